"""Fused implementations of the steering operator (one module per backend).

Each module mirrors :mod:`finesteer.reference`'s entry points; :mod:`finesteer._backends`
selects among them.
"""
