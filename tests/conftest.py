"""Test-session set-up shared by every test module.

Triton decides between compiling and interpreting when its kernels are decorated, so on a
machine without CUDA ``TRITON_INTERPRET=1`` must be set before anything imports
``finesteer._triton``. Setting it here, before any test module is collected, makes the Triton
tests run on the CPU through the interpreter with the plain ``python -m pytest`` command.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
