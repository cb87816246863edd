"""How much one MoSE fit depends on its seed and on rounding-level changes of its input.

On one held-out split of a ``bench_quality`` pair cache (by prompt, as ``mose_splits.py``), MoSE
is fitted with ``--seeds`` seeds, and once more with seed 0 on queries and δ multiplied by
(1 + 1e-6·ε), ε standard normal: a change far below what fp32 extraction in another batch
makes. For each fit option set (the defaults, and each ``--variant``) it reports:

- the held-out cosine and MSE against each held-out prompt's δ, mean and spread over seeds;
- the epochs the fits chose (``best_epoch``);
- **seed spread**: over held-out prompts, the mean of Σ_s ‖v_s − v̄‖² / Σ_s ‖v_s‖², v_s a seed's
  vector and v̄ the mean over seeds: the share of the vectors' energy that changes with the seed,
  0 when every seed gives the same vector, near 1 when they cancel out;
- **perturbation change**: the mean over held-out prompts of ‖v' − v₀‖ / ‖v₀‖, v' the vector of
  the perturbed fit and v₀ seed 0's.

``--trace-epochs E1,E2,…`` says where a perturbation change comes from: for each option set and
each E it also fits seed 0 on the plain and on the perturbed input with ``epochs=E`` and no early
stop (the best validation epoch among the E is kept, as always; with ``stopping=cv``, E caps the
cross-validated choice) and reports the change beside the clusters both fits chose. A change that
needs no other clusters and grows with E is the training amplifying the perturbation (e.g. too
large a learning rate); one present from E = 1 with other cluster sizes is K-means ending in
another local optimum.

    python benchmarks/quality/fit_stability.py --pairs-cache <cache>/train-pairs-plain-layer11.safetensors \\
        --variant cv:stopping=cv [--trace-epochs 1,5,10,20] -o fit_stability.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mose_splits import held_out_rows, load_pairs, parse_variant  # noqa: E402

#: relative size of the input perturbation (fp32 rounding is ≈ 6e-8; re-batched extraction ≈ 1e-6)
PERTURBATION = 1e-6


def split_by_prompt(q: torch.Tensor, holdout: float, seed: int) -> torch.Tensor:
    """[N] bool, True for rows whose prompt (identical query) is held out; the choice of
    ``mose_splits.py`` for the same ``seed``."""
    uniq, prompt_of = torch.unique(q, dim=0, return_inverse=True)
    return held_out_rows(prompt_of, len(uniq), seed, holdout)


def perturbed(q: torch.Tensor, d: torch.Tensor) -> tuple:
    """(q, d) with every element multiplied by (1 + PERTURBATION·ε), ε standard normal from one fixed
    seed, so every perturbed fit of a run sees the same input."""
    g = torch.Generator().manual_seed(7)
    return tuple(x * (1 + PERTURBATION * torch.randn(x.shape, generator=g, dtype=x.dtype)) for x in (q, d))


def relative_change(v: torch.Tensor, v0: torch.Tensor) -> float:
    """Mean over rows of ‖v − v₀‖ / ‖v₀‖ (``v``, ``v0`` [P, d])."""
    return float(((v - v0).norm(dim=-1) / v0.norm(dim=-1).clamp_min(1e-30)).mean())


def epoch_trace(q: torch.Tensor, d: torch.Tensor, held: torch.Tensor, options: dict, epochs: list) -> list:
    """For each E in ``epochs``: seed 0 fitted with ``epochs=E`` and no early stop on the
    plain and on the perturbed input → ``{"epochs", "change", "cluster_sizes", "cluster_sizes_perturbed",
    "best_epoch", "best_epoch_perturbed"}`` (see the module docstring)."""
    from finesteer.fit import fit_mose
    from finesteer.fit.mose import merge_duplicate_queries

    q_held, _ = merge_duplicate_queries(q[held].double(), d[held].double())
    q_fit, d_fit = q[~held], d[~held]
    q_pert, d_pert = perturbed(q_fit, d_fit)
    rows = []
    for e in epochs:
        fixed = {**options, "epochs": e, "patience": e + 1}
        plain = fit_mose(q_fit, d_fit, seed=0, progress=False, **fixed)
        moved = fit_mose(q_pert, d_pert, seed=0, progress=False, **fixed)
        rows.append({"epochs": e,
                     "change": round(relative_change(moved.vector(q_held.float()).double(),
                                                     plain.vector(q_held.float()).double()), 6),
                     "cluster_sizes": plain.fit_stats["cluster_sizes"],
                     "cluster_sizes_perturbed": moved.fit_stats["cluster_sizes"],
                     "best_epoch": int(plain.fit_stats["best_epoch"]),
                     "best_epoch_perturbed": int(moved.fit_stats["best_epoch"])})
    return rows


def stability(q: torch.Tensor, d: torch.Tensor, held: torch.Tensor, options: dict, seeds: int) -> dict:
    """The report for one option set (see the module docstring)."""
    from finesteer.eval import metrics
    from finesteer.fit import fit_mose
    from finesteer.fit.mose import merge_duplicate_queries

    q_held, d_held = merge_duplicate_queries(q[held].double(), d[held].double())
    q_fit, d_fit = q[~held], d[~held]
    vectors, scores, epochs = [], [], []
    for seed in range(seeds):
        mose = fit_mose(q_fit, d_fit, seed=seed, progress=False, **options)
        v = mose.vector(q_held.float()).double()
        vectors.append(v)
        scores.append(metrics.delta_prediction(v.float(), d_held))
        epochs.append(int(mose.fit_stats["best_epoch"]))
    moved = fit_mose(*perturbed(q_fit, d_fit), seed=0, progress=False, **options)
    v_pert = moved.vector(q_held.float()).double()
    V = torch.stack(vectors)                                            # [S, P, d]
    centre = V.mean(0)
    spread = ((V - centre).square().sum((0, 2)) / V.square().sum((0, 2)).clamp_min(1e-30)).mean()
    change = relative_change(v_pert, vectors[0])
    cos = [float(s["cosine"]) for s in scores]
    mse = [float(s["mse"]) for s in scores]
    return {"cosine_mean": round(statistics.fmean(cos), 4), "cosine_sd": round(statistics.pstdev(cos), 4),
            "mse_mean": round(statistics.fmean(mse), 1), "mse_sd": round(statistics.pstdev(mse), 1),
            "best_epochs": epochs, "best_epoch_perturbed": int(moved.fit_stats["best_epoch"]),
            "seed_spread": round(float(spread), 5), "perturbation_change": round(float(change), 5)}


def _epoch_list(text: str) -> list:
    """``"1,5,10"`` → [1, 5, 10]; each a positive integer."""
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated epoch counts, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"epoch counts must be >= 1, got {text!r}")
    return values


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs-cache", required=True, help="train-pairs-*.safetensors of a bench_quality run")
    ap.add_argument("--seeds", type=int, default=5, help="fits per option set (seeds 0 … N-1)")
    ap.add_argument("--split-seed", type=int, default=1000, help="which mose_splits.py split to hold out")
    ap.add_argument("--holdout", type=float, default=0.2, help="fraction of prompts held out")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variant", type=parse_variant, action="append", default=[],
                    help="NAME:OPTION=VALUE[,...]: also measure MoSE fitted with these options (repeatable)")
    ap.add_argument("--trace-epochs", type=_epoch_list, default=[],
                    help="E1,E2,...: also report the perturbation change of fits with epochs=E and no early stop")
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args(argv)
    if a.seeds < 2:
        ap.error(f"--seeds must be >= 2 (a spread needs two fits), got {a.seeds}")
    torch.set_num_threads(a.threads)
    q, d = load_pairs(a.pairs_cache)
    held = split_by_prompt(q, a.holdout, a.split_seed)
    option_sets = {"mose": {}, **dict(a.variant)}
    report = {}
    for name, options in option_sets.items():
        report[name] = r = stability(q, d, held, options, a.seeds)
        print(f"{name}: held-out cosine {r['cosine_mean']:.3f} ± {r['cosine_sd']:.3f}, MSE {r['mse_mean']:.4g} ± "
              f"{r['mse_sd']:.3g}; best epochs {r['best_epochs']} (perturbed input: {r['best_epoch_perturbed']}); "
              f"seed spread {r['seed_spread']:.4f}; perturbation change {r['perturbation_change']:.4f}")
        if a.trace_epochs:
            r["epoch_trace"] = epoch_trace(q, d, held, options, a.trace_epochs)
            print("  perturbation change with epochs=E, no early stop: " + ", ".join(
                f"E={t['epochs']}: {t['change']:.2e}" + ("" if t["cluster_sizes"] == t["cluster_sizes_perturbed"]
                                                         else " (other clusters)") for t in r["epoch_trace"]))
    if a.output:
        Path(a.output).write_text(json.dumps(dict(
            pairs_cache=Path(a.pairs_cache).name, split_seed=a.split_seed, holdout=a.holdout, seeds=a.seeds,
            perturbation=PERTURBATION,
            variants={k: {o: str(v) for o, v in opts.items()} for k, opts in option_sets.items() if opts},
            results=report), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
