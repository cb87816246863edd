"""MoSE vs the mean vector over several held-out splits of the training pairs.

``finesteer eval`` reports held-out response-shift prediction on one split (20 % of the pair
file's prompts, seeded). With a few hundred prompts, which prompts land in that split moves the
cosine by more than the MoSE-vs-mean gap, so this re-splits the same pairs (by prompt: pairs that
share a prompt stay on one side) with other seeds, fits MoSE with its defaults on each fit part
and scores MoSE and the fit part's mean δ on each held-out part (δ averaged per held-out prompt,
as the run does). Training data only; no model is loaded.

Input: the pair cache a ``bench_quality.py`` run leaves, e.g.
``~/.cache/finesteer/bench_quality/overrefusal/train-pairs-plain-layer11.safetensors``::

    python benchmarks/quality/mose_splits.py --pairs-cache <that file> --splits 8 \\
        -o benchmarks/results/quality/mose_splits_overrefusal.json

``--variant NAME:OPTION=VALUE[,OPTION=VALUE...]`` (repeatable; options as ``finesteer eval
--mose-option``) also fits and scores MoSE with those options on every split, e.g.
``--variant ridge:init=ridge``.

``--fit-pairs-per-prompt K`` fits every field on at most the first K pairs of each training prompt
(held-out prompts keep all theirs): with a cache extracted with many pairs per prompt (e.g.
``--pairs-per-prompt 16`` on TruthfulQA), two runs, with K and without, tell how much the fits gain
from more responses per prompt, judged on the same, less noisy held-out δ.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch


def load_pairs(path: str) -> tuple:
    """(queries [N, d], deltas [N, d]) from a ``train-pairs`` extraction cache (one layer)."""
    from safetensors.torch import load_file

    t = load_file(path)
    q = [k for k in t if k.startswith("queries_")]
    if len(q) != 1:
        raise ValueError(f"{path}: expected one queries_<layer> tensor, found {sorted(t)}")
    layer = q[0].split("_", 1)[1]
    return t[f"queries_{layer}"], t[f"deltas_{layer}"]


def rank_within_prompt(prompt_of: torch.Tensor) -> torch.Tensor:
    """[N] long: for each row, how many earlier rows share its prompt (0 for a prompt's first pair)."""
    seen: dict = {}
    out = torch.empty_like(prompt_of)
    for i, p in enumerate(prompt_of.tolist()):
        out[i] = seen.get(p, 0)
        seen[p] = out[i].item() + 1
    return out


def held_out_rows(prompt_of: torch.Tensor, n_prompts: int, seed: int, holdout: float) -> torch.Tensor:
    """[N] bool: True for the rows whose prompt (``prompt_of`` [N], ids in ``range(n_prompts)``) is
    among the ``max(1, round(holdout·n_prompts))`` prompts held out by ``seed``."""
    perm = torch.randperm(n_prompts, generator=torch.Generator().manual_seed(seed))
    held_prompt = torch.zeros(n_prompts, dtype=torch.bool)
    held_prompt[perm[:max(1, int(round(holdout * n_prompts)))]] = True
    return held_prompt[prompt_of]


def one_split(q: torch.Tensor, d: torch.Tensor, prompt_of: torch.Tensor, n_prompts: int, seed: int,
              holdout: float, variants: dict = None, fit_pairs_per_prompt: int = None) -> dict:
    from finesteer.eval import metrics
    from finesteer.eval.baselines import mean_vector_mose
    from finesteer.fit import fit_mose
    from finesteer.fit.mose import merge_duplicate_queries

    held = held_out_rows(prompt_of, n_prompts, seed, holdout)
    q_held, d_held = merge_duplicate_queries(q[held].double(), d[held].double())
    fit = ~held
    if fit_pairs_per_prompt is not None:
        fit &= rank_within_prompt(prompt_of) < fit_pairs_per_prompt
    fields = {"mean_vector": mean_vector_mose(d[fit].double().mean(0).float()),
              "mose": fit_mose(q[fit], d[fit], seed=0, progress=False)}
    for name, options in (variants or {}).items():
        fields[name] = fit_mose(q[fit], d[fit], seed=0, progress=False, **options)
    out = {"seed": seed, "n_prompts_heldout": int(q_held.shape[0]), "n_fit_pairs": int(fit.sum())}
    for name, f in fields.items():
        scores = metrics.delta_prediction(f.vector(q_held.float()), d_held)
        out[name] = {k: round(float(v), 4) for k, v in scores.items()}
    return out


def parse_variant(text: str) -> tuple:
    """``NAME:OPTION=VALUE[,OPTION=VALUE...]`` → (NAME, {option: value}); values parsed as
    ``finesteer eval --mose-option`` parses them. A comma starts a new option only where
    ``OPTION=`` follows, so ``k_range=2,4`` stays one value."""
    import re

    from finesteer.fit.mose import option_from_text

    name, sep, spec = text.partition(":")
    if not sep or not name or name in ("mean_vector", "mose"):
        raise argparse.ArgumentTypeError(f"expected NAME:OPTION=VALUE[,...] with a new NAME, got {text!r}")
    try:
        return name, dict(option_from_text(item) for item in re.split(r",(?=\w+=)", spec))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--variant {name}: {exc}") from None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs-cache", required=True, help="train-pairs-*.safetensors of a bench_quality run")
    ap.add_argument("--splits", type=int, default=8)
    ap.add_argument("--holdout", type=float, default=0.2, help="fraction of prompts held out per split")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variant", type=parse_variant, action="append", default=[],
                    help="NAME:OPTION=VALUE[,...]: also score MoSE fitted with these options (repeatable)")
    ap.add_argument("--fit-pairs-per-prompt", type=int, default=None,
                    help="fit on at most the first K pairs of each training prompt (default: all)")
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args(argv)
    if a.fit_pairs_per_prompt is not None and a.fit_pairs_per_prompt < 1:
        ap.error(f"--fit-pairs-per-prompt must be >= 1, got {a.fit_pairs_per_prompt}")
    torch.set_num_threads(a.threads)
    q, d = load_pairs(a.pairs_cache)
    uniq, prompt_of = torch.unique(q, dim=0, return_inverse=True)
    variants = dict(a.variant)
    names = ("mean_vector", "mose", *variants)
    rows = [one_split(q, d, prompt_of, len(uniq), 1000 + s, a.holdout, variants, a.fit_pairs_per_prompt)
            for s in range(a.splits)]
    summary = {}
    for name in names:
        for metric in ("cosine", "mse"):
            vals = torch.tensor([r[name][metric] for r in rows], dtype=torch.float64)
            summary[f"{name}_{metric}_mean"] = round(float(vals.mean()), 4)
    for name in names[1:]:
        summary[f"{name}_cosine_higher"] = sum(r[name]["cosine"] > r["mean_vector"]["cosine"] for r in rows)
        summary[f"{name}_mse_lower"] = sum(r[name]["mse"] < r["mean_vector"]["mse"] for r in rows)
    for r in rows:
        print(f"seed {r['seed']}: held-out prompts {r['n_prompts_heldout']}: cosine "
              + ", ".join(f"{name} {r[name]['cosine']:.3f}" for name in names)
              + "; MSE " + ", ".join(f"{name} {r[name]['mse']:.4g}" for name in names))
    print(f"over {len(rows)} splits: {json.dumps(summary)}")
    if a.output:
        given = {} if a.fit_pairs_per_prompt is None else {"fit_pairs_per_prompt": a.fit_pairs_per_prompt}
        Path(a.output).write_text(json.dumps(dict(pairs_cache=Path(a.pairs_cache).name, holdout=a.holdout, **given,
                                                  variants={k: {o: str(v) for o, v in opts.items()}
                                                            for k, opts in variants.items()},
                                                  summary=summary, splits=rows), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
