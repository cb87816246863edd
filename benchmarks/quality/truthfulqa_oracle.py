"""An upper bound for TruthfulQA steering: each question steered by its own answers' response shift.

FineSteer and CAA share a ceiling on TruthfulQA from λ ≈ 8 on (docs/quality.md). This study asks
whether that ceiling belongs to the steering form (one vector added at layer 11 from the last
prompt token on) or to what the query reveals about the vector. Per fold of the two-fold
cross-fit it steers every *scored* question, always on, by an **oracle** vector built from that
question's own answers: the mean response shift δ over its (correct, incorrect) answer pairs (up to
``--pairs-per-question``, built as training pairs are), rescaled to the norm of the fold's CAA vector
so that λ means a push as large as CAA's. Leaky on purpose (it uses the answers that are scored):
no predictor from the query can know more.

With ``--own-cosine c`` a *graded* oracle is scored too: per question, the vector in the plane of
CAA's direction m and its own δ u, turned from m toward u until its cosine with u is ``c`` (left at
m where m already agrees that well), same norm. It says how well a δ predictor must agree with each
question's own shift before it beats CAA; MoSE's held-out cosine on TruthfulQA is about 0.25 and
the mean vector's about 0.2 (the runs' ``delta_prediction_heldout``).

Each oracle runs through the operator itself, in the MoSE slot: an interpolating linear map
``s(h) = b + U M h`` over the scored questions' prompt states (:func:`interpolating_map`), with the
bias as the single expert's value. Its cosine with the targets, on those states and on states
perturbed by 10⁻⁵ relative, is reported: the scoring pass recomputes the states in other batches.

    nice python benchmarks/quality/truthfulqa_oracle.py --task truthfulness --cache-dir <bench_quality cache> \\
        --strengths 2,4,8,16,32 -o <dir>/oracle_fold1.json
    nice python benchmarks/quality/truthfulqa_oracle.py --task truthfulness_swapped --cache-dir <cache> \\
        --strengths 2,4,8,16,32 -o <dir>/oracle_fold2.json
    python benchmarks/quality/truthfulqa_oracle.py pool <dir>/oracle_fold1.json <dir>/oracle_fold2.json \\
        -o benchmarks/results/quality/truthfulqa_oracle.json

Options after ``--`` are ``finesteer eval``'s, for the MoSE whose agreement with each question's own
δ is reported beside CAA's (the adopted fit: ``-- --mose-cluster-on query --k-min 2 --k-max 4
--mose-stopping cv``); ``agreement --query-layers 3,7,15`` also predicts from other blocks' states,
``--pooled-layers 11,15`` from prompt states averaged over the prompt's tokens.
Graded oracles, without CAA (scored by the run above)::

    nice python benchmarks/quality/truthfulqa_oracle.py --task truthfulness --cache-dir <cache> --no-caa \\
        --own-cosine 0.3,0.4,0.5 --strengths 4,8,16,32 -o <dir>/graded_fold1.json -- <the adopted fit's options>
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

TASKS = ("truthfulness", "truthfulness_swapped")
#: Relative size of the perturbation the robustness check applies to the prompt states.
NOISE = 1e-5


def interpolating_map(h: torch.Tensor, t: torch.Tensor, ridge: float = 1e-8) -> tuple:
    """``(b [d], U [d, r], M [r, d])`` with ``b + U M h_i ≈ t_i`` for every row of ``h`` [n, d],
    ``t`` [n, d] (n ≤ d + 1 distinct states): the minimum-norm affine interpolant, solved in float64
    with a ridge of ``ridge`` × the centred Gram's mean diagonal. ``U`` spans the centred targets."""
    h, t = h.double(), t.double()
    h_mean, t_mean = h.mean(0), t.mean(0)
    X, Y = h - h_mean, t - t_mean
    gram = X @ X.T
    lam = ridge * float(gram.diagonal().mean())
    A = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), Y)  # Y ≈ X Xᵀ A
    _, S, Vh = torch.linalg.svd(Y, full_matrices=False)
    U = Vh[S > S[0] * 1e-10].T
    M = (U.T @ A.T) @ X
    return t_mean - U @ (M @ h_mean), U, M


def oracle_mose(h: torch.Tensor, targets: torch.Tensor):
    """The operator's MoSE whose vector is :func:`interpolating_map` of ``targets`` over ``h``:
    ``linear_map_mose`` for ``U M h`` with the bias as its single expert's value."""
    from finesteer.eval.baselines import linear_map_mose

    b, U, M = interpolating_map(h, targets)
    mose = linear_map_mose(U.float(), M.float())
    mose.V = b.float().reshape(1, -1).contiguous()
    mose.fit_stats = {"kind": "truthfulqa_oracle", "rank": int(U.shape[1])}
    return mose


def graded_targets(own: torch.Tensor, mean: torch.Tensor, cosine: float, norm: float) -> torch.Tensor:
    """Per row of ``own`` [n, d] a vector of norm ``norm`` in the plane of ``mean`` [d] and that row,
    turned from ``mean``'s direction toward the row's until their cosine is ``cosine`` (left along
    ``mean`` where it already agrees at least that well); ``cosine = 1`` gives the row's own direction."""
    if not 0.0 < cosine <= 1.0:
        raise ValueError(f"own cosine must be in (0, 1], got {cosine}")
    m = mean.double() / mean.double().norm()
    u = own.double() / own.double().norm(dim=1, keepdim=True)
    a = (u @ m).clamp(-1.0, 1.0)
    w = u - a[:, None] * m
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)
    theta = (torch.arccos(a) - torch.arccos(torch.tensor(cosine, dtype=torch.float64))).clamp_min(0.0)
    return norm * (torch.cos(theta)[:, None] * m + torch.sin(theta)[:, None] * w)


def per_question_deltas(prompts: list, deltas: torch.Tensor, questions: list) -> torch.Tensor:
    """``[len(questions), d]``: each question's mean δ over the rows of ``deltas`` whose prompt is its text."""
    index = {q: i for i, q in enumerate(questions)}
    total = torch.zeros(len(questions), deltas.shape[1], dtype=torch.float64)
    count = torch.zeros(len(questions), dtype=torch.float64)
    for k, p in enumerate(prompts):
        total[index[p]] += deltas[k].double()
        count[index[p]] += 1
    if bool((count == 0).any()):
        missing = [questions[i] for i in (count == 0).nonzero().flatten().tolist()]
        raise ValueError(f"no answer pair for {len(missing)} question(s), e.g. {missing[0]!r}")
    return total / count[:, None]


def first_pairs(prompts: list, k: int) -> torch.Tensor:
    """Boolean mask [len(prompts)] of each prompt's first ``k`` rows: of ``truthfulqa_pairs(qs, n)``
    for n ≥ k, exactly the rows of ``truthfulqa_pairs(qs, k)`` (it cycles through the answers in order)."""
    seen: dict = {}
    mask = []
    for p in prompts:
        seen[p] = seen.get(p, 0) + 1
        mask.append(seen[p] <= k)
    return torch.tensor(mask, dtype=torch.bool)


def _cosines(mose, h: torch.Tensor, targets: torch.Tensor) -> dict:
    noisy = h.float() * (1 + NOISE * torch.randn(h.shape, generator=torch.Generator().manual_seed(0)))
    cos = torch.nn.functional.cosine_similarity
    exact = cos(mose.vector(h.float()).double(), targets, dim=1)
    perturbed = cos(mose.vector(noisy).double(), targets, dim=1)
    return {"min": float(exact.min()), "perturbed_min": float(perturbed.min())}


def query_predictions(q_train: torch.Tensor, d_train: torch.Tensor, q_new: torch.Tensor,
                      penalties=(0.1, 1.0, 10.0, 100.0), neighbours=(10, 40)) -> dict:
    """Simple predictors of a new question's δ from its prompt state, fitted on training questions
    (``q_train`` [n, d] states, ``d_train`` [n, d] their δ; ``q_new`` [m, d]) → {name: [m, d]}:
    ``mean`` (CAA's vector), ``ridge<p>`` (linear ridge on centred states, penalty p × the centred
    Gram's mean diagonal, around the mean) and ``knn<k>`` (mean δ of the k training questions whose
    centred states are closest in cosine)."""
    q, dd, qn = q_train.double(), d_train.double(), q_new.double()
    centre, mean = q.mean(0), dd.mean(0)
    X, Xn = q - centre, qn - centre
    gram = X @ X.T
    scale = float(gram.diagonal().mean())
    out = {"mean": mean.expand(qn.shape[0], -1)}
    for p in penalties:
        A = torch.linalg.solve(gram + p * scale * torch.eye(gram.shape[0], dtype=gram.dtype), dd - mean)
        out[f"ridge{p:g}"] = mean + (Xn @ X.T) @ A
    sim = torch.nn.functional.cosine_similarity(Xn[:, None, :], X[None], dim=2)
    for k in neighbours:
        out[f"knn{k}"] = dd[sim.topk(min(k, X.shape[0]), dim=1).indices].mean(1)
    return out


def agreement(own: torch.Tensor, predictions: dict, d_train: torch.Tensor) -> dict:
    """How well each prediction [m, d] matches the questions' own δ ``own`` [m, d]: the runs' held-out
    measure (:func:`finesteer.eval.metrics.delta_prediction`: mean cosine, MSE) → {name: {cosine,
    mse, n}}; and ``hindsight_best_training_question``: per question, the single training question's
    δ (rows of ``d_train``) that agrees best in cosine, the most that routing each question to one
    training question's shift could reach."""
    from finesteer.eval.metrics import delta_prediction

    out = {name: delta_prediction(pred, own) for name, pred in predictions.items()}
    cos = torch.nn.functional.cosine_similarity(own.double()[:, None, :], d_train.double()[None], dim=2)
    out["hindsight_best_training_question"] = delta_prediction(d_train.double()[cos.argmax(1)], own)
    return out


def oracle_name(cosine: float) -> str:
    return "oracle" if cosine == 1.0 else f"oracle_cos{cosine:g}"


def _fold(task: str, cache_dir: str, fit_options, pairs_per_question: int, model, tok, limit_truthfulqa=None) -> tuple:
    """``(run, inputs, (prompts, deltas), h [n, d])`` of one fold: the harness run of the task (with
    the further eval options ``fit_options``; not yet fitted), the scored questions' answer pairs'
    prompts and δ [P, d] (up to ``pairs_per_question`` per question) and their prompt states."""
    import dataclasses

    import bench_quality as bq

    from finesteer import extract
    from finesteer.eval.data import truthfulqa_pairs
    from finesteer.eval.harness import _Inputs, _Run

    cfg = bq.task_config(task, str(Path(cache_dir) / bq.TASK_CACHE.get(task, task)), tuple(fit_options))
    cfg = dataclasses.replace(cfg, methods=("unsteered", "caa", "mose_nogate"), progress=False,
                              **({"limit_truthfulqa": limit_truthfulqa} if limit_truthfulqa else {}))
    run, inputs = _Run(model, tok, cfg), _Inputs(cfg)
    texts = [q.question for q in inputs.truthfulqa]
    p, c, r = truthfulqa_pairs(inputs.truthfulqa, pairs_per_question)
    _, d = extract.response_deltas(model, tok, p, c, r, [cfg.layer], positions=cfg.delta_positions,
                                   batch_size=cfg.batch_size, cache_file=run._cache_file("oracle-pairs"),
                                   progress=False, prompt_format=run.enc.fmt)
    return run, inputs, (p, d[cfg.layer]), run._states(texts, "eval-truthfulqa")


def pooled_prompt_states(model, tok, prompts: list, layers, prompt_format: str) -> dict:
    """{layer: [len(prompts), d]}: h after each block in ``layers``, averaged over every token of the
    formatted prompt (one prompt per forward, so no padding enters the mean). A query the operator
    does not read (it reads the last prompt token); here only to ask whether it would predict δ."""
    import bench_quality as bq

    from finesteer import extract

    out = {layer: [] for layer in layers}
    for ids in extract.encode_prompts(tok, prompts, prompt_format=prompt_format):
        for layer, states in bq.block_states(model, ids, layers).items():
            out[layer].append(states.mean(0))
    return {layer: torch.stack(rows) for layer, rows in out.items()}


def agreement_fold(task: str, cache_dir: str, fit_options, pairs_per_question: int, model, tok,
                   query_layers=(), pooled_layers=()) -> dict:
    """How well predictors from the query agree with each scored question's own δ, on one fold:
    :func:`query_predictions` and the fold's MoSE (the task's fit with ``fit_options``), all fitted on
    the rows MoSE is fitted on in the runs (the training pairs less the held-out prompts). With
    ``query_layers``, :func:`query_predictions` also from the last prompt token's state after each of
    those blocks (predicting the steered layer's δ; the operator itself reads only its own layer);
    with ``pooled_layers``, from :func:`pooled_prompt_states` after those blocks."""
    from margin_transfer import mose_fit_rows

    from finesteer import extract
    from finesteer.eval.metrics import delta_prediction
    from finesteer.fit import fit_mose

    run, inputs, (p, d_own), h = _fold(task, cache_dir, fit_options, pairs_per_question, model, tok)
    cfg, texts = run.cfg, [x.question for x in inputs.truthfulqa]
    own = per_question_deltas(p, d_own, texts)
    first = first_pairs(p, cfg.pairs_per_prompt)  # the runs' own pairs per question (their held-out target)
    own_first = per_question_deltas([x for x, keep in zip(p, first.tolist()) if keep], d_own[first], texts)
    train_prompts, q, d = mose_fit_rows(model, tok, run, inputs)
    mose = fit_mose(q, d, **{"seed": cfg.seed, **cfg.mose_options, "progress": False})
    # one row per training question: its state and its mean δ over its pairs
    questions = list(dict.fromkeys(train_prompts))
    first_row = {x: i for i, x in reversed(list(enumerate(train_prompts)))}
    q_train = q[[first_row[x] for x in questions]].double()
    d_train = per_question_deltas(train_prompts, d, questions)
    predictions = query_predictions(q_train, d_train, h)
    predictions["mose"] = mose.vector(h.float())

    def from_states(states: torch.Tensor) -> dict:
        preds = query_predictions(states[:len(questions)], d_train, states[len(questions):])
        return {name: {"own_delta": delta_prediction(v, own), "own_delta_runs_pairs": delta_prediction(v, own_first)}
                for name, v in preds.items() if name != "mean"}

    other_layers = {str(layer): from_states(extract.last_token_states(
        model, tok, questions + texts, [layer], batch_size=cfg.batch_size, progress=False,
        prompt_format=run.enc.fmt)[layer]) for layer in query_layers}
    pooled = {str(layer): from_states(st) for layer, st in
              pooled_prompt_states(model, tok, questions + texts, pooled_layers, run.enc.fmt).items()}
    return {"task": task, "n": own.shape[0], "n_pairs": len(p), "n_training_questions": len(questions),
            "fit_options": list(fit_options), "mose_fit": dict(mose.fit_stats or {}),
            "agreement_with_own_delta": agreement(own, predictions, d_train),
            "runs_pairs_per_question": cfg.pairs_per_prompt,
            "agreement_with_own_delta_runs_pairs": agreement(own_first, predictions, d_train),
            **({"query_layers": other_layers} if query_layers else {}),
            **({"pooled_layers": pooled} if pooled_layers else {})}


def run_fold(task: str, cache_dir: str, strengths: list, cosines: list, pairs_per_question: int, model, tok,
             limit_truthfulqa=None, with_caa: bool = True, fit_options: tuple = ()) -> dict:
    """Score the unsteered model, CAA (unless not ``with_caa``) and each oracle (``cosines``; 1 = the
    own δ) on the fold's scored questions at ``strengths``: the harness's TruthfulQA result, the
    oracles' fit checks, and how well the fold's CAA vector and its MoSE (fitted as the task with
    the further ``finesteer eval`` options ``fit_options``) agree with each question's own δ."""
    from finesteer.eval.baselines import with_strength
    from finesteer.steerer import Steerer

    run, inputs, (p, d_own), h = _fold(task, cache_dir, fit_options, pairs_per_question, model, tok, limit_truthfulqa)
    own = per_question_deltas(p, d_own, [x.question for x in inputs.truthfulqa])
    run.fit(inputs)  # the fold's CAA vector (the mean δ of its MoSE training rows) and MoSE, as in the runs
    cfg, questions = run.cfg, inputs.truthfulqa
    caa = run.methods["caa"].mose.V[0].double()
    cos = torch.nn.functional.cosine_similarity
    mose_cos = cos(run.methods["mose_nogate"].mose.vector(h.float()).double(), own, dim=1)
    checks = {}
    configs = [("unsteered", 0.0, None)]
    if with_caa:
        configs += [("caa", lam, with_strength(run.methods["caa"], lam)) for lam in strengths]
    for cosine in cosines:
        targets = graded_targets(own, caa, cosine, float(caa.norm()))
        mose = oracle_mose(h, targets)
        name = oracle_name(cosine)
        agree = cos(targets, own, dim=1)
        checks[name] = {"own_cosine": cosine, "mean_cosine_with_own_delta": float(agree.mean()),
                        "map_cosine_with_targets": _cosines(mose, h, targets), "rank": mose.fit_stats["rank"]}
        st = Steerer(mose=mose, layer=cfg.layer)
        configs += [(name, lam, with_strength(st, lam)) for lam in strengths]
    run.configs = configs
    t0 = time.perf_counter()
    tqa = run.truthfulqa(questions)
    return {"task": task, "n": len(questions), "n_pairs": len(p), "caa_norm": float(caa.norm()),
            "own_delta_cosine_with_caa_mean": float(cos(own, caa[None], dim=1).mean()),
            "own_delta_cosine_with_mose_mean": float(mose_cos.mean()), "fit_options": list(fit_options),
            "mose_fit": run.result.fit["mose"], "oracles": checks,
            "results": tqa["results"], "unsteered": tqa["unsteered"], "per_question": tqa["per_question"],
            "paired": tqa["paired"], "seconds_truthfulqa": round(time.perf_counter() - t0, 1)}


def pool(folds: list) -> dict:
    """MC1 / MC2 of every (method, λ) over both folds' questions, and each method's best λ."""
    if sorted(f["task"] for f in folds) != sorted(TASKS):
        raise ValueError(f"pool needs one run of each of {TASKS}, got {[f['task'] for f in folds]}")
    pooled, best = {}, {}
    for method in folds[0]["per_question"]:
        for lam in folds[0]["per_question"][method]:
            mc1 = [x for f in folds for x in f["per_question"][method][lam]["mc1"]]
            mc2 = [x for f in folds for x in f["per_question"][method][lam]["mc2"]]
            pooled.setdefault(method, {})[lam] = {"mc1": sum(mc1) / len(mc1), "mc2": sum(mc2) / len(mc2)}
        best[method] = {k: max(pooled[method].values(), key=lambda v: v[k])[k] for k in ("mc1", "mc2")}
    return {"n": sum(f["n"] for f in folds), "pooled": pooled, "best": best,
            "oracles": {f["task"]: f["oracles"] for f in folds},
            **{key: {f["task"]: f.get(key) for f in folds}
               for key in ("own_delta_cosine_with_caa_mean", "own_delta_cosine_with_mose_mean")}}


def _fold_arguments(ap: argparse.ArgumentParser) -> None:
    """The options every per-fold command takes."""
    ap.add_argument("--task", required=True, choices=TASKS)
    ap.add_argument("--cache-dir", required=True, help="bench_quality's --cache-dir (one folder per task below it)")
    ap.add_argument("--pairs-per-question", type=int, default=8)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("fit_options", nargs=argparse.REMAINDER,
                    help="after --: further `finesteer eval` options of the MoSE whose agreement with each "
                         "question's own δ is reported (e.g. the adopted fit's --mose-cluster-on query ...)")


def _run_fold_command(a, compute) -> int:
    """Load the model (or skip without the shared data), ``compute(model, tok, fit_options)`` the
    fold's document, time it and write it to ``a.output``."""
    import bench_quality as bq

    options = [x for x in a.fit_options if x != "--"]
    got = bq.study_document("truthfulqa_oracle", a.threads, a.model, lambda model, tok: compute(model, tok, options))
    if got is not None:
        doc, seconds = got
        doc["seconds"] = round(seconds, 1)
        bq.write_json(doc, a.output)
    return 0


def _print_mc(results: dict) -> None:
    for method, per in results.items():
        print(f"{method}: " + ", ".join(f"λ {float(lam):g}: {v['mc1']:.3f} / {v['mc2']:.3f}" for lam, v in per.items()))


def main_agreement(argv) -> int:
    ap = argparse.ArgumentParser(prog="truthfulqa_oracle.py agreement",
                                 description="how well predictors from the query agree with each question's own δ")
    ap.add_argument("--query-layers", default="",
                    help="comma-separated further layers whose last-prompt-token state predicts the δ too")
    ap.add_argument("--pooled-layers", default="",
                    help="comma-separated layers whose prompt states, averaged over the prompt's tokens, predict it too")
    _fold_arguments(ap)
    a = ap.parse_args(argv)
    try:
        layers = [int(x) for x in a.query_layers.split(",") if x]
        pooled_layers = [int(x) for x in a.pooled_layers.split(",") if x]
    except ValueError as e:
        ap.error(f"--query-layers / --pooled-layers: {e}")

    def compute(model, tok, fit_options):
        doc = agreement_fold(a.task, a.cache_dir, fit_options, a.pairs_per_question, model, tok, layers,
                             pooled_layers)
        for key, label in (("query_layers", "last token"), ("pooled_layers", "pooled")):
            for layer, per in doc.get(key, {}).items():
                print(f"{label}, layer {layer} (cosine with the own δ): "
                      + ", ".join(f"{k} {v['own_delta']['cosine']:.3f}" for k, v in per.items()))
        for key in ("agreement_with_own_delta", "agreement_with_own_delta_runs_pairs"):
            print(f"{key} (cosine / MSE): "
                  + ", ".join(f"{k} {v['cosine']:.3f} / {v['mse']:,.0f}" for k, v in doc[key].items()))
        return doc

    return _run_fold_command(a, compute)


def main_pool(argv) -> int:
    import bench_quality as bq

    ap = argparse.ArgumentParser(prog="truthfulqa_oracle.py pool", description="pool the two folds' runs")
    ap.add_argument("runs", nargs=2)
    ap.add_argument("-o", "--output", required=True)
    a = ap.parse_args(argv)
    doc = pool([json.loads(Path(x).read_text()) for x in a.runs])
    doc["inputs"] = a.runs
    _print_mc(doc["pooled"])
    bq.write_json(doc, a.output)
    return 0


def main_run(argv) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strengths", default="2,4,8,16,32")
    ap.add_argument("--own-cosine", default="1", help="comma-separated cosines of the graded oracles (1: own δ)")
    ap.add_argument("--limit-truthfulqa", type=int, default=None, help="score only the first N questions")
    ap.add_argument("--no-caa", action="store_true", help="do not score CAA (e.g. beside a run that did)")
    _fold_arguments(ap)
    a = ap.parse_args(argv)
    try:
        strengths = [float(x) for x in a.strengths.split(",")]
        cosines = [float(x) for x in a.own_cosine.split(",")]
        for c in cosines:
            graded_targets(torch.ones(1, 2), torch.tensor([1.0, 0.0]), c, 1.0)  # refuses a bad cosine up front
    except ValueError as e:
        ap.error(f"--strengths / --own-cosine: {e}")

    def compute(model, tok, fit_options):
        doc = run_fold(a.task, a.cache_dir, strengths, cosines, a.pairs_per_question, model, tok,
                       a.limit_truthfulqa, with_caa=not a.no_caa, fit_options=fit_options)
        for name, chk in doc["oracles"].items():
            print(f"{name}: map cosine with its targets ≥ {chk['map_cosine_with_targets']['min']:.6f} "
                  f"(perturbed {chk['map_cosine_with_targets']['perturbed_min']:.6f}), "
                  f"mean cosine with the own δ {chk['mean_cosine_with_own_delta']:.3f}")
        print(f"mean cosine with each question's own δ: CAA {doc['own_delta_cosine_with_caa_mean']:.3f}, "
              f"MoSE {doc['own_delta_cosine_with_mose_mean']:.3f}")
        _print_mc(doc["results"])
        return doc

    return _run_fold_command(a, compute)


def main(argv=None) -> int:
    """``agreement …`` / ``pool …`` / otherwise a fold's oracle run (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    commands = {"agreement": main_agreement, "pool": main_pool}
    if argv[:1] and argv[0] in commands:
        return commands[argv[0]](argv[1:])
    return main_run(argv)


if __name__ == "__main__":
    sys.exit(main())
