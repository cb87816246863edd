"""What only the ``cuda`` backend has: grid-stride loops for more rows than a grid dimension holds.
Everything it shares with the other backends (agreement with the reference, exactness, the index
contract, opcheck, CUDA-graph capture, bad input) is in ``tests/test_backends.py``.

Skipped cleanly without a CUDA device or without the built extension (the skip reason says
which). On a GPU machine: ``python -m pytest tests/test_backends.py tests/test_cuda.py -q`` (the
first call builds the extension from csrc/ unless ``pip install -e . --no-build-isolation``
already did).
"""
from __future__ import annotations

import pytest
import torch

import finesteer as fs

from .utils import check_against_reference, make_bank, random_h

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda():
    listing = fs.backends()["cuda"]
    if not listing.startswith("available"):
        pytest.skip(f"cuda backend {listing}")
    from finesteer.fused.native import CUDA

    return CUDA


def test_more_rows_than_a_grid_dimension(cuda):
    """T > 65535 exercises the grid-stride loops over rows and row tiles."""
    dev = torch.device("cuda")
    bank = make_bank(32, [dict(r=3, K=5, H=11, m=3, gate_mode="soft")], device=dev)
    h = random_h(70_000, 32, torch.bfloat16, device=dev)
    check_against_reference(cuda, h, bank, None, "T=70000")
