"""Time the fit (SCS + MoSE) on 1,000 examples at d = 4096 with default parameters (DESIGN §7: ≤ 60 s
on 2 CPU cores, with a progress bar).

The activations are synthetic but structured like real ones: a shared offset, a low-rank
"background" every row carries, a few target directions for the gate, and δ drawn around six
behaviour modes whose queries share a mode-specific component. Run:

    python benchmarks/bench_fit.py [--n 1000] [--d 4096] [--seed 0] [--threads T] [--no-progress]

``--threads`` calls ``torch.set_num_threads`` in this process only (default: torch's choice).
On a CPU shared with other busy processes, 2 OpenMP threads can be several times slower than 1
(every small op waits for a descheduled worker), so compare both when the machine is loaded.

Prints one line per stage and a JSON summary line (stage seconds, threads, chosen K, epochs).
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def synthetic(n: int, d: int, seed: int, modes: int = 6, background_rank: int = 32):
    g = torch.Generator().manual_seed(seed)
    offset = 4.0 * torch.randn(d, generator=g)
    basis = torch.linalg.qr(torch.randn(d, background_rank + 8, generator=g))[0]
    bg, tgt = basis[:, :background_rank], basis[:, background_rank:]

    def rows(m, target: bool):
        x = offset + 3.0 * torch.randn(m, background_rank, generator=g) @ bg.T + torch.randn(m, d, generator=g)
        if target:
            x += 6.0 * torch.randn(m, tgt.shape[1], generator=g) @ tgt.T
        return x

    target, benign = rows(n, True), rows(n, False)
    mode = torch.randint(modes, (n,), generator=g)
    centers = 2.0 * torch.randn(modes, d, generator=g)
    keys = 5.0 * torch.randn(modes, d, generator=g)
    queries = rows(n, False) + keys[mode]
    deltas = centers[mode] + 0.5 * torch.randn(n, d, generator=g)
    return target, benign, queries, deltas


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--d", type=int, default=4096)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from finesteer.fit import fit_mose, fit_scs

    target, benign, queries, deltas = synthetic(args.n, args.d, args.seed)
    t0 = time.perf_counter()
    gate = fit_scs(target, benign)
    t1 = time.perf_counter()
    mose = fit_mose(queries, deltas, progress=not args.no_progress)
    t2 = time.perf_counter()
    print(f"fit_scs : {t1 - t0:6.2f} s   {gate.report}")
    fs = mose.fit_stats
    print(f"fit_mose: {t2 - t1:6.2f} s   K={fs['num_experts']} best epoch {fs['best_epoch']}/{fs['epochs_run']} "
          f"val MSE {fs['val_loss']:.4g} (mean-δ baseline {fs['val_loss_mean_delta']:.4g})")
    print(f"total   : {t2 - t0:6.2f} s   (n={args.n}, d={args.d}, torch threads={torch.get_num_threads()}; "
          "target <= 60 s on 2 cores)")
    print(json.dumps({"bench": "fit", "n": args.n, "d": args.d, "threads": torch.get_num_threads(),
                      "scs_s": round(t1 - t0, 3), "mose_s": round(t2 - t1, 3), "total_s": round(t2 - t0, 3),
                      "K": fs["num_experts"], "epochs_run": fs["epochs_run"], "best_epoch": fs["best_epoch"]}))


if __name__ == "__main__":
    main()
