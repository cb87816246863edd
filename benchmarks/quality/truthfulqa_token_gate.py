"""TruthfulQA steered in token mode by a gate fitted on answer tokens (a study; the gate is now also
``finesteer eval --gate-tokens response``, run by ``bench_quality.py --task truthfulness_tokens``).

In prompt mode the steerer reads only the question, and the oracle study
(``truthfulqa_oracle.py``) found that the question's state predicts next to nothing of the
per-question shift beyond the mean direction. In **token mode** (DESIGN §4: every row computes its
own gate and vector) the operator also reads each answer token's state while the answer is scored,
so it can act on what the answer says. This study fits the SCS gate on answer tokens:

- target side: the states at every token of the *incorrect* answers of the fold's training
  questions (all of each question's incorrect answers);
- benign side: the states at every token of their best and correct answers, each training
  question's last prompt token, and the last token of the gate's benign training prompts
  (``benign_train``, as in the runs), so the gate learns "this answer is heading somewhere false"
  rather than "this is TruthfulQA";
- a linear probe in the SCS form (``fit_scs(method="probe")``), τ at a benign budget (``--budgets``).

The vector is the fold's CAA vector (the mean δ of the runs' training pairs), so the configuration is
"SCS + mean vector" in token mode: λ·δ̄ is added at the tokens where the gate opens. An ablation
keeps the gate and replaces δ̄ by a seeded random direction of the same norm: if it scores as well,
what helps is the gate flagging false answers (any push there lowers their likelihood), not the
direction. CAA in token mode is CAA (a constant vector is the same in both modes).

Per fold (the two folds of the two-fold cross-fit), all scored questions, through the harness's
TruthfulQA scoring in token mode, and the benign KL on the run's ``benign_val`` prompts::

    nice python benchmarks/quality/truthfulqa_token_gate.py --task truthfulness --cache-dir <cache> -o <dir>/fold1.json
    nice python benchmarks/quality/truthfulqa_token_gate.py --task truthfulness_swapped --cache-dir <cache> -o <dir>/fold2.json
    python benchmarks/quality/truthfulqa_token_gate.py pool <dir>/fold1.json <dir>/fold2.json [more runs of either fold] \\
        -o benchmarks/results/quality/truthfulqa_token_gate.json

With ``--benign-continuations N`` the gate's benign side also takes every token of the unsteered
greedy continuations of the first N benign prompts, so that it stays closed on ordinary text the
model writes (without them it opens on about 40 % of those tokens). Its configurations keep their
names, so pool such runs on their own::

    python benchmarks/quality/truthfulqa_token_gate.py pool <dir>/fold1_selective.json <dir>/fold2_selective.json -o …

``gate-rates`` fits a fold's gates only and reports where they open: on the scored answers' tokens by
kind, and on the benign KL set's prompt and continuation tokens (seconds, no scoring)::

    python benchmarks/quality/truthfulqa_token_gate.py gate-rates --task truthfulness --cache-dir <cache> -o …

``generate`` writes greedy continuations of a fold's first scored questions under the unsteered model,
CAA, the gate with CAA's vector and with the random direction (token mode), to see what the text
looks like where MC improves::

    nice python benchmarks/quality/truthfulqa_token_gate.py generate --task truthfulness --cache-dir <cache> \
        -o benchmarks/results/quality/truthfulqa_token_gate/generate_truthfulness.json

The answer-token states are cached under ``<cache>/answer-tokens-<format>-layer<L>.pt`` (both folds
share it: each fold's training questions are the other's scored ones).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

TASKS = ("truthfulness", "truthfulness_swapped")


def answer_token_states(model, run, questions, cache_path=None, progress: bool = False) -> dict:
    """``{(question, answer): [1 + n, d] float16}``: h after the steered block at the last prompt token
    and at each of the answer's ``n`` tokens, for every best, correct and incorrect answer of
    ``questions``, encoded as the harness scores them (one sequence per forward, so no padding).
    Entries already in ``cache_path`` are reused; new ones are added to it."""
    cache = torch.load(cache_path) if cache_path is not None and Path(cache_path).is_file() else {}
    todo = [(q.question, a) for q in questions for a in dict.fromkeys([q.best, *q.correct, *q.incorrect])
            if (q.question, a) not in cache]
    if todo:
        import bench_quality as bq

        for i, (question, answer) in enumerate(todo):
            seq = run.enc.response(question, answer, f"truthfulqa answer {i}")
            h = bq.block_states(model, list(seq.ids), [run.cfg.layer])[run.cfg.layer]
            cache[(question, answer)] = h[seq.last_prompt:].to(torch.float16)
            if progress and i % 200 == 0:
                print(f"answer-token states: {i}/{len(todo)}", flush=True)
        if cache_path is not None:
            tmp = Path(str(cache_path) + ".tmp")
            torch.save(cache, tmp)
            tmp.replace(cache_path)
    return cache


def gate_rows(questions, states: dict, benign_prompts: torch.Tensor) -> tuple:
    """``(target [Nt, d], benign [Nb, d])`` float32 for the answer-token gate: every token of the
    questions' incorrect answers; every token of their best and correct answers, each question's last
    prompt token (row 0 of any of its entries) and ``benign_prompts`` (last-token states)."""
    target, benign = [], [benign_prompts.float()]
    for q in questions:
        incorrect = set(q.incorrect)
        correct = [a for a in dict.fromkeys([q.best, *q.correct]) if a not in incorrect]
        target += [states[(q.question, a)][1:] for a in dict.fromkeys(q.incorrect)]
        benign += [states[(q.question, a)][1:] for a in correct]
        benign.append(states[(q.question, q.incorrect[0])][:1])
    return torch.cat(target).float(), torch.cat(benign).float()


def random_direction(like: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded random direction with the norm of ``like`` [d]."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(like.shape, generator=g, dtype=torch.float64)
    return (v / v.norm() * like.double().norm()).to(like.dtype)


def open_rates(gate, questions, states: dict) -> dict:
    """Share of answer tokens where ``gate`` opens, by the answer's kind (on scored questions)."""
    def rate(rows):
        return gate_open_share(gate, torch.cat(rows).float())

    inc = [states[(q.question, a)][1:] for q in questions for a in dict.fromkeys(q.incorrect)]
    cor = [states[(q.question, a)][1:] for q in questions for a in dict.fromkeys([q.best, *q.correct])
           if a not in set(q.incorrect)]
    last = [states[(q.question, q.incorrect[0])][:1] for q in questions]
    return {"incorrect_answer_tokens": rate(inc), "correct_answer_tokens": rate(cor), "last_prompt_token": rate(last)}


def benign_token_states(model, run, prompt_set, continuations: Optional[dict] = None) -> tuple:
    """``(prompt_rows [Np, d], continuation_rows [Nc, d])`` float32: h after the steered block at every
    token of ``prompt_set``'s prompts and of their unsteered greedy continuations (by default the
    run's cached ones, the sequences the benign KL is measured on; else ``continuations[prompt]``),
    one sequence per forward."""
    import bench_quality as bq

    prompt_ids = run.enc.prompts(prompt_set.prompts)
    conts = (run._continuations(f"eval-{prompt_set.name}", prompt_ids) if continuations is None
             else [continuations[p] for p in prompt_set.prompts])
    prompt_rows, cont_rows = [], []
    for p, c in zip(prompt_ids, conts):
        h = bq.block_states(model, list(p) + list(c), [run.cfg.layer])[run.cfg.layer].float()
        prompt_rows.append(h[:len(p)])
        cont_rows.append(h[len(p):])
    return torch.cat(prompt_rows), torch.cat(cont_rows)


def continuation_token_states(model, run, prompts: list) -> torch.Tensor:
    """[N, d] float32: h after the steered block at every token of the unsteered greedy continuations
    (``run.cfg.continuation_tokens`` new tokens, as for the benign KL) of ``prompts``: ordinary text
    the model writes itself, for the answer-token gate's benign side."""
    from finesteer.eval.scoring import greedy_continuations

    prompt_ids = run.enc.prompts(prompts)
    conts = greedy_continuations(model, prompt_ids, run.cfg.continuation_tokens, run.enc.pad_id,
                                 run.tok.eos_token_id, run.cfg.batch_size, progress=False)
    return benign_token_states(model, run, SimpleNamespace(prompts=prompts),
                               continuations=dict(zip(prompts, conts)))[1]


def gate_open_share(gate, rows: torch.Tensor) -> float:
    """Share of ``rows`` [n, d] where the hard gate opens (score above τ)."""
    return float((gate.score(rows) > gate.threshold).double().mean())


def gate_summary(gate, scored, states: dict, benign_prompt_rows: torch.Tensor, benign_cont_rows: torch.Tensor) -> dict:
    """A fitted answer-token gate's calibration report and where it opens: on the scored questions'
    answer tokens by kind (:func:`open_rates`) and on the benign KL set's prompt and continuation
    tokens (:func:`benign_token_states`)."""
    return {"report": gate.report.to_dict(), "open_on_scored": open_rates(gate, scored, states),
            "open_on_benign": {"prompt_tokens": gate_open_share(gate, benign_prompt_rows),
                               "continuation_tokens": gate_open_share(gate, benign_cont_rows)}}


def fold(task: str, cache_dir: str, model, tok, fit_options: tuple = (), with_mose: bool = False,
         limit_truthfulqa=None, benign_continuations: int = 0) -> dict:
    """One fold's pieces, fitted as the task's run in token mode (with the further ``finesteer eval``
    options ``fit_options``): ``run`` and ``inputs`` (the harness's), the ``train`` and ``scored``
    questions, their answer-token ``states``, the gate's ``target`` and ``benign`` rows (with
    ``benign_continuations`` > 0, also every token of the greedy continuations of that many of the
    gate's benign prompts, :func:`continuation_token_states`), the fold's ``caa`` steerer and, with
    ``with_mose``, its ``mose`` steerer; ``seconds`` to get them."""
    import bench_quality as bq

    from finesteer.eval.data import load_truthfulqa
    from finesteer.eval.harness import _Inputs, _Run

    cfg = bq.task_config(task, str(Path(cache_dir) / bq.TASK_CACHE.get(task, task)), ("--mode", "token", *fit_options))
    methods = ("unsteered", "caa") + (("mose_nogate",) if with_mose else ())
    cfg = dataclasses.replace(cfg, methods=methods, progress=False,
                              **({"limit_truthfulqa": limit_truthfulqa} if limit_truthfulqa else {}))
    run, inputs = _Run(model, tok, cfg), _Inputs(cfg)
    t0 = time.perf_counter()
    run.fit(inputs)  # the fold's CAA vector (and MoSE), as in the runs
    every = load_truthfulqa(cfg.truthfulqa)
    train = [every[i] for i in inputs._indices(cfg.truthfulqa, len(every), 0)]
    scored = inputs.truthfulqa
    states = answer_token_states(model, run, train + scored, Path(cache_dir) / f"answer-tokens-{run.enc.fmt}-layer{cfg.layer}.pt",
                                 progress=True)
    target, benign = gate_rows(train, states, run._states(inputs.benign, "train-benign"))
    if benign_continuations:
        benign = torch.cat([benign, continuation_token_states(model, run, inputs.benign[:benign_continuations])])
    return {"run": run, "inputs": inputs, "train": train, "scored": scored, "states": states, "target": target,
            "benign": benign, "caa": run.methods["caa"], "mose": run.methods.get("mose_nogate"),
            "seconds": time.perf_counter() - t0}


def run_fold(task: str, cache_dir: str, budgets: list, strengths: list, random_strengths: list, model, tok,
             limit_truthfulqa=None, seed: int = 0, mose_strengths: tuple = (), fit_options: tuple = (),
             benign_continuations: int = 0) -> dict:
    """Score, in token mode on the fold's scored questions, with each configuration's benign KL: the
    unsteered model; CAA and the answer-token gate with CAA's vector at each budget, at ``strengths``;
    the gate at the last budget with a random direction at ``random_strengths``, and with the fold's
    MoSE (fitted as the task with the further ``finesteer eval`` options ``fit_options``) at
    ``mose_strengths``. An empty list leaves its configurations out. ``benign_continuations``: see
    :func:`fold`."""
    from finesteer.eval.baselines import mean_vector_mose, with_strength
    from finesteer.fit import fit_scs
    from finesteer.steerer import Steerer

    f = fold(task, cache_dir, model, tok, fit_options, bool(mose_strengths), limit_truthfulqa, benign_continuations)
    run, inputs, scored, states, target, benign = (f[k] for k in ("run", "inputs", "scored", "states", "target", "benign"))
    cfg, caa, seconds_fit = run.cfg, f["caa"], f["seconds"]
    delta = caa.mose.V[0]
    configs = [("unsteered", 0.0, None)] + [("caa", lam, with_strength(caa, lam)) for lam in strengths]
    gates = {}
    benign_set = next(ps for ps in inputs.sets if ps.role == "benign")
    benign_prompt_rows, benign_cont_rows = benign_token_states(model, run, benign_set)
    for budget in budgets:
        gate = fit_scs(target, benign, method="probe", max_benign_fpr=budget, seed=seed)
        gates[budget] = gate_summary(gate, scored, states, benign_prompt_rows, benign_cont_rows)
        st = Steerer(gate=gate, mose=caa.mose, layer=cfg.layer)
        configs += [(f"answer_gate_{budget:g}", lam, with_strength(st, lam)) for lam in strengths]
    variants = {"random": (mean_vector_mose(random_direction(delta, seed)), random_strengths)}
    if mose_strengths:
        variants["mose"] = (f["mose"].mose, mose_strengths)
    for label, (mose, lams) in variants.items():
        st = Steerer(gate=gate, mose=mose, layer=cfg.layer)
        configs += [(f"answer_gate_{budgets[-1]:g}_{label}", lam, with_strength(st, lam)) for lam in lams]
    run.configs = configs
    t1 = time.perf_counter()
    tqa = run.truthfulqa(scored)
    t2 = time.perf_counter()
    _, util = run.utility(benign_set, configs)
    kl = {}
    for (name, lam, _), sc in zip(configs, util):
        kl.setdefault(name, {})[str(lam)] = float(sc.kl.mean())
    return {"task": task, "n": len(scored), "n_train_questions": len(f["train"]),
            "benign_continuations": benign_continuations, "mode": cfg.mode, "layer": cfg.layer,
            "gate_rows": {"target": int(target.shape[0]), "benign": int(benign.shape[0])},
            "caa_norm": float(delta.norm()), "gates": {f"{b:g}": v for b, v in gates.items()},
            "fit_options": list(fit_options), **({"mose_fit": run.result.fit["mose"]} if mose_strengths else {}),
            "results": tqa["results"], "unsteered": tqa["unsteered"], "paired": tqa["paired"],
            "per_question": tqa["per_question"], "benign_kl": kl, "benign_set": benign_set.name,
            "n_benign": len(benign_set),
            "seconds": {"fit_and_states": round(seconds_fit, 1), "truthfulqa": round(t2 - t1, 1),
                        "benign_kl": round(time.perf_counter() - t2, 1)}}


def gate_rates_fold(task: str, cache_dir: str, budgets: list, model, tok, seed: int = 0) -> dict:
    """Where the fold's answer-token gate opens at each budget, without scoring: its calibration
    report; the share of the scored answers' tokens by kind (:func:`open_rates`); and the share of
    the benign KL set's prompt tokens and continuation tokens (:func:`benign_token_states`)."""
    from finesteer.fit import fit_scs

    f = fold(task, cache_dir, model, tok)
    benign_set = next(ps for ps in f["inputs"].sets if ps.role == "benign")
    prompt_rows, cont_rows = benign_token_states(model, f["run"], benign_set)
    gates = {}
    for budget in budgets:
        gate = fit_scs(f["target"], f["benign"], method="probe", max_benign_fpr=budget, seed=seed)
        gates[f"{budget:g}"] = gate_summary(gate, f["scored"], f["states"], prompt_rows, cont_rows)
    return {"task": task, "benign_set": benign_set.name, "n_benign": len(benign_set),
            "benign_tokens": {"prompt": int(prompt_rows.shape[0]), "continuation": int(cont_rows.shape[0])},
            "gates": gates}


def generate_fold(task: str, cache_dir: str, n_questions: int, new_tokens: int, budget: float, strengths: list,
                  gate_strengths: list, random_strengths: list, model, tok, seed: int = 0,
                  benign_continuations: int = 0) -> dict:
    """Greedy continuations of the fold's first ``n_questions`` scored questions (prompt as scored,
    ``new_tokens`` new tokens) under the unsteered model, CAA at ``strengths``, the answer-token gate
    at ``budget`` with CAA's vector at ``gate_strengths`` and with the random direction at
    ``random_strengths``, all attached in token mode: what the text looks like where MC improves.
    ``benign_continuations``: see :func:`fold`."""
    import finesteer as fs
    from finesteer import extract
    from finesteer.eval.baselines import mean_vector_mose, with_strength
    from finesteer.fit import fit_scs
    from finesteer.generation import generate_ids
    from finesteer.steerer import Steerer

    f = fold(task, cache_dir, model, tok, benign_continuations=benign_continuations)
    run, caa = f["run"], f["caa"]
    gate = fit_scs(f["target"], f["benign"], method="probe", max_benign_fpr=budget, seed=seed)
    gated = Steerer(gate=gate, mose=caa.mose, layer=run.cfg.layer)
    rand = Steerer(gate=gate, mose=mean_vector_mose(random_direction(caa.mose.V[0], seed)), layer=run.cfg.layer)
    configs = ([("unsteered", 0.0, None)] + [("caa", lam, with_strength(caa, lam)) for lam in strengths]
               + [(f"answer_gate_{budget:g}", lam, with_strength(gated, lam)) for lam in gate_strengths]
               + [(f"answer_gate_{budget:g}_random", lam, with_strength(rand, lam)) for lam in random_strengths])
    questions = f["scored"][:n_questions]
    prompts = extract.encode_prompts(tok, [q.question for q in questions], prompt_format=run.enc.fmt)
    texts = {}
    for name, lam, st in configs:
        out = []
        for ids in prompts:  # one prompt per call: no padding, so the continuations do not depend on batching
            if st is None:
                out += generate_ids(model, tok, [ids], new_tokens)
            else:
                with fs.FusedSteerer.attach(model, st, mode="token", backend="reference"):
                    out += generate_ids(model, tok, [ids], new_tokens)
        texts.setdefault(name, {})[str(lam)] = out
    return {"task": task, "mode": "token", "new_tokens": new_tokens, "budget": budget,
            "benign_continuations": benign_continuations,
            "questions": [{"question": q.question, "best_answer": q.best} for q in questions], "continuations": texts}


def merge_runs(runs: list) -> list:
    """One document per fold from several runs (e.g. a second run with more configurations): their
    per-question results, benign KL and gates joined. The runs of one fold must agree on the
    unsteered model's per-question values and on every configuration they share."""
    folds = {}
    for r in runs:
        f = folds.setdefault(r["task"], {"task": r["task"], "n": r["n"], "per_question": {}, "benign_kl": {}, "gates": {}})
        if r["n"] != f["n"]:
            raise ValueError(f"{r['task']}: runs score {f['n']} and {r['n']} questions")
        for method, per in r["per_question"].items():
            for lam, v in per.items():
                have = f["per_question"].setdefault(method, {}).get(lam)
                if have is not None and have != v:
                    raise ValueError(f"{r['task']}: the runs disagree on {method} at λ = {lam}")
                f["per_question"][method][lam] = v
                f["benign_kl"].setdefault(method, {})[lam] = r["benign_kl"].get(method, {}).get(lam, 0.0)
        f["gates"].update(r["gates"])
    return list(folds.values())


def pool(runs: list) -> dict:
    """Both folds' questions (any number of runs per fold, :func:`merge_runs`): MC1 / MC2 and both folds'
    benign KL of every (method, λ), each method's best, and each configuration paired against CAA at
    the same λ and at CAA's best-MC2 λ."""
    from finesteer.eval.metrics import paired_comparison

    folds = merge_runs(runs)
    if sorted(f["task"] for f in folds) != sorted(TASKS):
        raise ValueError(f"pool needs runs of each of {TASKS}, got {[r['task'] for r in runs]}")
    folds.sort(key=lambda f: TASKS.index(f["task"]))
    methods = [m for m in folds[0]["per_question"] if all(m in f["per_question"] for f in folds)]

    def joined(method, lam):
        return ([x for f in folds for x in f["per_question"][method][lam]["mc1"]],
                [x for f in folds for x in f["per_question"][method][lam]["mc2"]])

    pooled, best, paired = {}, {}, {}
    for method in methods:
        for lam in folds[0]["per_question"][method]:
            mc1, mc2 = joined(method, lam)
            pooled.setdefault(method, {})[lam] = {"mc1": sum(mc1) / len(mc1), "mc2": sum(mc2) / len(mc2),
                                                  "benign_kl": [f["benign_kl"][method][lam] for f in folds]}
        best[method] = {k: max(pooled[method].values(), key=lambda v: v[k])[k] for k in ("mc1", "mc2")}
    caa_best = max(pooled["caa"], key=lambda lam: pooled["caa"][lam]["mc2"])
    for method in methods:
        if method in ("unsteered", "caa"):
            continue
        for lam in pooled[method]:
            a = joined(method, lam)
            rows = {}
            for label, other in (("caa_same_strength", lam), (f"caa_best_mc2_{caa_best}", caa_best)):
                if other in pooled["caa"]:
                    b = joined("caa", other)
                    rows[label] = paired_comparison(a[0], b[0], a[1], b[1])
            paired.setdefault(method, {})[lam] = rows
    return {"n": sum(f["n"] for f in folds), "pooled": pooled, "best": best, "caa_best_mc2_strength": caa_best,
            "paired": paired, "gates": {f["task"]: f["gates"] for f in folds}}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["pool"]:
        ap = argparse.ArgumentParser(prog="truthfulqa_token_gate.py pool", description=pool.__doc__)
        ap.add_argument("runs", nargs="+", help="each fold's run(s)")
        ap.add_argument("-o", "--output", required=True)
        a = ap.parse_args(argv[1:])
        import bench_quality as bq

        bq.write_json(pool([json.loads(Path(p).read_text()) for p in a.runs]), a.output)
        return 0
    if argv[:1] == ["gate-rates"]:
        ap = argparse.ArgumentParser(prog="truthfulqa_token_gate.py gate-rates", description=gate_rates_fold.__doc__)
        ap.add_argument("--task", required=True, choices=TASKS)
        ap.add_argument("--cache-dir", required=True)
        ap.add_argument("--budgets", default="0.1,0.2")
        ap.add_argument("--model", default=None)
        ap.add_argument("--threads", type=int, default=1)
        ap.add_argument("-o", "--output", required=True)
        a = ap.parse_args(argv[1:])
        return _fold_command(a, lambda model, tok: gate_rates_fold(a.task, a.cache_dir, _floats(a.budgets), model, tok))
    if argv[:1] == ["generate"]:
        ap = argparse.ArgumentParser(prog="truthfulqa_token_gate.py generate", description=generate_fold.__doc__)
        ap.add_argument("--task", required=True, choices=TASKS)
        ap.add_argument("--cache-dir", required=True)
        ap.add_argument("--questions", type=int, default=15)
        ap.add_argument("--new-tokens", type=int, default=30)
        ap.add_argument("--budget", type=float, default=0.2)
        ap.add_argument("--strengths", default="8,32", help="CAA's")
        ap.add_argument("--gate-strengths", default="16,32")
        ap.add_argument("--random-strengths", default="4")
        ap.add_argument("--benign-continuations", type=int, default=0)
        ap.add_argument("--model", default=None)
        ap.add_argument("--threads", type=int, default=1)
        ap.add_argument("-o", "--output", required=True)
        a = ap.parse_args(argv[1:])
        return _fold_command(a, lambda model, tok: generate_fold(
            a.task, a.cache_dir, a.questions, a.new_tokens, a.budget, _floats(a.strengths),
            _floats(a.gate_strengths), _floats(a.random_strengths), model, tok,
            benign_continuations=a.benign_continuations))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True, choices=TASKS)
    ap.add_argument("--cache-dir", required=True, help="bench_quality's --cache-dir (one folder per task below it)")
    ap.add_argument("--budgets", default="0.1,0.2", help="benign budgets of the answer-token gate's τ")
    ap.add_argument("--strengths", default="8,16,32")
    ap.add_argument("--random-strengths", default="16,32",
                    help="strengths of the random-direction ablation (gate at the last budget); '' for none")
    ap.add_argument("--mose-strengths", default="",
                    help="strengths of the gate (at the last budget) with the fold's MoSE; '' for none")
    ap.add_argument("--benign-continuations", type=int, default=0,
                    help="add every token of the greedy continuations of this many of the gate's benign "
                         "prompts to its benign side")
    ap.add_argument("--limit-truthfulqa", type=int, default=None)
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("fit_options", nargs=argparse.REMAINDER,
                    help="after --: further `finesteer eval` options of the MoSE (e.g. the adopted fit's "
                         "--mose-cluster-on query --k-min 2 --k-max 4 --mose-stopping cv)")
    a = ap.parse_args(argv)
    return _fold_command(a, lambda model, tok: run_fold(
        a.task, a.cache_dir, _floats(a.budgets), _floats(a.strengths), _floats(a.random_strengths), model, tok,
        a.limit_truthfulqa, mose_strengths=_floats(a.mose_strengths),
        fit_options=tuple(x for x in a.fit_options if x != "--"), benign_continuations=a.benign_continuations))


def _floats(text: str) -> list:
    return [float(x) for x in text.split(",") if x.strip()]


def _fold_command(a, compute) -> int:
    """Load the model (or skip without the shared data), ``compute(model, tok)`` the fold's document,
    time it and write it to ``a.output``."""
    import bench_quality as bq

    got = bq.study_document("truthfulqa_token_gate", a.threads, a.model, compute)
    if got is not None:
        doc, seconds = got
        doc.setdefault("seconds", {})["total"] = round(seconds, 1)
        bq.write_json(doc, a.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
