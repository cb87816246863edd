"""TruthfulQA on every question: pool the two folds of a two-fold cross-fit.

The one TruthfulQA file is split in half by question; ``bench_quality.py --task truthfulness`` fits
on one half and scores the other, ``--task truthfulness_swapped`` (``finesteer eval --swap-split``)
the other way round. Each question is then scored exactly once, by steerers that were never fitted
on it. This script checks that the two ``eval.json`` files are the two folds of one split (same
file, seed and fraction; one swapped; disjoint questions), pools every configuration's per-question
MC1 hits and MC2 values, and repeats the paired comparison of ``finesteer eval`` (against the
unsteered model and against CAA at the same λ: questions only one side gets right with the exact
sign-test p, and the MC2 difference ± its standard error) on the pooled questions; FineSteer is
also compared with SCS + mean vector, the ablation that differs only in MoSE.

    python benchmarks/quality/truthfulqa_crossfit.py \\
        benchmarks/results/quality/truthfulness/eval.json \\
        benchmarks/results/quality/truthfulness_swapped/eval.json \\
        -o benchmarks/results/quality/truthfulqa_crossfit.json

Writes the JSON and, beside it, a Markdown table (same name, ``.md``). Pooling two folds pools two
fitted steerers per method: what is measured is the fitting procedure, not one steerer.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from finesteer.eval import metrics
from finesteer.eval.report import truthfulqa_paired_markdown


#: Besides the unsteered model, what each steered configuration is compared with at the same λ:
#: CAA (the issue's baseline; :data:`DEFAULT_AGAINST`), and for FineSteer also SCS + mean vector —
#: the same gate with the mean vector instead of MoSE, so that pair isolates what MoSE's
#: query-specific vectors add.
DEFAULT_AGAINST = ("caa",)
ALSO_AGAINST = {"finesteer": ("caa", "scs_mean")}


def _fold_split(doc: dict, where: str) -> dict:
    """The split of the TruthfulQA file in one run's ``eval.json`` (``swapped`` False when absent:
    runs before --swap-split existed)."""
    path = doc.get("config", {}).get("truthfulqa")
    tqa = doc.get("truthfulqa")
    if not path or not tqa or "per_question" not in tqa:
        raise ValueError(f"{where}: no TruthfulQA per-question results (a finesteer eval run with --truthfulqa)")
    split = doc.get("splits", {}).get(path)
    if split is None:
        raise ValueError(f"{where}: the TruthfulQA file {path} was not split for fitting (not a cross-fit fold)")
    return {**split, "file": path, "swapped": bool(split.get("swapped", False))}


def check_folds(a: dict, b: dict) -> None:
    """Raises ValueError unless ``a`` and ``b`` are the two folds of one split with the same configurations."""
    sa, sb = _fold_split(a, "first file"), _fold_split(b, "second file")
    for key in ("file", "records", "seed", "fit_fraction"):
        if sa[key] != sb[key]:
            raise ValueError(f"the two runs split different things: {key} {sa[key]!r} vs {sb[key]!r}")
    if sa["swapped"] == sb["swapped"]:
        raise ValueError(f"both runs have swapped={sa['swapped']}: give one run with --swap-split and one without")
    na, nb = a["truthfulqa"]["n"], b["truthfulqa"]["n"]
    if na > sa["scored"] or nb > sb["scored"]:
        raise ValueError(f"more questions scored ({na}, {nb}) than the splits hold ({sa['scored']}, {sb['scored']})")
    if sa["fit"] != sb["scored"] or sb["fit"] != sa["scored"]:
        raise ValueError(f"the parts do not mirror each other: fit/scored {sa['fit']}/{sa['scored']} vs "
                         f"{sb['fit']}/{sb['scored']}")
    qa, qb = a["truthfulqa"]["per_question"], b["truthfulqa"]["per_question"]
    configs_a = {(m, lam) for m, per in qa.items() for lam in per}
    configs_b = {(m, lam) for m, per in qb.items() for lam in per}
    if configs_a != configs_b:
        raise ValueError(f"the runs scored different configurations: only in the first {sorted(configs_a - configs_b)}, "
                         f"only in the second {sorted(configs_b - configs_a)}")


def pool(a: dict, b: dict) -> dict:
    """Pooled MC1/MC2 of every configuration over both folds' questions, and the paired comparisons
    against the unsteered model and :data:`ALSO_AGAINST` / :data:`DEFAULT_AGAINST` at the same λ
    (:func:`finesteer.eval.metrics.paired_against`)."""
    check_folds(a, b)
    qa, qb = a["truthfulqa"]["per_question"], b["truthfulqa"]["per_question"]
    pooled = {m: {lam: {"mc1": list(qa[m][lam]["mc1"]) + list(qb[m][lam]["mc1"]),
                        "mc2": list(qa[m][lam]["mc2"]) + list(qb[m][lam]["mc2"])} for lam in per}
              for m, per in qa.items()}
    n = len(next(iter(pooled["unsteered"].values()))["mc1"])
    out = {"n": n, "folds": [a["truthfulqa"]["n"], b["truthfulqa"]["n"]], "results": {}}
    for m, per in pooled.items():
        for lam, v in per.items():
            out["results"].setdefault(m, {})[lam] = {"mc1": sum(v["mc1"]) / n, "mc2": sum(v["mc2"]) / n,
                                                     "fold_mc1": [a["truthfulqa"]["results"][m][lam]["mc1"],
                                                                  b["truthfulqa"]["results"][m][lam]["mc1"]],
                                                     "fold_mc2": [a["truthfulqa"]["results"][m][lam]["mc2"],
                                                                  b["truthfulqa"]["results"][m][lam]["mc2"]]}
    out["paired"] = metrics.paired_against(pooled, {m: ALSO_AGAINST.get(m, DEFAULT_AGAINST) for m in pooled})
    return out


def markdown(out: dict) -> str:
    n, (na, nb) = out["n"], out["folds"]
    lines = [f"# TruthfulQA, two-fold cross-fit: {n} questions ({na} + {nb}), each scored by steerers not fitted on it",
             "", "| method | λ | MC1 | MC2 | MC1 per fold | MC2 per fold |", "|---|---|---|---|---|---|"]
    for m, per in out["results"].items():
        for lam, r in per.items():
            lines.append(f"| {m} | {float(lam):g} | {r['mc1']:.3f} | {r['mc2']:.3f} | "
                         f"{r['fold_mc1'][0]:.3f} / {r['fold_mc1'][1]:.3f} | {r['fold_mc2'][0]:.3f} / {r['fold_mc2'][1]:.3f} |")
    return "\n".join(lines + truthfulqa_paired_markdown(out)) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("fold_a", help="eval.json of one fold (e.g. the truthfulness task)")
    p.add_argument("fold_b", help="eval.json of the other fold (e.g. truthfulness_swapped)")
    p.add_argument("-o", "--out", required=True, help="output JSON (a .md table is written beside it)")
    a = p.parse_args(argv)
    docs = [json.loads(Path(f).read_text()) for f in (a.fold_a, a.fold_b)]
    try:
        out = pool(*docs)
    except ValueError as e:
        print(f"truthfulqa_crossfit: {e}", file=sys.stderr)
        return 2
    out["inputs"] = [a.fold_a, a.fold_b]
    path = Path(a.out)
    path.write_text(json.dumps(out, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(out))
    print(markdown(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
