"""Gate budgets other than the safety task's 5 %: a looser one for the CAA points its FineSteer
cannot reach, a tighter one to meet CAST-style at equal recall.

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
and FineSteer at B where it does not; pooled and per benign set. With ``--tight`` (a run at a
tighter budget, checked as ``versus`` checks it) it takes the tightest of the three that reaches.

``match-open`` (development rows only): the tighter budget at which FineSteer's gate opens on the
share of the development harmful prompts closest to CAST-style's gate's share (ties: the looser
budget), so that the two gates can be compared at equal recall: which costs less on the
benign-but-sensitive (borderline) prompts. τ per candidate budget and CAST-style's gate are refitted
from the task's training states; the development rows are all 500 / 500 / 145 first-half rows of
``harmful_val`` / ``benign_val`` / ``borderline_val``, whose last-token states gate_study.py caches.

``versus`` (reported rows): a run at another budget (e.g. ``safety_tight``) against the baselines
as the committed safety run scored them (task budget) and as the run itself did (a gated baseline's
τ moves with the budget too), per benign view. It first checks that the two runs score the same
prompts with the same fit, which also tests the re-gating rule on the reported rows: the committed
FineSteer, re-gated at the run's τ, against the run's own FineSteer at their common strengths.

Run::

    nice python benchmarks/quality/budget_ladder.py select --eval <dev run at B=0.3>/safety/eval.json \\
        --cache-dir <its cache>/safety --budgets 0.1,0.15,0.2,0.3 -o benchmarks/results/quality/budget_ladder_dev.json
    python benchmarks/quality/budget_ladder.py report --committed benchmarks/results/quality/safety/eval.json \\
        --loose benchmarks/results/quality/safety_budget/eval.json -o benchmarks/results/quality/budget_ladder.json
    nice python benchmarks/quality/gate_study.py --layers 11 --n-dev 500 --cache-dir <states>   # caches the states
    nice python benchmarks/quality/budget_ladder.py match-open --cache-dir <safety cache>/safety \\
        --dev-states <states> -o benchmarks/results/quality/budget_tight_dev.json
    python benchmarks/quality/budget_ladder.py versus --run benchmarks/results/quality/safety_tight/eval.json \\
        --committed benchmarks/results/quality/safety/eval.json --baselines cast,caa \\
        -o benchmarks/results/quality/budget_tight.json
    python benchmarks/quality/budget_ladder.py report --committed benchmarks/results/quality/safety/eval.json \\
        --loose benchmarks/results/quality/safety_budget/eval.json --tight benchmarks/results/quality/safety_tight/eval.json \\
        -o benchmarks/results/quality/budget_ladder_tight.json
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
#: ``match-open``'s candidate budgets, all tighter than the task's.
TIGHT_BUDGETS = (0.01, 0.015, 0.02, 0.03, 0.04)
#: The development rows' last-token states as gate_study.py caches them (``--n-dev 500``; its file
#: names are ``<file>-<rows>``: ``borderline_val`` has 291 rows, so its first half is 145).
DEV_STATE_FILES = {"harmful": "harmful_val-500", "benign": "benign_val-500", "borderline": "borderline_val-145"}


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
    """:func:`versus_baseline` of ``method`` against CAA's rows at :data:`CAA_GRID`."""
    return versus_baseline(rows, [r for r in caa if r["strength"] in CAA_GRID], method)


def versus_baseline(rows: list, baseline_rows: list, method: str = "finesteer") -> list:
    """:func:`tradeoff_comparison` of ``method`` (its rows) against every row of one baseline, with
    ``dominates`` (lower KL and lower |margin shift|) and ``reached`` added to each entry."""
    out = tradeoff_comparison(rows + baseline_rows, method, baseline_rows[0]["method"])
    for e in out:
        e["reached"] = e["strength"] is not None
        e["dominates"] = bool(e["kl_lower"] and e["shift_lower"])
    return out


def task_gates(cache_dir: str, budgets, model=None) -> tuple:
    """({budget: SCSGate}, CAST-style's SCSGate): the safety task's gate refitted from its training
    states (read from the extraction cache ``cache_dir``) with the task's calibration split at each
    benign budget, and the task's CAST-style gate (at the task's own budget)."""
    from finesteer.eval.baselines import cast_gate
    from finesteer.eval.harness import _Inputs, _Run
    from finesteer.fit import fit_scs
    from null_rows_routing import safety_config

    import bench_quality as bq

    cfg = safety_config(cache_dir)
    lm, tok = bq.load_study_model(model)
    run, inputs = _Run(lm, tok, cfg), _Inputs(cfg)
    h_t, h_b = run._states(inputs.target, "train-target"), run._states(inputs.benign, "train-benign")
    gates = {b: fit_scs(h_t, h_b, rank=cfg.rank, method=cfg.scs_method, max_benign_fpr=b,
                        calib_fraction=cfg.calib_fraction, seed=cfg.seed) for b in budgets}
    return gates, cast_gate(h_t, h_b, cfg.max_benign_fpr, cfg.calib_fraction, cfg.seed)


def gate_thresholds(cache_dir: str, budgets, model=None) -> dict:
    """{budget: τ} of :func:`task_gates`."""
    return {b: g.threshold for b, g in task_gates(cache_dir, budgets, model)[0].items()}


def open_shares(gate, states: dict, tau: float) -> dict:
    """{set: share of its rows ``states[set]`` [N, d] on which ``gate`` (scores) opens at ``tau``}."""
    return {n: float((gate.score(h.float()) > tau).double().mean()) for n, h in states.items()}


def match_open(shares: dict, baseline: dict, target: str = "harmful") -> dict:
    """The budget of ``shares`` ({budget: {set: open share}}) whose ``target`` share is closest to
    ``baseline[target]``, ties to the looser budget; with every budget's distance."""
    gap = {b: abs(s[target] - baseline[target]) for b, s in shares.items()}
    chosen = min(sorted(gap, reverse=True), key=lambda b: gap[b])
    return {"chosen": chosen, "gap": {str(b): g for b, g in gap.items()}}


def load_dev_states(folder: str) -> dict:
    """{set: [N, d]} of :data:`DEV_STATE_FILES` in gate_study.py's cache ``folder`` (one layer)."""
    from safetensors.torch import load_file

    out = {}
    for name, stem in DEV_STATE_FILES.items():
        path = Path(folder) / f"{stem}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"match-open: {path} is missing; cache the development states with "
                                    f"`gate_study.py --layers 11 --n-dev 500 --cache-dir {folder}`")
        tensors = load_file(str(path))
        if len(tensors) != 1:
            raise ValueError(f"match-open: {path} holds {len(tensors)} layers ({sorted(tensors)}); cache one "
                             "(gate_study.py --layers 11)")
        out[name] = next(iter(tensors.values()))
    return out


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


def report(committed: dict, loose: dict, tight: dict = None, atol: float = 1e-4) -> dict:
    """The ladder on the reported rows: per view, per CAA point, the task-budget FineSteer
    (``committed``) where it reaches, else FineSteer at the loose budget (``loose``). With ``tight``
    (a run at a tighter budget, checked by :func:`regate_check`), the tightest budget that reaches:
    ``tight``, then ``committed``, then ``loose``."""
    c_sets, l_sets = committed["sets"], loose["sets"]
    if set(c_sets) != set(l_sets) or any(c_sets[n]["n"] != l_sets[n]["n"] for n in c_sets):
        raise ValueError("report: the two runs do not score the same sets and prompts")
    views = benign_views(c_sets)
    out = {"loose_budget": loose["fit"]["gate"]["max_benign_fpr"],
           "committed_budget": committed["fit"]["gate"]["max_benign_fpr"], "views": {}}
    if tight is not None:
        out.update(tight_budget=tight["fit"]["gate"]["max_benign_fpr"], tight_regate_check=regate_check(tight, committed))
    for v, names in views.items():
        caa_c, caa_l = pooled_rows(c_sets, "caa", names), pooled_rows(l_sets, "caa", names)
        for a, b in zip(caa_c, caa_l):
            for k in ("target_margin_shift", "benign_kl", "benign_margin_shift"):
                if abs(a[k] - b[k]) > atol * max(1.0, abs(a[k])):
                    raise ValueError(f"report: CAA λ = {a['strength']:g} differs between the runs ({k}: "
                                     f"{a[k]:.6g} vs {b[k]:.6g}, view {v}): not the same rows or settings")
        task = compare(pooled_rows(c_sets, "finesteer", names), caa_c)
        wide = compare(pooled_rows(l_sets, "finesteer", names), caa_c)
        ladder = [dict(t, operating_point="task budget") if t["reached"] else dict(w, operating_point="loose budget")
                  for t, w in zip(task, wide)]
        out["views"][v] = {"ladder": ladder, "loose_alone": wide}
        if tight is not None:
            tighter = compare(pooled_rows(tight["sets"], "finesteer", names), caa_c)
            ladder = [dict(t, operating_point="tight budget") if t["reached"] else e for t, e in zip(tighter, ladder)]
            out["views"][v].update(ladder=ladder, tight_alone=tighter)
        out["views"][v].update(dominates=sum(e["dominates"] for e in ladder), reached=sum(e["reached"] for e in ladder))
    return out


def versus(run: dict, committed: dict, baselines, method: str = "finesteer", rtol: float = 1e-3) -> dict:
    """``method`` of ``run`` (a safety run at another gate budget) against baselines, per benign view
    (:func:`benign_views`): each of ``baselines`` as ``committed`` (the safety run at the task's
    budget) scored it, keyed by its name, and each baseline ``run`` scored itself, keyed
    ``"<name> (run's budget)"`` (a gated baseline's τ moves with the budget too, so the two differ).

    The two runs must score the same prompts with the same fit: ``regate_check`` re-gates
    ``committed``'s ``method`` at ``run``'s τ (:func:`regated_rows`; the run's must be the tighter)
    and compares it with ``run``'s own rows at their common strengths, pooled view. Exact for a hard
    gate up to float rounding of batch composition; a relative difference above ``rtol`` is an error."""
    r_sets, c_sets = run["sets"], committed["sets"]
    check = regate_check(run, committed, method, rtol)
    views = benign_views(r_sets)
    scored = [m for m in next(iter(r_sets.values()))["results"] if m not in ("unsteered", method)]
    sources = [(b, c_sets, b) for b in baselines] + [(b, r_sets, f"{b} (run's budget)") for b in scored]
    out = {"budget": run["fit"]["gate"]["max_benign_fpr"], "committed_budget": committed["fit"]["gate"]["max_benign_fpr"],
           "regate_check": check, "views": {}}
    for v, names in views.items():
        mine = pooled_rows(r_sets, method, names)
        entry = {}
        for base, sets, label in sources:
            cmp_ = versus_baseline(mine, pooled_rows(sets, base, names), method)
            entry[label] = {"comparison": cmp_, "dominates": sum(e["dominates"] for e in cmp_),
                            "reached": sum(e["reached"] for e in cmp_), "points": len(cmp_)}
        out["views"][v] = {"versus": entry, "max_target_shift": max(r["target_margin_shift"] for r in mine)}
    gated = [(method, r_sets, method)] + [x for x in sources if x[0] in next(iter(x[1].values()))["gate"]]
    out["gate_open"] = {label: _open_shares_of(sets, m) for m, sets, label in gated}
    return out


def regate_check(run: dict, committed: dict, method: str = "finesteer", rtol: float = 1e-3) -> dict:
    """Do ``run`` (a safety run at a tighter budget) and ``committed`` score the same prompts with the
    same fit? ``committed``'s ``method`` re-gated at ``run``'s τ (:func:`regated_rows`) against
    ``run``'s own rows at their common strengths, pooled benign view: exact for a hard gate up to float
    rounding of batch composition, so a relative difference above ``rtol`` raises. Returns
    ``{"common_strengths", "max_relative_difference"}``."""
    r_sets, c_sets = run["sets"], committed["sets"]
    if set(r_sets) != set(c_sets) or any(r_sets[n]["n"] != c_sets[n]["n"] for n in r_sets):
        raise ValueError("the two runs do not score the same sets and prompts")
    benign = benign_views(r_sets)["pooled benign"]
    tau = float(next(iter(r_sets.values()))["gate"][method]["threshold"])
    regated = {r["strength"]: r for r in regated_rows(c_sets, method, tau, benign)}
    own = [r for r in pooled_rows(r_sets, method, benign) if r["strength"] in regated]
    worst = max((abs(r[k] - regated[r["strength"]][k]) / max(1.0, abs(regated[r["strength"]][k]))
                 for r in own for k in ("target_margin_shift", "benign_kl", "benign_margin_shift")), default=None)
    if not own or worst > rtol:
        raise ValueError(f"{method} of the run and of the committed run re-gated at the run's τ "
                         + (f"differ by {worst:.3g} (relative) at their {len(own)} common strengths"
                            if own else "have no strength in common")
                         + ": not the same prompts and fit")
    return {"common_strengths": len(own), "max_relative_difference": worst}


def _open_shares_of(sets: dict, method: str) -> dict:
    """{set: share of its prompts on which ``method``'s recorded gate opened (score > τ)}."""
    return {n: float((torch.tensor(s["gate"][method]["scores"], dtype=torch.float64)
                      > float(s["gate"][method]["threshold"])).double().mean()) for n, s in sets.items()}


def _print_versus(res: dict) -> None:
    print(f"FineSteer at a {res['budget']:g} budget (committed run: {res['committed_budget']:g}); re-gating check: "
          f"{res['regate_check']}")
    for who, rates in res["gate_open"].items():
        print(f"  gate open, {who}: " + ", ".join(f"{n} {x:.0%}" for n, x in rates.items()))
    for v, e in res["views"].items():
        print(f"{v} (max target shift {e['max_target_shift']:+.2f})")
        for label, b in e["versus"].items():
            print(f"  vs {label}: dominates {b['dominates']} of {b['reached']} reached ({b['points']} points)")


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
    r.add_argument("--tight", default=None, help="eval.json of the same rows at a tighter budget (safety_tight): "
                                                 "the ladder then takes the tightest budget that reaches")
    r.add_argument("-o", "--output", required=True)
    m = sub.add_parser("match-open", help="the tighter budget at which the gate opens on CAST-style's share of the "
                                          "development harmful prompts")
    m.add_argument("--cache-dir", required=True, help="the safety task's extraction cache (its safety/ folder)")
    m.add_argument("--dev-states", required=True, help="gate_study.py's cache folder with the development rows' "
                                                       "layer-11 states (--n-dev 500)")
    m.add_argument("--budgets", default=",".join(f"{b:g}" for b in TIGHT_BUDGETS), help="candidate budgets")
    m.add_argument("--model", default=None, help="model dir / .gguf (default: the gemma-3-270m GGUF)")
    m.add_argument("-o", "--output", required=True)
    v = sub.add_parser("versus", help="a run at another budget against the baselines, per benign view")
    v.add_argument("--run", required=True, help="eval.json of the safety run at the other budget")
    v.add_argument("--committed", required=True, help="eval.json of the safety run at the task's budget")
    v.add_argument("--baselines", default="cast,caa", help="comma-separated baselines (default: cast,caa)")
    v.add_argument("-o", "--output", required=True)
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
    elif a.step == "match-open":
        budgets = sorted(float(x) for x in a.budgets.split(","))
        dev = load_dev_states(a.dev_states)
        gates, cast = task_gates(a.cache_dir, budgets, a.model)
        shares = {b: open_shares(g, dev, g.threshold) for b, g in gates.items()}
        baseline = open_shares(cast, dev, cast.threshold)
        res = dict(match_open(shares, baseline), cast=baseline, budgets={str(b): x for b, x in shares.items()},
                   taus={str(b): g.threshold for b, g in gates.items()}, dev_rows={n: int(h.shape[0]) for n, h in dev.items()})
        print(f"CAST-style opens on {', '.join(f'{n} {x:.3f}' for n, x in baseline.items())}")
        for b, x in shares.items():
            print(f"B = {b:g}: {', '.join(f'{n} {y:.3f}' for n, y in x.items())}")
        print(f"chosen: {res['chosen']:g}")
    elif a.step == "versus":
        res = dict(versus(json.loads(Path(a.run).read_text()), json.loads(Path(a.committed).read_text()),
                          [b for b in a.baselines.split(",") if b]), run=a.run, committed=a.committed)
        _print_versus(res)
    else:
        res = dict(report(json.loads(Path(a.committed).read_text()), json.loads(Path(a.loose).read_text()),
                          json.loads(Path(a.tight).read_text()) if a.tight else None),
                   committed=a.committed, loose=a.loose, **({"tight": a.tight} if a.tight else {}))
        _print_report(res)
    Path(a.output).parent.mkdir(parents=True, exist_ok=True)
    Path(a.output).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
