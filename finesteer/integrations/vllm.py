"""FineSteer inside vLLM: a general plugin that steers the served model's residual stream.

Install ``finesteer[vllm]``; the package registers :func:`register` under vLLM's entry-point
group ``vllm.general_plugins``, which vLLM calls in every process it starts (the front end, the
engine core and each worker). Steering is configured through vLLM's own ``additional_config``::

    vllm serve MODEL --additional-config '{"finesteer": {"steerers": ["a.safetensors"], "mode": "token"}}'
    LLM(model=MODEL, additional_config={"finesteer": {"steerers": ["a.safetensors"]}})

Configuration (the value of ``additional_config["finesteer"]``)::

    steerers  list of artifact paths, or of {"path": str, "strength": float} to override λ
    mode      "token" (default; the only mode served inside vLLM today, see the README, "Serving with vLLM")
    backend   finesteer backend name or "auto" (default)

Where it hooks. vLLM decoder layers (Llama, Mistral, Qwen2/3, Gemma2/3) return the pair
``(hidden_states, residual)``: the block's pending output and the stream before it. The
residual stream after block ℓ — DESIGN §1's ``h``, HuggingFace's ``output_hidden_states[ℓ+1]``
— is their sum, which the next layer's fused add-RMSNorm (or the final norm) forms as its first
step. A forward hook on layer ℓ replaces the pair by ``(0, steer(hidden_states + residual))``:

- exact: the next consumer computes ``0 + steered = steered`` bit for bit, so the stream it sees
  is exactly the operator's output (h + λ·g·s rounded once from fp32), and rows whose gate is
  closed are exactly ``hidden_states + residual``, what the unsteered model would have formed.
  Adding ``v`` to ``residual`` instead would give ``hidden_states + (residual + v)``, two
  roundings in the model's dtype and not DESIGN §4's result.
- capturable: token mode calls :func:`finesteer.ops.steer_tokens` with no index, so there is no
  host sync and every shape is static ([T, d] in, [T, d] out).
- tensor parallel: after a layer's row-parallel all-reduce both tensors are replicated on every
  rank, so every rank computes the same steered stream; nothing is communicated.

Validation happens twice: in the front-end process as soon as vLLM has built its config (before
any engine or worker starts), and again in each worker before the hooks go in, so a bad
configuration never serves half-steered. Each problem is one line naming the file and field.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..artifact import ArtifactError, load_steerer, read_metadata
from .._backends import get_backend
from ..bank import SteeringBank
from ..ops import steer_tokens

# Under vLLM's "vllm" logger, so the lines appear in vLLM's own log format and level.
logger = logging.getLogger("vllm.finesteer")

#: Key of FineSteer's section in vLLM's ``additional_config``.
CONFIG_KEY = "finesteer"

#: vLLM architectures whose decoder layers return ``(hidden_states, residual)`` with the stream
#: after the block equal to their sum, under ``model.model.layers``.
SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Gemma2ForCausalLM",
    "Gemma3ForCausalLM",
)

_MODES = ("token",)
_KEYS = {"steerers", "mode", "backend"}
_HOOKS_ATTR = "_finesteer_hook_handles"


class FineSteerConfigError(ValueError):
    """A FineSteer configuration vLLM cannot serve; raised before the engine starts."""

    def __init__(self, problem: str):
        super().__init__(f"finesteer vLLM plugin: {problem}")


@dataclass(frozen=True)
class SteererSpec:
    path: str
    strength: Optional[float] = None


@dataclass(frozen=True)
class VllmSteeringConfig:
    """The parsed ``additional_config["finesteer"]`` section."""

    steerers: tuple
    mode: str = "token"
    backend: str = "auto"


# --------------------------------------------------------------------------------------------
# configuration and validation (pure Python: no vLLM import needed)
# --------------------------------------------------------------------------------------------

def parse_config(additional_config) -> Optional[VllmSteeringConfig]:
    """FineSteer's section of vLLM's ``additional_config``, validated for form; ``None`` if absent."""
    if not isinstance(additional_config, dict) or CONFIG_KEY not in additional_config:
        return None
    raw = additional_config[CONFIG_KEY]
    if not isinstance(raw, dict):
        raise FineSteerConfigError(f"additional_config['{CONFIG_KEY}'] must be an object, got {type(raw).__name__}")
    unknown = set(raw) - _KEYS
    if unknown:
        raise FineSteerConfigError(f"unknown key(s) {sorted(unknown)} in additional_config['{CONFIG_KEY}']; "
                                   f"known: {sorted(_KEYS)}")
    mode = raw.get("mode", "token")
    if mode not in _MODES:
        hint = (" (prompt mode needs per-request prefill metadata inside the model; see the README, section Serving with vLLM)"
                if mode == "prompt" else "")
        raise FineSteerConfigError(f"mode {mode!r} is not supported inside vLLM; use 'token'{hint}")
    backend = raw.get("backend", "auto")
    if not isinstance(backend, str):
        raise FineSteerConfigError(f"'backend' must be a string, got {backend!r}")
    items = raw.get("steerers")
    if not isinstance(items, (list, tuple)) or not items:
        raise FineSteerConfigError("'steerers' must be a non-empty list of artifact paths")
    specs = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            specs.append(SteererSpec(item))
        elif isinstance(item, dict) and isinstance(item.get("path"), str) and set(item) <= {"path", "strength"}:
            strength = item.get("strength")
            if strength is not None and not isinstance(strength, (int, float)):
                raise FineSteerConfigError(f"steerers[{i}].strength must be a number, got {strength!r}")
            specs.append(SteererSpec(item["path"], None if strength is None else float(strength)))
        else:
            raise FineSteerConfigError(f"steerers[{i}] must be a path or {{'path': str, 'strength': float}}, "
                                       f"got {item!r}")
    return VllmSteeringConfig(steerers=tuple(specs), mode=mode, backend=backend)


def load_and_check(cfg: VllmSteeringConfig, architectures, hidden_size: int, num_layers: int,
                   model_name: str = "the model") -> list:
    """Load every steerer and check it against the model; returns the :class:`Steerer` list.

    Checks, each failing with one :class:`FineSteerConfigError` line: a supported architecture,
    the artifact exists and is a valid FineSteer file, its hidden size equals the model's, its
    layer is in ``[0, num_layers)``, at most one steerer per layer, and the backend is known.
    """
    archs = list(architectures or [])
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise FineSteerConfigError(f"architecture {', '.join(archs) or '(unknown)'} of {model_name} is not "
                                   f"supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    from .._backends import BACKEND_MODULES
    if cfg.backend != "auto" and cfg.backend not in BACKEND_MODULES:
        raise FineSteerConfigError(f"unknown backend {cfg.backend!r}; known: {', '.join(BACKEND_MODULES)} or 'auto'")
    steerers, by_layer = [], {}
    for spec in cfg.steerers:
        path = Path(spec.path)
        try:
            meta = read_metadata(path)
            if meta["hidden_size"] != hidden_size:
                raise FineSteerConfigError(f"steerer '{path}' was fitted for hidden size {meta['hidden_size']}, "
                                           f"but {model_name} has hidden size {hidden_size}")
            if not 0 <= meta["layer"] < num_layers:
                raise FineSteerConfigError(f"steerer '{path}' is bound to layer {meta['layer']}, but {model_name} "
                                           f"has {num_layers} decoder layers (valid: 0..{num_layers - 1})")
            st = load_steerer(path, hidden_size=hidden_size)
        except FileNotFoundError:
            raise FineSteerConfigError(f"steerer file '{path}' does not exist") from None
        except ArtifactError as exc:
            raise FineSteerConfigError(f"steerer '{path}' is not usable: {exc}") from None
        except OSError as exc:
            raise FineSteerConfigError(f"steerer file '{path}' is not readable: {exc}") from None
        if st.layer in by_layer:
            raise FineSteerConfigError(f"steerers '{by_layer[st.layer]}' and '{path}' are both bound to layer "
                                       f"{st.layer}; serve one steerer per layer")
        by_layer[st.layer] = path
        if spec.strength is not None:
            st.strength = spec.strength
        steerers.append(st)
    return steerers


def check_vllm_config(vllm_config) -> Optional[list]:
    """Validate the FineSteer section of a ``VllmConfig``; the loaded steerers, or ``None`` if unset."""
    cfg = parse_config(getattr(vllm_config, "additional_config", None))
    if cfg is None:
        return None
    mc = vllm_config.model_config
    text = mc.hf_text_config
    return load_and_check(cfg, mc.architectures, int(text.hidden_size), int(text.num_hidden_layers),
                          model_name=f"model '{mc.model}'")


# --------------------------------------------------------------------------------------------
# the operator on vLLM's two-tensor residual stream
# --------------------------------------------------------------------------------------------

def steer_residual_stream(hidden_states: torch.Tensor, residual: torch.Tensor, bank: SteeringBank,
                          index: Optional[torch.Tensor] = None, backend: str = "auto") -> torch.Tensor:
    """Token-mode steering of a stream held as two summands.

    Semantics::

        h      = hidden_states + residual            # the stream after the block, model dtype
        out[t] = h[t] + λ·g(h[t])·s(h[t])            # finesteer.ops.steer_tokens

    Shape: ``hidden_states``, ``residual`` [T, d] (same dtype); ``index`` [T] or ``None``.
    Returns a new [T, d] tensor; neither input is modified. Rows whose steering vector is zero
    are exactly ``hidden_states + residual``. Composed from the public entry points: a fused
    kernel taking the two inputs would save one read and one write of [T, d].
    """
    return steer_tokens(hidden_states + residual, bank, index, backend)


class _LayerSteering:
    """Forward hook of one decoder layer: ``(hs, res) → (0, steer(hs + res))``."""

    def __init__(self, bank: SteeringBank, backend: str, name: str):
        self.bank, self.backend, self.name = bank, backend, name

    def __call__(self, module, args, output):
        hidden_states, residual = output
        d = hidden_states.shape[-1]
        steered = steer_residual_stream(hidden_states.reshape(-1, d), residual.reshape(-1, d), self.bank,
                                        None, self.backend).reshape(residual.shape)
        # The stream lives in ``residual``; the block's pending delta is zero (see module docstring).
        return torch.zeros_like(hidden_states), steered


def decoder_layers(model: torch.nn.Module):
    """The decoder-layer list of a supported vLLM causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise FineSteerConfigError(f"cannot find the decoder layers of {type(model).__name__} "
                                   f"(expected model.model.layers)")
    return layers


def _stream_dtype(layer, params) -> torch.dtype:
    """The residual stream's dtype: the layer's first floating-point parameter's (quantized
    weights are integers, their norms' weights are not)."""
    for p in params:
        if p.dtype in (torch.float32, torch.bfloat16, torch.float16):
            return p.dtype
    return torch.get_default_dtype()


def attach(model: torch.nn.Module, steerers, backend: str = "auto", dtype: Optional[torch.dtype] = None) -> list:
    """Hook ``steerers`` (each at its ``layer``) into a loaded vLLM model; returns the hook handles.

    ``dtype`` is the model's activation dtype (default: guessed from the layer's parameters); it
    is only used for the one warm-up call that loads the backend before serving.

    Layers that live on another pipeline-parallel rank (``PPMissingLayer``, no parameters) are
    skipped: the rank that holds the layer steers it.
    """
    if getattr(model, _HOOKS_ATTR, None):
        raise RuntimeError("finesteer: steering is already attached to this model; detach() it first")
    layers = decoder_layers(model)
    handles = []
    for st in steerers:
        layer = layers[st.layer]
        params = list(layer.parameters())
        if not params or type(layer).__name__ == "PPMissingLayer":  # on another pipeline rank
            continue
        device = params[0].device
        dtype = dtype or _stream_dtype(layer, params)
        bank = SteeringBank.from_steerers([st], device=device)
        # Resolve "auto" to a concrete backend and run it once now: its lazy imports and builds
        # happen here, never inside torch.compile's trace or a CUDA-graph capture.
        name = get_backend(backend, device).NAME
        steer_tokens(torch.zeros(1, st.hidden_size, device=device, dtype=dtype), bank, None, name)
        handles.append(layer.register_forward_hook(_LayerSteering(bank, name, f"layer {st.layer}")))
        logger.info("finesteer: steering decoder layer %d in token mode (backend %s, strength %g, gate %s)",
                    st.layer, name, st.strength, st.gate_mode)
    setattr(model, _HOOKS_ATTR, handles)
    return handles


def detach(model: torch.nn.Module) -> None:
    """Remove every FineSteer hook from ``model``; outputs are then bit-identical to unsteered."""
    for handle in getattr(model, _HOOKS_ATTR, None) or ():
        handle.remove()
    setattr(model, _HOOKS_ATTR, [])


# --------------------------------------------------------------------------------------------
# the plugin: patches vLLM's config creation (front end) and model loading (workers)
# --------------------------------------------------------------------------------------------

_registered = False


def _wrap_create_engine_config(orig):
    @functools.wraps(orig)
    def create_engine_config(self, *args, **kwargs):
        config = orig(self, *args, **kwargs)
        steerers = check_vllm_config(config)
        if steerers is not None:
            logger.info("finesteer: configuration checked: %s", ", ".join(
                f"layer {s.layer} (λ={s.strength:g})" for s in steerers))
        return config
    create_engine_config._finesteer_wrapped = True
    return create_engine_config


def is_served_model(vllm_config, model_config) -> bool:
    """Whether a loader call loads the served (target) model rather than a speculative drafter.

    The target is loaded with ``vllm_config.model_config``. A drafter is loaded either with the
    speculative config's ``draft_model_config`` passed explicitly (EAGLE heads) or inside a copy
    of the config whose ``model_config`` *is* that draft config (draft models), so the draft
    config's identity tells them apart in both cases.
    """
    if model_config is not vllm_config.model_config:
        return False
    spec = getattr(vllm_config, "speculative_config", None)
    return spec is None or model_config is not getattr(spec, "draft_model_config", None)


def _wrap_load_model(orig):
    @functools.wraps(orig)
    def load_model(self, vllm_config, model_config, *args, **kwargs):
        model = orig(self, vllm_config, model_config, *args, **kwargs)
        if is_served_model(vllm_config, model_config) and not getattr(model, _HOOKS_ATTR, None):
            steerers = check_vllm_config(vllm_config)
            if steerers is not None:
                cfg = parse_config(vllm_config.additional_config)
                attach(model, steerers, cfg.backend, dtype=model_config.dtype)
        return model
    load_model._finesteer_wrapped = True
    return load_model


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


def register() -> None:
    """vLLM general-plugin entry point; safe to call any number of times in any process."""
    global _registered
    if _registered:
        return
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import BaseModelLoader

    if not getattr(EngineArgs.create_engine_config, "_finesteer_wrapped", False):
        EngineArgs.create_engine_config = _wrap_create_engine_config(EngineArgs.create_engine_config)
    # Loaders that override load_model are wrapped too; the attribute guard in the wrapper keeps
    # a loader that calls super().load_model from attaching twice.
    for cls in (BaseModelLoader, *_all_subclasses(BaseModelLoader)):
        fn = cls.__dict__.get("load_model")
        if fn is not None and not getattr(fn, "_finesteer_wrapped", False):
            setattr(cls, "load_model", _wrap_load_model(fn))
    _registered = True
