"""Fused implementations of the steering operator, each backend's Python side in one module.

- :mod:`~finesteer.fused.native`: the ``cpu`` and ``cuda`` backends (one compiled library from
  ``csrc/``, two devices), with the fakes of their ops;
- :mod:`~finesteer.fused.triton`: the ``triton`` backend (kernels in ``kernels/``, installed as
  ``finesteer._triton``), with its op registration;
- :mod:`~finesteer.fused.op_schema`: the one op schema both libraries share, and the fakes.

Each backend mirrors :mod:`finesteer.reference`'s entry points and contract;
:mod:`finesteer._backends` selects among them, and :func:`finesteer.backends` lists them.
"""
