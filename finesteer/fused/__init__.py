"""Fused implementations of the steering operator, one module per backend (cpu, triton, cuda).

Each module mirrors :mod:`finesteer.reference`'s entry points; :mod:`finesteer._backends`
selects among them, and :func:`finesteer.backends` lists them.
"""
