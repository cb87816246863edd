#!/usr/bin/env bash
# One prepared GPU check of FineSteer for a lent H200 (the `device` tool's `run`), ~8 minutes.
#
# What it does, each step under its own `timeout` and all inside one overall deadline
# (GPU_CHECK_BUDGET_S, default 470 s), carrying on after a failed step so one failure or hang
# does not cost the rest:
#   1. setup    environment report; `pip install -e . --no-deps --no-build-isolation --no-index`
#               (the H200 image already has torch+CUDA, triton, transformers, safetensors, tqdm,
#               numpy, pytest, hypothesis, pytest-benchmark; nothing can be downloaded there), which
#               also builds finesteer._C with the CPU and CUDA kernels for sm_90 only
#               (FINESTEER_CUDA_ARCHS=90, MAX_JOBS=16). Fallback if pip fails: build_ext --inplace and
#               PYTHONPATH=. (finesteer finds the Triton kernels in kernels/ by itself); then
#               finesteer.backends().
#   2. tests    the conformance suite tests/test_backends.py for every backend but Triton (custom
#               ops, torch.compile, CUDA-graph capture) plus tests/test_cuda.py, then
#               tests/test_hf.py -k "cuda or gpu"; last, the Triton part of the conformance suite
#               and tests/test_triton.py compiled on the GPU (the longest: every block configuration
#               compiles once).
#   3. bench    benchmarks/bench_steer.py --device cuda --dtype bfloat16 --flush-l2 (fused vs
#               reference vs floor, bandwidth bound), then benchmarks/bench_e2e.py on the GPU
#               (7B-shaped random Llama, bf16, 32 layers; decode-step overhead of steering).
# Output under $OUT (8 files at most, flat): summary.txt (one line per step: rc and seconds),
# setup.log, tests.log, triton.log, bench_steer.log, bench_e2e.log, bench-steer-gpu.json,
# e2e-gpu.json. The two JSONs are the result files to commit under benchmarks/results/.
#
# Usage (from a session whose task was drawn for a device; run from the repository root):
#   device run, command:  bash benchmarks/gpu_check.sh      timeout_s: 560
#   locally (no GPU), to check the script's plumbing with small shapes (~2 min on 2 cores):
#     OUT=/tmp/gc GPU_CHECK_ALLOW_CPU=1 GPU_CHECK_STEER_ARGS="--T 1 --d 256 --budget 0.3" \
#     GPU_CHECK_E2E_ARGS="--hidden 256 --layers 2 --intermediate 512 --heads 4 --kv-heads 4 --vocab 1000 --prompt 16 --budget 2" \
#     GPU_CHECK_TRITON_ARGS=--collect-only bash benchmarks/gpu_check.sh
#   (without a GPU the CUDA tests skip, the benchmarks run on the CPU; nothing is installed unless
#   GPU_CHECK_INSTALL=1)
# Then copy the fetched JSONs to benchmarks/results/ (e.g. nvidia-h200-bf16.json, e2e-nvidia-h200.json)
# and read summary.txt plus the tails of the logs.
set -uo pipefail
export PYTHONUNBUFFERED=1
export FINESTEER_CUDA_ARCHS=${FINESTEER_CUDA_ARCHS:-90}
export MAX_JOBS=${MAX_JOBS:-16}
export FINESTEER_BUILD_DIR=${FINESTEER_BUILD_DIR:-/tmp/finesteer-build}
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/finesteer-gpu-check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
DEADLINE=$((SECONDS + BUDGET))
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"

# step NAME LOG LIMIT_S CMD...: run CMD under timeout (capped by the time left), append to LOG.
step() {
    local name=$1 log=$2 limit=$3
    shift 3
    local left=$((DEADLINE - SECONDS))
    if ((left < 15)); then
        echo "$name: SKIPPED (overall budget spent)" | tee -a "$SUMMARY"
        return 0
    fi
    ((limit > left)) && limit=$left
    local t0=$SECONDS
    echo "===== $name (limit ${limit}s) =====" >>"$log"
    timeout --kill-after=10 "$limit" "$@" >>"$log" 2>&1
    local rc=$?
    local verdict=ok
    ((rc == 124 || rc == 137)) && verdict=TIMEOUT
    ((rc != 0 && rc != 124 && rc != 137)) && verdict=FAILED
    echo "$name: $verdict rc=$rc $((SECONDS - t0))s" | tee -a "$SUMMARY"
    tail -n 3 "$log"
    return 0
}

# ---------------------------------------------------------------------------------------- 1. setup
SETUP="$OUT/setup.log"
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv 2>&1 || true
    $PY -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())" 2>&1
    $PY -m pip list 2>/dev/null | grep -iE "^(torch|triton|transformers|safetensors|tqdm|numpy|pytest|hypothesis|ninja) " || true
    command -v nvcc && nvcc --version | tail -n 2
} >>"$SETUP" 2>&1

GPU=$($PY -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)
if [[ "$GPU" != 1 && "${GPU_CHECK_ALLOW_CPU:-0}" != 1 ]]; then
    echo "no CUDA device visible to $PY; set GPU_CHECK_ALLOW_CPU=1 to exercise the plumbing anyway" | tee -a "$SUMMARY"
    exit 1
fi

install_package() {
    # Editable install with the build run here (no isolation: use the image's torch), no downloads.
    $PY -m pip install --no-deps --no-build-isolation --no-index -e . && return 0
    echo "pip install -e failed; falling back to build_ext --inplace + PYTHONPATH"
    $PY setup.py build_ext --inplace || return 1
    return 0
}
if [[ "$GPU" == 1 || "${GPU_CHECK_INSTALL:-0}" == 1 ]]; then
    export -f install_package
    export PY
    step install "$SETUP" 300 bash -c install_package
    if ! (cd / && $PY -c "import finesteer") >/dev/null 2>&1; then
        export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
step backends "$SETUP" 120 $PY -c "
import json, finesteer, finesteer._ext as e
print(json.dumps(finesteer.backends(), indent=1)); print(e.status())"

# ---------------------------------------------------------------------------------------- 2. tests
PYTEST=($PY -m pytest -q -rs -p no:cacheprovider --durations=5)
step tests_backends "$OUT/tests.log" 150 "${PYTEST[@]}" tests/test_backends.py tests/test_cuda.py -k "not triton"
step tests_hf_gpu "$OUT/tests.log" 90 "${PYTEST[@]}" tests/test_hf.py -k "cuda or gpu"

# ---------------------------------------------------------------------------------------- 3. bench
DEV=cuda
[[ "$GPU" == 1 ]] || DEV=cpu
# Extra arguments (e.g. smaller shapes for a CPU plumbing check) through GPU_CHECK_{STEER,E2E}_ARGS.
# shellcheck disable=SC2086
step bench_steer "$OUT/bench_steer.log" 120 $PY benchmarks/bench_steer.py --device $DEV --dtype bfloat16 \
    --flush-l2 --budget 1.0 --out gpu-check-steer ${GPU_CHECK_STEER_ARGS:-}
# shellcheck disable=SC2086
step bench_e2e "$OUT/bench_e2e.log" 150 $PY benchmarks/bench_e2e.py --device $DEV --budget 15 --op-budget 2 \
    --out gpu-check-e2e ${GPU_CHECK_E2E_ARGS:-}
cp benchmarks/results/gpu-check-steer.json "$OUT/bench-steer-gpu.json" 2>/dev/null || true
cp benchmarks/results/gpu-check-e2e.json "$OUT/e2e-gpu.json" 2>/dev/null || true
rm -f benchmarks/results/gpu-check-steer.json benchmarks/results/gpu-check-e2e.json  # $OUT has them

# Last, with whatever time is left: the Triton backend compiled on the GPU (conformance + specific).
# shellcheck disable=SC2086
step tests_triton "$OUT/triton.log" 240 "${PYTEST[@]}" tests/test_backends.py tests/test_triton.py -k triton \
    ${GPU_CHECK_TRITON_ARGS:-}

echo "total $SECONDS s" | tee -a "$SUMMARY"
cat "$SUMMARY"
tail -n 25 "$OUT/bench_e2e.log" 2>/dev/null
