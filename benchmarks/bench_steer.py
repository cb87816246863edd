"""Benchmark of the fused steering operator (token mode) against its floor and the reference.

Providers, timed interleaved in one process (benchmarks/utils.py):
    reference  finesteer.reference.steer_tokens (eager PyTorch, ~20 ops)
    floor      ``h @ A`` + ``coef @ B`` with torch's BLAS on the same packed weights: the work any
               fused op must do at decode shapes (read A and B once), DESIGN §7
    cpu        the fused C++ operator (CPU) on a pre-packed bank
    triton     the fused Triton kernels (GPU) on a pre-packed bank
    cuda       the fused CUDA kernels (GPU) on a pre-packed bank
    <name>_api the public call ``finesteer.steer(h, steerer, backend=<name>)`` (the README's
               Quickstart; the same as ``steerer.apply``): argument checks, the packed bank the
               steerer caches, the backend look-up and the op. ``<name>_api/<name>`` is its overhead.
Shapes: T ∈ {1, 4, 8, 64} (decode) and 2048 (prefill) × d ∈ {2048, 4096}; H = 256, r = 16, K = 8,
m = 10, one steerer with a soft gate (every row takes the full path).

Scenarios (``--scenario``, CPU serving shares its cores):
    quiet      nothing else started by the benchmark
    busy       a "busy neighbour": a background process spinning on one core (started before the
               scenario's timings and stopped after them; ``--neighbour-cpu N`` pins it to core N)
Each row records the scenario and the load average before and after it; other jobs on a shared
machine count too, so note the load average and repeat.

On GPU it also reports the bytes the fused op must move (weights once, h in, out) and the time
those bytes take at the measured copy bandwidth (``bound_us``), DESIGN §7's second target.

Usage:
    python benchmarks/bench_steer.py                       # CPU, fp32 (DESIGN §7 CPU target)
    python benchmarks/bench_steer.py --scenario quiet busy --T 1 4 8 --d 2048 4096
    python benchmarks/bench_steer.py --device cuda --dtype bfloat16 --flush-l2
    python benchmarks/bench_steer.py --T 1 4 --d 2048 --budget 3
    python benchmarks/bench_steer.py --stat min        # on a busy shared machine
Writes benchmarks/results/<machine>.json (``--out`` to change, ``--no-write`` to skip).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from utils import environment, format_table, machine_descriptor, measure_bandwidth, time_interleaved, write_results  # noqa: E402

import finesteer  # noqa: E402
from finesteer import MoSE, SCSGate, Steerer, reference  # noqa: E402
from finesteer._backends import _load  # noqa: E402
from finesteer.bank import SteeringBank  # noqa: E402

FUSED = ("cpu", "triton", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def random_steerer(d: int, r: int = 16, K: int = 8, H: int = 256, m: int = 10, seed: int = 0) -> Steerer:
    """A steerer with well-scaled random weights and a soft gate (every row takes the full path)."""
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s, scale=1.0: torch.randn(*s, generator=g) * scale  # noqa: E731
    P, _ = torch.linalg.qr(rn(d, r))
    gate = SCSGate(P=P, mu=rn(d, scale=0.1), threshold=r / d)
    mose = MoSE(R=rn(d, K, scale=d ** -0.5), c=rn(K, scale=0.1), V=rn(K, d), U=rn(d, m, scale=d ** -0.5),
                W1=rn(H, d, scale=d ** -0.5), b1=rn(H, scale=0.1), W2=rn(m, H, scale=H ** -0.5), b2=rn(m, scale=0.1))
    return Steerer(gate=gate, mose=mose, gate_mode="soft", temperature=0.05)


def random_bank(d: int, r: int = 16, K: int = 8, H: int = 256, m: int = 10, device="cpu",
                weight_dtype=torch.float32, seed: int = 0) -> SteeringBank:
    """:func:`random_steerer` packed as a one-steerer bank."""
    return random_steerer(d, r=r, K=K, H=H, m=m, seed=seed).bank(device=device, weight_dtype=weight_dtype)


#: The busy neighbour: a pure-Python spin loop (one core at 100 %, no memory traffic to speak of).
_SPIN = "import os, sys\nif len(sys.argv) > 1: os.sched_setaffinity(0, {int(sys.argv[1])})\nwhile True: pass\n"


@contextmanager
def scenario(name: str, neighbour_cpu=None):
    """Run the block in scenario ``name``; yields a dict that gets the load averages around it."""
    info = {"scenario": name, "load_before": os.getloadavg()[0]}
    proc = None
    if name == "busy":
        cmd = [sys.executable, "-c", _SPIN] + ([str(neighbour_cpu)] if neighbour_cpu is not None else [])
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
        time.sleep(0.5)  # let it start spinning before the first timing
        print(f"# scenario busy: neighbour pid {proc.pid} spinning"
              f"{'' if neighbour_cpu is None else f' on core {neighbour_cpu}'}", flush=True)
    elif name != "quiet":
        raise ValueError(f"unknown scenario {name!r} (quiet | busy)")
    try:
        yield info
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=10)
        info["load_after"] = os.getloadavg()[0]


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
    for scen in args.scenario:
        with scenario(scen, args.neighbour_cpu) as info:
            rows += run_shapes(args, device, dtype, fused, bw, info)
        for r in rows:
            if r["scenario"] == scen:
                r["load_after"] = info["load_after"]
        print(f"# scenario {scen}: load average {info['load_before']:.2f} before, {info['load_after']:.2f} after",
              flush=True)
    return {"env": env, "bandwidth_Bps": bw, "config": vars(args), "rows": rows}


def run_shapes(args, device, dtype, fused, bw, info) -> list:
    rows = []
    for d in args.d:
        steerer = random_steerer(d)
        # The steerer's own cached bank: the op and the public call then read the same weights
        # (separate copies would give the provider timed second a colder cache).
        bank = steerer.packed_bank(device=device, weight_dtype=dtype)
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
                if not args.no_api:
                    # The public call packs with fp32 weights (its default): `bank` itself for fp32.
                    fns[f"{name}_api"] = (lambda name=name: finesteer.steer(h, steerer, backend=name))
            if args.skip_reference_above and T > args.skip_reference_above:
                fns.pop("reference")
            res = time_interleaved(fns, device, budget_s=args.budget, flush_l2=args.flush_l2)
            nbytes = bytes_moved(bank, T, dtype)
            row = {"scenario": info["scenario"], "load_before": info["load_before"], "d": d, "T": T,
                   "dtype": args.dtype, "bytes": nbytes}
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
                if f"{name}_api_us" in row:
                    row[f"{name}_api_over_op"] = row[f"{name}_api_us"] / t
                    row[f"{name}_api_over_floor"] = row[f"{name}_api_us"] / row["floor_us"]
                if "reference_us" in row:
                    row[f"reference_over_{name}"] = row["reference_us"] / t
                    if f"{name}_api_us" in row:
                        row[f"reference_over_{name}_api"] = row["reference_us"] / row[f"{name}_api_us"]
                row[f"{name}_GBps"] = nbytes / (t * 1e-6) / 1e9
                if bw:
                    row["bound_us"] = nbytes / bw * 1e6
                    row[f"{name}_over_bound"] = t / row["bound_us"]
            rows.append(row)
            print(format_table([row], table_columns(fused, bool(bw), not args.no_api)).splitlines()[-1], flush=True)
    return rows


def table_columns(fused, with_bound: bool, with_api: bool = True):
    cols = [("scenario", "scenario", "{}"), ("d", "d", "{}"), ("T", "T", "{}"),
            ("reference_us", "ref µs", "{:.1f}"), ("floor_us", "floor µs", "{:.1f}")]
    for name in fused:
        cols += [(f"{name}_us", f"{name} µs", "{:.1f}"), (f"{name}_over_floor", f"{name}/floor", "{:.2f}"),
                 (f"reference_over_{name}", f"ref/{name}", "{:.2f}")]
        if with_api:
            cols += [(f"{name}_api_us", f"{name}_api µs", "{:.1f}"),
                     (f"{name}_api_over_op", f"{name}_api/{name}", "{:.2f}"),
                     (f"reference_over_{name}_api", f"ref/{name}_api", "{:.2f}")]
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
    p.add_argument("--scenario", nargs="+", choices=("quiet", "busy"), default=["quiet"],
                   help="quiet: nothing else started; busy: a background process spins on one core meanwhile")
    p.add_argument("--neighbour-cpu", type=int, default=None, help="busy scenario: pin the neighbour to this core")
    p.add_argument("--no-api", action="store_true", help="skip the public-call providers (<backend>_api)")
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
    print(format_table(payload["rows"], table_columns(fused, bool(payload["bandwidth_Bps"]), not args.no_api)))
    if not args.no_write:
        path = write_results(payload, args.out or machine_descriptor(torch.device(args.device)))
        print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
