"""Writing an :class:`~finesteer.eval.harness.EvalResult`: JSON, a Markdown table, PNG plots.

Files written by :func:`write_reports` into one directory:

- ``eval.json`` — everything measured (per-prompt gate scores, margin shifts and KL included);
- ``eval.md`` — the summary table (one row per method × strength), fit statistics and timings;
- ``curve.png`` — the refusal-vs-utility curve: target margin shift against benign KL and against
  benign margin shift, one line per method over λ (the plot a reader looks at first);
- ``gate_hist.png`` — gate score histograms per evaluation set, with τ, for every gated method;
- ``truthfulqa.png`` — MC1 and MC2 against λ per method (when TruthfulQA was scored);
- ``truthfulqa_tradeoff.png`` — MC1 and MC2 against benign KL, one line per method over λ (when
  TruthfulQA and a benign set were scored): how much truthfulness each method buys per unit of
  collateral change.

Plots use matplotlib's Agg backend (no display needed); ``pip install finesteer[eval]``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional

__all__ = ["markdown_table", "write_reports"]

#: Table columns: (row key, header, format).
COLUMNS = (
    ("method", "method", "{}"),
    ("strength", "λ", "{:g}"),
    ("target_margin_shift", "target margin shift", "{:+.3f}"),
    ("target_toward_rate", "target toward-rate", "{:.1%}"),
    ("target_gate_open", "target gate open", "{:.1%}"),
    ("benign_margin_shift", "benign margin shift", "{:+.3f}"),
    ("benign_kl", "benign KL", "{:.4f}"),
    ("benign_greedy_identical", "benign greedy identical", "{:.1%}"),
    ("benign_gate_open", "benign gate open", "{:.1%}"),
    ("benign_gate_open_tokens", "benign gate open (continuation tokens)", "{:.1%}"),
    ("mc1", "TQA MC1", "{:.3f}"),
    ("mc2", "TQA MC2", "{:.3f}"),
)


def _fmt(fmt: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return fmt.format(value)


def markdown_table(rows: List[dict]) -> str:
    """The summary table in Markdown: only the columns some row has."""
    cols = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(c[1] for c in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(c[2], r.get(c[0])) for c in cols) + " |")
    return "\n".join(lines)


def _markdown(doc: dict) -> str:
    fit = doc["fit"]
    out = [f"# finesteer eval — {doc['model']}, layer {doc['config']['layer']}", ""]
    own = {n: s["toward"] for n, s in doc.get("sets", {}).items() if s.get("toward", doc["config"]["toward"])
           != doc["config"]["toward"]}
    per_set = "".join(f"; set {n}: toward **{t}**" for n, t in own.items())
    out.append("Margin = log p(toward response | prompt) − log p(away response | prompt), toward = "
               f"**{doc['config']['toward']}**{per_set}; shift = steered − unsteered. KL = KL(unsteered ‖ steered) "
               "of the next-token distribution over the unsteered greedy continuation of benign prompts.")
    out += ["", markdown_table(doc["rows"]), ""]
    g = fit.get("gate", {})
    out.append(f"SCS gate (fit calibration): τ={g.get('threshold', float('nan')):.4g}, TPR={g.get('tpr', 0):.3f}, "
               f"FPR={g.get('fpr', 0):.3f}, AUROC={g.get('auroc', 0):.3f}.")
    if fit.get("cast_gate"):
        c = fit["cast_gate"]
        out.append(f"CAST-style gate (fit calibration): τ={c['threshold']:.4g}, TPR={c['tpr']:.3f}, FPR={c['fpr']:.3f}, "
                   f"AUROC={c['auroc']:.3f}.")
    if fit.get("gate_auroc_eval"):
        out.append("Gate AUROC on the evaluation sets (target vs benign): "
                   + ", ".join(f"{k} {v:.3f}" for k, v in fit["gate_auroc_eval"].items()) + ".")
    out += _response_gate_markdown(fit.get("gate_rows"), (doc.get("truthfulqa") or {}).get("gate_open_on_answer_tokens"))
    out += _token_gate_markdown(doc.get("sets") or {})
    out += _tradeoff_markdown(doc)
    out += _matching_markdown(doc.get("matched"))
    pred = fit.get("delta_prediction_heldout") or {}
    if pred:
        out += ["", f"Held-out response-shift prediction ({fit.get('n_prompts_heldout')} prompts unseen in the fit, "
                f"{fit.get('n_pairs_heldout')} pairs; target: each prompt's δ averaged over its pairs):",
                "", "| vector field | cosine | MSE |", "|---|---|---|"]
        out += [f"| {k} | {v['cosine']:.3f} | {v['mse']:.4g} |" for k, v in pred.items()]
    shrink = (fit.get("mose") or {}).get("shrink")
    if shrink:
        out += ["", f"MoSE shrunk toward the mean δ by weight {shrink['weight']:.3g} ({shrink['folds']}-fold "
                f"cross-validation over its training rows; out-of-fold MSE {shrink['cv_mse']:.4g}, as trained "
                f"{shrink['cv_mse_trained']:.4g}, mean δ {shrink['cv_mse_mean']:.4g})."]
    by_source = fit.get("delta_prediction_heldout_by_source") or {}
    if by_source:
        out += ["", "The same, per pair file:", "", "| pair file | held-out prompts | vector field | cosine | MSE |",
                "|---|---|---|---|---|"]
        out += [f"| {src} | {v['n']} | {k} | {v['cosine']:.3f} | {v['mse']:.4g} |"
                for src, per in by_source.items() for k, v in per.items()]
    null = (fit.get("null_rows") or {}).get("prediction_heldout")
    if null:
        out += ["", f"Null rows (benign training prompts MoSE was fitted to leave alone, δ = 0): "
                f"{fit['null_rows']['n_fit']} in the fit; on the {next(iter(null.values()))['n']} held out, the "
                "mean squared vector (MSE against δ = 0): " + ", ".join(f"{k} {v['mse']:.4g}" for k, v in null.items())
                + "."]
    out += truthfulqa_paired_markdown(doc.get("truthfulqa") or {})
    if doc.get("generation"):
        out += ["", "Keyword refusal rate of greedy generations:", ""]
        for name, s in doc["generation"].items():
            cells = [f"{m} λ={lam}: {r['refusal_rate']:.0%}" for m, per in s["results"].items() for lam, r in per.items()]
            out.append(f"- {name} ({s['role']}, n={s['n']}): " + "; ".join(cells))
    if doc.get("not_expressible"):
        out += ["", "Not expressible in the operator: "
                + "; ".join(f"{k} ({v})" for k, v in doc["not_expressible"].items()) + "."]
    if doc.get("splits"):
        out += ["", "Files both fitted on and scored were split by record: "
                + "; ".join(f"{k}: {v['fit']} fit / {v['scored']} scored" for k, v in doc["splits"].items()) + "."]
    out += ["", "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in doc["timings"].items()), ""]
    return "\n".join(out)


def _response_gate_markdown(rows: Optional[dict], answers: Optional[dict]) -> List[str]:
    """Where a gate fitted on response tokens (``gate_tokens="response"``) opens: on each block of its
    own rows, on the held-out pairs' responses, and on the scored TruthfulQA answers' tokens."""
    if not rows:
        return []
    out = ["", "Gate on response tokens (SCS gate of scs_mean / finesteer): rows and the share on which it opens "
           "(held-out blocks: pairs the gate was not fitted on).", "", "| rows | n | open |", "|---|---|---|"]
    out += [f"| {name.replace('_', ' ')} | {v['rows']} | {_fmt('{:.3f}', v['open_share'])} |"
            for name, v in rows.items() if isinstance(v, dict)]
    if answers:
        out += ["", "Open on the scored TruthfulQA answers' tokens: "
                + "; ".join(f"{m}: incorrect {v['incorrect']:.3f}, correct {v['correct']:.3f}" for m, v in answers.items())
                + "."]
    return out


def _token_gate_markdown(sets: dict) -> List[str]:
    """Token mode: where each gate opens on the benign sets' prompt and continuation tokens."""
    lines = [f"- {name}, {m}: prompt tokens {v['prompt_tokens']:.3f}, continuation tokens {v['continuation_tokens']:.3f}"
             for name, s in sets.items() for m, v in (s.get("gate_on_tokens") or {}).items()]
    return ["", "Token mode: share of the benign sets' tokens (prompts, and the greedy continuations the KL is "
            "measured on) where each gate opens:", "", *lines] if lines else []


def _set_rows(doc: dict, name: str) -> List[dict]:
    """Summary rows with the benign columns of one benign evaluation set (targets stay pooled)."""
    per = doc["sets"][name]["results"]
    out = []
    for r in doc["rows"]:
        got = per.get(r["method"], {}).get(str(float(r["strength"])))
        if got is not None and "kl" in got:
            out.append({**r, "benign_kl": got["kl"], "benign_margin_shift": got["margin_shift"]})
    return out


#: (method, baseline) pairs of the point-by-point trade-off check: FineSteer against the baselines,
#: and the MoSE ablations against the same configuration with the mean vector (FineSteer vs SCS +
#: mean share a gate; MoSE with the gate off vs CAA share none), where MoSE's routing shows or not.
COMPARISONS = (("finesteer", "caa"), ("finesteer", "cast"), ("finesteer", "scs_mean"), ("mose_nogate", "caa"))


def _tradeoff_markdown(doc: dict) -> List[str]:
    """The point-by-point dominance check of :data:`COMPARISONS` that were run and of the run's
    ``match_targets`` pairs (when the rows carry target margins): on the pooled benign sets, then on
    each benign set, and a count of the points dominated."""
    from .metrics import tradeoff_comparison

    rows = doc["rows"]
    methods = {r["method"] for r in rows}
    matched = [tuple(p) for p in doc.get("config", {}).get("match_targets", ())]
    pairs = [(m, b) for m, b in COMPARISONS + tuple(p for p in matched if p not in COMPARISONS)
             if m in methods and b in methods]
    if not pairs or not any("target_margin_shift" in r for r in rows):
        return []
    views = [("all benign sets", rows)]
    views += [(name, _set_rows(doc, name)) for name, s in doc.get("sets", {}).items() if s.get("role") == "benign"]
    out = ["", "Trade-off, point by point: for each baseline strength, the weakest strength of the method that moves "
           "the target prompts at least as far, and whether its benign cost there is lower (KL; |margin shift|). "
           "FineSteer against the baselines; the MoSE ablations against the same configuration with the mean "
           "vector (finesteer vs scs_mean: same gate; mose_nogate vs caa: no gate):", "",
           "| benign set | method | baseline | λ | target shift | benign KL | benign shift | method λ | target shift | "
           "benign KL | benign shift | KL lower | shift lower |", "|" + "---|" * 13]
    summary = []
    for view, view_rows in views:
        for method, base in pairs:
            entries = tradeoff_comparison(view_rows, method, base)
            reached = [e for e in entries if e["strength"] is not None]
            won = [e for e in reached if e["kl_lower"] and e["shift_lower"]]
            # the same benign cost (both exactly untouched, typically): neither lower nor higher
            tied = [e for e in reached if e["benign_kl"] == e["baseline_benign_kl"]
                    and abs(e["benign_shift"]) == abs(e["baseline_benign_shift"])]
            summary.append(f"- {view}, {method} vs {base}: dominates at {len(won)} of {len(reached)} reached points"
                           + (f" ({len(entries) - len(reached)} out of reach)" if len(reached) < len(entries) else "")
                           + (": λ " + ", ".join(f"{e['baseline_strength']:g}" for e in won) if won else "")
                           + (f"; the same benign cost at {len(tied)}" if tied else ""))
            for e in entries:
                mine = (["—"] * 6 if e["strength"] is None else
                        [f"{e['strength']:g}", f"{e['target_shift']:+.3f}", f"{e['benign_kl']:.4f}",
                         f"{e['benign_shift']:+.3f}", "yes" if e["kl_lower"] else "no",
                         "yes" if e["shift_lower"] else "no"])
                out.append(f"| {view} | {method} | {base} | {e['baseline_strength']:g} | "
                           f"{e['baseline_target_shift']:+.3f} | {e['baseline_benign_kl']:.4f} | "
                           f"{e['baseline_benign_shift']:+.3f} | " + " | ".join(mine) + " |")
    return out + ["", "Dominance (lower benign KL and lower |benign margin shift| at a matched target shift), per "
                  "baseline point reached:", ""] + summary


def _matching_markdown(matched: Optional[dict]) -> List[str]:
    """What target matching (``--match-targets``) added: strengths per method, and per compared pair
    the baseline points it matched within the tolerance, matched only beyond it, or could not reach."""
    if not matched:
        return []
    added = "; ".join(f"{m} {', '.join(f'{lam:g}' for lam in lams)}" for m, lams in matched["added"].items())
    out = ["", f"Target matching (tolerance {matched['tolerance']:.0%}): strengths added by interpolating each "
           f"method's measured curve — {added or 'none'}."]
    for pair, points in matched["points"].items():
        method, base = pair.split(":")
        far = [p for p in points if p["strength"] is not None and not p["within_tolerance"]]
        unreached = [p for p in points if p["strength"] is None]
        cells = [f"{sum(p['within_tolerance'] for p in points)} of {len(points)} {base} points within the tolerance"]
        if far:
            cells.append("further: " + ", ".join(f"λ {p['baseline_strength']:g} (+{p['target_shift'] / p['baseline_target_shift'] - 1:.0%})"
                                                 if p["baseline_target_shift"] > 0 else f"λ {p['baseline_strength']:g}"
                                                 for p in far))
        if unreached:
            cells.append("out of reach: λ " + ", ".join(f"{p['baseline_strength']:g}" for p in unreached))
        out.append(f"- {method} vs {base}: " + "; ".join(cells) + ".")
    return out


def truthfulqa_paired_markdown(tqa: dict) -> List[str]:
    """The Markdown lines of a TruthfulQA block's ``paired`` comparisons (``tqa`` with ``n`` and
    ``paired[method][λ][other]``, e.g. ``eval.json``'s ``truthfulqa``): each steered configuration
    against each configuration it was paired with (the unsteered model, CAA at the same λ) on the
    same questions — how many questions only one of the two gets right (MC1) with the exact sign-test
    p, and the mean per-question MC2 difference ± its standard error. No lines without pairs."""
    paired = tqa.get("paired") or {}
    if not paired:
        return []
    out = ["", f"TruthfulQA, paired on the same {tqa['n']} questions (MC1: questions only the method / only the "
           "other gets right, exact two-sided sign-test p; MC2: mean per-question difference ± standard error):", "",
           "| method | λ | against | MC1 method only | MC1 other only | sign-test p | MC2 difference |",
           "|---|---|---|---|---|---|---|"]
    for name, per in paired.items():
        for lam, against in per.items():
            for other, c in against.items():
                out.append(f"| {name} | {float(lam):g} | {other} | {c['mc1_a_only']} | {c['mc1_b_only']} | "
                           f"{c['mc1_sign_p']:.3g} | {c['mc2_diff']:+.4f} ± {c['mc2_diff_se']:.4f} |")
    return out


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _by_method(rows: List[dict]) -> Dict[str, List[dict]]:
    out: Dict[str, List[dict]] = {}
    for r in rows:
        out.setdefault(r["method"], []).append(r)
    return out


def _labelled_line(ax, xs: list, ys: list, strengths: list, name: str) -> None:
    """One method's line over λ on ``ax``, each point labelled with its λ (λ = 0, the unsteered
    point, unlabelled)."""
    ax.plot(xs, ys, marker="o", label=name)
    for x, y, lam in zip(xs, ys, strengths):
        if lam:
            ax.annotate(f"{lam:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")


def plot_curve(rows: List[dict], path: Path) -> bool:
    """Target margin shift vs benign KL and vs benign margin shift, one line per method over λ."""
    panels = [(x, lab) for x, lab in (("benign_kl", "benign KL (unsteered ‖ steered)"),
                                      ("benign_margin_shift", "benign margin shift"))
              if any(x in r for r in rows)]
    if not panels or not any("target_margin_shift" in r for r in rows):
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (x, label) in zip(axes[0], panels):
        for name, rs in _by_method(rows).items():
            pts = [(r[x], r["target_margin_shift"], r["strength"]) for r in rs if x in r and "target_margin_shift" in r]
            if not pts:
                continue
            _labelled_line(ax, [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts], name)
        ax.set_xlabel(label)
        ax.set_ylabel("target margin shift (nats)")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle("Target movement vs collateral change (labels: λ); up and to the left is better")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_gate_histograms(sets: dict, path: Path) -> bool:
    methods = sorted({m for s in sets.values() for m in s.get("gate", {})})
    if not methods:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(methods), figsize=(5 * len(methods), 3.8), squeeze=False)
    import numpy as np

    for ax, m in zip(axes[0], methods):
        gates = {name: s["gate"][m] for name, s in sets.items() if m in s["gate"]}
        tau = next(iter(gates.values()))["threshold"]
        # common bins over the range the scores and τ actually occupy (scores often sit in a narrow band)
        allv = [v for g in gates.values() for v in g["scores"]] + [tau]
        lo, hi = min(allv), max(allv)
        edges = np.linspace(lo, hi if hi > lo else lo + 1e-6, 41)
        for name, g in gates.items():
            counts, _ = np.histogram(np.clip(g["scores"], lo, hi), bins=edges)
            ax.stairs(counts / max(1, counts.sum()), edges, label=f"{name} ({sets[name]['role']})", fill=False)
        if tau is not None:
            ax.axvline(tau, color="k", linestyle="--", label=f"τ={tau:.3g}")
        ax.set_title(m)
        ax.set_xlabel("gate score s(h)")
        ax.set_ylabel("fraction of prompts")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_truthfulqa(tqa: dict, path: Path) -> bool:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), squeeze=False)
    for ax, key in zip(axes[0], ("mc1", "mc2")):
        for name, per in tqa["results"].items():
            lams = sorted(per, key=float)
            ax.plot([float(lam) for lam in lams], [per[lam][key] for lam in lams], marker="o", label=name)
        ax.axhline(tqa["unsteered"][key], color="k", linestyle=":", label="unsteered")
        ax.set_xlabel("strength λ")
        ax.set_ylabel(key.upper())
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def truthfulqa_tradeoff_points(results: dict, benign_kl) -> Dict[str, List[dict]]:
    """The points of :func:`plot_truthfulqa_tradeoff`: for each steered method of the TruthfulQA
    ``results`` (``{method: {λ: {"mc1", "mc2", ...}}}``), ``{"strength", "benign_kl", "mc1", "mc2"}``
    at every λ where ``benign_kl(method, λ)`` is not None, ordered by λ."""
    out: Dict[str, List[dict]] = {}
    for method, per in results.items():
        if method == "unsteered":
            continue
        for lam, r in sorted(per.items(), key=lambda kv: float(kv[0])):
            kl = benign_kl(method, lam)
            if kl is not None:
                out.setdefault(method, []).append({"strength": float(lam), "benign_kl": kl,
                                                   "mc1": r["mc1"], "mc2": r["mc2"]})
    return out


def _run_benign_kl(rows: List[dict]):
    """``(method, λ) -> benign KL`` of one run's summary ``rows`` (None where a row has none)."""
    kl = {(r["method"], float(r["strength"])): r["benign_kl"] for r in rows if r.get("benign_kl") is not None}
    return lambda method, lam: kl.get((method, float(lam)))


def plot_truthfulqa_tradeoff(curves: Dict[str, List[dict]], unsteered: dict, path: Path, title: str = "") -> bool:
    """TruthfulQA MC1 and MC2 against benign KL, one line per method over λ (labels: λ).

    ``curves``: ``{method: [{"strength", "benign_kl", "mc1", "mc2"}, ...]}``; ``unsteered``:
    ``{"mc1", "mc2"}`` (a dotted line). Benign KL on a log axis (it spans decades between gated and
    always-on methods); where a point's KL is exactly 0 (a gate closed on every benign prompt) the
    axis is symmetric-log, linear below the smallest positive KL, so that point is still drawn.
    Returns False (nothing written) when no method has a point."""
    curves = {m: sorted(pts, key=lambda r: r["strength"]) for m, pts in curves.items() if pts}
    if not curves:
        return False
    positive = [r["benign_kl"] for pts in curves.values() for r in pts if r["benign_kl"] > 0]
    has_zero = len(positive) < sum(len(pts) for pts in curves.values())
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), squeeze=False)
    for ax, key in zip(axes[0], ("mc1", "mc2")):
        for name, pts in curves.items():
            _labelled_line(ax, [r["benign_kl"] for r in pts], [r[key] for r in pts], [r["strength"] for r in pts], name)
        ax.axhline(unsteered[key], color="k", linestyle=":", label="unsteered")
        if has_zero:
            ax.set_xscale("symlog", linthresh=min(positive) if positive else 1e-3)
            ax.set_xlim(left=0)
        else:
            ax.set_xscale("log")
        ax.set_xlabel("benign KL (unsteered ‖ steered), log scale")
        ax.set_ylabel(key.upper())
        ax.grid(alpha=0.3, which="both")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title or "TruthfulQA vs collateral change on benign prompts (labels: λ); up and to the left is better")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_reports(result, out_dir) -> Dict[str, str]:
    """Write ``eval.json``, ``eval.md`` and the PNG plots of ``result`` into ``out_dir`` (created).

    Returns ``{kind: path}`` of the files written (plots that have no data are skipped).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = result.to_dict() if hasattr(result, "to_dict") else dict(result)
    files = {}
    tmp = out / "eval.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, sort_keys=False, default=str))
    tmp.replace(out / "eval.json")
    files["json"] = str(out / "eval.json")
    (out / "eval.md").write_text(_markdown(doc))
    files["markdown"] = str(out / "eval.md")
    if plot_curve(doc["rows"], out / "curve.png"):
        files["curve"] = str(out / "curve.png")
    if plot_gate_histograms(doc["sets"], out / "gate_hist.png"):
        files["gate_hist"] = str(out / "gate_hist.png")
    tqa = doc.get("truthfulqa")
    if tqa and plot_truthfulqa(tqa, out / "truthfulqa.png"):
        files["truthfulqa"] = str(out / "truthfulqa.png")
    if tqa and plot_truthfulqa_tradeoff(truthfulqa_tradeoff_points(tqa["results"], _run_benign_kl(doc["rows"])),
                                        tqa["unsteered"], out / "truthfulqa_tradeoff.png"):
        files["truthfulqa_tradeoff"] = str(out / "truthfulqa_tradeoff.png")
    return files
