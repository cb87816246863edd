"""The ``finesteer`` command line: ``fit``, ``generate``, ``inspect``, ``demo`` and ``eval``.

::

    finesteer fit --model M --layer L --pairs pairs.jsonl --target harmful.jsonl --benign benign.jsonl \\
                  -o steerer.safetensors
    finesteer generate --model M --steerer steerer.safetensors --prompts prompts.jsonl -o out.jsonl
    finesteer inspect steerer.safetensors
    finesteer demo
    finesteer eval --help        # quality of FineSteer vs baselines (finesteer.eval.cli)

Errors in the inputs (a missing field, an empty or over-long prompt, a number out of range, an
unwritable output path, a layer out of range, an artifact for another model size or layer, a model
that cannot be loaded, a file that cannot be read or written) end the command with a one-line
message on stderr and exit status 2; ``FINESTEER_DEBUG=1`` shows the traceback instead. Options,
input files and the output path are checked before the model is loaded. When the reader of the
output goes away (``finesteer inspect --json | head``) the command stops quietly (status 1).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Optional

__all__ = ["main", "build_parser"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


# ---------------------------------------------------------------------------------------------
# model loading


def load_model(name: str, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
               progress: bool = True):
    """:func:`finesteer.models.load_model` with its errors turned into one-line CLI errors."""
    from .models import ModelLoadError, load_model as _load

    try:
        return _load(name, device, dtype, trust_remote_code, progress)
    except ModelLoadError as exc:
        raise CLIError(f"--model: {exc}") from None


# ---------------------------------------------------------------------------------------------
# argument parsing


def _model_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=True, help="local model directory, HuggingFace hub id, or a .gguf file "
                                                   "(converted once into ~/.cache/finesteer/gguf; "
                                                   "FINESTEER_GGUF_CACHE overrides)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model weight dtype (default: bfloat16/float16 on CUDA, float32 on CPU)")
    g.add_argument("--layers-path", default=None,
                   help="dotted path of the decoder-block list when it is not found automatically "
                        "(e.g. model.layers)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub repository")
    g.add_argument("--no-chat-template", action="store_true",
                   help="feed prompts as raw text even when the tokenizer has a chat template")
    g.add_argument("--prompt-format", default=None, choices=["auto", "chat", "plain", "raw"],
                   help="how prompts are formatted: auto (the chat template where there is one, else "
                        "'User: {prompt}\\nAssistant:'), chat, plain or raw; fit records it in the steerer, "
                        "generate and calibrate reuse the recorded one (default: auto, or raw with "
                        "--no-chat-template)")
    g.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default: 8)")
    g.add_argument("--quiet", action="store_true", help="no progress bars")


def positions_arg(text: str):
    if text == "all":
        return "all"
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all' or a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected 'all' or a positive integer, got {text!r}")
    return n


# ---------------------------------------------------------------------------------------------
# checks that run before any model is loaded


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


#: (option dest, flag, predicate, what it must be) — checked by :func:`check_options` on whichever
#: of these a command has, so a bad number fails in a second, not after the model load.
OPTION_RULES = (
    ("layer", "--layer", lambda v: v >= 0, "a layer index >= 0"),
    ("batch_size", "--batch-size", lambda v: v >= 1, "an integer >= 1"),
    ("limit", "--limit", lambda v: v >= 1, "an integer >= 1"),
    ("rank", "--rank", lambda v: v >= 1, "an integer >= 1"),
    ("max_benign_fpr", "--max-benign-fpr", lambda v: _finite(v) and 0 <= v < 1, "a rate in [0, 1)"),
    ("calib_fraction", "--calib-fraction", lambda v: _finite(v) and 0 < v < 1, "a fraction in (0, 1)"),
    ("temperature", "--temperature", lambda v: _finite(v) and v > 0, "a finite number > 0"),
    ("k_min", "--k-min", lambda v: v >= 2, "an integer >= 2"),
    ("k_max", "--k-max", lambda v: v >= 2, "an integer >= 2"),
    ("residual_dim", "--residual-dim", lambda v: v >= 1, "an integer >= 1"),
    ("hidden", "--hidden", lambda v: v >= 1, "an integer >= 1"),
    ("epochs", "--epochs", lambda v: v >= 1, "an integer >= 1"),
    ("null_rows", "--null-rows", lambda v: v >= 0, "an integer >= 0"),
    ("gate_continuations", "--gate-continuations", lambda v: v >= 0, "an integer >= 0"),
    ("continuation_tokens", "--continuation-tokens", lambda v: v >= 1, "an integer >= 1"),
    ("strength", "--strength", _finite, "a finite number"),
    ("max_new_tokens", "--max-new-tokens", lambda v: v >= 1, "an integer >= 1"),
    ("sampling_temperature", "--sampling-temperature", lambda v: _finite(v) and v > 0, "a finite number > 0"),
    ("top_p", "--top-p", lambda v: _finite(v) and 0 < v <= 1, "a probability mass in (0, 1]"),
)


def check_options(args) -> None:
    """Raise :class:`CLIError` on the first numeric option outside its range (``None`` = not given)."""
    for dest, flag, ok, what in OPTION_RULES:
        value = getattr(args, dest, None)
        if value is not None and not ok(value):
            raise CLIError(f"{flag} must be {what}, got {value}")


def check_output_path(path, flag: str) -> None:
    """Fail now, with one line, if a file cannot be written at ``path`` (before hours of work).

    ``path`` must not be a directory, and the nearest existing folder on its way must accept a
    new file: that is probed by creating and removing an empty temporary file there, which is
    what the atomic save does (permission bits alone would say yes to root on a read-only mount).
    """
    p = Path(path).expanduser()
    if p.is_dir():
        raise CLIError(f"{flag} {path}: is a directory; give a file path (e.g. {p / 'steerer.safetensors'})")
    folder = p.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise CLIError(f"{flag} {path}: {folder} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".finesteer-write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CLIError(f"{flag} {path}: cannot write in {folder} ({exc.strerror or exc})") from None


def _mose_option(text: str) -> tuple:
    """argparse type of ``--mose-option NAME=VALUE`` (:func:`finesteer.fit.mose.option_from_text`)."""
    from .fit.mose import option_from_text

    try:
        return option_from_text(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_gate_token_arguments(group, whose: str, response_note: str) -> None:
    """``--gate-tokens`` and ``--gate-continuations``, which ``finesteer fit`` and ``finesteer eval``
    share (:mod:`finesteer.token_gate`): ``whose`` names the gate, ``response_note`` follows the word
    "response" in the help."""
    from .token_gate import GATE_TOKENS

    group.add_argument("--gate-tokens", default="prompt", choices=list(GATE_TOKENS),
                       help=f"what {whose} is fitted on: prompt, the last token of the --target and --benign "
                            f"prompts (default); response{response_note}, every token of the pairs' rejected "
                            f"responses against every token of their chosen ones, their prompts' and the --benign "
                            f"prompts' last tokens, so it opens where a response heads the rejected way")
    group.add_argument("--gate-continuations", type=int, default=0, metavar="N",
                       help="with --gate-tokens response: also keep the gate closed on every token of the model's "
                            "own greedy continuations of the first N --benign prompts (default: 0)")


def add_mose_arguments(group, null_rows_help: str) -> None:
    """The MoSE fit options ``finesteer fit`` and ``finesteer eval`` share (read by :func:`mose_options`)."""
    from .fit.mose import CLUSTER_ON, INITS, SHRINKS, STOPPINGS

    group.add_argument("--k-min", type=int, default=4, help="fewest MoSE experts K tried (default: 4)")
    group.add_argument("--k-max", type=int, default=10, help="most MoSE experts K tried (default: 10)")
    group.add_argument("--residual-dim", type=int, default=10, help="MoSE residual basis size m (default: 10)")
    group.add_argument("--hidden", type=int, default=256, help="MoSE residual MLP hidden size H (default: 256)")
    group.add_argument("--epochs", type=int, default=200,
                       help="most MoSE training epochs (early stopping) (default: 200)")
    group.add_argument("--mose-init", default="mean", choices=INITS,
                       help="where training starts: mean (the mean δ), ridge (the mean δ plus a ridge read-out of "
                            "the residual from the query, penalty picked on the validation rows; needs --hidden >= "
                            "2·--residual-dim), random (default: mean)")
    group.add_argument("--mose-cluster-on", default="delta", choices=CLUSTER_ON,
                       help="what K-means groups into experts: delta (the response shifts; each expert a kind of "
                            "shift) or query (the prompts' states; each expert the mean shift of a group of similar "
                            "prompts, which averages out per-response noise: for data whose single shifts are mostly "
                            "answer wording; it helped on TruthfulQA, not on CoCoNot) (default: delta)")
    group.add_argument("--mose-shrink", default="off", choices=SHRINKS,
                       help="cv: after training, pull MoSE's vectors toward the mean δ by the weight that "
                            "cross-validation over the training pairs picks (5 folds; --mose-option "
                            "shrink_folds=N; 1 keeps the fit, 0 is the mean vector); for data whose response "
                            "shift the query barely predicts (default: off)")
    group.add_argument("--mose-stopping", default="holdout", choices=STOPPINGS,
                       help="how many epochs MoSE trains: holdout (early stopping on a tenth of the pairs, the "
                            "best weights kept) or cv (the epoch count with the lowest pooled out-of-fold loss of 5 "
                            "fits, --mose-option stopping_folds=N; then one fit on every pair for that many epochs: "
                            "slower, and far less dependent on the seed where the query predicts little of the "
                            "shift) (default: holdout)")
    group.add_argument("--mose-option", action="append", default=[], metavar="NAME=VALUE", type=_mose_option,
                       help="any MoSEOptions field, applied over the flags above, e.g. loss=mse_cosine, "
                            "weight_decay=0.1, query_dim=none, shrink_folds=10; repeatable")
    group.add_argument("--null-rows", type=int, default=0, metavar="N", help=null_rows_help)


def mose_options(args) -> dict:
    """``fit_mose`` keyword arguments from the options of :func:`add_mose_arguments` (``--mose-option``
    applied over the dedicated flags), every value checked now by the fit's own rules, so that a bad
    one fails before the model loads (:class:`CLIError`)."""
    from .fit.mose import MoSEOptions

    if args.k_min > args.k_max:
        raise CLIError(f"--k-min {args.k_min} is larger than --k-max {args.k_max}")
    options = dict(k_range=(args.k_min, args.k_max), residual_dim=args.residual_dim, hidden=args.hidden,
                   epochs=args.epochs, init=args.mose_init, shrink=args.mose_shrink,
                   cluster_on=args.mose_cluster_on, stopping=args.mose_stopping)
    options.update(dict(args.mose_option))
    try:
        MoSEOptions().replace(**options).validated(1)  # the hidden size only resolves attn_dim's default
    except (TypeError, ValueError) as exc:
        raise CLIError(f"MoSE options: {exc}") from None
    return options


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="finesteer",
        description="FineSteer: fit, apply and inspect fine-grained inference-time steerers "
                    "(SCS gate + MoSE) for HuggingFace causal language models.")
    parser.add_argument("--version", action="version", version=f"finesteer {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    # fit -------------------------------------------------------------------------------------
    fit = sub.add_parser(
        "fit", help="extract activations, fit the SCS gate and MoSE, save a steerer artifact",
        description="Extract activations of --model at --layer (h after decoder block L), fit the SCS gate on "
                    "--target vs --benign prompts (or, with --gate-tokens response, on the pairs' response tokens) "
                    "and the MoSE on the --pairs preference triples, and save "
                    "one .safetensors steerer. Prints the gate's calibration report and the MoSE fit statistics. "
                    "Empty prompts or responses are refused; inputs longer than the model's context are refused "
                    "too (never truncated: truncation would move the measured token), or dropped and counted "
                    "with --skip-long. Options and the output path are checked before the model is loaded.")
    _model_options(fit)
    fit.add_argument("--layer", type=int, required=True, help="0-based decoder layer to steer (h after block L)")
    fit.add_argument("--pairs", required=True,
                     help="preference triples (prompt, chosen, rejected): .jsonl/.json/.csv/.tsv or a datasets "
                          "save_to_disk folder (DIR:SPLIT for a DatasetDict)")
    fit.add_argument("--target", default=None,
                     help="prompts the gate should open on (same formats); required, except with --gate-tokens "
                          "response, whose gate opens on the pairs' rejected responses instead")
    fit.add_argument("--benign", required=True, help="prompts the gate should stay closed on (same formats)")
    fit.add_argument("-o", "--output", required=True, help="where to write the steerer (.safetensors)")
    f = fit.add_argument_group("data fields")
    f.add_argument("--prompt-field", default="prompt",
                   help="field holding the prompt in --pairs, --target and --benign (default: prompt)")
    f.add_argument("--chosen-field", default="chosen", help="field of the preferred response (default: chosen)")
    f.add_argument("--rejected-field", default="rejected",
                   help="field of the undesired response (default: rejected)")
    f.add_argument("--limit", type=int, default=None, help="use at most this many records of each file")
    f.add_argument("--skip-long", action="store_true",
                   help="drop (and count in the summary) prompts and pairs longer than the model's context "
                        "instead of refusing the whole run (default: refuse)")
    f.add_argument("--delta-positions", type=positions_arg, default="all",
                   help="response tokens averaged for the deltas: 'all' (default, the paper's) or N = the first "
                        "N response tokens")
    f.add_argument("--cache-dir", default=None,
                   help="cache extracted activations here; a rerun with the same model, layer and data reuses them")
    s = fit.add_argument_group("SCS gate")
    s.add_argument("--rank", type=int, default=None, help="gate subspace rank r (default: 16; the probe gate is "
                   "rank 1)")
    s.add_argument("--scs-method", default="energy", choices=["energy", "contrastive", "discriminant", "probe"],
                   help="gate fit (default: energy; probe: a linear probe in the SCS form, which generalised "
                        "best to unseen prompt collections in docs/quality.md)")
    s.add_argument("--max-benign-fpr", type=float, default=0.05,
                   help="threshold τ: the largest allowed held-out benign false-positive rate (default: 0.05)")
    s.add_argument("--calib-fraction", type=float, default=0.2,
                   help="fraction of target and benign prompts held out to calibrate τ (default: 0.2)")
    s.add_argument("--gate-mode", default="hard", choices=["hard", "soft", "off"],
                   help="hard: steer when score > τ; soft: sigmoid((score−τ)/temperature); off: always "
                        "(default: hard)")
    s.add_argument("--temperature", type=float, default=0.05, help="soft-gate temperature (default: 0.05)")
    add_gate_token_arguments(s, "the gate", " (read in token mode: finesteer generate --mode token; the artifact "
                                            "records it)")
    s.add_argument("--continuation-tokens", type=int, default=16, metavar="N",
                   help="length of those continuations in tokens (default: 16)")
    m = fit.add_argument_group("MoSE")
    add_mose_arguments(m, null_rows_help="also fit MoSE on N of the --benign prompts (a seeded choice) with a "
                       "zero response shift, so its vector shrinks on queries that resemble them more than the "
                       "targets: it learns how much to steer as well as which way (default: 0)")
    m.add_argument("--seed", type=int, default=0, help="seed of the splits and the MoSE fit (default: 0)")
    m.add_argument("--strength", type=float, default=1.0, help="steering strength λ stored in the artifact "
                                                                   "(default: 1.0)")

    # generate --------------------------------------------------------------------------------
    gen = sub.add_parser(
        "generate", help="generate with and without a steerer, side by side, as JSONL",
        description="For every prompt, generate the base (unsteered) and the steered continuation and write one "
                    "JSON object per line: prompt, base, steered, layer, gate_score (the SCS score at the last "
                    "prompt token, read in the steered run's own prefill) and gate (the gate value g in [0, 1]; "
                    "in prompt mode 0 means the steerer left the answer alone). Prompts are formatted with the tokenizer's chat template unless --no-chat-template; empty "
                    "prompts and prompts longer than the model's context are refused, not truncated.")
    _model_options(gen)
    gen.add_argument("--steerer", required=True, help="steerer artifact (.safetensors) written by `finesteer fit`")
    gen.add_argument("--prompts", required=True, help="prompts file (.jsonl/.json/.csv/.tsv or datasets folder)")
    gen.add_argument("--prompt-field", default="prompt", help="field holding the prompt (default: prompt)")
    gen.add_argument("--limit", type=int, default=None, help="use at most this many prompts")
    gen.add_argument("-o", "--output", default=None, help="output .jsonl (default: standard output)")
    gen.add_argument("--layer", type=int, default=None,
                     help="expected layer: refuse an artifact fitted for another layer (default: the artifact's)")
    gen.add_argument("--strength", type=float, default=None, help="override the artifact's strength λ")
    gen.add_argument("--mode", default="prompt", choices=["prompt", "token"],
                     help="prompt: one vector per prompt from its last token (default); token: every token")
    gen.add_argument("--backend", default="auto", help="operator backend: auto, reference, cpu, triton, cuda")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per answer (default: 64)")
    gen.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--sampling-temperature", type=float, default=1.0, help="sampling temperature (default: 1.0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    gen.add_argument("--seed", type=int, default=0,
                     help="sampling seed; base and steered runs of a batch start from the same seed (default: 0)")

    # calibrate -------------------------------------------------------------------------------
    cal = sub.add_parser(
        "calibrate", help="choose a steerer's gate threshold again, on new prompts, at a new benign budget",
        description="Score --target and --benign prompts with the gate of --steerer (at its layer, in its recorded "
                    "prompt format), set the threshold τ to the smallest value whose false-positive rate on "
                    "--benign is at most --max-benign-fpr, and save the steerer with that τ to -o. Everything "
                    "else in the artifact (subspace, experts, strength, gate mode) is kept; the summary gives τ's "
                    "TPR on --target, FPR on --benign and their AUROC, beside the artifact's previous τ. Use "
                    "prompts the gate was not fitted on: a held-out benign set in your traffic's style. "
                    "Prompts longer than the model's context are refused, not truncated.")
    _model_options(cal)
    cal.add_argument("--steerer", required=True, help="steerer artifact (.safetensors) with a gate")
    cal.add_argument("--target", required=True,
                     help="prompts the gate should open on: .jsonl/.json/.csv/.tsv or a datasets folder")
    cal.add_argument("--benign", required=True, help="prompts the gate should stay closed on (same formats)")
    cal.add_argument("--max-benign-fpr", type=float, required=True,
                     help="the largest allowed false-positive rate on --benign, in [0, 1)")
    cal.add_argument("-o", "--output", required=True,
                     help="where to write the recalibrated steerer (may be --steerer itself: it is replaced "
                          "only once the new file is complete)")
    cal.add_argument("--prompt-field", default="prompt", help="field holding the prompt (default: prompt)")
    cal.add_argument("--limit", type=int, default=None, help="use at most this many records of each file")

    # inspect ---------------------------------------------------------------------------------
    ins = sub.add_parser("inspect", help="show what is in a steerer artifact",
                         description="Print a steerer artifact's layer, sizes, experts K and cluster sizes, gate "
                                     "calibration and MoSE fit statistics.")
    ins.add_argument("steerer", help="steerer artifact (.safetensors)")
    ins.add_argument("--json", action="store_true", help="print the summary as JSON")

    # demo: options are added lazily by finesteer.demo.cli when the command is run -----------
    sub.add_parser("demo", help="fit and show a steerer on the small model shipped with finesteer (CPU, minutes)",
                   add_help=False)
    # eval: options are added lazily by finesteer.eval.cli when the command is run --------------
    sub.add_parser("eval", help="fit FineSteer and baselines, score them with likelihood metrics, write reports",
                   add_help=False)
    return parser


# ---------------------------------------------------------------------------------------------
# commands


def _progress(args) -> bool:
    return not getattr(args, "quiet", False)


def _check_layer(model, layer: int, layers_path: Optional[str]) -> None:
    from .models import find_decoder_layers

    try:
        n = len(find_decoder_layers(model, layers_path))
    except ValueError as exc:
        raise CLIError(f"{exc} (on the command line: --layers-path)") from None
    if not 0 <= layer < n:
        raise CLIError(f"--layer {layer} is out of range: {type(model).__name__} has {n} decoder layers "
                       f"(valid: 0..{n - 1})")


def _check_steerer_fits(args, steerer, model) -> None:
    """The artifact ``--steerer`` was fitted for this model's hidden size, and its layer exists."""
    from .models import model_hidden_size

    d = model_hidden_size(model)
    if d is not None and d != steerer.hidden_size:
        raise CLIError(f"{args.steerer}: artifact is for hidden size {steerer.hidden_size}, {args.model} has hidden "
                       f"size {d} (was it fitted on another model?)")
    _check_layer(model, steerer.layer, args.layers_path)


def _prompt_format(tok, name, chat_template: bool) -> str:
    from .extract import resolve_prompt_format

    try:
        return resolve_prompt_format(tok, name, chat_template)
    except ValueError as exc:
        raise CLIError(f"--prompt-format: {exc}") from None


def _cache(args, name: str):
    return None if args.cache_dir is None else Path(args.cache_dir) / f"{name}-layer{args.layer}.safetensors"


def _load_inputs(args):
    """Read --pairs, --target and --benign, turning a missing field into a hint at the right flag."""
    from .data import MissingFieldError, load_pairs, load_prompts

    flags = {args.prompt_field: "--prompt-field", getattr(args, "chosen_field", None): "--chosen-field",
             getattr(args, "rejected_field", None): "--rejected-field"}
    try:
        if args.command == "calibrate":
            return load_prompts(args.target, args.prompt_field, args.limit), \
                load_prompts(args.benign, args.prompt_field, args.limit)
        if args.command == "fit":
            pairs = load_pairs(args.pairs, args.prompt_field, args.chosen_field, args.rejected_field, args.limit)
            target = [] if args.target is None else load_prompts(args.target, args.prompt_field, args.limit)
            return pairs, target, load_prompts(args.benign, args.prompt_field, args.limit)
        return load_prompts(args.prompts, args.prompt_field, args.limit)
    except MissingFieldError as exc:
        raise CLIError(f"{exc}; choose the field with {flags.get(exc.field, '--prompt-field')}") from None


def _drop_long(args, model, tok, fmt, pairs, target, benign):
    """Rows longer than the model's context: refused (CLIError) unless --skip-long, then dropped.

    Returns ``(pairs, target, benign, skipped)`` with ``skipped`` = ``{"pairs": n, ...}``.
    """
    from .extract import long_rows
    from .models import model_context_length

    context = model_context_length(model)
    # A gate on response tokens reads every response token, so the whole response must fit.
    positions = "all" if args.gate_tokens == "response" else args.delta_positions
    found = {"pairs": long_rows(tok, pairs[0], pairs[1], pairs[2], context=context, prompt_format=fmt,
                                positions=positions),
             "target": long_rows(tok, target, context=context, prompt_format=fmt),
             "benign": long_rows(tok, benign, context=context, prompt_format=fmt)}
    if not args.skip_long:
        for name, rows in found.items():
            if rows:
                raise CLIError(f"--{name}: {len(rows)} row(s) (first: record {rows[0] + 1}) are longer than the "
                               f"model's context of {context} tokens; shorten them, or pass --skip-long to drop "
                               f"and count them (rows are never truncated: that would move the measured token)")
        return pairs, target, benign, {k: 0 for k in found}

    def keep(seq, rows):
        drop = set(rows)
        return [x for i, x in enumerate(seq) if i not in drop]

    pairs = tuple(keep(col, found["pairs"]) for col in pairs)
    target, benign = keep(target, found["target"]), keep(benign, found["benign"])
    skipped = {k: len(v) for k, v in found.items()}
    if any(skipped.values()):
        print(f"skipped (longer than the context of {context} tokens): {skipped['pairs']} pairs, "
              f"{skipped['target']} target prompts, {skipped['benign']} benign prompts")
    for name, rows in (("pairs", pairs[0]), ("target", target), ("benign", benign)):
        if not rows and skipped[name]:
            raise CLIError(f"--{name}: every row is longer than the model's context of {context} tokens")
    return pairs, target, benign, skipped


def _check_gate_tokens(args) -> None:
    """``--target`` goes with a gate on prompts, ``--gate-continuations`` with one on response tokens."""
    if args.gate_tokens == "prompt":
        if args.target is None:
            raise CLIError("--target is required: the prompts the gate should open on (or fit the gate on response "
                           "tokens with --gate-tokens response)")
        if args.gate_continuations:
            raise CLIError("--gate-continuations keeps a gate on response tokens closed on ordinary text: it needs "
                           "--gate-tokens response")
    elif args.target is not None:
        raise CLIError("--target: a gate on response tokens (--gate-tokens response) opens on the pairs' rejected "
                       "responses, not on prompts; drop --target")


def _response_gate_rows(args, model, tok, fmt, pairs, queries, h_b, benign, common):
    """The rows of ``--gate-tokens response`` (:func:`finesteer.token_gate.response_gate_rows`), with the
    model's own greedy continuations of the first ``--gate-continuations`` benign prompts."""
    from .extract import encode_prompts, pad_token_id
    from .token_gate import prompt_and_continuation_states, response_gate_rows

    conts = None
    if args.gate_continuations:
        from .eval.scoring import greedy_continuations

        ids = encode_prompts(tok, benign[:args.gate_continuations], prompt_format=fmt)
        generated = greedy_continuations(model, ids, args.continuation_tokens, pad_token_id(tok), tok.eos_token_id,
                                         args.batch_size, _progress(args))
        conts = prompt_and_continuation_states(model, tok, args.layer, ids, generated, batch_size=args.batch_size,
                                               cache_file=_cache(args, "benign-continuation-tokens"),
                                               progress=_progress(args), module_path=args.layers_path)[1]
    return response_gate_rows(model, tok, args.layer, *pairs, queries, h_b, continuation_states=conts,
                              cache_file=_cache(args, "pair-tokens"), **common)


def cmd_fit(args) -> int:
    from .extract import ChatTemplateError, last_token_states, response_deltas
    from .fit import append_null_rows, choose_null_rows, fit_mose, fit_scs
    from .steerer import Steerer

    # Everything that can be checked without the model is checked first: a typo in a field
    # name, a bad number or an unwritable output should fail in a second, not after the fit.
    check_options(args)
    _check_gate_tokens(args)
    options = mose_options(args)
    check_output_path(args.output, "-o/--output")
    pairs, target, benign = _load_inputs(args)
    print(f"data: {len(pairs[0])} pairs, {len(target)} target prompts, {len(benign)} benign prompts")
    if args.null_rows > len(benign):
        raise CLIError(f"--null-rows {args.null_rows}: --benign has only {len(benign)} prompts to draw them from")
    model, tok = load_model(args.model, args.device, args.dtype, args.trust_remote_code, _progress(args))
    _check_layer(model, args.layer, args.layers_path)
    fmt = _prompt_format(tok, args.prompt_format, not args.no_chat_template)
    pairs, target, benign, skipped = _drop_long(args, model, tok, fmt, pairs, target, benign)
    common = dict(batch_size=args.batch_size, prompt_format=fmt, progress=_progress(args),
                  module_path=args.layers_path)
    layer = args.layer
    try:
        h_b = last_token_states(model, tok, benign, [layer], cache_file=_cache(args, "benign"), **common)[layer]
        q, d = response_deltas(model, tok, *pairs, [layer], positions=args.delta_positions,
                               cache_file=_cache(args, "pairs"), **common)
        if args.gate_tokens == "response":
            rows = _response_gate_rows(args, model, tok, fmt, pairs, q[layer], h_b, benign, common)
            h_t, gate_benign = rows.target, rows.benign
            print("gate rows (response tokens): " + ", ".join(f"{k.replace('_', ' ')} {v.shape[0]}"
                                                              for k, v in rows.parts.items() if v.shape[0]))
        else:
            h_t = last_token_states(model, tok, target, [layer], cache_file=_cache(args, "target"), **common)[layer]
            gate_benign = h_b
    except ChatTemplateError as exc:
        raise CLIError(f"--pairs: {exc} (on the command line: --prompt-format plain)") from None
    print(f"activations: layer {layer}, hidden size {h_b.shape[1]}")

    gate = fit_scs(h_t, gate_benign, rank=args.rank, method=args.scs_method, max_benign_fpr=args.max_benign_fpr,
                   calib_fraction=args.calib_fraction, seed=args.seed)
    print(f"SCS gate ({args.scs_method}, rank {gate.rank}): {gate.report}")
    null = h_b[choose_null_rows(h_b.shape[0], args.null_rows, args.seed)]
    queries, deltas = append_null_rows(q[layer], d[layer], null)
    mose = fit_mose(queries, deltas, **{"seed": args.seed, "progress": _progress(args), **options})
    _print_mose(mose)
    meta = {"delta_positions": args.delta_positions, "prompt_format": fmt, "n_pairs": len(pairs[0]),
            "n_target": len(target), "n_benign": len(benign), "null_rows": args.null_rows,
            "gate_tokens": args.gate_tokens}
    if args.gate_tokens == "response":
        meta["gate_continuations"] = {"prompts": args.gate_continuations, "tokens": args.continuation_tokens}
    if args.skip_long:
        meta["skipped_long"] = skipped
    steerer = Steerer(gate=gate, mose=mose, strength=args.strength, layer=layer, gate_mode=args.gate_mode,
                      temperature=args.temperature, metadata=meta)
    steerer.save(args.output, model_name_or_path=args.model)
    print(f"saved {args.output}: {steerer}")
    return 0


def cmd_calibrate(args) -> int:
    from .extract import ChatTemplateError, last_token_states, long_rows
    from .fit import recalibrate_scs
    from .models import model_context_length
    from .steerer import Steerer

    check_options(args)
    check_output_path(args.output, "-o/--output")
    target, benign = _load_inputs(args)
    steerer = Steerer.load(args.steerer)  # validates the file before the (slow) model load
    if steerer.gate is None:
        raise CLIError(f"--steerer {args.steerer}: the artifact has no gate (fitted with the gate off), so it has "
                       f"no threshold to calibrate")
    if steerer.reads_response_tokens:
        raise CLIError(f"--steerer {args.steerer}: its gate was fitted on response tokens (--gate-tokens response); "
                       f"calibrating it on prompts would set τ on rows it never reads: refit it with finesteer fit "
                       f"--max-benign-fpr instead")
    model, tok = load_model(args.model, args.device, args.dtype, args.trust_remote_code, _progress(args))
    _check_steerer_fits(args, steerer, model)
    layer = steerer.layer
    # The gate was fitted, and is applied, on prompts in the steerer's recorded format: τ must be
    # chosen on the same (an artifact without a record takes the command line's, or auto).
    recorded = steerer.metadata.get("prompt_format")
    fmt = _prompt_format(tok, recorded or args.prompt_format, not args.no_chat_template)
    asked = None if not (args.prompt_format or args.no_chat_template) else \
        _prompt_format(tok, args.prompt_format, not args.no_chat_template)
    if recorded and asked is not None and asked != recorded:
        raise CLIError(f"--prompt-format {asked}: {args.steerer} was fitted on prompts in the '{recorded}' format, "
                       f"and generation uses that one; calibrating on another would set τ for inputs it never sees")
    context = model_context_length(model)
    for flag, prompts in (("--target", target), ("--benign", benign)):
        rows = long_rows(tok, prompts, context=context, prompt_format=fmt)
        if rows:
            raise CLIError(f"{flag}: {len(rows)} prompt(s) (first: record {rows[0] + 1}) are longer than the model's "
                           f"context of {context} tokens; shorten or remove them (they are never truncated)")
    common = dict(batch_size=args.batch_size, prompt_format=fmt, progress=_progress(args),
                  module_path=args.layers_path)
    try:
        h_t = last_token_states(model, tok, target, [layer], **common)[layer]
        h_b = last_token_states(model, tok, benign, [layer], **common)[layer]
    except ChatTemplateError as exc:
        raise CLIError(f"{exc} (on the command line: --prompt-format plain)") from None
    previous = steerer.gate
    steerer.gate = recalibrate_scs(previous, h_t, h_b, args.max_benign_fpr)
    steerer.metadata["calibrated_on"] = {"target": str(args.target), "benign": str(args.benign),
                                         "n_target": len(target), "n_benign": len(benign), "prompt_format": fmt,
                                         "previous_threshold": previous.threshold}
    print(f"data: {len(target)} target prompts, {len(benign)} benign prompts (layer {layer}, prompt format {fmt})")
    rates = {name: float((previous.score(h.float()) > previous.threshold).double().mean())
             for name, h in (("TPR", h_t), ("FPR", h_b))}
    print(f"previous gate: tau={previous.threshold:.6g}, on these prompts TPR={rates['TPR']:.3f} "
          f"FPR={rates['FPR']:.3f}" + (f" (at its fit: {previous.report})" if previous.report is not None else ""))
    print(f"recalibrated:  {steerer.gate.report}")
    steerer.save(args.output)
    print(f"saved {args.output}: {steerer}")
    return 0


def _print_mose(mose) -> None:
    st = mose.fit_stats or {}
    sizes = st.get("cluster_sizes")
    if sizes is None and mose.cluster_sizes is not None:
        sizes = [int(x) for x in mose.cluster_sizes.tolist()]
    print(f"MoSE: K={mose.num_experts} experts (cluster sizes {sizes}), residual dim m={mose.residual_dim}, "
          f"MLP hidden H={mose.mlp_hidden}")
    keys = ("n_train", "n_val", "best_epoch", "epochs_run", "stopped_early", "train_loss", "val_loss",
            "val_loss_mean_delta")
    shown = {k: st[k] for k in keys if k in st}
    if shown:
        print("MoSE fit: " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in shown.items()))
    if "stopping" in st:
        sp = st["stopping"]
        print(f"MoSE epochs chosen by {sp['folds']}-fold cross-validation: {sp['epochs']} (out-of-fold MSE "
              f"{st['val_mse']:.4g}, cosine {st['val_cosine']:.3g}; mean δ {st['val_loss_mean_delta']:.4g}, "
              f"{st['val_cosine_mean_delta']:.3g}), then trained on all {st['n_train']} rows")
    if "shrink" in st:
        sh = st["shrink"]
        print(f"MoSE shrinkage toward the mean δ ({sh['folds']}-fold cross-validation): weight {sh['weight']:.3g} "
              f"(out-of-fold MSE {sh['cv_mse']:.4g}; as trained {sh['cv_mse_trained']:.4g}; mean δ {sh['cv_mse_mean']:.4g})")
    if "ch_scores" in st:
        print("MoSE Calinski-Harabasz by K: " + "  ".join(f"{k}:{v:.4g}" for k, v in st["ch_scores"].items()))
    limit = (st.get("hyperparameters") or {}).get("epochs")
    if limit and st.get("best_epoch") == limit:
        # the best weights are the last ones allowed: the loss was still falling when training had to stop
        print(f"MoSE note: the validation loss was still falling at the last of the {limit} epochs allowed; "
              "a higher limit (--epochs, or --mose-option epochs=N) may fit better")


def cmd_generate(args) -> int:
    from .extract import encode_prompts
    from .generation import batches, generate_ids
    from .integrations.hf import FusedSteerer
    from .models import model_context_length
    from .steerer import Steerer

    check_options(args)
    if args.output:
        check_output_path(args.output, "-o/--output")
    prompts = _load_inputs(args)
    steerer = Steerer.load(args.steerer)  # validates the file before the (slow) model load
    if steerer.reads_response_tokens and args.mode != "token":
        raise CLIError(f"--steerer {args.steerer}: its gate was fitted on response tokens (--gate-tokens response) "
                       f"and reads each generated token: generate with --mode token")
    if args.layer is not None and steerer.layer != args.layer:
        raise CLIError(f"{args.steerer} was fitted for layer {steerer.layer}, not the requested --layer {args.layer}")
    model, tok = load_model(args.model, args.device, args.dtype, args.trust_remote_code, _progress(args))
    _check_steerer_fits(args, steerer, model)
    if args.strength is not None:
        steerer.strength = args.strength
    # The steerer's recorded format unless the command line names one: fitting and generation must agree.
    recorded = None if (args.prompt_format or args.no_chat_template) else steerer.metadata.get("prompt_format")
    fmt = _prompt_format(tok, args.prompt_format or recorded, not args.no_chat_template)
    context = model_context_length(model)
    seqs = encode_prompts(tok, prompts, context=context, prompt_format=fmt)
    if context is not None:
        long = [i for i, s in enumerate(seqs) if len(s) + args.max_new_tokens > context]
        if long:
            warnings.warn(f"{len(long)} prompt(s) (first: prompt {long[0]}) plus --max-new-tokens "
                          f"{args.max_new_tokens} exceed the model's context of {context} tokens; their answers "
                          f"may degrade", stacklevel=1)
    sampling = dict(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                    temperature=args.sampling_temperature, top_p=args.top_p)

    def run_batch(rows, b):
        # Base and steered runs of a batch start from the same seed, so sampling differs only by steering.
        return generate_ids(model, tok, [seqs[i] for i in rows], seed=args.seed + b, **sampling)

    from tqdm.auto import tqdm

    out_f = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        gates_all = []
        for b, rows in enumerate(tqdm(batches(len(prompts), args.batch_size), desc="generate", unit="batch", disable=not _progress(args))):
            base = run_batch(rows, b)
            with FusedSteerer.attach(model, steerer, mode=args.mode, backend=args.backend,
                                     module_path=args.layers_path) as fs:
                steered = run_batch(rows, b)
                # The gate as the steered run saw it: h at the last prompt token of its own prefill.
                h = fs.prompt_states()
                scores, gates = steerer.score(h).tolist(), steerer.gate_value(h).tolist()
            gates_all += gates
            for j, i in enumerate(rows):
                rec = {"prompt": prompts[i], "base": base[j], "steered": steered[j], "layer": steerer.layer,
                       "gate_score": scores[j], "gate": gates[j]}
                out_f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            out_f.flush()
    finally:
        if out_f is not sys.stdout:
            out_f.close()
    if args.output:
        n_open = sum(g > 0 for g in gates_all)
        print(f"wrote {len(prompts)} records to {args.output} (gate open on {n_open}/{len(prompts)})",
              file=sys.stderr)
    return 0


def inspect_summary(path) -> dict:
    """A JSON-serialisable summary of the artifact at ``path`` (what ``finesteer inspect`` prints)."""
    from .artifact import load_steerer, read_metadata

    meta = read_metadata(path)
    s = load_steerer(path)
    mo = s.mose
    sizes = [int(x) for x in mo.cluster_sizes.tolist()] if mo.cluster_sizes is not None else \
        (mo.fit_stats or {}).get("cluster_sizes")
    return {
        "file": str(path),
        "format_version": meta.get("format_version"),
        "package_version": meta.get("package_version"),
        "model_name_or_path": meta.get("model_name_or_path"),
        "layer": s.layer,
        "hidden_size": s.hidden_size,
        "strength": s.strength,
        "gate": None if s.gate is None else {"method": s.gate.method, "rank": s.gate.rank,
                                             "threshold": s.gate.threshold, "mode": s.gate_mode,
                                             "temperature": s.temperature},
        "calibration": meta.get("calibration"),
        "mose": {"num_experts": mo.num_experts, "cluster_sizes": sizes, "residual_dim": mo.residual_dim,
                 "mlp_hidden": mo.mlp_hidden},
        "fit": meta.get("fit") or {},
        "extra": meta.get("extra") or {},
    }


def cmd_inspect(args) -> int:
    info = inspect_summary(args.steerer)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    print(f"{info['file']}  (format {info['format_version']}, finesteer {info['package_version']})")
    print(f"  model:        {info['model_name_or_path'] or '(not recorded)'}")
    print(f"  layer:        {info['layer']}    hidden size: {info['hidden_size']}    strength λ: {info['strength']}")
    g = info["gate"]
    if g is None:
        print("  gate:         none (always steers)")
    else:
        print(f"  gate:         SCS {g['method']}, rank {g['rank']}, τ={g['threshold']:.4g}, mode {g['mode']}"
              + (f" (temperature {g['temperature']})" if g["mode"] == "soft" else ""))
    cal = info["calibration"]
    if cal:
        print(f"  calibration:  TPR={cal['tpr']:.3f} FPR={cal['fpr']:.3f} AUROC={cal['auroc']:.3f} "
              f"(held-out {cal['n_target']} target / {cal['n_benign']} benign, max benign FPR "
              f"{cal['max_benign_fpr']})")
    mo = info["mose"]
    fit = info["fit"]
    # artifacts written before cluster_on existed record no such option: they clustered δ
    clustered = " (clustered on queries)" if fit.get("hyperparameters", {}).get("cluster_on") == "query" else ""
    print(f"  MoSE:         K={mo['num_experts']} experts{clustered}, cluster sizes {mo['cluster_sizes']}, "
          f"residual m={mo['residual_dim']}, MLP H={mo['mlp_hidden']}")
    keys = ("n_samples", "best_epoch", "epochs_run", "train_loss", "val_loss", "val_loss_mean_delta", "seed")
    shown = [f"{k}={fit[k]:.4g}" if isinstance(fit[k], float) else f"{k}={fit[k]}" for k in keys if k in fit]
    if shown:
        print("  fit:          " + "  ".join(shown))
    if "stopping" in fit:
        print(f"  stopping:     {fit['stopping']['epochs']} epochs on every row, chosen by "
              f"{fit['stopping']['folds']}-fold cross-validation")
    if "shrink" in fit:
        print(f"  shrinkage:    weight {fit['shrink']['weight']:.3g} toward the mean δ "
              f"({fit['shrink']['folds']}-fold cross-validation)")
    if info["extra"]:
        print("  extra:        " + json.dumps(info["extra"], sort_keys=True))
    return 0


def cmd_demo(argv: list) -> int:
    try:
        from .demo import cli as demo_cli
    except ImportError as exc:
        raise CLIError(f"the demo is not available in this installation ({exc})") from None
    parser = argparse.ArgumentParser(prog="finesteer demo")
    demo_cli.add_arguments(parser)
    return int(demo_cli.run(parser.parse_args(argv)) or 0)


COMMANDS = {"fit": cmd_fit, "calibrate": cmd_calibrate, "generate": cmd_generate, "inspect": cmd_inspect}


def _one_line(exc: BaseException) -> str:
    """``exc`` for the error line: an operating-system error as "path: reason" (no errno prefix)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename}: {exc.strerror}" if exc.filename is not None else exc.strerror
    return str(exc)


def main(argv: Optional[list] = None) -> int:
    """Entry point of the ``finesteer`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("FINESTEER_DEBUG", "") not in ("", "0")
    try:
        if argv and argv[0] == "demo":
            # The demo's options come from finesteer.demo.cli, imported only when it runs.
            return cmd_demo(argv[1:])
        if argv and argv[0] == "eval":  # options in finesteer.eval.cli, imported only when it runs
            from .eval.cli import main as eval_main
            return eval_main(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return COMMANDS[args.command](args)
    except BrokenPipeError:
        # The reader of stdout went away (`finesteer inspect --json | head`): stop quietly. Point
        # stdout at /dev/null so the interpreter's final flush does not raise again.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except (CLIError, ValueError, TypeError, IndexError, OSError, ImportError, RuntimeError) as exc:
        if debug:
            raise
        hint = "" if isinstance(exc, (CLIError, OSError)) else " (FINESTEER_DEBUG=1 shows the traceback)"
        print(f"finesteer: error: {_one_line(exc)}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("finesteer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
