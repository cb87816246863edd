"""Benchmark of the fused steering operator (token mode) against its floor and the reference.

Providers, timed interleaved in one process (benchmarks/utils.py):
    reference  finesteer.reference.steer_tokens (eager PyTorch, ~20 ops)
    floor      ``h @ A`` + ``coef @ B`` with torch's BLAS on the same packed weights: the work any
               fused op must do at decode shapes (read A and B once), DESIGN §7
    cpu        the fused C++ operator (CPU)
    triton     the fused Triton kernels (GPU)
    cuda       the fused CUDA kernels (GPU)
Shapes: T ∈ {1, 4, 8, 64} (decode) and 2048 (prefill) × d ∈ {2048, 4096}; H = 256, r = 16, K = 8,
m = 10, one steerer with a soft gate (every row takes the full path).

On GPU it also reports the bytes the fused op must move (weights once, h in, out) and the time
those bytes take at the measured copy bandwidth (``bound_us``), DESIGN §7's second target.

Usage:
    python benchmarks/bench_steer.py                       # CPU, fp32 (DESIGN §7 CPU target)
    python benchmarks/bench_steer.py --device cuda --dtype bfloat16 --flush-l2
    python benchmarks/bench_steer.py --T 1 4 --d 2048 --budget 3
    python benchmarks/bench_steer.py --stat min        # on a busy shared machine
Writes benchmarks/results/<machine>.json (``--out`` to change, ``--no-write`` to skip).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils import environment, format_table, machine_descriptor, measure_bandwidth, time_interleaved, write_results  # noqa: E402

from finesteer import reference  # noqa: E402
from finesteer._backends import _load  # noqa: E402
from finesteer.bank import SteeringBank  # noqa: E402

FUSED = ("cpu", "triton", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def random_bank(d: int, r: int = 16, K: int = 8, H: int = 256, m: int = 10, device="cpu",
                weight_dtype=torch.float32, seed: int = 0) -> SteeringBank:
    """A one-steerer bank with well-scaled random weights and a soft gate."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    P, _ = torch.linalg.qr(rn(d, r))
    mu = rn(1, d, scale=0.1)
    A = torch.cat([P, rn(d, K, scale=d ** -0.5), rn(d, H, scale=d ** -0.5)], dim=1)[None]
    B = torch.cat([rn(K, d), rn(m, d, scale=d ** -0.5)], dim=0)[None]
    f32 = dict(dtype=torch.float32)
    bank = SteeringBank(
        A=A.contiguous(), B=B.contiguous(), W2=rn(1, m, H, scale=H ** -0.5), mu=mu,
        c=rn(1, K, scale=0.1), b1=rn(1, H, scale=0.1), b2=rn(1, m, scale=0.1),
        gate_mode=torch.tensor([2], dtype=torch.int32),
        threshold=torch.tensor([r / d], **f32), temperature=torch.tensor([0.05], **f32),
        strength=torch.tensor([1.0], **f32), r=r, K=K, H=H, m=m)
    return bank.to(device=device, weight_dtype=weight_dtype)


def fused_providers(device: torch.device) -> dict:
    out = {}
    for name in FUSED:
        mod, reason = _load(name)
        if mod is not None and mod.supports(device):
            out[name] = mod
        else:
            print(f"# provider {name}: skipped ({reason if mod is None else 'does not support ' + str(device)})")
    return out


def bytes_moved(bank: SteeringBank, T: int, io_dtype: torch.dtype) -> int:
    """Minimum traffic of one fused call: the weights once, h in, the output out."""
    w = sum(bank.tensors()[k].numel() * bank.tensors()[k].element_size() for k in ("A", "B", "W2"))
    io = 2 * T * bank.hidden_size * torch.tensor([], dtype=io_dtype).element_size()
    return w + io


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    fused = fused_providers(device)
    env = environment(device)
    bw = measure_bandwidth(device) if device.type == "cuda" else None
    if bw:
        print(f"# measured copy bandwidth: {bw / 1e9:.0f} GB/s")
    rows = []
    for d in args.d:
        bank = random_bank(d, device=device, weight_dtype=dtype)
        A, B = bank.A[0], bank.B[0]
        for T in args.T:
            g = torch.Generator(device="cpu").manual_seed(T)
            h = torch.randn(T, d, generator=g).to(device=device, dtype=dtype)
            coef = torch.randn(T, bank.K + bank.m, generator=g).to(device=device, dtype=dtype)
            fns = {
                "reference": lambda: reference.steer_tokens(h, bank, None),
                "floor": lambda: (h @ A, coef @ B),
            }
            for name, mod in fused.items():
                fns[name] = (lambda mod=mod: mod.steer_tokens(h, bank, None))
            if args.skip_reference_above and T > args.skip_reference_above:
                fns.pop("reference")
            res = time_interleaved(fns, device, budget_s=args.budget, flush_l2=args.flush_l2)
            nbytes = bytes_moved(bank, T, dtype)
            row = {"d": d, "T": T, "dtype": args.dtype, "bytes": nbytes}
            for name, r in res.items():
                row[f"{name}_us"] = r[f"{args.stat}_us"]
                row[f"{name}_median_us"] = r["median_us"]
                row[f"{name}_min_us"] = r["min_us"]
                row[f"{name}_p20_us"] = r["p20_us"]
                row[f"{name}_p80_us"] = r["p80_us"]
                row[f"{name}_reps"] = r["reps"]
            for name in fused:
                t = row.get(f"{name}_us")
                row[f"{name}_over_floor"] = t / row["floor_us"]
                if "reference_us" in row:
                    row[f"reference_over_{name}"] = row["reference_us"] / t
                row[f"{name}_GBps"] = nbytes / (t * 1e-6) / 1e9
                if bw:
                    row["bound_us"] = nbytes / bw * 1e6
                    row[f"{name}_over_bound"] = t / row["bound_us"]
            rows.append(row)
            print(format_table([row], table_columns(fused, bool(bw))).splitlines()[-1], flush=True)
    return {"env": env, "bandwidth_Bps": bw, "config": vars(args), "rows": rows}


def table_columns(fused, with_bound: bool):
    cols = [("d", "d", "{}"), ("T", "T", "{}"), ("reference_us", "ref µs", "{:.1f}"), ("floor_us", "floor µs", "{:.1f}")]
    for name in fused:
        cols += [(f"{name}_us", f"{name} µs", "{:.1f}"), (f"{name}_over_floor", f"{name}/floor", "{:.2f}"),
                 (f"reference_over_{name}", f"ref/{name}", "{:.2f}")]
        if with_bound:
            cols += [(f"{name}_GBps", f"{name} GB/s", "{:.0f}"), (f"{name}_over_bound", f"{name}/bound", "{:.2f}")]
    if with_bound:
        cols.append(("bound_us", "bound µs", "{:.2f}"))
    return cols


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="I/O and weight dtype (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--T", type=int, nargs="+", default=[1, 4, 8, 64, 2048])
    p.add_argument("--d", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timing per shape (all providers)")
    p.add_argument("--flush-l2", action="store_true", help="CUDA: evict L2 before every sample")
    p.add_argument("--skip-reference-above", type=int, default=0, help="skip the reference for T above this")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="statistic of the table and ratios (min: robust on a busy shared machine)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the run (CPU)")
    p.add_argument("--out", default=None, help="result name (default: the machine descriptor)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    payload = run(args)
    fused = [n for n in FUSED if any(f"{n}_us" in r for r in payload["rows"])]
    print()
    print(f"{payload['env']['machine']}  dtype={args.dtype}  threads={payload['env']['threads']}  "
          f"torch={payload['env']['torch']}  statistic={args.stat}")
    print(format_table(payload["rows"], table_columns(fused, bool(payload["bandwidth_Bps"]))))
    if not args.no_write:
        path = write_results(payload, args.out or machine_descriptor(torch.device(args.device)))
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
