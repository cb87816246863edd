"""The ``finesteer`` command line: ``fit``, ``generate``, ``inspect`` and ``demo``.

::

    finesteer fit --model M --layer L --pairs pairs.jsonl --target harmful.jsonl --benign benign.jsonl \\
                  -o steerer.safetensors
    finesteer generate --model M --steerer steerer.safetensors --prompts prompts.jsonl -o out.jsonl
    finesteer inspect steerer.safetensors
    finesteer demo

Errors in the inputs (a missing field, an empty or over-long prompt, a layer out of range, an
artifact for another model size or layer, a model that cannot be loaded) end the command with a
one-line message on stderr and exit status 2; ``FINESTEER_DEBUG=1`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
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
    g.add_argument("--model", required=True, help="local model directory or HuggingFace hub id")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N (default: cuda when available, else cpu)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="model weight dtype (default: bfloat16/float16 on CUDA, float32 on CPU)")
    g.add_argument("--layers-path", default=None,
                   help="dotted path of the decoder-block list when it is not found automatically "
                        "(e.g. model.layers)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub repository")
    g.add_argument("--no-chat-template", action="store_true",
                   help="feed prompts as raw text even when the tokenizer has a chat template")
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
                    "--target vs --benign prompts and the MoSE on the --pairs preference triples, and save "
                    "one .safetensors steerer. Prints the gate's calibration report and the MoSE fit statistics. "
                    "Empty prompts or responses, and inputs longer than the model's context, are refused "
                    "(never truncated: truncation would move the measured token).")
    _model_options(fit)
    fit.add_argument("--layer", type=int, required=True, help="0-based decoder layer to steer (h after block L)")
    fit.add_argument("--pairs", required=True,
                     help="preference triples (prompt, chosen, rejected): .jsonl/.json/.csv/.tsv or a datasets "
                          "save_to_disk folder (DIR:SPLIT for a DatasetDict)")
    fit.add_argument("--target", required=True, help="prompts the gate should open on (same formats)")
    fit.add_argument("--benign", required=True, help="prompts the gate should stay closed on (same formats)")
    fit.add_argument("-o", "--output", required=True, help="where to write the steerer (.safetensors)")
    f = fit.add_argument_group("data fields")
    f.add_argument("--prompt-field", default="prompt",
                   help="field holding the prompt in --pairs, --target and --benign (default: prompt)")
    f.add_argument("--chosen-field", default="chosen", help="field of the preferred response (default: chosen)")
    f.add_argument("--rejected-field", default="rejected",
                   help="field of the undesired response (default: rejected)")
    f.add_argument("--limit", type=int, default=None, help="use at most this many records of each file")
    f.add_argument("--delta-positions", type=positions_arg, default="all",
                   help="response tokens averaged for the deltas: 'all' (default, the paper's) or N = the first "
                        "N response tokens")
    f.add_argument("--cache-dir", default=None,
                   help="cache extracted activations here; a rerun with the same model, layer and data reuses them")
    s = fit.add_argument_group("SCS gate")
    s.add_argument("--rank", type=int, default=16, help="gate subspace rank r (default: 16)")
    s.add_argument("--scs-method", default="energy", choices=["energy", "contrastive"],
                   help="subspace fit (default: energy)")
    s.add_argument("--max-benign-fpr", type=float, default=0.05,
                   help="threshold τ: the largest allowed held-out benign false-positive rate (default: 0.05)")
    s.add_argument("--calib-fraction", type=float, default=0.2,
                   help="fraction of target and benign prompts held out to calibrate τ (default: 0.2)")
    s.add_argument("--gate-mode", default="hard", choices=["hard", "soft", "off"],
                   help="hard: steer when score > τ; soft: sigmoid((score−τ)/temperature); off: always "
                        "(default: hard)")
    s.add_argument("--temperature", type=float, default=0.05, help="soft-gate temperature (default: 0.05)")
    m = fit.add_argument_group("MoSE")
    m.add_argument("--k-min", type=int, default=4, help="fewest experts K tried (default: 4)")
    m.add_argument("--k-max", type=int, default=10, help="most experts K tried (default: 10)")
    m.add_argument("--residual-dim", type=int, default=10, help="residual basis size m (default: 10)")
    m.add_argument("--hidden", type=int, default=256, help="hidden size H of the residual MLP (default: 256)")
    m.add_argument("--epochs", type=int, default=200, help="most training epochs (early stopping) (default: 200)")
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

    # inspect ---------------------------------------------------------------------------------
    ins = sub.add_parser("inspect", help="show what is in a steerer artifact",
                         description="Print a steerer artifact's layer, sizes, experts K and cluster sizes, gate "
                                     "calibration and MoSE fit statistics.")
    ins.add_argument("steerer", help="steerer artifact (.safetensors)")
    ins.add_argument("--json", action="store_true", help="print the summary as JSON")

    # demo: options are added lazily by finesteer.demo.cli when the command is run -----------
    sub.add_parser("demo", help="fit and show a steerer on the small model shipped with finesteer (CPU, minutes)",
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


def _cache(args, name: str):
    return None if args.cache_dir is None else Path(args.cache_dir) / f"{name}-layer{args.layer}.safetensors"


def cmd_fit(args) -> int:
    from .data import load_pairs, load_prompts
    from .extract import last_token_states, response_deltas
    from .fit import fit_mose, fit_scs
    from .steerer import Steerer

    if args.k_min > args.k_max:
        raise CLIError(f"--k-min {args.k_min} is larger than --k-max {args.k_max}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    # Read every input before loading the model: a typo in a field name should fail in a second.
    pairs = load_pairs(args.pairs, args.prompt_field, args.chosen_field, args.rejected_field, args.limit)
    target = load_prompts(args.target, args.prompt_field, args.limit)
    benign = load_prompts(args.benign, args.prompt_field, args.limit)
    print(f"data: {len(pairs[0])} pairs, {len(target)} target prompts, {len(benign)} benign prompts")
    model, tok = load_model(args.model, args.device, args.dtype, args.trust_remote_code, _progress(args))
    _check_layer(model, args.layer, args.layers_path)
    template = not args.no_chat_template
    common = dict(batch_size=args.batch_size, chat_template=template, progress=_progress(args),
                  module_path=args.layers_path)
    layer = args.layer
    h_t = last_token_states(model, tok, target, [layer], cache_file=_cache(args, "target"), **common)[layer]
    h_b = last_token_states(model, tok, benign, [layer], cache_file=_cache(args, "benign"), **common)[layer]
    q, d = response_deltas(model, tok, *pairs, [layer], positions=args.delta_positions,
                           cache_file=_cache(args, "pairs"), **common)
    print(f"activations: layer {layer}, hidden size {h_t.shape[1]}")

    gate = fit_scs(h_t, h_b, rank=args.rank, method=args.scs_method, max_benign_fpr=args.max_benign_fpr,
                   calib_fraction=args.calib_fraction, seed=args.seed)
    print(f"SCS gate ({args.scs_method}, rank {gate.rank}): {gate.report}")
    mose = fit_mose(q[layer], d[layer], k_range=(args.k_min, args.k_max), residual_dim=args.residual_dim,
                    hidden=args.hidden, epochs=args.epochs, seed=args.seed, progress=_progress(args))
    _print_mose(mose)
    steerer = Steerer(gate=gate, mose=mose, strength=args.strength, layer=layer, gate_mode=args.gate_mode,
                      temperature=args.temperature,
                      metadata={"delta_positions": args.delta_positions, "chat_template": template,
                                "n_pairs": len(pairs[0]), "n_target": len(target), "n_benign": len(benign)})
    steerer.save(args.output, model_name_or_path=args.model)
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
    if "ch_scores" in st:
        print("MoSE Calinski-Harabasz by K: " + "  ".join(f"{k}:{v:.4g}" for k, v in st["ch_scores"].items()))


def cmd_generate(args) -> int:

    from .data import load_prompts
    from .extract import encode_prompts
    from .generation import batches, generate_ids
    from .integrations.hf import FusedSteerer
    from .models import model_context_length, model_hidden_size
    from .steerer import Steerer

    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be >= 1, got {args.batch_size}")
    prompts = load_prompts(args.prompts, args.prompt_field, args.limit)
    steerer = Steerer.load(args.steerer)  # validates the file before the (slow) model load
    if args.layer is not None and steerer.layer != args.layer:
        raise CLIError(f"{args.steerer} was fitted for layer {steerer.layer}, not the requested --layer {args.layer}")
    model, tok = load_model(args.model, args.device, args.dtype, args.trust_remote_code, _progress(args))
    d = model_hidden_size(model)
    if d is not None and d != steerer.hidden_size:
        raise CLIError(f"{args.steerer}: artifact is for hidden size {steerer.hidden_size}, {args.model} has hidden "
                       f"size {d} (was it fitted on another model?)")
    _check_layer(model, steerer.layer, args.layers_path)
    if args.strength is not None:
        steerer.strength = float(args.strength)
    template = not args.no_chat_template
    context = model_context_length(model)
    seqs = encode_prompts(tok, prompts, template, context)
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
    print(f"  MoSE:         K={mo['num_experts']} experts, cluster sizes {mo['cluster_sizes']}, "
          f"residual m={mo['residual_dim']}, MLP H={mo['mlp_hidden']}")
    fit = info["fit"]
    keys = ("n_samples", "best_epoch", "epochs_run", "train_loss", "val_loss", "val_loss_mean_delta", "seed")
    shown = [f"{k}={fit[k]:.4g}" if isinstance(fit[k], float) else f"{k}={fit[k]}" for k in keys if k in fit]
    if shown:
        print("  fit:          " + "  ".join(shown))
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


COMMANDS = {"fit": cmd_fit, "generate": cmd_generate, "inspect": cmd_inspect}


def main(argv: Optional[list] = None) -> int:
    """Entry point of the ``finesteer`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("FINESTEER_DEBUG", "") not in ("", "0")
    try:
        if argv and argv[0] == "demo":
            # The demo's options come from finesteer.demo.cli, imported only when it runs.
            return cmd_demo(argv[1:])
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return COMMANDS[args.command](args)
    except (CLIError, ValueError, TypeError, IndexError, FileNotFoundError, ImportError, RuntimeError) as exc:
        if debug:
            raise
        hint = "" if isinstance(exc, CLIError) else " (FINESTEER_DEBUG=1 shows the traceback)"
        print(f"finesteer: error: {exc}{hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("finesteer: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
