"""Which layer for TruthfulQA, chosen inside the training halves only (nested).

The truthfulness runs split the TruthfulQA file in two by question (seeded, ``--fit-fraction``
0.5): ``truthfulness`` fits on the first half and scores the second, ``truthfulness_swapped`` the
other way round. A setting chosen on those scored questions would be tuned on what is reported, so
this study works inside one fold's *training* half only: it writes that half (203 questions) to a
file of its own, and ``finesteer eval`` splits it again (fit on about half, score the other half)
with the truthfulness task's settings at each layer. Methods CAA and FineSteer, λ = 2, 4, 8, 16.

The rule (fixed before any inner result was seen; docs/quality.md): pool the two folds' inner
questions; a layer is a *candidate* when FineSteer's MC1 and MC2 are at or above CAA's at every λ.
If the task's layer (11) is a candidate, or no layer is, nothing changes; otherwise the candidate
with the largest mean MC2 gain over CAA is the one to run on the reported questions.

Run (one process per fold runs them side by side on two cores)::

    nice python benchmarks/quality/truthfulqa_nested.py run --fold 1 --layers 11 7 9 13 --out <dir> --cache-dir <cache>
    nice python benchmarks/quality/truthfulqa_nested.py run --fold 2 --layers 11 7 9 13 --out <dir> --cache-dir <cache>
    python benchmarks/quality/truthfulqa_nested.py summarize --out <dir> --layers 7 9 11 13 \\
        -o benchmarks/results/quality/truthfulqa_nested_layers.json

A *fit variant* (``--variant NAME --mose-option OPTION=VALUE ...``) is judged the same way at one
layer: ``run`` refits and scores FineSteer only, with those MoSE options (CAA does not depend on
them, so ``summarize`` takes CAA and the unsteered model from the plain run at that layer, which
must exist; the variant reuses its extraction cache), into ``f<fold>_L<layer>_<NAME>/``. The rule
for a variant: it is adopted for the reported runs when it is a candidate (FineSteer at or above CAA
on MC1 and MC2 at every λ) and its mean MC2 gain over CAA is at least the default fit's::

    nice python benchmarks/quality/truthfulqa_nested.py run --fold 1 --layers 11 --out <dir> --cache-dir <cache> \\
        --variant query_clusters --mose-option cluster_on=query --mose-option k_range=2,4
    python benchmarks/quality/truthfulqa_nested.py summarize --out <dir> --layers 11 --variant query_clusters -o …

Each adopted variant raised the bar for the next: ``--bar-variant NAME`` judges ``--variant``
against that earlier variant's mean MC2 gain instead of the default fit's.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import bench_quality as bq  # noqa: E402

#: The task's own layer (bench_quality.DEFAULTS["layer"]).
TASK_LAYER = bq.DEFAULTS["layer"]
STRENGTHS = (2.0, 4.0, 8.0, 16.0)
METHODS = "unsteered,caa,finesteer"
#: A fit variant changes only FineSteer's MoSE; CAA and the unsteered model come from the plain run.
VARIANT_METHODS = "unsteered,finesteer"


def training_half(rows: list, fold: int, seed: int = 0) -> list:
    """The rows of TruthfulQA that fold ``fold`` (1: ``truthfulness``, 2: ``truthfulness_swapped``)
    fits on: the harness's seeded split at fit fraction 0.5, its fit part for fold 1 and its scored
    part for fold 2."""
    from finesteer.eval.data import disjoint_split

    if fold not in (1, 2):
        raise ValueError(f"fold must be 1 or 2, got {fold}")
    fit, scored = disjoint_split(len(rows), 0.5, seed)
    return [rows[i] for i in (fit if fold == 1 else scored)]


def inner_argv(path: Path, layer: int, out: Path, cache: Path, model: str, mose_options: tuple = ()) -> list:
    """``finesteer eval`` arguments: the truthfulness task's, at ``layer``, with the TruthfulQA file
    replaced by ``path`` (one fold's training half), CAA and FineSteer at :data:`STRENGTHS`; with
    ``mose_options`` (``"NAME=VALUE"`` texts, a fit variant) FineSteer only, fitted with them."""
    src = str(bq.DATA / "truthfulqa" / "train.jsonl")
    a = argparse.Namespace(**{**bq.DEFAULTS, "strengths": ",".join(f"{x:g}" for x in STRENGTHS), "limit_pairs": None,
                              "limit_eval": None, "max_benign_fpr": None, "threads": 1, "prompt_format": "auto",
                              "layer": layer, "limit_truthfulqa": 1000})
    args = [str(path) if x == src else x for x in bq.task_args("truthfulness", a)]
    args[args.index("--methods") + 1] = VARIANT_METHODS if mose_options else METHODS
    extra = [x for option in mose_options for x in ("--mose-option", option)]
    return ["--model", model, *args, *extra, "-o", str(out), "--cache-dir", str(cache), "--quiet"]


def run_dir(out: Path, fold: int, layer: int, variant: str = None) -> Path:
    """Where one inner run writes: ``f<fold>_L<layer>`` or, for a fit variant, ``…_<variant>``."""
    return out / (f"f{fold}_L{layer}" + (f"_{variant}" if variant else ""))


def with_variant(pooled: dict, variant: dict) -> dict:
    """``pooled`` (a plain run's :func:`pool`) with FineSteer's rows replaced by ``variant``'s."""
    missing = [lam for lam in STRENGTHS if ("finesteer", lam) not in variant]
    if missing:
        raise ValueError(f"the variant runs lack FineSteer at λ = {', '.join(f'{x:g}' for x in missing)}")
    out = {k: v for k, v in pooled.items() if k[0] != "finesteer"}
    out.update({k: v for k, v in variant.items() if k[0] == "finesteer"})
    return out


def adopt_variant(bar: dict, variant: dict) -> bool:
    """The variant rule: a candidate whose mean MC2 gain over CAA is at least ``bar``'s (the default
    fit's summary, or with ``--bar-variant`` an earlier adopted variant's)."""
    return bool(variant["candidate"]) and variant["mean_mc2_gain"] >= bar["mean_mc2_gain"]


def pool(docs: list) -> dict:
    """{(method, λ): {"mc1": [...], "mc2": [...]}} over the per-question TruthfulQA results of the
    eval.json documents ``docs`` (the two folds' inner runs); the unsteered rows under λ = 0."""
    out: dict = {}
    for doc in docs:
        pq = doc["truthfulqa"]["per_question"]
        for method, per in pq.items():
            for lam, v in per.items():
                d = out.setdefault((method, 0.0 if method == "unsteered" else float(lam)), {"mc1": [], "mc2": []})
                d["mc1"] += v["mc1"]
                d["mc2"] += v["mc2"]
    return out


def layer_summary(pooled: dict) -> dict:
    """MC1/MC2 of CAA and FineSteer at each λ, whether FineSteer is at or above CAA on both at every
    λ (``candidate``), and FineSteer's mean MC2 gain over CAA."""
    def mean(x):
        return sum(x) / len(x)

    rows = []
    for lam in STRENGTHS:
        c, f = pooled[("caa", lam)], pooled[("finesteer", lam)]
        rows.append({"strength": lam, "caa_mc1": mean(c["mc1"]), "caa_mc2": mean(c["mc2"]),
                     "finesteer_mc1": mean(f["mc1"]), "finesteer_mc2": mean(f["mc2"])})
    u = pooled[("unsteered", 0.0)]
    return {"questions": len(u["mc1"]), "unsteered_mc1": mean(u["mc1"]), "unsteered_mc2": mean(u["mc2"]), "rows": rows,
            "candidate": all(r["finesteer_mc1"] >= r["caa_mc1"] and r["finesteer_mc2"] >= r["caa_mc2"] for r in rows),
            "mean_mc2_gain": mean([r["finesteer_mc2"] - r["caa_mc2"] for r in rows])}


def choose(layers: dict) -> int | None:
    """The rule: None when the task's layer is a candidate or no layer is; else the candidate layer
    with the largest mean MC2 gain."""
    candidates = [lay for lay, s in layers.items() if s["candidate"]]
    if not candidates or TASK_LAYER in candidates:
        return None
    return max(candidates, key=lambda lay: layers[lay]["mean_mc2_gain"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    r = sub.add_parser("run", help="one fold's inner runs, one per layer")
    r.add_argument("--fold", type=int, choices=(1, 2), required=True)
    r.add_argument("--layers", type=int, nargs="+", required=True)
    r.add_argument("--out", required=True, help="folder for the runs (f<fold>_L<layer>/) and the training half")
    r.add_argument("--cache-dir", required=True)
    r.add_argument("--model", default=None, help="model dir / .gguf (default: the gemma-3-270m GGUF)")
    r.add_argument("--variant", default=None, metavar="NAME",
                   help="a fit variant: FineSteer only, with the --mose-option settings, into f<fold>_L<layer>_NAME")
    r.add_argument("--mose-option", action="append", default=[], metavar="NAME=VALUE",
                   help="a MoSE option of the variant (as finesteer eval --mose-option); repeatable")
    s = sub.add_parser("summarize", help="pool the two folds per layer and apply the rule")
    s.add_argument("--out", required=True, help="the runs' folder")
    s.add_argument("--layers", type=int, nargs="+", required=True)
    s.add_argument("--variant", default=None, metavar="NAME",
                   help="judge this fit variant's runs against the plain runs at the same layers")
    s.add_argument("--bar-variant", default=None, metavar="NAME",
                   help="judge --variant against this earlier variant's mean MC2 gain instead of the default "
                        "fit's (its runs must be in --out)")
    s.add_argument("-o", "--output", required=True)
    a = p.parse_args(argv)
    out = Path(a.out)
    if a.step == "run" and bool(a.variant) != bool(a.mose_option):
        p.error("--variant NAME and --mose-option go together (a variant is a name for MoSE options)")
    if a.step == "summarize" and a.bar_variant and not a.variant:
        p.error("--bar-variant needs --variant (it sets the bar a variant is judged against)")
    if a.step == "run":
        if not bq.DATA.is_dir():
            print(f"truthfulqa_nested: skipped: the shared data folder {bq.DATA} is absent")
            return 0
        from finesteer.eval.cli import main as eval_main

        rows = [x for x in (bq.DATA / "truthfulqa" / "train.jsonl").read_text().splitlines() if x.strip()]
        out.mkdir(parents=True, exist_ok=True)
        half = out / f"fold{a.fold}_train.jsonl"
        half.write_text("\n".join(training_half(rows, a.fold)) + "\n")
        model = a.model or bq._gemma_gguf()
        for layer in a.layers:
            rc = eval_main(inner_argv(half, layer, run_dir(out, a.fold, layer, a.variant),
                                      Path(a.cache_dir) / f"f{a.fold}_L{layer}", model, tuple(a.mose_option)))
            if rc:
                return rc
        return 0
    def load(layer, variant=None):
        return pool([json.loads((run_dir(out, fold, layer, variant) / "eval.json").read_text()) for fold in (1, 2)])

    def show(label, e):
        print(f"{label}: {e['questions']} questions, unsteered {e['unsteered_mc1']:.3f} / {e['unsteered_mc2']:.3f}; "
              + "; ".join(f"λ {x['strength']:g} CAA {x['caa_mc1']:.3f} / {x['caa_mc2']:.3f}, FineSteer "
                          f"{x['finesteer_mc1']:.3f} / {x['finesteer_mc2']:.3f}" for x in e["rows"])
              + f"; candidate {e['candidate']}, mean MC2 gain {e['mean_mc2_gain']:+.4f}")

    plain = {layer: load(layer) for layer in a.layers}  # read once: the variant's judgement reuses them
    layers = {}
    for layer in a.layers:
        layers[layer] = layer_summary(plain[layer])
        show(f"layer {layer}", layers[layer])
    res = {"task_layer": TASK_LAYER, "strengths": list(STRENGTHS), "layers": {str(k): v for k, v in layers.items()}}
    if a.variant:
        res["variant"] = a.variant
        res["variant_layers"] = {}
        for layer in a.layers:
            e = layer_summary(with_variant(plain[layer], load(layer, a.variant)))
            if a.bar_variant:
                bar = layer_summary(with_variant(plain[layer], load(layer, a.bar_variant)))
                bar_name = f"{a.bar_variant} fit's"
            else:
                bar, bar_name = layers[layer], "default fit's"
            e["adopt"] = adopt_variant(bar, e)
            e["bar"] = {"fit": a.bar_variant or "default", "mean_mc2_gain": bar["mean_mc2_gain"]}
            res["variant_layers"][str(layer)] = e
            show(f"layer {layer}, {a.variant}", e)
            print(f"  adopt {a.variant} at layer {layer}: {e['adopt']} (a candidate, mean MC2 gain at least the "
                  f"{bar_name} {bar['mean_mc2_gain']:+.4f})")
    else:
        res["chosen"] = choose(layers)
        print(f"chosen: {res['chosen']} (None: nothing changes)")
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
