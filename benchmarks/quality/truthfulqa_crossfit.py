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

``--extend A B`` adds, to each fold, a run of the same fold at further strengths (same split, same
questions, the same unsteered scores — so the same model and fit); the pooled table then covers
every λ of both. With benign KL recorded (every run's ``rows``), the output also has the trade-off:
for each CAA λ, the weakest FineSteer λ whose pooled MC1 *and* MC2 are at least CAA's, and whether
its benign KL (mean of the two folds) is lower there.

    python benchmarks/quality/truthfulqa_crossfit.py <fold a>/eval.json <fold b>/eval.json \
        --extend <fold a, λ 12, 16>/eval.json <fold b, λ 12, 16>/eval.json -o truthfulqa_crossfit_16.json

``--extend`` may be given more than once. ``--variant NAME A B`` adds each fold's run of FineSteer
fitted another way (e.g. ``--mose-option shrink=cv``; same split, questions and unsteered scores) as
a method of its own, NAME: its ``finesteer`` configurations are renamed NAME (the run's other
steered methods are left out), compared at each λ with CAA, SCS + mean vector and FineSteer, and
given a trade-off table of its own. ``--extend-variant NAME A B`` adds runs of that variant at further
strengths as ``--extend`` does, their ``finesteer`` configurations joining NAME and their other
methods (e.g. CAA at the same new strengths) added as they are.

``--tradeoff-methods scs_mean,...`` gives further steered methods the same trade-off against CAA.

``--plot PNG`` draws pooled MC1 and MC2 against benign KL (log scale, labels λ), one line per
method: CAA, FineSteer and each variant, or the ``--plot-methods`` given.

    python benchmarks/quality/truthfulqa_crossfit.py <fold a>/eval.json <fold b>/eval.json \
        --variant fs_qc <fold a, variant>/eval.json <fold b, variant>/eval.json \
        --extend-variant fs_qc <fold a, variant, λ 24, 32>/eval.json <fold b, …>/eval.json \
        -o curve.json --plot curve.png --plot-methods caa,fs_qc
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

from finesteer.eval import metrics
from finesteer.eval.report import plot_truthfulqa_tradeoff, truthfulqa_paired_markdown, truthfulqa_tradeoff_points


#: Besides the unsteered model, what each steered configuration is compared with at the same λ:
#: CAA (the issue's baseline; :data:`DEFAULT_AGAINST`), and for FineSteer also SCS + mean vector —
#: the same gate with the mean vector instead of MoSE, so that pair isolates what MoSE's
#: query-specific vectors add.
DEFAULT_AGAINST = ("caa",)
ALSO_AGAINST = {"finesteer": ("caa", "scs_mean")}
#: What a variant of FineSteer (``--variant``) is compared with: also FineSteer as committed.
VARIANT_AGAINST = ("caa", "scs_mean", "finesteer")
#: How far two runs' unsteered MC2 of one question may differ and still count as the same scores
#: (:func:`extend`): float rounding of other batch compositions, not a different model or input.
MC2_TOLERANCE = 1e-4


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


def renamed(doc: dict, name: str) -> dict:
    """``doc`` (one fold's run) with its ``finesteer`` results renamed ``name`` — in the TruthfulQA
    results and the benign ``rows`` — and everything else as it is."""
    if name in ("unsteered", "finesteer"):
        raise ValueError(f"a variant needs a name of its own, not {name!r}")
    if "finesteer" not in doc["truthfulqa"]["per_question"]:
        raise ValueError(f"variant {name}: the run has no finesteer results to rename")
    out = copy.deepcopy(doc)
    for key in ("per_question", "results"):
        out["truthfulqa"][key] = {(name if m == "finesteer" else m): v for m, v in out["truthfulqa"][key].items()}
    out["rows"] = [{**r, "method": name} if r["method"] == "finesteer" else r for r in out.get("rows", [])]
    return out


def as_variant(doc: dict, name: str) -> dict:
    """``doc`` (one fold's run) with only its unsteered and ``finesteer`` results, the latter renamed
    ``name`` (:func:`renamed`), so :func:`extend` adds them to the fold as a method of their own."""
    out = renamed(doc, name)
    keep = ("unsteered", name)
    for key in ("per_question", "results"):
        out["truthfulqa"][key] = {m: v for m, v in out["truthfulqa"][key].items() if m in keep}
    out["rows"] = [r for r in out["rows"] if r["method"] in keep]
    return out


def extend(doc: dict, more: dict, where: str) -> dict:
    """``doc`` with the TruthfulQA configurations and benign rows of ``more`` (a run of the same fold
    at other strengths) added. Raises ValueError unless both split the same file the same way and
    score the same questions with the same unsteered MC1/MC2 (the same model and inputs), or when
    they share a steered configuration."""
    s1, s2 = _fold_split(doc, where), _fold_split(more, f"{where} (extension)")
    if s1 != s2:
        raise ValueError(f"{where}: the extension run splits the TruthfulQA file differently ({s1} vs {s2})")
    q1, q2 = doc["truthfulqa"]["per_question"], more["truthfulqa"]["per_question"]
    u1, u2 = next(iter(q1["unsteered"].values())), next(iter(q2["unsteered"].values()))
    # MC1 hits must agree exactly; MC2 up to float rounding (other batches: a few 1e-6 seen)
    if u1["mc1"] != u2["mc1"] or len(u1["mc2"]) != len(u2["mc2"]) or \
            any(abs(x - y) > MC2_TOLERANCE for x, y in zip(u1["mc2"], u2["mc2"])):
        raise ValueError(f"{where}: the extension run's unsteered per-question scores differ: not the same "
                         "questions, model or prompt format")
    shared = sorted((m, lam) for m, per in q2.items() if m != "unsteered" for lam in per if lam in q1.get(m, {}))
    if shared:
        raise ValueError(f"{where}: the extension run repeats configurations {shared}; give it only new strengths")
    out = copy.deepcopy(doc)
    for key in ("per_question", "results"):
        for m, per in more["truthfulqa"][key].items():
            if m != "unsteered":
                out["truthfulqa"][key].setdefault(m, {}).update(per)
    out["rows"] = list(doc.get("rows", [])) + [r for r in more.get("rows", []) if r["method"] != "unsteered"]
    return out


def benign_kl(a: dict, b: dict, method: str, lam) -> float | None:
    """The benign KL of ``method`` at λ = ``lam``: the mean of the two folds' ``rows`` (each fold
    measures it on its own benign prompts); None unless both folds recorded it."""
    vals = [r["benign_kl"] for d in (a, b) for r in d.get("rows", [])
            if r["method"] == method and float(r["strength"]) == float(lam)]
    return sum(vals) / 2 if len(vals) == 2 else None


def curve(out: dict, a: dict, b: dict, method: str) -> list:
    """``method``'s pooled MC1 and MC2 beside its benign KL (:func:`benign_kl`) at every λ where
    both folds recorded the KL, ordered by λ: the points of :func:`plot`."""
    results = {method: out["results"].get(method, {})}
    return truthfulqa_tradeoff_points(results, lambda m, lam: benign_kl(a, b, m, lam)).get(method, [])


def plot(out: dict, curves: dict, path: Path) -> bool:
    """MC1 and MC2 against benign KL (``curves``: :func:`plot_curves`), the unsteered model as a line
    (:func:`finesteer.eval.report.plot_truthfulqa_tradeoff`)."""
    unsteered = next(iter(out["results"]["unsteered"].values()))
    title = (f"TruthfulQA, two-fold cross-fit ({out['n']} questions) vs benign KL (labels: λ); "
             "up and to the left is better")
    return plot_truthfulqa_tradeoff(curves, unsteered, path, title)


def plot_curves(out: dict, docs: list, text: str | None, variants: list) -> dict:
    """``{method: curve}`` (:func:`curve`) of the methods ``--plot`` draws: ``text`` (comma-separated)
    or, by default, CAA, FineSteer and each variant that the pooled results hold. Raises ValueError
    for a method the results lack, or when none of them has benign KL recorded in both folds
    (checked before anything is written)."""
    if text:
        methods = [m for m in text.split(",") if m]
        missing = [m for m in methods if m not in out["results"]]
        if missing or not methods:
            raise ValueError(f"--plot-methods {text!r}: {', '.join(missing) or 'no method'} not in the pooled results "
                             f"({', '.join(m for m in out['results'] if m != 'unsteered')})")
    else:
        methods = [m for m in ("caa", "finesteer", *variants) if m in out["results"]]
    curves = {m: curve(out, *docs, m) for m in methods}
    if not any(curves.values()):
        raise ValueError(f"--plot: none of {', '.join(methods) or 'the methods'} has benign KL recorded in both folds")
    return curves


def tradeoff(out: dict, a: dict, b: dict, method: str = "finesteer", baseline: str = "caa") -> list:
    """For each λ of ``baseline`` in the pooled results ``out``: the weakest λ of ``method`` with pooled
    MC1 ≥ and MC2 ≥ the baseline's, and whether its benign KL (the mean of the two folds' ``rows``,
    ``a`` and ``b``) is lower there; ``None`` entries when no strength of ``method`` gets there."""
    def kl(m, lam):
        value = benign_kl(a, b, m, lam)
        if value is None:
            raise ValueError(f"tradeoff: benign KL of {m} at λ = {lam} is not recorded in both folds")
        return value

    res = out["results"]
    mine = sorted(res[method], key=float)
    entries = []
    for lam in sorted(res[baseline], key=float):
        base = res[baseline][lam]
        match = next((x for x in mine if res[method][x]["mc1"] >= base["mc1"] and res[method][x]["mc2"] >= base["mc2"]),
                     None)
        e = {"baseline_strength": float(lam), "baseline_mc1": base["mc1"], "baseline_mc2": base["mc2"],
             "baseline_benign_kl": kl(baseline, lam), "strength": None, "mc1": None, "mc2": None,
             "benign_kl": None, "kl_lower": None}
        if match is not None:
            e.update(strength=float(match), mc1=res[method][match]["mc1"], mc2=res[method][match]["mc2"],
                     benign_kl=kl(method, match))
            e["kl_lower"] = e["benign_kl"] < e["baseline_benign_kl"]
        entries.append(e)
    return entries


def pool(a: dict, b: dict, variants=()) -> dict:
    """Pooled MC1/MC2 of every configuration over both folds' questions, and the paired comparisons
    against the unsteered model and :data:`ALSO_AGAINST` / :data:`DEFAULT_AGAINST` at the same λ
    (:func:`finesteer.eval.metrics.paired_against`); each method named in ``variants`` (FineSteer
    fitted another way, :func:`as_variant`) against CAA, SCS + mean and FineSteer."""
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
    against = {m: ALSO_AGAINST.get(m, DEFAULT_AGAINST) for m in pooled}
    against.update({v: VARIANT_AGAINST for v in variants})
    out["paired"] = metrics.paired_against(pooled, against)
    return out


def markdown(out: dict) -> str:
    n, (na, nb) = out["n"], out["folds"]
    lines = [f"# TruthfulQA, two-fold cross-fit: {n} questions ({na} + {nb}), each scored by steerers not fitted on it",
             "", "| method | λ | MC1 | MC2 | MC1 per fold | MC2 per fold |", "|---|---|---|---|---|---|"]
    for m, per in out["results"].items():
        for lam, r in per.items():
            lines.append(f"| {m} | {float(lam):g} | {r['mc1']:.3f} | {r['mc2']:.3f} | "
                         f"{r['fold_mc1'][0]:.3f} / {r['fold_mc1'][1]:.3f} | {r['fold_mc2'][0]:.3f} / {r['fold_mc2'][1]:.3f} |")
    for method, entries in _tradeoffs(out):
        lines += ["", f"Trade-off: for each CAA λ, the weakest {method} λ with pooled MC1 and MC2 at least CAA's, "
                  "and its benign KL (mean of the folds):", "",
                  f"| CAA λ | CAA MC1 / MC2 / KL | {method} λ | {method} MC1 / MC2 / KL | KL lower |",
                  "|---|---|---|---|---|"]
        for e in entries:
            mine = ("— | never" if e["strength"] is None else
                    f"{e['strength']:g} | {e['mc1']:.3f} / {e['mc2']:.3f} / {e['benign_kl']:.3f}")
            lower = "" if e["kl_lower"] is None else ("yes" if e["kl_lower"] else "no")
            lines.append(f"| {e['baseline_strength']:g} | {e['baseline_mc1']:.3f} / {e['baseline_mc2']:.3f} / "
                         f"{e['baseline_benign_kl']:.3f} | {mine} | {lower} |")
    return "\n".join(lines + truthfulqa_paired_markdown(out)) + "\n"


def _tradeoffs(out: dict) -> list:
    """[(method, trade-off entries)]: FineSteer's (``tradeoff``), then each further method's
    (``tradeoff_methods``, ``--tradeoff-methods``), then each variant's (``tradeoff_variants``)."""
    found = [("FineSteer", out["tradeoff"])] if out.get("tradeoff") else []
    return found + list((out.get("tradeoff_methods") or {}).items()) + list((out.get("tradeoff_variants") or {}).items())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("fold_a", help="eval.json of one fold (e.g. the truthfulness task)")
    p.add_argument("fold_b", help="eval.json of the other fold (e.g. truthfulness_swapped)")
    p.add_argument("--extend", nargs=2, metavar=("MORE_A", "MORE_B"), action="append", default=[],
                   help="eval.json of each fold run again at further strengths, added to that fold (repeatable)")
    p.add_argument("--variant", nargs=3, metavar=("NAME", "RUN_A", "RUN_B"), action="append", default=[],
                   help="eval.json of each fold with FineSteer fitted another way, added as method NAME (repeatable)")
    p.add_argument("--extend-variant", nargs=3, metavar=("NAME", "MORE_A", "MORE_B"), action="append", default=[],
                   help="eval.json of each fold run again at further strengths with FineSteer fitted as variant NAME "
                        "(given by --variant): its finesteer configurations join NAME, its other methods are added as "
                        "by --extend (repeatable)")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="also draw pooled MC1 and MC2 against benign KL, one line per method (--plot-methods)")
    p.add_argument("--plot-methods", default=None, metavar="M1,M2,...",
                   help="methods for --plot (default: caa, finesteer and each --variant)")
    p.add_argument("--tradeoff-methods", default="", metavar="M1,M2,...",
                   help="further steered methods given the trade-off against CAA, as FineSteer is (e.g. scs_mean)")
    p.add_argument("-o", "--out", required=True, help="output JSON (a .md table is written beside it)")
    a = p.parse_args(argv)
    variants = list(dict.fromkeys(v for v, *_ in a.variant))
    unknown = sorted({v for v, *_ in a.extend_variant} - set(variants))
    if unknown:
        p.error(f"--extend-variant {', '.join(unknown)}: not a --variant of this run")
    docs = [json.loads(Path(f).read_text()) for f in (a.fold_a, a.fold_b)]
    try:
        for more in a.extend:
            docs = [extend(d, json.loads(Path(f).read_text()), name)
                    for d, f, name in zip(docs, more, ("first file", "second file"))]
        for variant, *runs in a.variant:
            docs = [extend(d, as_variant(json.loads(Path(f).read_text()), variant), f"{name} (variant {variant})")
                    for d, f, name in zip(docs, runs, ("first file", "second file"))]
        for variant, *runs in a.extend_variant:
            docs = [extend(d, renamed(json.loads(Path(f).read_text()), variant), f"{name} (variant {variant}, extension)")
                    for d, f, name in zip(docs, runs, ("first file", "second file"))]
        out = pool(*docs, variants=variants)
        if all(d.get("rows") for d in docs) and "caa" in out["results"]:
            if "finesteer" in out["results"]:
                out["tradeoff"] = tradeoff(out, *docs)
            further = [m for m in a.tradeoff_methods.split(",") if m]
            missing = [m for m in further if m not in out["results"] or m in ("unsteered", "caa", "finesteer")]
            if missing:
                raise ValueError(f"--tradeoff-methods: {', '.join(missing)} is not a further steered method of the "
                                 f"pooled results ({', '.join(m for m in out['results'] if m != 'unsteered')})")
            if further:
                out["tradeoff_methods"] = {m: tradeoff(out, *docs, method=m) for m in further}
            if variants:
                out["tradeoff_variants"] = {v: tradeoff(out, *docs, method=v) for v in variants}
        curves = plot_curves(out, docs, a.plot_methods, variants) if a.plot else None
    except ValueError as e:
        print(f"truthfulqa_crossfit: {e}", file=sys.stderr)
        return 2
    out["inputs"] = [a.fold_a, a.fold_b] + [f for more in a.extend for f in more]
    if a.variant:
        out["variants"] = {v: runs for v, *runs in a.variant}
    if a.extend_variant:
        out["variant_extensions"] = {v: [runs for w, *runs in a.extend_variant if w == v]
                                     for v in dict.fromkeys(w for w, *_ in a.extend_variant)}
    path = Path(a.out)
    path.write_text(json.dumps(out, indent=1) + "\n")
    path.with_suffix(".md").write_text(markdown(out))
    print(markdown(out))
    if a.plot:
        plot(out, curves, Path(a.plot))
        print(f"wrote {a.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
