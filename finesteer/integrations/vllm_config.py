"""The vLLM plugin's configuration: parsing, start-up checks, steerer names and the fingerprint.

Pure Python and PyTorch: nothing here imports vLLM, so every check is testable without it.
The plugin (:mod:`finesteer.integrations.vllm`) calls these in the front end, in the engine
core and in every worker; each problem is one :class:`FineSteerConfigError` line.

The value of ``additional_config["finesteer"]``::

    steerers          list of artifact paths, or of {"path": str, "strength": float, "name": str};
                      the name defaults to the file's stem. Several steerers at one layer form
                      that layer's bank; a name may label steerers at several layers (one each).
    mode              "token" (default) or "prompt"
    prompt_positions  prompt mode: "from_last" (default) or "all" (see :data:`PROMPT_POSITIONS`)
    default           name or list of names for requests that name none; default: unsteered
    backend           finesteer backend name or "auto" (default)
    fingerprint       written by the plugin in the front end (see :func:`fingerprint`)

A request chooses with ``SamplingParams.extra_args = {"finesteer": <name or list of names>}``
(HTTP: ``"vllm_xargs": {"finesteer": ...}``); ``"none"`` (or ``[]``) = unsteered.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..artifact import ArtifactError, load_steerer, read_metadata

#: Key of FineSteer's section in vLLM's ``additional_config`` and in ``SamplingParams.extra_args``.
CONFIG_KEY = "finesteer"

#: The request value that explicitly asks for no steering.
NO_STEERING = "none"

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

MODES = ("token", "prompt")

#: Prompt mode inside vLLM. ``"from_last"``: the vector is added from the request's last prompt
#: token on (that token and every generated one), the same under chunked prefill, prefix caching
#: and preemption. ``"all"``: also at every earlier prompt position (DESIGN §4 exactly); needs the
#: whole prompt in one step, so chunked prefill and prefix caching must be off.
PROMPT_POSITIONS = ("from_last", "all")

_KEYS = {"steerers", "mode", "prompt_positions", "default", "backend", "fingerprint"}


class FineSteerConfigError(ValueError):
    """A FineSteer configuration vLLM cannot serve; raised before the engine serves anything."""

    def __init__(self, problem: str):
        super().__init__(f"finesteer vLLM plugin: {problem}")


@dataclass(frozen=True)
class SteererSpec:
    path: str
    strength: Optional[float] = None
    name: Optional[str] = None

    @property
    def label(self) -> str:
        """The name requests use: the explicit ``name`` or the file's stem."""
        return self.name if self.name is not None else Path(self.path).stem


@dataclass(frozen=True)
class VllmSteeringConfig:
    """The parsed ``additional_config["finesteer"]`` section."""

    steerers: tuple
    mode: str = "token"
    prompt_positions: str = "from_last"
    default: tuple = ()
    backend: str = "auto"
    fingerprint: Optional[str] = None


def _names(value, where: str) -> tuple:
    """A name or list of names → tuple of names (``"none"`` → ``()``); raises ``ValueError``."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{where} must be a steerer name or a list of names, got {value!r}")
    if NO_STEERING in value:
        if len(value) != 1:
            raise ValueError(f"{where}: '{NO_STEERING}' cannot be combined with other names, got {list(value)}")
        return ()
    if len(set(value)) != len(value):
        raise ValueError(f"{where} names a steerer twice: {list(value)}")
    return tuple(value)


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
    if mode not in MODES:
        raise FineSteerConfigError(f"mode {mode!r} is not supported; use one of {', '.join(map(repr, MODES))}")
    positions = raw.get("prompt_positions", "from_last")
    if positions not in PROMPT_POSITIONS:
        raise FineSteerConfigError(f"prompt_positions {positions!r} is not supported; use one of "
                                   f"{', '.join(map(repr, PROMPT_POSITIONS))}")
    if mode != "prompt" and "prompt_positions" in raw:
        raise FineSteerConfigError("prompt_positions applies to mode 'prompt' only")
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
        elif isinstance(item, dict) and isinstance(item.get("path"), str) and set(item) <= {"path", "strength", "name"}:
            strength, name = item.get("strength"), item.get("name")
            if strength is not None and (isinstance(strength, bool) or not isinstance(strength, (int, float))):
                raise FineSteerConfigError(f"steerers[{i}].strength must be a number, got {strength!r}")
            if name is not None and (not isinstance(name, str) or not name or name == NO_STEERING):
                raise FineSteerConfigError(f"steerers[{i}].name must be a non-empty string other than "
                                           f"'{NO_STEERING}', got {name!r}")
            specs.append(SteererSpec(item["path"], None if strength is None else float(strength), name))
        else:
            raise FineSteerConfigError(f"steerers[{i}] must be a path or {{'path': str, 'strength': float, "
                                       f"'name': str}}, got {item!r}")
    for i, spec in enumerate(specs):
        if spec.label == NO_STEERING:
            raise FineSteerConfigError(f"steerers[{i}] '{spec.path}' is named '{NO_STEERING}', which requests use "
                                       f"to ask for no steering; give it another name")
    try:
        default = _names(raw.get("default", NO_STEERING), "'default'")
    except ValueError as exc:
        raise FineSteerConfigError(str(exc)) from None
    labels = {s.label for s in specs}
    missing = [n for n in default if n not in labels]
    if missing:
        raise FineSteerConfigError(f"'default' names unknown steerer(s) {missing}; configured: {sorted(labels)}")
    fp = raw.get("fingerprint")
    if fp is not None and not isinstance(fp, str):
        raise FineSteerConfigError(f"'fingerprint' must be a string, got {fp!r}")
    return VllmSteeringConfig(steerers=tuple(specs), mode=mode, prompt_positions=positions, default=default,
                              backend=backend, fingerprint=fp)


# --------------------------------------------------------------------------------------------
# steerer catalog: names → (layer, bank entry); what a request's choice resolves to
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Catalog:
    """Where every configured steerer goes: ``layers`` ascending (one bank each) and, per name,
    the bank entry it selects at each layer it labels.

    ``entries[name] = ((layer, bank_position), ...)``; ``bank_sizes[k]`` = steerers at ``layers[k]``.
    """

    layers: tuple
    bank_sizes: tuple
    entries: dict
    default: tuple

    def resolve(self, value) -> tuple:
        """A request's ``extra_args["finesteer"]`` value (``None`` = absent) → bank entry per layer.

        Returns one int per :attr:`layers` (−1 = unsteered there). Raises ``ValueError`` with a
        one-line message for an unknown name, a malformed value, or two names at one layer.
        """
        names = self.default if value is None else _names(value, f"extra_args['{CONFIG_KEY}']")
        choice = [-1] * len(self.layers)
        owner = {}
        for name in names:
            if name not in self.entries:
                raise ValueError(f"unknown steerer name {name!r} in extra_args['{CONFIG_KEY}']; served: "
                                 f"{', '.join(sorted(self.entries))} (or '{NO_STEERING}')")
            for layer, pos in self.entries[name]:
                k = self.layers.index(layer)
                if k in owner:
                    raise ValueError(f"extra_args['{CONFIG_KEY}'] chooses {owner[k]!r} and {name!r}, both at "
                                     f"layer {layer}; choose at most one steerer per layer")
                owner[k] = name
                choice[k] = pos
        return tuple(choice)


def _layer_of(spec: SteererSpec) -> int:
    try:
        return int(read_metadata(Path(spec.path))["layer"])
    except FileNotFoundError:
        raise FineSteerConfigError(f"steerer file '{spec.path}' does not exist") from None
    except (ArtifactError, KeyError, TypeError, ValueError) as exc:
        raise FineSteerConfigError(f"steerer '{spec.path}' is not usable: {exc}") from None
    except OSError as exc:
        raise FineSteerConfigError(f"steerer file '{spec.path}' is not readable: {exc}") from None


def build_catalog(cfg: VllmSteeringConfig) -> Catalog:
    """The :class:`Catalog` of ``cfg`` (reads each artifact's header only). Bank entries follow
    the order of ``steerers`` within each layer. Raises if one name labels two steerers at a layer."""
    banks: dict = {}
    entries: dict = {}
    for spec in cfg.steerers:
        layer = _layer_of(spec)
        bank = banks.setdefault(layer, [])
        for other in bank:
            if other.label == spec.label:
                raise FineSteerConfigError(f"steerers '{other.path}' and '{spec.path}' are both named "
                                           f"{spec.label!r} at layer {layer}; names must be unique within a layer "
                                           f"(set 'name' in the steerer entry)")
        entries.setdefault(spec.label, []).append((layer, len(bank)))
        bank.append(spec)
    layers = tuple(sorted(banks))
    return Catalog(layers=layers, bank_sizes=tuple(len(banks[l]) for l in layers),
                   entries={k: tuple(v) for k, v in entries.items()}, default=cfg.default)


def group_by_layer(steerers) -> dict:
    """``{layer: [Steerer, ...]}``, each list in the given order: the bank order :func:`build_catalog`
    assigns when ``steerers`` is :func:`load_and_check`'s list (configuration order)."""
    out: dict = {}
    for st in steerers:
        out.setdefault(st.layer, []).append(st)
    return out


# --------------------------------------------------------------------------------------------
# loading and start-up checks
# --------------------------------------------------------------------------------------------

def load_and_check(cfg: VllmSteeringConfig, architectures, hidden_size: int, num_layers: int,
                   model_name: str = "the model") -> list:
    """Load every steerer and check it against the model; returns the :class:`Steerer` list
    (configuration order, strengths overridden where the configuration says so).

    Checks, each failing with one :class:`FineSteerConfigError` line: a supported architecture,
    the artifact exists and is a valid FineSteer file, its hidden size equals the model's, its
    layer is in ``[0, num_layers)``, names are unique within a layer, the backend is known, and a
    steerer whose gate was fitted on response tokens is served in token mode.
    """
    archs = list(architectures or [])
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise FineSteerConfigError(f"architecture {', '.join(archs) or '(unknown)'} of {model_name} is not "
                                   f"supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    from .._backends import BACKEND_MODULES
    if cfg.backend != "auto" and cfg.backend not in BACKEND_MODULES:
        raise FineSteerConfigError(f"unknown backend {cfg.backend!r}; known: {', '.join(BACKEND_MODULES)} or 'auto'")
    steerers = []
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
        if cfg.mode == "prompt" and st.reads_response_tokens:
            raise FineSteerConfigError(f"steerer '{path}' has a gate fitted on response tokens (finesteer fit "
                                       f"--gate-tokens response), which reads every generated token: serve it in "
                                       f"mode 'token', not 'prompt'")
        if spec.strength is not None:
            st.strength = spec.strength
        steerers.append(st)
    build_catalog(cfg)  # names unique within each layer
    return steerers


def fingerprint(cfg: VllmSteeringConfig) -> str:
    """SHA-256 over every artifact's bytes and the settings that shape the steered forward.

    Stored in ``additional_config["finesteer"]["fingerprint"]``, which vLLM hashes into its
    compilation-cache key: a changed steerer file then never reuses a compiled graph traced
    with the old weights, and a worker that finds different files than the front end refuses.
    """
    h = hashlib.sha256()
    settings = {"mode": cfg.mode, "prompt_positions": cfg.prompt_positions, "default": list(cfg.default),
                "backend": cfg.backend,
                "steerers": [[s.path, s.strength, s.label] for s in cfg.steerers]}
    h.update(json.dumps(settings, sort_keys=True).encode())
    for spec in cfg.steerers:
        try:
            h.update(Path(spec.path).read_bytes())
        except FileNotFoundError:
            raise FineSteerConfigError(f"steerer file '{spec.path}' does not exist") from None
        except OSError as exc:
            raise FineSteerConfigError(f"steerer file '{spec.path}' is not readable: {exc}") from None
    return h.hexdigest()


def check_engine_support(cfg: VllmSteeringConfig, vllm_config) -> None:
    """Refuse, with one line each, the vLLM configurations the plugin cannot serve exactly.

    Per-token tables are filled from the V1 model runner's whole batch before each step, so:
    the V2 model runner (it keeps per-request state in a ``ModelState`` this plugin does not
    supply yet), micro-batching (each micro-batch's forward sees a slice of the batch) and context
    parallelism (a request's tokens are split across ranks) are refused in every mode. Prompt
    mode also refuses KV-transfer connectors (the vector would stay on the prefill instance) and
    adaptive speculative verification; ``prompt_positions="all"`` needs chunked prefill and
    prefix caching off (the whole prompt must be computed in one step, by this request).
    """
    pc = vllm_config.parallel_config
    if bool(getattr(vllm_config, "use_v2_model_runner", False)):
        raise FineSteerConfigError("vLLM's V2 model runner is not supported (per-request tables are filled in the "
                                   "V1 runner's _prepare_inputs); set VLLM_USE_V2_MODEL_RUNNER=0")
    if getattr(pc, "enable_dbo", False) or getattr(pc, "ubatch_size", 1) > 1:
        raise FineSteerConfigError("micro-batching (--enable-dbo / ubatch_size > 1) is not supported: the per-token "
                                   "steering tables describe the whole batch")
    for what in ("decode_context_parallel_size", "prefill_context_parallel_size"):
        if getattr(pc, what, 1) > 1:
            raise FineSteerConfigError(f"context parallelism ({what}={getattr(pc, what)}) is not supported: a "
                                       f"request's tokens would be split across ranks")
    if cfg.mode != "prompt":
        return
    if getattr(vllm_config, "kv_transfer_config", None) is not None:
        raise FineSteerConfigError("mode 'prompt' cannot be served with a KV-transfer connector: the prompt vector "
                                   "is kept by the instance that ran the prompt")
    spec = getattr(vllm_config, "speculative_config", None)
    if spec is not None and getattr(spec, "enable_adaptive_verification", False):
        raise FineSteerConfigError("mode 'prompt' is not supported with adaptive speculative verification")
    if cfg.prompt_positions == "all":
        sc, cc = vllm_config.scheduler_config, vllm_config.cache_config
        if getattr(sc, "enable_chunked_prefill", False):
            raise FineSteerConfigError("prompt_positions 'all' needs each prompt computed in one step: start vLLM "
                                       "with enable_chunked_prefill=False (or use 'from_last')")
        if getattr(cc, "enable_prefix_caching", False):
            raise FineSteerConfigError("prompt_positions 'all' steers cached prompt blocks with the request's own "
                                       "vector: start vLLM with enable_prefix_caching=False (or use 'from_last')")
