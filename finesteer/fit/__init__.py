"""Fitting: turn activations into the inference-form gate and MoSE (DESIGN §2, §3).

- :func:`fit_scs` → :class:`finesteer.gate.SCSGate` (subspace, centre, calibrated threshold);
  :func:`recalibrate_scs` chooses the threshold of a fitted gate again, on new prompts and budget
- :func:`fit_mose` → :class:`finesteer.mose.MoSE` (experts, residual basis, trained router, exported),
  configured by one :class:`MoSEOptions`

Both run offline on the CPU, are seeded, and raise ``ValueError`` naming the bad argument.
"""
from .mose import MoSEOptions, append_null_rows, choose_null_rows, fit_mose, fit_mose_network
from .network import MoSENetwork
from .scs import calibration_split, fit_scs, recalibrate_scs

__all__ = ["MoSENetwork", "MoSEOptions", "append_null_rows", "calibration_split", "choose_null_rows", "fit_mose",
           "fit_mose_network", "fit_scs", "recalibrate_scs"]
