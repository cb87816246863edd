"""Numerical constants shared by every backend, so that all of them compute the same function."""

#: ε in the SCS score s(h) = ‖Pᵀ(h − μ)‖² / (‖h − μ‖² + ε)  (DESIGN §2).
GATE_EPS = 1e-6

#: Integer codes of the gate modes as stored in a :class:`~finesteer.bank.SteeringBank`.
GATE_OFF, GATE_HARD, GATE_SOFT = 0, 1, 2
GATE_MODES = {"off": GATE_OFF, "hard": GATE_HARD, "soft": GATE_SOFT}

#: Version of the on-disk artifact format (DESIGN §6). Bump on any incompatible change.
FORMAT_VERSION = 1
