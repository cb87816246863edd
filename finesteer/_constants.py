"""Constants shared by every backend, so that all of them compute the same function.

The C++/CUDA side reads the gate-mode codes from ``csrc/gate_mode.h``; the conformance suite
checks that the two agree.
"""
import torch

#: ε in the SCS score s(h) = ‖Pᵀ(h − μ)‖² / (‖h − μ‖² + ε)  (DESIGN §2).
GATE_EPS = 1e-6

#: Integer codes of the gate modes as stored in a :class:`~finesteer.bank.SteeringBank`.
GATE_OFF, GATE_HARD, GATE_SOFT = 0, 1, 2
GATE_MODES = {"off": GATE_OFF, "hard": GATE_HARD, "soft": GATE_SOFT}

#: Float dtypes the operator accepts for hidden states and for the packed weight matrices.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

#: Integer dtypes accepted for a bank index or a slot.
INDEX_DTYPES = (torch.int32, torch.int64)

#: Version of the on-disk artifact format (DESIGN §6). Bump on any incompatible change.
FORMAT_VERSION = 1
