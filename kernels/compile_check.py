"""Compile the Triton kernels for an NVIDIA GPU without one: a CI check that the kernels
type-check, lower and assemble (PTX → cubin with Triton's bundled ptxas) in the configurations the
launchers pick, which the interpreter alone cannot show (it accepts, e.g., ``tl.dot`` shapes
below the hardware minimum).

Usage::

    python -m finesteer._triton.compile_check [--arch 90]   # TRITON_INTERPRET must be unset

Prints one line per variant: name, registers and stack bytes per thread (when Triton's bundled
``cuobjdump`` is present), compile seconds. Exits non-zero if any variant fails.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from finesteer._constants import GATE_HARD, GATE_OFF

from . import steer as k

_TY = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}


def _steer_variant(io: str, w: str, write_vectors: bool, has_index: bool, split: int, T: int, r: int, K: int,
                   H: int, m: int):
    cfg = k._default_config(T, H)
    block_r, block_k, block_m = k._np2(r), k._np2(K), k._np2(m)
    consts = dict(HAS_INDEX=has_index, WRITE_VECTORS=write_vectors, SPLIT=split,
                  BLOCK_T=cfg["BLOCK_T"], BLOCK_D=cfg["BLOCK_D"], BLOCK_DO=cfg["BLOCK_DO"], BLOCK_R=block_r,
                  BLOCK_K=block_k, BLOCK_H=cfg["BLOCK_H"], BLOCK_HE=cfg["BLOCK_HE"], BLOCK_M=block_m,
                  WS_PRE=block_r + block_k + 1, GATE_OFF=GATE_OFF, GATE_HARD=GATE_HARD)
    ptrs = {"h_ptr": _TY[io], "out_ptr": "*fp32" if write_vectors else _TY[io], "index_ptr": "*i64",
            "counter_ptr": "*i32", "A_ptr": _TY[w], "B_ptr": _TY[w], "W2_ptr": _TY[w], "mode_ptr": "*i32"}
    fn = k._steer_fwd_kernel
    sig = {a: "constexpr" if a in consts else (ptrs.get(a, "*fp32") if a.endswith("_ptr")
                                               else "fp32" if a == "eps" else "i32")
           for a in fn.arg_names}
    name = (f"steer[{'vectors' if write_vectors else 'tokens'} io={io} w={w} index={has_index} split={split} "
            f"T={T} r={r} K={K} H={H} m={m}]")
    return name, fn, sig, consts, dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])


def variants():
    """(name, kernel, signature, constexprs, compile options) for the configurations worth compiling."""
    yield _steer_variant("bf16", "bf16", False, True, 32, 1, 16, 10, 256, 10)    # decode T=1, split-d
    yield _steer_variant("fp32", "bf16", False, True, 16, 3, 16, 10, 256, 10)    # decode T=3, split-d
    yield _steer_variant("fp32", "fp32", True, False, 1, 513, 4, 3, 16, 2)       # prefill vectors
    yield _steer_variant("fp16", "fp32", False, True, 1, 64, 5, 7, 300, 3)       # H > BLOCK_H
    fn = k._add_vectors_kernel
    block_t, block_d = k._add_vectors_blocks(64, 4096)
    consts = dict(HAS_SLOT=True, BLOCK_T=block_t, BLOCK_D=block_d)
    sig = {a: "constexpr" if a in consts else ("*bf16" if a in ("h_ptr", "out_ptr") else "*fp32" if a == "vec_ptr"
                                               else "*i32" if a == "slot_ptr" else "i32") for a in fn.arg_names}
    yield "add_vectors[bf16 slot]", fn, sig, consts, dict(num_warps=4)


def _resource_usage(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        tool = shutil.which("cuobjdump")
    if not tool:
        return "resource usage: cuobjdump not found"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True)
    for line in res.stdout.splitlines():
        if "REG:" in line:
            fields = dict(tok.split(":", 1) for tok in line.split() if ":" in tok)
            return f"registers={fields.get('REG')} stack={fields.get('STACK')}B"
    return "resource usage: unavailable"


def compile_all(arch: int = 90) -> list[tuple[str, object]]:
    """Compile every variant for ``sm_<arch>``; returns ``(name, compiled kernel)`` pairs."""
    if k.INTERPRETED:
        raise RuntimeError("compile_check: TRITON_INTERPRET=1 is set; unset it (the kernels were decorated "
                           "for the interpreter and cannot be compiled)")
    out = []
    for name, fn, sig, consts, options in variants():
        t0 = time.perf_counter()
        ck = triton.compile(ASTSource(fn, sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                            options=options)
        print(f"{name}: ok, {_resource_usage(ck.asm['cubin'])}, {time.perf_counter() - t0:.1f} s", flush=True)
        out.append((name, ck))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability ×10 (default 90: H100/H200)")
    args = ap.parse_args(argv)
    compile_all(args.arch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
