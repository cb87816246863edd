"""What a gate would need to dominate CAA on the borderline prompts, and what a linear gate reaches.

A closed hard gate leaves a prompt untouched exactly (margin shift 0, KL 0), so a gated method's
mean over a prompt set is its open rate times its mean over the prompts it opens. From a safety
run's ``eval.json`` — a run on the *development* rows (``--eval-start 0``, the first rows of each
file; the committed one is ``results/quality/dev_grid``) — this gives, exactly, FineSteer's
per-opened means at each strength λ: target
margin shift a(λ) = shift / p, borderline KL k(λ) = KL / f and borderline margin shift
b(λ) = shift / f (p, f = the open rates on the target and on the borderline prompts).

FineSteer at λ dominates a CAA point (target shift T, borderline KL K, borderline shift S) iff
p·a(λ) ≥ T, f·k(λ) < K and f·|b(λ)| < |S|. Holding a, k, b fixed (an approximation: another
operating point opens other prompts), that asks the gate for p ≥ T / a(λ) and
f < min(K / k(λ), |S| / |b(λ)|) at some λ of the grid: a box in the (borderline open rate, target
TPR) plane, printed per CAA point.

The second part asks what gates reach: the probe gate (DESIGN §2, ``fit_scs(method="probe")``) at
the run's layer, fitted as in the run (``harmful_train`` vs ``benign_train`` + CoCoNot prompts,
the first --n rows of each) at several ridges, scored on the *development* rows (first half of
``harmful_val`` / ``borderline_val``); for each box, the largest development TPR of any ridge at a
borderline open rate under the box's bound, with the threshold set on the development borderline
rows themselves (an oracle threshold, so an optimistic answer). Given a development-row run,
nothing here looks at the reported rows.

Run (last-token states come from ``gate_study.py``'s cache; the model loads only to fill it)::

    nice python benchmarks/quality/borderline_bound.py \\
        --eval benchmarks/results/quality/dev_grid/eval.json \\
        -o benchmarks/results/quality/borderline_bound.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

RIDGES = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0)
BUDGETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
DEV = ("harmful_val", "borderline_val", "benign_val")


def per_opened(sets: dict, method: str, target: str, benign: str) -> dict:
    """{λ: (p, a, f, k, b)} of a gated ``method`` from eval.json ``sets``."""
    p = float(sets[target]["gate"][method]["open_rate"])
    f = float(sets[benign]["gate"][method]["open_rate"])
    out = {}
    for lam, r_t in sets[target]["results"][method].items():
        r_b = sets[benign]["results"][method][lam]
        a = r_t["margin_shift"] / p if p > 0 else 0.0
        k = r_b["kl"] / f if f > 0 else 0.0
        b = r_b["margin_shift"] / f if f > 0 else 0.0
        out[float(lam)] = (p, a, f, k, b)
    return out


def required_boxes(sets: dict, baseline: str, method: str, target: str, benign: str) -> list:
    """Per baseline strength: the gate operating points (min TPR, max borderline open rate) under
    which ``method`` at some grid λ would dominate it, with the observed (p, f)."""
    curve = per_opened(sets, method, target, benign)
    rows = []
    for lam, r_t in sets[target]["results"][baseline].items():
        r_b = sets[benign]["results"][baseline][lam]
        T, K, S = r_t["margin_shift"], r_b["kl"], abs(r_b["margin_shift"])
        boxes = []
        for mlam, (p, a, f, k, b) in sorted(curve.items()):
            if a <= 0:
                continue
            f_max = min(K / k if k > 0 else 1.0, S / abs(b) if b else 1.0, 1.0)
            boxes.append(dict(method_lambda=mlam, min_tpr=round(T / a, 3), max_borderline_open=round(f_max, 4),
                              observed_tpr=round(p, 3), observed_borderline_open=round(f, 3)))
        rows.append(dict(baseline=baseline, baseline_lambda=float(lam), target_shift=round(T, 3),
                         borderline_kl=round(K, 4), borderline_shift=round(S, 3),
                         boxes=[x for x in boxes if x["min_tpr"] <= 1.0]))
    return rows


def dev_states(layer: int, n: int, cache_dir: str, threads: int) -> dict:
    """Last-token states of the gate files and the development rows (``gate_study.py``'s cache)."""
    import gate_study

    args = argparse.Namespace(layers=[layer], n=n, n_dev=300, cache_dir=cache_dir, threads=threads)
    return {name: x[layer] for name, x in gate_study.states(args).items()}


def gate_benign(h: dict) -> torch.Tensor:
    """The gate's benign side as the safety run pools it (gate_study's ``benign_train+coconot``)."""
    import gate_study

    return torch.cat([h[name] for name in gate_study.BENIGN_SIDES["benign_train+coconot"]])


def dev_roc(h: dict) -> dict:
    """{ridge: (dev target scores, dev borderline scores)} of the probe gate fitted as in the run."""
    from finesteer.fit import fit_scs

    benign = gate_benign(h)
    out = {}
    for ridge in RIDGES:
        g = fit_scs(h["harmful_train"], benign, rank=1, method="probe", probe_ridge=ridge)
        out[ridge] = (g.score(h["harmful_val"]).double(), g.score(h["borderline_val"]).double())
    return out


def dominated(rows: list, p: float, f: float) -> list:
    """Baseline strengths a gate opening on fractions ``p`` (target) and ``f`` (borderline) would
    dominate, by the boxes of :func:`required_boxes`."""
    return [r["baseline_lambda"] for r in rows
            if any(p >= b["min_tpr"] and f < b["max_borderline_open"] for b in r["boxes"])]


def fitted_gates(h: dict, rows: list) -> list:
    """Every probe gate fitted as the run fits it (ridge × benign-FPR budget, τ calibrated on the
    train split): its development open rates and the baseline points it would dominate."""
    from finesteer.eval.metrics import gate_rates
    from finesteer.fit import fit_scs

    benign = gate_benign(h)
    out = []
    for ridge in RIDGES:
        for budget in BUDGETS:
            g = fit_scs(h["harmful_train"], benign, rank=1, method="probe", probe_ridge=ridge, max_benign_fpr=budget)
            rate = {name: gate_rates(g.score(h[name]), g.threshold) for name in DEV}
            p, f = rate["harmful_val"], rate["borderline_val"]
            out.append(dict(ridge=ridge, max_benign_fpr=budget, dev_tpr=round(p, 3), dev_borderline_open=round(f, 3),
                            dev_benign_open=round(rate["benign_val"], 3), dominates=dominated(rows, p, f)))
    return out


def best_tpr(roc: dict, max_open: float) -> tuple:
    """(TPR, ridge): the largest development TPR at a borderline open rate < ``max_open``, over ridges,
    with the threshold at the borderline scores' own quantile (oracle)."""
    from finesteer.eval.metrics import gate_rates

    best = (0.0, None)
    for ridge, (s_t, s_b) in roc.items():
        n_open = int(max_open * len(s_b) - 1e-9)  # strictly fewer than max_open · n borderline rows open
        if n_open < 0:
            continue
        tau = torch.sort(s_b, descending=True).values[n_open] if n_open < len(s_b) else s_b.min() - 1
        tpr = gate_rates(s_t, float(tau))
        if tpr > best[0]:
            best = (round(tpr, 3), ridge)
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--eval", required=True, help="eval.json of a safety run on the development rows")
    ap.add_argument("--baseline", default="caa")
    ap.add_argument("--method", default="finesteer")
    ap.add_argument("--target", default="harmful", help="target set name in eval.json")
    ap.add_argument("--benign", default="borderline", help="benign set name in eval.json")
    ap.add_argument("--n", type=int, default=1000, help="train prompts per gate file, as in the run")
    ap.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "finesteer" / "gate_study"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-roc", action="store_true", help="only the required boxes (no model, no states)")
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args(argv)
    res = json.loads(Path(a.eval).read_text())
    rows = required_boxes(res["sets"], a.baseline, a.method, a.target, a.benign)
    if not a.no_roc:
        torch.set_num_threads(a.threads)
        h = dev_states(int(res["config"]["layer"]), a.n, a.cache_dir, a.threads)
        roc = dev_roc(h)
        for row in rows:
            for box in row["boxes"]:
                tpr, ridge = best_tpr(roc, box["max_borderline_open"])
                box.update(dev_best_tpr=tpr, dev_best_ridge=ridge, reachable=tpr >= box["min_tpr"])
            row["reachable"] = any(b["reachable"] for b in row["boxes"])
    for row in rows:
        print(f"{row['baseline']} λ={row['baseline_lambda']:g}: target {row['target_shift']:+.2f}, "
              f"borderline KL {row['borderline_kl']:.3f}, |shift| {row['borderline_shift']:.2f}"
              + (f"  -> reachable: {row['reachable']}" if "reachable" in row else ""))
        for b in row["boxes"]:
            extra = (f"; dev oracle TPR {b['dev_best_tpr']:.2f} (ridge {b['dev_best_ridge']})"
                     if "dev_best_tpr" in b else "")
            has = f"(has {b['observed_tpr']:.2f} / {b['observed_borderline_open']:.3f})"
            print(f"    {a.method} λ={b['method_lambda']:g}: needs TPR ≥ {b['min_tpr']:.2f} at borderline open "
                  f"< {b['max_borderline_open']:.3f} {has}{extra}")
    gates = [] if a.no_roc else fitted_gates(h, rows)
    if gates:
        print(f"fitted probe gates (development rows): which {a.baseline} strengths each would dominate on {a.benign}")
        for g in gates:
            print(f"    ridge {g['ridge']:g}, budget {g['max_benign_fpr']:g}: TPR {g['dev_tpr']:.2f}, {a.benign} open "
                  f"{g['dev_borderline_open']:.3f}, benign open {g['dev_benign_open']:.3f} -> {g['dominates']}")
    if a.output:
        Path(a.output).write_text(json.dumps(dict(eval=a.eval, baseline=a.baseline, method=a.method,
                                                  target=a.target, benign=a.benign, rows=rows, fitted_gates=gates),
                                             indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
