"""Models: loading a causal LM, and reading what FineSteer needs from one.

One home for what the CLI, the demo, activation extraction, the evaluation harness and
:class:`~finesteer.FusedSteerer` all need to know about a model:

- :func:`load_model` — a causal LM and its tokenizer from a local directory or a hub id, in eval
  mode, with errors that say what is wrong (:class:`ModelLoadError`);
- :func:`find_decoder_layers` — the ``nn.ModuleList`` of decoder blocks (the hook point of
  DESIGN §1 is the output of block ``ℓ``);
- :func:`model_hidden_size`, :func:`model_context_length`, :func:`model_device`.

Only :func:`load_model` imports ``transformers``; the rest works on any ``nn.Module`` whose blocks
sit in an ``nn.ModuleList`` and whose config (if any) uses the usual attribute names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

__all__ = [
    "LAYER_PATHS",
    "ModelLoadError",
    "find_decoder_layers",
    "load_model",
    "model_context_length",
    "model_device",
    "model_hidden_size",
    "resolve_device",
    "resolve_dtype",
]


class ModelLoadError(ValueError):
    """A model or tokenizer could not be loaded; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------
# introspection

#: Where the decoder blocks live, tried in order. Causal-LM wrappers first, then bare bodies.
#: Llama, Qwen2, Mistral, Gemma2/3, Phi3 (``model.layers``), GPT-2 (``transformer.h``), GPT-NeoX
#: (``gpt_neox.layers``), BERT-style encoders (``bert.encoder.layer`` / ``encoder.layer``),
#: plus the common multimodal and encoder-decoder placements.
LAYER_PATHS = (
    "model.layers",
    "model.language_model.layers",
    "model.text_model.layers",
    "language_model.model.layers",
    "language_model.layers",
    "transformer.h",
    "gpt_neox.layers",
    "model.decoder.layers",
    "transformer.layers",
    "transformer.blocks",
    "bert.encoder.layer",
    "roberta.encoder.layer",
    "encoder.layer",
    "layers",
    "h",
    "blocks",
)


def _get_path(root: nn.Module, path: str):
    obj = root
    for part in path.split("."):
        if part.isdigit() and isinstance(obj, (nn.ModuleList, nn.Sequential)):
            idx = int(part)
            if idx >= len(obj):
                return None
            obj = obj[idx]
        else:
            obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        try:
            return config.get_text_config()
        except Exception:  # some remote-code configs break get_text_config; the plain config still helps
            return config
    return config


def model_hidden_size(model: nn.Module) -> Optional[int]:
    """The residual-stream width of ``model`` from its config (``None`` when it has no config)."""
    config = _text_config(model)
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


def model_context_length(model: nn.Module) -> Optional[int]:
    """The longest sequence ``model`` supports, from its config (``None`` when unknown)."""
    config = _text_config(model)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_device(module: nn.Module, default: Optional[torch.device] = None) -> torch.device:
    """The device of ``module``'s first parameter (``default``, else the CPU, when it has none)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu") if default is None else torch.device(default)


def find_decoder_layers(model: nn.Module, module_path: Optional[str] = None) -> nn.ModuleList:
    """The ``nn.ModuleList`` of decoder (or encoder) blocks of ``model``.

    ``module_path`` is a dotted attribute path from ``model`` (e.g. ``"model.layers"``); without it
    the known placements in :data:`LAYER_PATHS` are tried, and where the config states the number of
    layers the list must have that length. Raises ``ValueError`` naming the model class and what
    was tried when nothing fits.
    """
    cls = type(model).__name__
    if module_path is not None:
        found = _get_path(model, module_path)
        if not isinstance(found, nn.ModuleList):
            what = "nothing" if found is None else f"a {type(found).__name__}"
            raise ValueError(f"{cls}: module path {module_path!r} resolves to {what}, not an nn.ModuleList of "
                             f"decoder blocks")
        return found
    n_layers = getattr(_text_config(model), "num_hidden_layers", None)
    for path in LAYER_PATHS:
        found = _get_path(model, path)
        if isinstance(found, nn.ModuleList) and len(found) and (not isinstance(n_layers, int)
                                                               or len(found) == n_layers):
            return found
    raise ValueError(f"cannot find the decoder layers of {cls}: none of {', '.join(LAYER_PATHS)} is an "
                     f"nn.ModuleList of its {n_layers if n_layers is not None else '?'} blocks; pass the "
                     f"dotted path of the block list explicitly (module_path='...')")


# ---------------------------------------------------------------------------------------------
# loading


def resolve_device(name: str) -> str:
    """``"auto"`` → ``"cuda"`` when available, else ``"cpu"``; a CUDA device without CUDA raises."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r}: CUDA is not available on this machine; use 'cpu'")
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """``"auto"`` → bf16 (fp16 without bf16 support) on CUDA, fp32 on the CPU; else the named dtype."""
    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"dtype must be 'auto' or one of {', '.join(dtypes)}, got {name!r}")
    return dtypes[name]


def _explain_load_error(model: str, exc: Exception) -> str:
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    if "gated" in low or "401" in low or "403" in low or "restricted" in low:
        hint = ("this is a gated or private model: accept its licence on huggingface.co, then log in with "
                "`huggingface-cli login` or set HF_TOKEN")
    elif ("offline" in low or "connection" in low or "couldn't connect" in low or "could not connect" in low
          or "localentrynotfound" in low or "cannot find the requested files in the local cache" in low):
        hint = ("the hub cannot be reached and there is no local copy: download it once with network access "
                "(`huggingface-cli download MODEL`), or pass a local model directory")
    elif "not a valid model identifier" in low or "repositorynotfound" in low or "404" in low \
            or "does not appear to have" in low:
        hint = "no such model: check the hub id (owner/name) or pass a local directory containing config.json"
    else:
        hint = "check that it is a transformers causal-LM directory or hub id"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"cannot load model {model!r}: {hint} ({type(exc).__name__}: {first})"


def load_model(name_or_path: str, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
               progress: bool = True):
    """Load a causal LM and its tokenizer → ``(model, tokenizer)``, the model in eval mode on ``device``.

    ``name_or_path``: a local model directory (with ``config.json``) or a hub id (``owner/name``).
    ``device``: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``. ``dtype``: ``"auto"`` (bf16/fp16
    on CUDA, fp32 on the CPU), ``"float32"``, ``"bfloat16"`` or ``"float16"``. A tokenizer without a
    pad token gets its EOS token as pad. Raises :class:`ModelLoadError` with the reason and what
    to do (missing directory, not a model folder, gated, offline, unknown id).
    """
    try:
        import transformers
    except ImportError:
        raise ModelLoadError("loading models needs transformers: pip install 'finesteer[hf]'") from None
    # A hub id is "name" or "owner/name"; anything else can only be a local path.
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1 or "\\" in name_or_path
    local = Path(name_or_path).expanduser()
    if looks_local and not local.exists():
        raise ModelLoadError(f"model {name_or_path!r}: no such directory (a hub id looks like 'owner/name')")
    path = str(local) if local.exists() else name_or_path
    if local.is_file():
        raise ModelLoadError(f"model {name_or_path!r} is a file; expected a transformers model directory or a hub id")
    if local.is_dir() and not (local / "config.json").is_file():
        raise ModelLoadError(f"model {name_or_path!r}: the directory has no config.json; it is not a transformers "
                             f"model folder")
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    hf_logging = transformers.utils.logging
    bars_were_on = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype,
                                                                  trust_remote_code=trust_remote_code)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelLoadError(_explain_load_error(name_or_path, exc)) from None
    finally:
        if bars_were_on and not progress:  # a library call leaves the process's settings as it found them
            hf_logging.enable_progress_bar()
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
