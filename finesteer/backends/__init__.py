"""Fused implementations of the steering operator (one module per backend).

Each module mirrors :mod:`finesteer.reference`'s entry points; :mod:`finesteer._backends`
selects among them.
"""

import sys as _sys
import types as _types


class _CallablePackage(_types.ModuleType):
    """Importing any backend module binds this package to ``finesteer.backends``, shadowing the
    public function :func:`finesteer.backends` of the same name. Calling the package therefore
    does what the function does, so ``finesteer.backends()`` works whatever was imported first."""

    def __call__(self):
        from .._backends import backends

        return backends()


_sys.modules[__name__].__class__ = _CallablePackage
