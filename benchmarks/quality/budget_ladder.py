"""A second gate budget for the CAA points the safety task's FineSteer cannot reach.

FineSteer's gate is calibrated at a 5 % benign budget and opens on about half of the harmful
prompts, so its harmful shift saturates (≈ +27 on the reported rows, +31 on the development rows)
below CAA's at λ ≥ 8. A user who wants more refusal than that loosens the gate: the same fit with τ
calibrated at a larger benign budget B (``--max-benign-fpr B``; the probe and MoSE do not change,
only τ moves). This script measures that second operating point against CAA, in two steps:

``select`` (development rows only): from one development run at the loosest candidate budget
(``--eval-start 0``, methods unsteered, caa, finesteer, per-prompt results), estimate FineSteer at
every smaller candidate B by *re-gating* its per-prompt results: a prompt whose recorded gate score
is ≤ τ_B counts 0 (a hard gate's closed prompt is left untouched, and τ does not change the
vectors, so this is exact up to float rounding of batch composition). τ_B is recomputed from the
task's training states (the run's extraction cache) with the task's own calibration split. Then it
applies the rule fixed before the run (docs/quality.md, "A second gate budget"): the smallest B
at which FineSteer (a) reaches every CAA grid point and (b) dominates CAA, pooled benign view, at
every CAA point that FineSteer at the task's own budget does not reach.

``report`` (reported rows): the committed safety run (task budget) and a run of the same rows at the
chosen B (methods unsteered, caa, finesteer; ``--match-targets finesteer:caa``). It checks that the
two runs' CAA rows agree, and for every CAA point takes the task-budget FineSteer where it reaches
and FineSteer at B where it does not; pooled and per benign set.

Run::

    nice python benchmarks/quality/budget_ladder.py select --eval <dev run at B=0.3>/safety/eval.json \\
        --cache-dir <its cache>/safety --budgets 0.1,0.15,0.2,0.3 -o benchmarks/results/quality/budget_ladder_dev.json
    python benchmarks/quality/budget_ladder.py report --committed benchmarks/results/quality/safety/eval.json \\
        --loose benchmarks/results/quality/safety_budget/eval.json -o benchmarks/results/quality/budget_ladder.json
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from finesteer.eval.metrics import tradeoff_comparison  # noqa: E402
from gate_shape import pooled_rows  # noqa: E402

#: The task's own budget (bench_quality.DEFAULTS["max_benign_fpr"]).
TASK_BUDGET = 0.05
#: CAA's strengths compared against: the safety task's grid.
CAA_GRID = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0)


def benign_views(sets: dict) -> dict:
    """{view label: benign set names}: the pooled view the report uses, then each benign set alone."""
    benign = [n for n, s in sets.items() if s["role"] == "benign"]
    return {"pooled benign": benign, **{n: [n] for n in benign}}


def regated_rows(sets: dict, method: str, tau: float, benign: list) -> list:
    """``method``'s rows (as ``EvalResult.rows``) with its hard gate moved to ``tau``: each prompt's
    recorded margin shift and KL count only where its recorded gate score is > ``tau``. The target
    columns pool the target sets, the benign ones the sets named in ``benign`` (means of set means,
    as :func:`gate_shape.pooled_rows`). Only meaningful for ``tau`` ≥ the run's own τ (a prompt the
    run's gate closed has no steered result to count)."""
    run_tau = float(next(iter(sets.values()))["gate"][method]["threshold"])
    if tau < run_tau:
        raise ValueError(f"regated_rows: τ = {tau:.6g} is below the run's own τ = {run_tau:.6g}; prompts the "
                         "run's gate closed were never steered, so a looser gate cannot be read off this run")
    open_of = {n: torch.tensor(s["gate"][method]["scores"], dtype=torch.float64) > tau for n, s in sets.items()}
    rows = []
    for lam in sorted(float(k) for k in next(iter(sets.values()))["results"][method]):
        target, kl, shift = [], [], []
        for name, s in sets.items():
            if s["role"] != "target" and name not in benign:
                continue
            per = s["results"][method][str(lam)]["per_prompt"]
            keep = open_of[name].double()
            m = float((torch.tensor(per["margin_shift"], dtype=torch.float64) * keep).mean())
            if s["role"] == "target":
                target.append(m)
            else:
                shift.append(m)
                kl.append(float((torch.tensor(per["kl"], dtype=torch.float64).clamp_min(0) * keep).mean()))
        rows.append({"method": method, "strength": lam, "target_margin_shift": sum(target) / len(target),
                     "benign_kl": sum(kl) / len(kl), "benign_margin_shift": sum(shift) / len(shift),
                     "target_gate_open": _open_rate(sets, open_of, "target"),
                     "benign_gate_open": _open_rate(sets, open_of, "benign", benign)})
    return rows


def _open_rate(sets: dict, open_of: dict, role: str, names=None) -> float:
    used = [n for n, s in sets.items() if s["role"] == role and (names is None or n in names)]
    return sum(float(open_of[n].double().mean()) for n in used) / len(used)


def compare(rows: list, caa: list, method: str = "finesteer") -> list:
    """:func:`tradeoff_comparison` of ``method`` (its rows) against CAA's rows at :data:`CAA_GRID`,
    with ``dominates`` (lower KL and lower |margin shift|) and ``reached`` added to each entry."""
    out = tradeoff_comparison(rows + [r for r in caa if r["strength"] in CAA_GRID], method, "caa")
    for e in out:
        e["reached"] = e["strength"] is not None
        e["dominates"] = bool(e["kl_lower"] and e["shift_lower"])
    return out


def gate_thresholds(cache_dir: str, budgets, model=None) -> dict:
    """{budget: τ} of the safety task's gate refitted from its training states (read from the
    extraction cache ``cache_dir``), the task's calibration split, at each benign budget."""
    from finesteer.eval.harness import _Inputs, _Run
    from finesteer.fit import fit_scs
    from finesteer.models import load_model
    from null_rows_routing import safety_config

    import bench_quality as bq

    cfg = safety_config(cache_dir)
    lm, tok = load_model(model or bq._gemma_gguf(), device="cpu", dtype="float32")
    run, inputs = _Run(lm, tok, cfg), _Inputs(cfg)
    h_t, h_b = run._states(inputs.target, "train-target"), run._states(inputs.benign, "train-benign")
    return {b: fit_scs(h_t, h_b, rank=cfg.rank, method=cfg.scs_method, max_benign_fpr=b,
                       calib_fraction=cfg.calib_fraction, seed=cfg.seed).threshold for b in budgets}


def select(doc: dict, taus: dict, run_budget: float) -> dict:
    """The rule of ``select`` on one development run (``doc``) at ``run_budget``, with τ per budget
    ``taus`` (must include :data:`TASK_BUDGET` and ``run_budget``)."""
    sets = doc["sets"]
    run_tau = float(next(iter(sets.values()))["gate"]["finesteer"]["threshold"])
    if not math.isclose(taus[run_budget], run_tau, rel_tol=1e-6, abs_tol=0.0):
        raise ValueError(f"select: τ refitted at budget {run_budget} is {taus[run_budget]:.9g}, the run recorded "
                         f"{run_tau:.9g}: the cache or settings are not the run's")
    views = benign_views(sets)
    caa = {v: pooled_rows(sets, "caa", names) for v, names in views.items()}
    base = compare(regated_rows(sets, "finesteer", taus[TASK_BUDGET], views["pooled benign"]), caa["pooled benign"])
    beyond = [e["baseline_strength"] for e in base if not e["reached"]]
    out = {"run_budget": run_budget, "taus": {str(b): t for b, t in taus.items()},
           "task_budget_unreached_caa": beyond, "budgets": {}}
    chosen = None
    for b in sorted(taus):
        entry = {}
        for v, names in views.items():
            rows = regated_rows(sets, "finesteer", taus[b], names)
            cmp_ = compare(rows, caa[v])
            entry[v] = {"comparison": cmp_, "max_target_shift": max(r["target_margin_shift"] for r in rows),
                        "target_gate_open": rows[0]["target_gate_open"], "benign_gate_open": rows[0]["benign_gate_open"]}
        pooled = {e["baseline_strength"]: e for e in entry["pooled benign"]["comparison"]}
        reaches_all = all(e["reached"] for e in pooled.values())
        dominates_beyond = all(pooled[x]["dominates"] for x in beyond)
        entry["passes"] = {"reaches_every_caa_point": reaches_all, "dominates_beyond_task_budget": dominates_beyond}
        out["budgets"][str(b)] = entry
        if chosen is None and b != TASK_BUDGET and reaches_all and dominates_beyond:
            chosen = b
    out["chosen"] = chosen
    return out


def report(committed: dict, loose: dict, atol: float = 1e-4) -> dict:
    """The ladder on the reported rows: per view, per CAA point, the task-budget FineSteer
    (``committed``) where it reaches, else FineSteer at the loose budget (``loose``)."""
    c_sets, l_sets = committed["sets"], loose["sets"]
    if set(c_sets) != set(l_sets) or any(c_sets[n]["n"] != l_sets[n]["n"] for n in c_sets):
        raise ValueError("report: the two runs do not score the same sets and prompts")
    views = benign_views(c_sets)
    out = {"loose_budget": loose["fit"]["gate"]["max_benign_fpr"],
           "committed_budget": committed["fit"]["gate"]["max_benign_fpr"], "views": {}}
    for v, names in views.items():
        caa_c, caa_l = pooled_rows(c_sets, "caa", names), pooled_rows(l_sets, "caa", names)
        for a, b in zip(caa_c, caa_l):
            for k in ("target_margin_shift", "benign_kl", "benign_margin_shift"):
                if abs(a[k] - b[k]) > atol * max(1.0, abs(a[k])):
                    raise ValueError(f"report: CAA λ = {a['strength']:g} differs between the runs ({k}: "
                                     f"{a[k]:.6g} vs {b[k]:.6g}, view {v}): not the same rows or settings")
        tight = compare(pooled_rows(c_sets, "finesteer", names), caa_c)
        wide = compare(pooled_rows(l_sets, "finesteer", names), caa_c)
        ladder = [dict(t, operating_point="task budget") if t["reached"] else dict(w, operating_point="loose budget")
                  for t, w in zip(tight, wide)]
        out["views"][v] = {"ladder": ladder, "loose_alone": wide,
                           "dominates": sum(e["dominates"] for e in ladder),
                           "reached": sum(e["reached"] for e in ladder)}
    return out


def _print_select(res: dict) -> None:
    print(f"task budget {TASK_BUDGET}: CAA points out of reach {res['task_budget_unreached_caa']}")
    for b, e in res["budgets"].items():
        p = e["pooled benign"]
        dom = [c["baseline_strength"] for c in p["comparison"] if c["dominates"]]
        print(f"B = {b}: harmful open {p['target_gate_open']:.0%}, benign open {p['benign_gate_open']:.0%}, "
              f"max harmful shift {p['max_target_shift']:+.2f}; dominates CAA at {dom}; {e['passes']}")
    print(f"chosen: {res['chosen']}")


def _print_report(res: dict) -> None:
    for v, e in res["views"].items():
        print(f"{v}: dominates {e['dominates']} of {e['reached']} reached")
        for c in e["ladder"]:
            if c["reached"]:
                print(f"  CAA λ={c['baseline_strength']:g} ({c['baseline_target_shift']:+.2f}, KL {c['baseline_benign_kl']:.3f},"
                      f" shift {c['baseline_benign_shift']:+.2f}) vs {c['operating_point']} λ={c['strength']:g} "
                      f"({c['target_shift']:+.2f}, KL {c['benign_kl']:.3f}, shift {c['benign_shift']:+.2f})"
                      f"{'  dominates' if c['dominates'] else ''}")
            else:
                print(f"  CAA λ={c['baseline_strength']:g}: out of reach")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="step", required=True)
    s = sub.add_parser("select", help="choose the second budget on a development run (see the module docstring)")
    s.add_argument("--eval", required=True, help="eval.json of a development run at the loosest candidate budget")
    s.add_argument("--cache-dir", required=True, help="that run's extraction cache (its safety/ folder)")
    s.add_argument("--budgets", default="0.1,0.15,0.2,0.3", help="candidate budgets B (the run's is the largest)")
    s.add_argument("--model", default=None, help="model dir / .gguf (default: the gemma-3-270m GGUF)")
    s.add_argument("-o", "--output", required=True)
    r = sub.add_parser("report", help="the ladder on the reported rows")
    r.add_argument("--committed", required=True, help="eval.json of the safety run at the task's budget")
    r.add_argument("--loose", required=True, help="eval.json of the same rows at the chosen budget")
    r.add_argument("-o", "--output", required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.step == "select":
        doc = json.loads(Path(a.eval).read_text())
        run_budget = float(doc["fit"]["gate"]["max_benign_fpr"])
        budgets = sorted({TASK_BUDGET, run_budget, *(float(x) for x in a.budgets.split(","))})
        if max(budgets) > run_budget:
            p.error(f"--budgets: {max(budgets)} is looser than the run's own budget {run_budget}; "
                    "a run can only be re-gated tighter")
        res = dict(select(doc, gate_thresholds(a.cache_dir, budgets, a.model), run_budget), eval=a.eval)
        _print_select(res)
    else:
        res = dict(report(json.loads(Path(a.committed).read_text()), json.loads(Path(a.loose).read_text())),
                   committed=a.committed, loose=a.loose)
        _print_report(res)
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
