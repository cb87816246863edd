"""FineSteer's Triton kernels (``steer``: the fused operator; ``compile_check``: an sm_90 compile
without a GPU).

Their sources live in the checkout's top-level ``kernels/`` folder. A wheel carries copies of them
in this package (setup.py's ``build_py``); a source checkout, installed editable or merely on
``sys.path``, does not, so the folder is added to this package's search path here.

``kernels/`` itself has no ``__init__.py`` on purpose: a checkout's root is on ``sys.path`` whenever
Python runs from it (``python -m pytest``, a script there), and a regular package named ``kernels``
there would shadow the ``kernels`` distribution that transformers (≥ 5.25) imports.
"""
from pathlib import Path

_CHECKOUT_KERNELS = Path(__file__).resolve().parents[2] / "kernels"

if not (Path(__file__).parent / "steer.py").is_file() and (_CHECKOUT_KERNELS / "steer.py").is_file():
    __path__.append(str(_CHECKOUT_KERNELS))  # noqa: F821 - the package's own __path__
