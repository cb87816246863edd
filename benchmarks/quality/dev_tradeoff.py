"""Compare development-row safety runs by FineSteer's trade-off against CAA (used to choose δ positions).

For each ``eval.json`` (a safety run on the *development* rows, ``--eval-start 0``, with CAA and
FineSteer on one λ grid, per-prompt results included), this applies the report's point-by-point rule
(``eval.md``, "Trade-off, point by point": for each CAA strength, the weakest FineSteer strength that
moves the target prompts at least as far, and whether its benign KL and |margin shift| are lower
there) with the benign sets pooled and with ``borderline`` alone, on the reported λ grid and on the
run's full grid, and lists the CAA strengths FineSteer dominates and those it never reaches. It also
carries each run's held-out δ prediction (MoSE and the mean vector). No model is loaded.

Run (one eval.json per candidate setting; the label is the part before ``=``)::

    python benchmarks/quality/dev_tradeoff.py all=<dir>/eval.json 6=<dir6>/eval.json \\
        -o benchmarks/results/quality/dev_delta_positions.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from finesteer.eval.metrics import tradeoff_comparison  # noqa: E402
from gate_shape import CAA_POINTS, pooled_rows  # noqa: E402


def summarise(doc: dict, grid=None) -> dict:
    """{view: {"dominated": [...], "unreached": [...], "compared": n}} for one eval.json ``doc``;
    ``grid``: compare only these strengths (both methods; None: every strength run)."""
    sets = doc["sets"]
    benign = [n for n, s in sets.items() if s["role"] == "benign"]
    views = {"pooled benign": benign, **{n: [n] for n in benign if n != "benign"}}
    out = {}
    for view, names in views.items():
        rows = pooled_rows(sets, "finesteer", names) + pooled_rows(sets, "caa", names)
        if grid is not None:
            rows = [r for r in rows if r["strength"] in grid]
        cmp = tradeoff_comparison(rows, "finesteer", "caa")
        out[view] = {"dominated": [e["baseline_strength"] for e in cmp if e["kl_lower"] and e["shift_lower"]],
                     "unreached": [e["baseline_strength"] for e in cmp if e["strength"] is None],
                     "compared": len(cmp)}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=EVAL_JSON")
    p.add_argument("-o", "--out", default=None, help="write the summary as JSON here")
    a = p.parse_args(argv)
    table = {}
    for item in a.runs:
        label, sep, path = item.partition("=")
        if not sep:
            p.error(f"{item!r}: give LABEL=EVAL_JSON")
        doc = json.loads(Path(path).read_text())
        table[label] = {"eval": path, "delta_positions": doc["config"].get("delta_positions"),
                        "reported_grid": summarise(doc, CAA_POINTS), "full_grid": summarise(doc),
                        "delta_prediction_heldout": doc["fit"]["delta_prediction_heldout"]}
        for grid in ("reported_grid", "full_grid"):
            for view, r in table[label][grid].items():
                print(f"{label:>6} {grid:>13} {view:>14}: dominates CAA at {r['dominated']} "
                      f"(of {r['compared']}; never reached: {r['unreached']})")
    if a.out:
        Path(a.out).write_text(json.dumps(table, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
