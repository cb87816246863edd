"""How hard MoSE pushes each TruthfulQA question along the mean direction, and what that does against CAA.

MoSE's vector s(q) for a question has a component along the mean training δ m — the direction
CAA adds — and a part orthogonal to it. Measured in units of CAA's own push (‖m‖)::

    push(q) = ⟨s(q), u⟩ / ‖m‖,   off(q) = ‖s(q) − ⟨s(q), u⟩ u‖ / ‖m‖,   u = m / ‖m‖

so at equal λ FineSteer pushes a question push(q) times as far as CAA along CAA's direction. For
each fold of the two-fold cross-fit this refits MoSE exactly as the run did (``bench_quality``'s
task config, the run's held-out split of the pairs, extraction cached under ``--cache-dir``),
reads push and off for every scored question, and splits the per-question MC2 difference
FineSteer − CAA of the committed runs at the median push, per λ: whether FineSteer's lead or lag
against CAA sits on the questions it pushes harder. Reads committed results only; the model is
loaded for the (cached) question states.

    nice python benchmarks/quality/truthfulqa_push.py --cache-dir <dir> \\
        --fold truthfulness benchmarks/results/quality/truthfulness/eval.json \\
            benchmarks/results/quality/truthfulness_16/eval.json \\
        --fold truthfulness_swapped benchmarks/results/quality/truthfulness_swapped/eval.json \\
            benchmarks/results/quality/truthfulness_swapped_16/eval.json \\
        -o benchmarks/results/quality/truthfulqa_push.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def push_along_mean(vectors: torch.Tensor, mean: torch.Tensor) -> tuple:
    """(push [N], off [N]) of ``vectors`` [N, d] against the mean δ ``mean`` [d], in units of ‖mean‖."""
    v, m = vectors.double(), mean.double()
    scale = m.norm()
    along = v @ (m / scale)
    off = (v - along[:, None] * (m / scale)).norm(dim=1)
    return along / scale, off / scale


def split_at_median(push: torch.Tensor, diff: torch.Tensor) -> dict:
    """Mean of ``diff`` [N] over all questions, over those with push above the median and the rest,
    and the correlation of the two."""
    above = push > push.median()
    d = diff.double()
    corr = torch.corrcoef(torch.stack([d, push.double()]))[0, 1]
    return {"all": float(d.mean()), "push_above_median": float(d[above].mean()),
            "push_at_or_below_median": float(d[~above].mean()), "corr": float(corr)}


def per_question(paths: list, method: str) -> dict:
    """{λ: per-question MC2 list} of ``method`` over the eval.json files ``paths`` (one fold)."""
    out = {}
    for path in paths:
        per = json.loads(Path(path).read_text())["truthfulqa"]["per_question"].get(method, {})
        out.update({float(lam): v["mc2"] for lam, v in per.items()})
    return out


def fold_report(task: str, cache_dir: str, runs: list, model, tok) -> dict:
    import bench_quality as bq
    from margin_transfer import mose_fit_rows

    from finesteer.eval.harness import _Inputs, _Run
    from finesteer.fit import fit_mose

    cfg = bq.task_config(task, str(Path(cache_dir) / bq.TASK_CACHE.get(task, task)))
    run, inputs = _Run(model, tok, cfg), _Inputs(cfg)
    _, q, d = mose_fit_rows(model, tok, run, inputs)
    mose = fit_mose(q, d, **{"seed": cfg.seed, **cfg.mose_options, "progress": False})
    states = run._states([x.question for x in inputs.truthfulqa], "eval-truthfulqa")
    push, off = push_along_mean(mose.vector(states.float()), d.double().mean(0))
    fs, caa = per_question(runs, "finesteer"), per_question(runs, "caa")
    if any(len(v) != push.numel() for v in fs.values()):
        raise ValueError(f"{task}: the runs scored {sorted({len(v) for v in fs.values()})} questions, the split "
                         f"has {push.numel()}")
    q_ = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    return {"n": push.numel(), "push_quantiles_10_50_90": push.quantile(q_).tolist(),
            "push_mean": float(push.mean()), "off_mean": float(off.mean()),
            "mc2_finesteer_minus_caa": {str(lam): split_at_median(push, torch.tensor(fs[lam]) - torch.tensor(caa[lam]))
                                        for lam in sorted(set(fs) & set(caa))}}


def main(argv=None) -> int:
    import bench_quality as bq

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", required=True, help="bench_quality's --cache-dir (one folder per task below it)")
    ap.add_argument("--fold", nargs="+", action="append", required=True, metavar=("TASK", "EVAL_JSON"),
                    help="a task (truthfulness or truthfulness_swapped) and its runs' eval.json files")
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args(argv)
    if not bq.DATA.is_dir():
        print(f"truthfulqa_push: skipped: the shared data folder {bq.DATA} is absent")
        return 0
    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model, tok = bq.load_study_model(a.model)
    doc = {"folds": {}}
    for task, *runs in a.fold:
        if not runs:
            ap.error(f"--fold {task}: give the fold's eval.json files")
        rep = fold_report(task, a.cache_dir, runs, model, tok)
        doc["folds"][task] = {"runs": runs, **rep}
        qs = rep["push_quantiles_10_50_90"]
        print(f"{task}: push along the mean (× CAA's) 10/50/90 % {qs[0]:.2f} / {qs[1]:.2f} / {qs[2]:.2f}, "
              f"off-direction {rep['off_mean']:.2f}")
        for lam, r in rep["mc2_finesteer_minus_caa"].items():
            print(f"  λ = {float(lam):g}: MC2 FineSteer − CAA {r['all']:+.4f}; push above median "
                  f"{r['push_above_median']:+.4f}, at or below {r['push_at_or_below_median']:+.4f}; "
                  f"corr {r['corr']:+.3f}")
    doc["seconds"] = time.perf_counter() - t0
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
