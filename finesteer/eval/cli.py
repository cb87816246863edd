"""``finesteer eval``: fit every method on training files, score it on evaluation files, write reports.

::

    finesteer eval --model google/gemma-3-270m --layer 6 \\
        --opening-pairs harmful_train.jsonl --target harmful_train.jsonl --benign benign_train.jsonl \\
        --eval-target harmful=harmful_val.jsonl --eval-benign benign=benign_val.jsonl \\
        --limit-train 200 --limit-eval 50 -o eval-out

Dispatched from :mod:`finesteer.cli` (which imports this module only when ``eval`` is run).
"""
from __future__ import annotations

import argparse
import time

from ..cli import add_gate_token_arguments, add_mose_arguments, mose_options
from ..fit.scs import METHODS as SCS_METHODS
from .baselines import METHODS
from .config import TOWARD

__all__ = ["add_arguments", "run"]


def _named_path(text: str):
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    return name, path


def _set_toward(text: str):
    name, sep, direction = text.partition("=")
    if not sep or not name or direction not in TOWARD:
        raise argparse.ArgumentTypeError("expected NAME=" + " or NAME=".join(TOWARD) + f", got {text!r}")
    return name, direction


def _floats(text: str):
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not vals or any(not (v > 0) for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive strengths, got {text!r}")
    return vals


def _methods(text: str):
    vals = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [v for v in vals if v not in METHODS]
    if bad or not vals:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad or text!r}; choose from {', '.join(METHODS)}")
    return vals


def _method_strengths(text: str):
    """``METHOD=λ,λ,...`` for --extra-strengths."""
    name, sep, lams = text.partition("=")
    if not sep or name not in METHODS or name == "unsteered":
        raise argparse.ArgumentTypeError(f"expected METHOD=λ,λ,... with METHOD one of "
                                         f"{', '.join(m for m in METHODS if m != 'unsteered')}, got {text!r}")
    return name, _floats(lams)


def _method_pairs(text: str):
    """``METHOD:BASELINE,...`` for --match-targets."""
    steered = [m for m in METHODS if m != "unsteered"]
    pairs = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        method, sep, base = item.partition(":")
        if not sep or method not in steered or base not in steered or method == base:
            raise argparse.ArgumentTypeError(f"expected METHOD:BASELINE[,...] with two different methods of "
                                             f"{', '.join(steered)}, got {item!r}")
        pairs.append((method, base))
    if not pairs:
        raise argparse.ArgumentTypeError(f"expected METHOD:BASELINE[,...], got {text!r}")
    return tuple(pairs)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..cli import positions_arg

    p.description = (
        "Fit FineSteer and its baselines (all as configurations of the same steerer operator) on training files, "
        "score them on evaluation files with judge-free likelihood metrics, and write eval.json, eval.md and PNG "
        "plots to --output-dir. Metrics: the preference margin log p(toward | prompt) - log p(away | prompt) "
        "(refusal vs compliance openings, or the file's chosen/rejected pair) steered vs unsteered on every set; "
        "on benign sets KL(unsteered || steered) over the unsteered greedy continuation, the fraction of greedy "
        "continuations left identical, and reference-answer log-likelihood when the file has one; gate "
        "TPR/FPR/AUROC and score histograms; TruthfulQA MC1/MC2; with --generate, keyword refusal rates of "
        "greedy generations. Methods: " + ", ".join(METHODS) + ". A file given both for fitting and for "
        "scoring is split by record (--fit-fraction) so nothing is scored that was fitted on.")
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="local model directory, HuggingFace hub id, or a .gguf file "
                                                   "(converted once into a cache)")
    g.add_argument("--gguf-file", default=None, help="name of a GGUF file inside the --model directory")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model weight dtype (default: bfloat16/float16 on CUDA, float32 on CPU)")
    g.add_argument("--layers-path", default=None, help="dotted path of the decoder-block list when it is not found "
                                                       "automatically (e.g. model.layers)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub repository")
    g.add_argument("--prompt-format", default=None, choices=["auto", "chat", "plain", "raw"],
                   help="how prompts are shown to the model: chat template, 'User: ...\\nAssistant:' (plain), or raw "
                        "text (default: auto = chat when the tokenizer has a template, else plain)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; 1 is "
                                                             "fastest on a loaded shared machine)")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")

    t = p.add_argument_group("training data (the steerers are fitted on these)")
    t.add_argument("--layer", type=int, required=True, help="0-based decoder layer to steer (h after block L)")
    t.add_argument("--pairs", help="preference triples (prompt, chosen, rejected; δ = chosen − rejected), or a "
                                   "TruthfulQA file (question, best/correct/incorrect answers → correct vs incorrect)")
    t.add_argument("--opening-pairs", help="prompt file turned into CAA-style (refusal opening, compliance opening) "
                                           "pairs from the training openings of finesteer.eval.openings; give "
                                           "--pairs, --opening-pairs, --compliance-opening-pairs or several (they are pooled, e.g. "
                                           "refusal pairs on harmful prompts with CoCoNot's pairs)")
    t.add_argument("--compliance-opening-pairs", metavar="FILE",
                   help="prompt file turned into the same written-opening pairs the other way round (compliance "
                        "opening, refusal opening: δ toward compliance), pooled after --opening-pairs, e.g. "
                        "benign-but-sensitive prompts a model should answer")
    t.add_argument("--pairs-per-prompt", type=int, default=2,
                   help="pairs per prompt for --opening-pairs and --compliance-opening-pairs, and per question of a "
                        "TruthfulQA --pairs file (at most one per answer of its longer list; default: 2)")
    t.add_argument("--target", required=True, help="prompts the gate should open on (field prompt or question)")
    t.add_argument("--benign", required=True, nargs="+", metavar="FILE",
                   help="prompts the gate should stay closed on; several files are pooled (e.g. ordinary "
                        "instructions and benign-but-sensitive requests)")

    e = p.add_argument_group("evaluation data (scored, never fitted on)")
    e.add_argument("--eval-target", type=_named_path, action="append", default=[], metavar="NAME=PATH",
                   help="a set the steerer should move (e.g. harmful=harmful_val.jsonl); repeatable")
    e.add_argument("--eval-benign", type=_named_path, action="append", default=[], metavar="NAME=PATH",
                   help="a set the steerer should leave alone (e.g. benign=benign_val.jsonl); repeatable")
    e.add_argument("--truthfulqa", default=None, help="TruthfulQA file (question, best_answer, correct_answers, "
                                                      "incorrect_answers) for MC1/MC2")
    e.add_argument("--toward", default="refusal", choices=list(TOWARD),
                   help="which openings the margin counts as 'toward': refusal (safety, default) or compliance "
                        "(reducing over-refusal); prompts with chosen/rejected fields use those")
    e.add_argument("--set-toward", type=_set_toward, action="append", default=[], metavar="NAME=DIRECTION",
                   help="score evaluation set NAME toward refusal or compliance instead of --toward (e.g. "
                        "borderline=compliance beside harmful sets scored toward refusal: one steerer that should "
                        "refuse some prompts and comply with others); repeatable")
    e.add_argument("--openings-per-side", type=int, default=None,
                   help="score with only the first N refusal and N compliance openings (default: all)")
    e.add_argument("--continuation-tokens", type=int, default=16,
                   help="length of the unsteered greedy continuation of benign prompts used for KL and greedy "
                        "identity (default: 16)")
    e.add_argument("--generate", action="store_true",
                   help="also generate greedy answers with each steerer attached and report keyword refusal rates "
                        "(meaningful for instruct models)")
    e.add_argument("--generate-tokens", type=int, default=32, help="tokens per generated answer (default: 32)")

    lim = p.add_argument_group("subset sizes")
    lim.add_argument("--limit-train", type=int, default=None, help="at most N gate prompts from each of --target "
                                                                    "and --benign")
    lim.add_argument("--limit-pairs", type=int, default=None,
                     help="at most N records of --pairs (of a TruthfulQA file: N pairs, 2 per question) and N "
                          "prompts of --opening-pairs and of --compliance-opening-pairs")
    lim.add_argument("--limit-eval", type=int, default=None, help="at most N prompts from each evaluation set")
    lim.add_argument("--limit-truthfulqa", type=int, default=None, help="at most N TruthfulQA questions")
    lim.add_argument("--limit-generate", type=int, default=20, help="prompts per set for --generate (default: 20)")
    lim.add_argument("--eval-start", type=float, default=0.0,
                     help="score each evaluation file from this fraction of its rows on; the rows before it are "
                          "left for development (choosing layer, gate, threshold), so the report never saw them "
                          "(default: 0)")
    lim.add_argument("--fit-fraction", type=float, default=0.5,
                     help="share of a file used for fitting when it is also scored (default: 0.5)")
    lim.add_argument("--swap-split", action="store_true",
                     help="swap the two parts of such a split: fit on the part normally scored and score the part "
                          "normally fitted (the second fold of a two-fold cross-fit; same seed)")
    lim.add_argument("--holdout-fraction", type=float, default=0.2,
                     help="share of pair prompts held out from the MoSE fit to measure response-shift prediction "
                          "(default: 0.2)")

    f = p.add_argument_group("methods and fit")
    f.add_argument("--methods", type=_methods, default=METHODS,
                   help="comma-separated subset of: " + ", ".join(METHODS) + " (default: all)")
    f.add_argument("--strengths", type=_floats, default=(0.5, 1.0, 2.0, 4.0),
                   help="comma-separated strengths λ of every steered method (default: 0.5,1,2,4)")
    f.add_argument("--extra-strengths", action="append", default=[], metavar="METHOD=λ,λ", type=_method_strengths,
                   help="further strengths for one method, scored beside --strengths (e.g. finesteer=24,32: a "
                        "gated method moves a set only through the prompts it opens, so it needs a larger λ to "
                        "move the set as far as an always-on one); repeatable")
    f.add_argument("--match-targets", type=_method_pairs, default=(), metavar="METHOD:BASELINE,...",
                   help="after the grid, also score METHOD at the strengths where it moves the target sets as far as "
                        "each of BASELINE's points (to within --match-tolerance), found by interpolating its own "
                        "measured curve, so the trade-off check compares equal target shifts instead of the next "
                        "grid point (e.g. finesteer:caa,finesteer:cast)")
    f.add_argument("--match-tolerance", type=float, default=0.02,
                   help="how much further than the baseline point a matched strength may move the targets, "
                        "relative (default: 0.02)")
    f.add_argument("--delta-positions", type=positions_arg, default="all",
                   help="response tokens averaged for δ: 'all' (default) or the first N")
    f.add_argument("--rank", type=int, default=None, help="SCS subspace rank r (default: 16; the probe gate is "
                   "rank 1)")
    f.add_argument("--scs-method", default="energy", choices=list(SCS_METHODS),
                   help="SCS subspace fit (default: energy; see finesteer.fit.fit_scs)")
    f.add_argument("--benign-rank", type=int, default=None, help="benign subspace rank r_b of the contrastive gate "
                                                                 "(default: --rank)")
    f.add_argument("--max-benign-fpr", type=float, default=0.05,
                   help="gate threshold: the largest allowed held-out benign FPR (default: 0.05)")
    f.add_argument("--calib-fraction", type=float, default=0.2, help="gate prompts held out to calibrate τ "
                                                                     "(default: 0.2)")
    f.add_argument("--gate-mode", default="hard", choices=["hard", "soft"],
                   help="gate of scs_mean and finesteer: hard, 1[score > τ], leaves closed prompts exactly "
                        "untouched (default); soft, sigmoid((score − τ)/T)")
    f.add_argument("--gate-temperature", type=float, default=0.5,
                   help="soft gate T in units of the std of the gate's scores on the benign training prompts "
                        "(default: 0.5)")
    add_gate_token_arguments(f, "the gate of scs_mean and finesteer", " (needs --mode token; the held-out pairs "
                                                                     "stay out of it)")
    add_mose_arguments(f, null_rows_help="add N of the gate's benign training prompts to MoSE's training data "
                       "with a zero response shift, so the experts also learn how much to steer: the vector "
                       "shrinks on queries that resemble benign prompts more than targets (the mean vector of "
                       "caa, cast and scs_mean is unchanged; default: 0)")
    f.add_argument("--seed", type=int, default=0, help="seed of every split and fit (default: 0)")
    f.add_argument("--mode", default="prompt", choices=["prompt", "token"],
                   help="prompt: one vector per prompt from its last token (default); token: every token")
    f.add_argument("--backend", default="auto", help="operator backend: auto, reference, cpu, triton, cuda")

    o = p.add_argument_group("output")
    o.add_argument("-o", "--output-dir", required=True, help="where eval.json, eval.md and the PNG plots go")
    o.add_argument("--cache-dir", default=None, help="extraction and continuation cache; a rerun with the same model "
                                                     "and data skips those steps (default: OUTPUT_DIR/cache)")


def _merged(method_strengths) -> dict:
    """Repeated --extra-strengths of one method pooled: {method: (λ, ...)}."""
    out = {}
    for name, lams in method_strengths:
        out[name] = out.get(name, ()) + tuple(lams)
    return out


def config_from_args(args):
    """The :class:`~finesteer.eval.config.EvalConfig` that ``args`` describe."""
    from pathlib import Path

    from .config import EvalConfig, EvalSetSpec

    toward = dict(args.set_toward)
    names = [n for n, _ in args.eval_target + args.eval_benign]
    unknown = sorted(set(toward) - set(names))
    if unknown:
        raise ValueError(f"--set-toward names {', '.join(unknown)}, which is not an evaluation set "
                         f"(--eval-target / --eval-benign names: {', '.join(names) or 'none'})")
    sets = [EvalSetSpec(n, pth, "target", toward.get(n)) for n, pth in args.eval_target]
    sets += [EvalSetSpec(n, pth, "benign", toward.get(n)) for n, pth in args.eval_benign]
    mose = mose_options(args)
    return EvalConfig(
        layer=args.layer, target=args.target, benign=args.benign, pairs=args.pairs, opening_pairs=args.opening_pairs,
        compliance_opening_pairs=args.compliance_opening_pairs,
        pairs_per_prompt=args.pairs_per_prompt, eval_sets=sets, truthfulqa=args.truthfulqa, methods=args.methods,
        strengths=args.strengths, extra_strengths=_merged(args.extra_strengths), match_targets=args.match_targets,
        match_tolerance=args.match_tolerance, toward=args.toward, openings_per_side=args.openings_per_side,
        continuation_tokens=args.continuation_tokens, generate=args.generate, generate_tokens=args.generate_tokens,
        limit_generate=args.limit_generate, limit_train=args.limit_train, limit_pairs=args.limit_pairs,
        limit_eval=args.limit_eval, limit_truthfulqa=args.limit_truthfulqa, fit_fraction=args.fit_fraction,
        swap_split=args.swap_split,
        eval_start=args.eval_start,
        holdout_fraction=args.holdout_fraction, delta_positions=args.delta_positions, rank=args.rank,
        scs_method=args.scs_method, benign_rank=args.benign_rank, max_benign_fpr=args.max_benign_fpr, calib_fraction=args.calib_fraction,
        gate_mode=args.gate_mode, gate_temperature=args.gate_temperature, gate_tokens=args.gate_tokens,
        gate_continuations=args.gate_continuations,
        mose_options=mose, null_rows=args.null_rows, seed=args.seed, mode=args.mode, backend=args.backend, batch_size=args.batch_size,
        prompt_format=args.prompt_format, module_path=args.layers_path,
        cache_dir=args.cache_dir or str(Path(args.output_dir) / "cache"), progress=not args.quiet)


def run(args) -> int:
    """Run ``finesteer eval`` with parsed ``args``; returns the exit status."""
    import torch

    from ..cli import CLIError, _check_layer
    from ..models import ModelLoadError, load_model
    from .harness import run_eval
    from .report import markdown_table, write_reports

    if args.threads is not None:
        if args.threads < 1:
            raise CLIError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    config = config_from_args(args)  # validates every option before the (slow) model load
    t0 = time.perf_counter()
    extra = {} if args.gguf_file is None else {"gguf_file": args.gguf_file}
    try:
        model, tok = load_model(args.model, args.device, args.dtype, args.trust_remote_code, not args.quiet, **extra)
    except ModelLoadError as exc:
        raise CLIError(f"--model: {exc}") from None
    load_s = time.perf_counter() - t0
    _check_layer(model, args.layer, args.layers_path)
    result = run_eval(model, tok, config)
    result.timings["load model"] = round(load_s, 3)
    result.model = args.model + (f" ({args.gguf_file})" if args.gguf_file else "")
    files = write_reports(result, args.output_dir)
    print(markdown_table(result.rows))
    print("timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in result.timings.items()))
    print("wrote " + ", ".join(files.values()))
    return 0


def main(argv) -> int:
    parser = argparse.ArgumentParser(prog="finesteer eval")
    add_arguments(parser)
    return run(parser.parse_args(argv))
