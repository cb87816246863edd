"""Models: loading a causal LM, and reading what FineSteer needs from one.

One home for what the CLI, the demo, activation extraction, the evaluation harness and
:class:`~finesteer.FusedSteerer` all need to know about a model:

- :func:`load_model` — a causal LM and its tokenizer from a local directory, a hub id or a GGUF
  file, in eval mode, with errors that say what is wrong (:class:`ModelLoadError`);
- :func:`gguf_model_dir` — a GGUF file converted once into a transformers folder in a cache
  (:func:`gguf_cache_root`, overridden by the ``FINESTEER_GGUF_CACHE`` environment variable);
- :func:`find_decoder_layers` — the ``nn.ModuleList`` of decoder blocks (the hook point of
  DESIGN §1 is the output of block ``ℓ``);
- :func:`model_hidden_size`, :func:`model_context_length`, :func:`model_device`.

Only :func:`load_model` imports ``transformers``; the rest works on any ``nn.Module`` whose blocks
sit in an ``nn.ModuleList`` and whose config (if any) uses the usual attribute names.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import inspect
from pathlib import Path
from typing import Optional

import torch
from torch import nn

__all__ = [
    "GGUF_CACHE_ENV",
    "LAYER_PATHS",
    "ModelLoadError",
    "find_decoder_layers",
    "full_forward_kwargs",
    "gguf_cache_root",
    "gguf_model_dir",
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


def full_forward_kwargs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        position_ids: torch.Tensor) -> dict:
    """Keyword arguments for one cache-free forward of ``model`` over whole padded sequences.

    ``position_ids`` (counting real tokens only, so padding does not shift positions) and
    ``use_cache=False`` are passed only where the model's ``forward`` takes them.
    """
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask)
    params = inspect.signature(model.forward).parameters
    if "position_ids" in params:
        kwargs["position_ids"] = position_ids
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return kwargs


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


# ---------------------------------------------------------------------------------------------
# GGUF files: converted once into a transformers folder, then loaded like any local model

#: Environment variable naming the folder that holds converted GGUF models (see :func:`gguf_cache_root`).
GGUF_CACHE_ENV = "FINESTEER_GGUF_CACHE"
#: Bumped when the conversion changes, so old cache entries are not reused.
_GGUF_CACHE_FORMAT = 1
_GGUF_MARKER = "finesteer_gguf.json"


def gguf_cache_root() -> Path:
    """Where converted GGUF models live: ``$FINESTEER_GGUF_CACHE`` when set, else
    ``$XDG_CACHE_HOME/finesteer/gguf`` (``~/.cache/finesteer/gguf`` without ``XDG_CACHE_HOME``)."""
    env = os.environ.get(GGUF_CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "finesteer" / "gguf"


def _gguf_key(path: Path) -> str:
    """Cache key of a GGUF file: the SHA-256 of its bytes (a renamed or moved copy reuses the
    conversion; an edited file does not), 24 hex digits, plus the conversion format."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return f"{h.hexdigest()[:24]}-v{_GGUF_CACHE_FORMAT}"


def _gguf_available() -> bool:
    # transformers reads GGUF with the gguf package and refuses to without accelerate
    return all(importlib.util.find_spec(name) is not None for name in ("gguf", "accelerate"))


def _convert_gguf(path: Path, out: Path) -> None:
    """Dequantise the GGUF file ``path`` into a plain fp32 transformers folder ``out``.

    ``save_pretrained`` refuses a model loaded from GGUF ("quantized with gguf and is not
    serializable"), so the model class is built from the GGUF's config without its
    ``quantization_config`` and the dequantised state dict is copied into it; both give
    identical logits. The tokenizer is saved beside it.
    """
    import transformers

    folder, name = str(path.parent), path.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # Tied weights (lm_head = embeddings) may be absent from the state dict; anything else is a bug.
    missing = [k for k in missing if k not in (getattr(plain, "_tied_weights_keys", None) or ())]
    if missing or unexpected:
        raise ModelLoadError(f"GGUF file {str(path)!r}: converting to a transformers model left weights "
                             f"unmatched (missing {missing[:5]}, unexpected {unexpected[:5]})")
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if getattr(loaded, "generation_config", None) is not None:
        loaded.generation_config.save_pretrained(out)


def gguf_model_dir(gguf_path, cache_root=None, progress: bool = True) -> Path:
    """A transformers model folder for the GGUF file ``gguf_path``, converted on first use.

    The folder is ``<cache_root>/<key>/`` (``cache_root`` defaults to :func:`gguf_cache_root`;
    ``key`` = a content hash of the file, so the conversion is reused whatever the file is
    called). Conversion writes into a temporary sibling folder and renames it into place, so an
    interrupted conversion leaves nothing that a later call would take for a finished one.
    Raises :class:`ModelLoadError` when the file is missing, the ``gguf`` or ``accelerate``
    package (needed by transformers to read GGUF) is not installed, or transformers cannot read it.
    """
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {str(gguf_path)!r}: no such file")
    root = Path(cache_root).expanduser() if cache_root is not None else gguf_cache_root()
    out = root / _gguf_key(path)
    if (out / _GGUF_MARKER).is_file():
        return out
    if not _gguf_available():
        raise ModelLoadError(f"GGUF file {str(path)!r}: reading GGUF needs the gguf and accelerate packages: "
                             f"pip install gguf accelerate (or pip install 'finesteer[eval]')")
    if progress:
        print(f"converting {path} once into {out} (dequantised fp32; later loads reuse it)", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=root))
    try:
        try:
            _convert_gguf(path, tmp)
        except (OSError, ValueError, ImportError, KeyError) as exc:
            # transformers raises these for a GGUF it cannot read (unknown architecture, bad file)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelLoadError(f"GGUF file {str(path)!r}: cannot convert it to a transformers model "
                                 f"({type(exc).__name__}: {first})") from exc
        (tmp / _GGUF_MARKER).write_text(json.dumps({"source": str(path.resolve()), "key": out.name,
                                                     "format": _GGUF_CACHE_FORMAT}, indent=1))
        try:
            os.replace(tmp, out)
        except OSError:
            if not (out / _GGUF_MARKER).is_file():  # not a concurrent conversion that won the race
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out



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


def _load_tokenizer(transformers, path: str, trust_remote_code: bool):
    """``AutoTokenizer.from_pretrained(path)``, also for a folder saved by a newer transformers.

    transformers 5 saves ``"tokenizer_class": "TokenizersBackend"``, its added special tokens as a
    list ``"extra_special_tokens"``, and the chat template in a separate ``chat_template.jinja``.
    transformers 4.x has no such class (its ``PreTrainedTokenizerFast`` reads the same
    ``tokenizer.json``), later 4.x releases (4.57 among them; 4.44 ignores the key) take
    ``extra_special_tokens`` for a ``{name: token}`` dict, where a list fails, and older 4.x
    releases do not read the template file. All three are
    bridged here so one model folder works on every supported version.
    """
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except ValueError as exc:
        if "TokenizersBackend" not in str(exc):
            raise
        kwargs = {}
        config = Path(path) / "tokenizer_config.json"
        extra = json.loads(config.read_text(encoding="utf-8")).get("extra_special_tokens") if config.is_file() else None
        if isinstance(extra, list):  # the 4.x meaning of a list of added special tokens
            kwargs = {"extra_special_tokens": {}, "additional_special_tokens": extra}
        tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(path, **kwargs)
    template = Path(path) / "chat_template.jinja"
    if getattr(tokenizer, "chat_template", None) is None and template.is_file():
        tokenizer.chat_template = template.read_text(encoding="utf-8")
    return tokenizer


def _dtype_keyword(version: str) -> str:
    """The ``from_pretrained`` keyword for the weight dtype: ``dtype`` from transformers 4.56 on,
    ``torch_dtype`` before (older versions pass an unknown ``dtype`` on to the config silently)."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return "dtype"  # an unparsable (development) version: assume a current one
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def load_model(name_or_path: str, device: str = "auto", dtype: str = "auto", trust_remote_code: bool = False,
               progress: bool = True, gguf_file: Optional[str] = None):
    """Load a causal LM and its tokenizer → ``(model, tokenizer)``, the model in eval mode on ``device``.

    ``name_or_path``: a local model directory (with ``config.json``), a hub id (``owner/name``), or
    a GGUF file (a path ending in ``.gguf``). ``gguf_file``: the name of a GGUF file inside the
    local directory ``name_or_path`` (transformers' convention). A GGUF model is dequantised and
    converted once into a cache folder (:func:`gguf_model_dir`; ``$FINESTEER_GGUF_CACHE``
    overrides its location) and loaded from there; this needs the ``gguf`` package.
    ``device``: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``. ``dtype``: ``"auto"`` (bf16/fp16
    on CUDA, fp32 on the CPU), ``"float32"``, ``"bfloat16"`` or ``"float16"``. A tokenizer without a
    pad token gets its EOS token as pad. Raises :class:`ModelLoadError` with the reason and what
    to do (missing directory, not a model folder, gated, offline, unknown id).
    """
    try:
        import transformers
    except ImportError:
        raise ModelLoadError("loading models needs transformers: pip install 'finesteer[hf]'") from None
    if gguf_file is not None or name_or_path.lower().endswith(".gguf"):
        source = Path(name_or_path).expanduser()
        if gguf_file is not None:
            if not source.is_dir():
                raise ModelLoadError(f"model {name_or_path!r}: with gguf_file={gguf_file!r} it must be the local "
                                     f"directory holding that file")
            source = source / gguf_file
        name_or_path = str(gguf_model_dir(source, progress=progress))
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
        tokenizer = _load_tokenizer(transformers, path, trust_remote_code)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=trust_remote_code, **{_dtype_keyword(transformers.__version__): torch_dtype})
    except (OSError, ValueError, EnvironmentError) as exc:
        raise ModelLoadError(_explain_load_error(name_or_path, exc)) from None
    finally:
        if bars_were_on and not progress:  # a library call leaves the process's settings as it found them
            hf_logging.enable_progress_bar()
    first = next(model.parameters(), None)
    if first is not None and first.dtype != torch_dtype:
        # A transformers that ignored the dtype keyword: cast (only then, so that modules a model
        # keeps in fp32 on purpose stay so when the keyword was understood).
        model.to(dtype=torch_dtype)
    model.to(device).eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
