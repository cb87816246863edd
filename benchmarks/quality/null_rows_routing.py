"""How much of its push MoSE keeps on the prompts the safety gate opens, with and without null rows.

Null rows (``finesteer eval --null-rows N``) are benign training prompts that MoSE is fitted to
leave alone (δ = 0). This study fits MoSE exactly as the safety task does (its training prompts,
pairs, layer, gate and MoSE settings, from ``bench_quality.task_args``), once on the pairs alone and
once per null-row variant and seed, and reads on the *development* rows (the first --n-dev prompts
of ``harmful_val``, ``benign_val`` and ``borderline_val``; the reported runs score the second half)
the push along the mean refusal direction u = mean δ / ‖mean δ‖ of every prompt the gate opens:

- ``kept``: the mean over a set's opened prompts of push(null rows) / push(pairs only), and
  ``kept > 1/2``: the share of them that keep more than half of it;
- ``borderline / harmful``: the set-mean push on ``borderline_val`` over that on ``harmful_val``
  (opened prompts push, closed ones count 0). The committed safety gate with the plain mean
  vector has about the ratio of its open rates.

It explains the margins of the development run with ``--null-rows 300`` (docs/quality.md): the
vector shrinks on opened borderline prompts, and on most opened harmful ones as well, so the
harmful shift saturates early. Variants: ``random`` (a seeded choice over all of the gate's benign
prompts, what ``--null-rows`` does) and ``top`` (the benign prompts the gate scores highest).

Run (one torch thread; states cached under --cache-dir, the safety run's cache is reused)::

    nice python benchmarks/quality/null_rows_routing.py --cache-dir ~/.cache/finesteer/bench_quality/safety \\
        -o benchmarks/results/quality/null_rows_routing.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

DEV_SETS = ("harmful_val", "benign_val", "borderline_val")


def safety_config(cache_dir: str):
    """The safety task's :class:`EvalConfig` (bench_quality's arguments, parsed by ``finesteer eval``)."""
    import bench_quality as bq

    return bq.task_config("safety", cache_dir)


def push_report(gate, u: torch.Tensor, dev: dict, vector, base) -> dict:
    """Per development set: prompts opened, mean kept push, share keeping more than half (see the docstring)."""
    out = {}
    for name, H in dev.items():
        opened = gate.score(H) > gate.threshold
        p, p0 = vector(H[opened]) @ u, base(H[opened]) @ u
        kept = p / p0
        any_open = bool(opened.any())  # none opened: nothing kept or lost (None, not NaN)
        out[name] = {"n": int(H.shape[0]), "opened": int(opened.sum()),
                     "kept": float(kept.mean()) if any_open else None,
                     "kept_over_half": float((kept > 0.5).float().mean()) if any_open else None,
                     "set_push": float(p.sum() / H.shape[0])}
    out["borderline_over_harmful"] = out["borderline_val"]["set_push"] / out["harmful_val"]["set_push"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model dir / .gguf (default: the gemma-3-270m GGUF)")
    p.add_argument("--cache-dir", required=True, help="extraction cache (the safety run's is reused)")
    p.add_argument("--n-dev", type=int, default=145, help="development rows per validation file (default: 145)")
    p.add_argument("--null-rows", type=int, nargs="+", default=[150, 300])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("-o", "--output", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    import bench_quality as bq

    if not bq.DATA.is_dir():
        print(f"null_rows_routing: skipped: the shared data folder {bq.DATA} is absent")
        return 0
    from finesteer import extract
    from finesteer.eval.data import load_train_prompts
    from finesteer.eval.harness import _Inputs, _Run
    from finesteer.fit import append_null_rows, choose_null_rows, fit_mose, fit_scs

    t0 = time.perf_counter()
    cfg = safety_config(a.cache_dir)
    model, tok = bq.load_study_model(a.model)
    run, inputs = _Run(model, tok, cfg), _Inputs(cfg)
    h_t, h_b = run._states(inputs.target, "train-target"), run._states(inputs.benign, "train-benign")
    q, d = extract.response_deltas(model, tok, *inputs.pairs, [cfg.layer], positions=cfg.delta_positions,
                                   cache_file=run._cache_file("train-pairs"), progress=False,
                                   prompt_format=run.enc.fmt)
    q, d = q[cfg.layer], d[cfg.layer]
    dev = {name: run._states(load_train_prompts(str(bq.DATA / "safety" / f"{name}.jsonl"))[:a.n_dev], f"dev-{name}")
           for name in DEV_SETS}
    gate = fit_scs(h_t, h_b, rank=cfg.rank, method=cfg.scs_method, max_benign_fpr=cfg.max_benign_fpr,
                   calib_fraction=cfg.calib_fraction, seed=cfg.seed)
    opts = dict(cfg.mose_options, progress=False)
    u = d.mean(0) / d.mean(0).norm()
    rows = []
    for seed in a.seeds:
        base = fit_mose(q, d, **{**opts, "seed": seed}).vector
        mean_only = push_report(gate, u, dev, lambda H: d.mean(0).expand(H.shape[0], -1), base)
        rows.append({"variant": "pairs only (mean vector vs MoSE)", "seed": seed, **mean_only})
        for n, variant in itertools.product(a.null_rows, ("random", "top")):
            pick = (choose_null_rows(h_b.shape[0], n, seed) if variant == "random"
                    else gate.score(h_b).argsort(descending=True)[:n])
            mose = fit_mose(*append_null_rows(q, d, h_b[pick]), **{**opts, "seed": seed})
            rows.append({"variant": f"{variant} {n}", "seed": seed, **push_report(gate, u, dev, mose.vector, base)})
            r = rows[-1]
            print(f"seed {seed} {variant:6s} {n:4d}: kept harmful {r['harmful_val']['kept']:.2f} "
                  f"(>1/2: {r['harmful_val']['kept_over_half']:.0%}), borderline {r['borderline_val']['kept']:.2f}; "
                  f"borderline/harmful {r['borderline_over_harmful']:.3f}", flush=True)
    doc = {"n_dev": a.n_dev, "layer": cfg.layer, "gate": cfg.scs_method, "mose_options": {k: v for k, v in opts.items()
                                                                                          if k != "progress"},
           "rows": rows, "seconds": time.perf_counter() - t0}
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(doc, indent=1, default=str) + "\n")
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
