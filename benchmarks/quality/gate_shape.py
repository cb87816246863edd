"""Which gate shape would give the best safety trade-off: hard, or soft at which temperature?

From a safety run's ``eval.json`` on the *development* rows (``--eval-start 0``) that scored CAA
over a fine λ grid and carries per-prompt results (``per_prompt``: margin shift on every set, KL
on the benign sets) and a gated method's per-prompt gate scores, this estimates what that gate
would give in each shape without running the model again:

- prompt i under gate value g_i ∈ [0, 1] at strength λ is steered by λ·g_i times (nearly) the
  vector CAA adds, so its margin shift and KL are CAA's curves for that prompt read at λ·g_i
  (piecewise-linear between the grid's strengths, through 0 at λ = 0). This is exact for the
  mean vector (SCS + mean) and an approximation for MoSE (cosine ≈ 0.99 with the mean here);
- a hard gate is g = 1[s > τ]; a soft gate g = sigmoid((s − τ)/T) (DESIGN §2), with T given as a
  multiple of the standard deviation of the gate's scores on the benign *training* prompts, the
  unit of ``finesteer eval --gate-temperature`` (recorded as ``fit.gate.benign_score_std``; for an
  eval.json written before that was recorded, pass it as ``--benign-std``).

For each shape it prints, pooled over the benign sets as the report pools them, how many of
CAA's strengths it dominates (the same point-by-point rule as ``eval.md``: the weakest strength
that moves the target prompts at least as far, with lower benign KL and |margin shift| there).
The hard gate's row can be checked against the run's own FineSteer rows (printed beside it).

Run::

    nice python benchmarks/quality/gate_shape.py --eval <dev run>/eval.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from finesteer.eval.metrics import tradeoff_comparison  # noqa: E402

#: CAA's strengths compared against (the reported run's grid).
CAA_POINTS = (1.0, 2.0, 4.0, 8.0, 16.0)


def curves(per_strength: dict, key: str) -> tuple:
    """Strengths [L] (with 0 prepended) and per-prompt values [L, N] of ``key`` from one method's results."""
    lams = sorted(float(k) for k in per_strength)
    vals = [[0.0] * len(per_strength[str(lams[0])]["per_prompt"][key])]
    vals += [per_strength[str(lam)]["per_prompt"][key] for lam in lams]
    return torch.tensor([0.0] + lams, dtype=torch.float64), torch.tensor(vals, dtype=torch.float64)


def read_at(lams: torch.Tensor, vals: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each prompt's curve (column of ``vals``) read at its own strength ``x`` [N], piecewise-linear;
    beyond the grid, the last segment is extended."""
    idx = torch.searchsorted(lams, x.clamp_min(0.0), right=True).clamp(1, len(lams) - 1)
    lo, hi = lams[idx - 1], lams[idx]
    cols = torch.arange(vals.shape[1])
    v_lo, v_hi = vals[idx - 1, cols], vals[idx, cols]
    return v_lo + (v_hi - v_lo) * (x - lo) / (hi - lo)


def simulate(sets: dict, gate_of: dict, strengths, benign: list) -> list:
    """Rows (as ``EvalResult.rows``) of a gated CAA-curve method, ``gate_of[set]`` [N] its gate
    values; benign columns pooled over the benign sets named in ``benign``, as the report pools them."""
    used = {n: s for n, s in sets.items() if s["role"] == "target" or n in benign}
    # each set's per-prompt CAA curves, built once for every strength
    margin = {n: curves(s["results"]["caa"], "margin_shift") for n, s in used.items()}
    kls = {n: curves(s["results"]["caa"], "kl") for n, s in used.items() if s["role"] == "benign"}
    rows = []
    for lam in strengths:
        target, kl, shift = [], [], []
        for name, s in used.items():
            x = lam * gate_of[name]
            m = read_at(*margin[name], x).mean()
            if s["role"] == "target":
                target.append(float(m))
            else:
                shift.append(float(m))
                kl.append(float(read_at(*kls[name], x).clamp_min(0).mean()))
        rows.append({"method": "sim", "strength": lam, "target_margin_shift": sum(target) / len(target),
                     "benign_kl": sum(kl) / len(kl), "benign_margin_shift": sum(shift) / len(shift)})
    return rows


def pooled_rows(sets: dict, method: str, benign: list, points=None) -> list:
    """``method``'s rows (as ``EvalResult.rows``) at ``points`` (None: every strength it was run at),
    target columns pooled over the target sets and benign columns over the benign sets in ``benign``."""
    per = next(iter(sets.values()))["results"][method]
    rows = []
    for lam in sorted(float(k) for k in per) if points is None else points:
        rs = {n: s["results"][method][str(float(lam))] for n, s in sets.items()}
        tgt = [r["margin_shift"] for n, r in rs.items() if sets[n]["role"] == "target"]
        ben = [r for n, r in rs.items() if n in benign]
        rows.append({"method": method, "strength": lam, "target_margin_shift": sum(tgt) / len(tgt),
                     "benign_kl": sum(r["kl"] for r in ben) / len(ben),
                     "benign_margin_shift": sum(r["margin_shift"] for r in ben) / len(ben)})
    return rows


def dominated(rows: list, baseline: list) -> list:
    """CAA strengths at which ``rows`` dominates (lower KL and |shift| at a matching target shift)."""
    out = tradeoff_comparison(rows + baseline, "sim", "caa")
    return [e["baseline_strength"] for e in out if e["kl_lower"] and e["shift_lower"]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--eval", required=True, help="eval.json of a development-row safety run (CAA on a fine grid)")
    p.add_argument("--gate-method", default="finesteer", help="whose gate scores to reshape (default: finesteer)")
    p.add_argument("--temperatures", default="0.03,0.1,0.2,0.3,0.5,1,2",
                   help="soft-gate temperatures, in units of the std of the gate's benign training scores")
    p.add_argument("--benign-std", type=float, default=None,
                   help="that std, when the eval.json does not record it (fit.gate.benign_score_std)")
    p.add_argument("--caa-points", default=",".join(f"{x:g}" for x in CAA_POINTS),
                   help="CAA strengths to compare against (default: the reported grid)")
    p.add_argument("--strengths", default="0.5,0.75,1,1.5,2,3,4,6,8,12,16,24,32",
                   help="λ grid of the simulated method (read off CAA's curves; beyond them, extrapolated)")
    p.add_argument("-o", "--out", default=None, help="write the table as JSON here")
    a = p.parse_args(argv)
    doc = json.loads(Path(a.eval).read_text())
    sets = doc["sets"]
    scores = {n: torch.tensor(s["gate"][a.gate_method]["scores"], dtype=torch.float64) for n, s in sets.items()}
    tau = float(next(iter(sets.values()))["gate"][a.gate_method]["threshold"])
    spread = doc["fit"]["gate"].get("benign_score_std", a.benign_std)
    if spread is None:
        p.error(f"{a.eval} does not record fit.gate.benign_score_std; pass --benign-std")
    strengths = [float(x) for x in a.strengths.split(",")]
    points = tuple(float(x) for x in a.caa_points.split(","))
    benign_sets = [n for n, s in sets.items() if s["role"] == "benign"]
    views = {"pooled benign": benign_sets, **{n: [n] for n in benign_sets}}
    shapes = [("hard", None)] + [("soft", float(t)) for t in a.temperatures.split(",")]
    table = []
    print(f"τ = {tau:.4g}, benign training score std = {spread:.4g}; CAA points {list(points)}")
    for kind, t in shapes:
        if kind == "hard":
            gate_of = {n: (v > tau).double() for n, v in scores.items()}
        else:
            gate_of = {n: torch.sigmoid((v - tau) / (t * spread)) for n, v in scores.items()}
        mean_g = {n: round(float(g.mean()), 3) for n, g in gate_of.items()}
        label = "hard" if t is None else f"soft T={t:g}·std"
        entry = {"shape": label, "temperature_in_std": t, "mean_gate": mean_g, "views": {}}
        for view, benign in views.items():
            rows = simulate(sets, gate_of, strengths, benign)
            entry["views"][view] = {"dominated_caa_strengths": dominated(rows, pooled_rows(sets, "caa", benign, points)), "rows": rows}
        print(f"{label:>16}: dominates CAA at " + "; ".join(f"{v}: {e['dominated_caa_strengths']}"
                                                           for v, e in entry["views"].items()) + f"  (mean gate {mean_g})")
        table.append(entry)
        if t is None:  # the hard gate's simulation against the run's own rows of that method
            real = {r["strength"]: r for r in doc["rows"] if r["method"] == a.gate_method}
            sim = {r["strength"]: r for r in entry["views"]["pooled benign"]["rows"] if r["strength"] in real}
            for key in ("target_margin_shift", "benign_kl", "benign_margin_shift"):
                print(f"{'':>18}check vs the run's {a.gate_method}, {key}: "
                      + ", ".join(f"λ={lam:g} {sim[lam][key]:.3f}/{real[lam][key]:.3f}" for lam in sorted(sim)))
    if a.out:
        Path(a.out).write_text(json.dumps({"eval": a.eval, "tau": tau, "benign_score_std": spread,
                                           "caa_points": list(points), "shapes": table}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
