"""FineSteer inside vLLM: a general plugin that steers the served model's residual stream.

Install ``finesteer[vllm]``; the package registers :func:`register` under vLLM's entry-point
group ``vllm.general_plugins``, which vLLM calls in every process it starts (the front end, the
engine core and each worker). Steering is configured through vLLM's own ``additional_config``
(keys: :mod:`finesteer.integrations.vllm_config`) and chosen per request through
``SamplingParams.extra_args`` (HTTP: ``vllm_xargs``)::

    LLM(model=M, additional_config={"finesteer": {"steerers": ["refusal.safetensors", "calm.safetensors"]}})
    llm.generate(prompts, SamplingParams(extra_args={"finesteer": "refusal"}))

Where it hooks. vLLM decoder layers (Llama, Mistral, Qwen2/3, Gemma2/3) return the pair
``(hidden_states, residual)``: the block's pending output and the stream before it. The
residual stream after block ℓ — DESIGN §1's ``h``, HuggingFace's ``output_hidden_states[ℓ+1]``
— is their sum, which the next layer's fused add-RMSNorm (or the final norm) forms as its first
step. A forward hook on layer ℓ replaces the pair by ``(0, steered)``, where ``steered`` is one
fused call of the backend on ``hidden_states + residual`` (exact: the next consumer computes
``0 + steered``, and rows nobody steers are exactly ``hidden_states + residual``).

What each token uses comes from :class:`~finesteer.integrations.vllm_state.StepTables`,
persistent buffers that the plugin fills before each step from the V1 model runner's batch
(a wrapper around ``GPUModelRunner._prepare_inputs``, which the CPU runner inherits), frees
finished requests from (``_update_states``) and resets before dummy runs. The hook reads them by slicing to the step's token count: no host sync, no
data-dependent shape, nothing allocated per step but the outputs, so torch.compile's trace and
CUDA-graph replay see the same tensors every step.

Other patched points, each a thin wrapper around a vLLM function: ``EngineArgs.
create_engine_config`` (check the configuration and write its fingerprint, in the front end,
before any engine starts), ``InputProcessor._validate_params`` (reject an unknown steerer name
in a request: an HTTP 400), the block-hash extra keys (a prefix-cache block holding steered KV
is shared only between requests steered alike), ``Scheduler.__init__`` (the engine core learns
the configuration), and every model loader's ``load_model`` (attach the hooks in each worker).
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from typing import Optional

import torch

from .._backends import get_backend
from ..bank import SteeringBank
from .vllm_config import (  # noqa: F401  (re-exported: the plugin's configuration API)
    CONFIG_KEY,
    NO_STEERING,
    PROMPT_POSITIONS,
    SUPPORTED_ARCHITECTURES,
    Catalog,
    FineSteerConfigError,
    SteererSpec,
    VllmSteeringConfig,
    build_catalog,
    check_engine_support,
    fingerprint,
    load_and_check,
    group_by_layer,
    parse_config,
)
from .vllm_state import ScheduledRequest, StepTables

# Under vLLM's "vllm" logger, so the lines appear in vLLM's own log format and level.
logger = logging.getLogger("vllm.finesteer")

_STATE_ATTR = "_finesteer_state"

#: The vLLM release the plugin is tested with (the ``vllm`` extra admits this minor version only):
#: every point it hooks is a private vLLM function, checked by :func:`missing_hooks`.
TESTED_VLLM = "0.32"
#: The module of the V1 model runner, whose methods the workers wrap (:data:`RUNNER_HOOKS`).
RUNNER_MODULE = "vllm.v1.worker.gpu_model_runner"


# --------------------------------------------------------------------------------------------
# configuration in vLLM's processes
# --------------------------------------------------------------------------------------------

_catalogs: dict = {}


def catalog_for(cfg: VllmSteeringConfig) -> Catalog:
    """The :class:`Catalog` of ``cfg``, built once per process and configuration."""
    key = (cfg, cfg.fingerprint)
    if key not in _catalogs:
        _catalogs[key] = build_catalog(cfg)
    return _catalogs[key]


def check_vllm_config(vllm_config, verify_fingerprint: bool = True):
    """Validate the FineSteer section of a ``VllmConfig`` against the model and vLLM's settings.

    Returns ``(config, steerers)`` (``None`` when the section is absent). With
    ``verify_fingerprint``, a fingerprint written by the front end must match the files now. A
    vLLM that lacks a function the plugin hooks is refused first (:func:`check_vllm_hooks`).
    """
    cfg = parse_config(getattr(vllm_config, "additional_config", None))
    if cfg is None:
        return None
    check_vllm_hooks()
    mc = vllm_config.model_config
    text = mc.hf_text_config
    steerers = load_and_check(cfg, mc.architectures, int(text.hidden_size), int(text.num_hidden_layers),
                              model_name=f"model '{mc.model}'")
    check_engine_support(cfg, vllm_config)
    if verify_fingerprint and cfg.fingerprint is not None and cfg.fingerprint != fingerprint(cfg):
        raise FineSteerConfigError("the steerer files changed after the engine was configured (fingerprint "
                                   "mismatch); restart vLLM to serve the new files")
    return cfg, steerers


def request_choice(catalog: Catalog, sampling_params) -> tuple:
    """The bank entry per steered layer a request asked for (``extra_args["finesteer"]``)."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    return catalog.resolve(extra.get(CONFIG_KEY))


# --------------------------------------------------------------------------------------------
# the hook and the per-worker state
# --------------------------------------------------------------------------------------------

class _LayerSteering:
    """Forward hook of one decoder layer: ``(hs, res) → (0, steered(hs + res))``.

    Holds the backend module resolved at attach (called directly: no per-call lookup) and reads
    the step tables; bank ``k`` is this layer's position among the steered layers.
    """

    def __init__(self, bank: SteeringBank, impl, tables: StepTables, k: int):
        self.bank, self.impl, self.tables, self.k = bank, impl, tables, k

    def __call__(self, module, args, output):
        hidden_states, residual = output
        shape, d = residual.shape, residual.shape[-1]
        stream = (hidden_states + residual).reshape(-1, d)
        T = stream.shape[0]
        tables = self.tables
        if tables.mode == "token":
            out = self.impl.steer_tokens(stream, self.bank, tables.token_index[self.k, :T])
        else:
            # Vectors of the requests whose last prompt token is in this step, written to their
            # slots (unused selection rows write zeros to scratch rows), then the add.
            rows = stream.index_select(0, tables.sel_pos)
            vectors = self.impl.steering_vectors(rows, self.bank, tables.sel_index[self.k])
            tables.vectors[self.k].index_copy_(0, tables.sel_slot, vectors)
            out = self.impl.add_vectors(stream, tables.vectors[self.k], tables.slot[:T])
        # The stream lives in ``residual``; the block's pending delta is zero (see module docstring).
        return torch.zeros_like(hidden_states), out.reshape(shape)


class _WorkerSteering:
    """What one worker holds for its served model: tables, catalog, hook handles, request choices."""

    def __init__(self, tables: StepTables, catalog: Catalog, handles: list):
        self.tables, self.catalog, self.handles = tables, catalog, handles
        self.choices: dict = {}  # req_id → bank entry per steered layer, resolved once

    def choice(self, req_id, sampling_params) -> tuple:
        c = self.choices.get(req_id)
        if c is None:
            if self.catalog is None:
                raise RuntimeError("finesteer: attached without a catalog, so request choices cannot be resolved")
            c = self.choices[req_id] = request_choice(self.catalog, sampling_params)
        return c

    def finish(self, req_ids) -> None:
        for rid in req_ids:
            self.choices.pop(rid, None)
        self.tables.finish(req_ids)


def decoder_layers(model: torch.nn.Module):
    """The decoder-layer list of a supported vLLM causal LM (``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise FineSteerConfigError(f"cannot find the decoder layers of {type(model).__name__} "
                                   f"(expected model.model.layers)")
    return layers


def _stream_dtype(params) -> torch.dtype:
    """The residual stream's dtype: the layer's first floating-point parameter's (quantized
    weights are integers, their norms' weights are not)."""
    for p in params:
        if p.dtype in (torch.float32, torch.bfloat16, torch.float16):
            return p.dtype
    return torch.get_default_dtype()


def attach(model: torch.nn.Module, steerers, backend: str = "auto", dtype: Optional[torch.dtype] = None, *,
           mode: str = "token", prompt_positions: str = "from_last", max_tokens: int = 8192, max_seqs: int = 256,
           catalog: Optional[Catalog] = None) -> StepTables:
    """Hook ``steerers`` (each at its ``layer``; several at one layer form a bank, in list order)
    into a loaded vLLM model; returns the :class:`StepTables` the hooks read.

    Until the tables are filled nothing is steered: the plugin fills them before every step
    (resolving each request's choice with ``catalog``); elsewhere call :meth:`StepTables.fill`.
    ``max_tokens`` / ``max_seqs``: vLLM's ``max_num_batched_tokens`` / ``max_num_seqs``. ``dtype`` is the model's
    activation dtype (default: guessed from the layer's parameters), used for the one warm-up
    call that loads the backend before serving. Layers on another pipeline-parallel rank
    (``PPMissingLayer``, no parameters) are skipped: the rank that holds the layer steers it.
    """
    if getattr(model, _STATE_ATTR, None) is not None:
        raise RuntimeError("finesteer: steering is already attached to this model; detach() it first")
    layers = decoder_layers(model)
    banks = group_by_layer(steerers)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    hidden = steerers[0].hidden_size
    tables = StepTables([len(banks[l]) for l in sorted(banks)], mode, prompt_positions, max_tokens, max_seqs,
                        hidden, device)
    handles = []
    for k, layer_idx in enumerate(sorted(banks)):
        layer = layers[layer_idx]
        params = list(layer.parameters())
        if not params or type(layer).__name__ == "PPMissingLayer":  # on another pipeline rank
            continue
        bank = SteeringBank.from_steerers(banks[layer_idx], device=params[0].device)
        # Resolve "auto" to a concrete backend and run it once now: its lazy imports and builds
        # happen here, never inside torch.compile's trace or a CUDA-graph capture.
        impl = get_backend(backend, params[0].device)
        probe = torch.zeros(1, hidden, device=params[0].device, dtype=dtype or _stream_dtype(params))
        impl.add_vectors(probe, impl.steering_vectors(probe, bank, None), None)
        handles.append(layer.register_forward_hook(_LayerSteering(bank, impl, tables, k)))
        logger.info("finesteer: steering decoder layer %d in %s mode (backend %s, bank of %d: %s)", layer_idx,
                    mode, impl.NAME, bank.num_steerers,
                    ", ".join(f"λ={s.strength:g} gate {s.gate_mode}" for s in banks[layer_idx]))
    setattr(model, _STATE_ATTR, _WorkerSteering(tables, catalog, handles))
    return tables


def detach(model: torch.nn.Module) -> None:
    """Remove every FineSteer hook from ``model``; outputs are then bit-identical to unsteered."""
    state = getattr(model, _STATE_ATTR, None)
    for handle in (state.handles if state is not None else ()):
        handle.remove()
    setattr(model, _STATE_ATTR, None)


# --------------------------------------------------------------------------------------------
# the model runner: fill the tables before each step, reset them before dummy runs
# --------------------------------------------------------------------------------------------

def _worker_state(runner) -> Optional[_WorkerSteering]:
    model = getattr(runner, "model", None)
    if model is None:
        return None
    state = getattr(model, _STATE_ATTR, None)
    if state is None:
        try:
            state = getattr(runner.get_model(), _STATE_ATTR, None)
        except (AttributeError, ValueError):
            return None
    return state


def fill_from_runner(state: _WorkerSteering, runner, num_scheduled_tokens) -> None:
    """Fill ``state``'s tables from a V1 runner's persistent batch, just prepared for this step."""
    ib = runner.input_batch
    n = ib.num_reqs
    computed, prompt = ib.num_computed_tokens_cpu, ib.num_prompt_tokens
    batch = []
    for i, rid in enumerate(ib.req_ids[:n]):
        batch.append(ScheduledRequest(rid, int(computed[i]), int(num_scheduled_tokens[i]), int(prompt[i]),
                                      state.choice(rid, runner.requests[rid].sampling_params)))
    state.tables.fill(batch)


def _wrap_update_states(orig):
    # Every step passes here, also one that schedules no token (where _prepare_inputs is
    # skipped), so no finished request is missed.
    @functools.wraps(orig)
    def _update_states(self, scheduler_output, *args, **kwargs):
        state = _worker_state(self)
        if state is not None:
            state.finish(scheduler_output.finished_req_ids)
        return orig(self, scheduler_output, *args, **kwargs)
    _update_states._finesteer_wrapped = True
    return _update_states


def _wrap_prepare_inputs(orig):
    @functools.wraps(orig)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        out = orig(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        state = _worker_state(self)
        if state is not None:
            fill_from_runner(state, self, num_scheduled_tokens)
        return out
    _prepare_inputs._finesteer_wrapped = True
    return _prepare_inputs


def _wrap_dummy_run(orig):
    @functools.wraps(orig)
    def _dummy_run(self, *args, **kwargs):
        state = _worker_state(self)
        if state is not None:
            state.tables.reset()
        return orig(self, *args, **kwargs)
    _dummy_run._finesteer_wrapped = True
    return _dummy_run


def _patch(cls, name, wrapper) -> bool:
    """Wrap ``cls.name`` (defined by ``cls`` itself; ``cls`` may be a module) once; whether
    ``cls`` defines it."""
    fn = cls.__dict__.get(name)
    if fn is None:
        return False
    if not getattr(fn, "_finesteer_wrapped", False):
        setattr(cls, name, wrapper(fn))
    return True


#: The V1 model runner's methods the plugin wraps (subclasses such as the CPU runner inherit them).
RUNNER_HOOKS = (("_update_states", _wrap_update_states), ("_prepare_inputs", _wrap_prepare_inputs),
                ("_dummy_run", _wrap_dummy_run))


def _patch_model_runner() -> None:
    try:
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ImportError:
        raise FineSteerConfigError(unsupported_vllm_message([f"{RUNNER_MODULE} (the V1 model runner)"])) from None
    missing = [f"{RUNNER_MODULE}.GPUModelRunner.{name}" for name, _ in RUNNER_HOOKS
               if name not in GPUModelRunner.__dict__]
    if missing:
        raise FineSteerConfigError(unsupported_vllm_message(missing))
    for cls in (GPUModelRunner, *_all_subclasses(GPUModelRunner)):
        for name, wrapper in RUNNER_HOOKS:
            _patch(cls, name, wrapper)


# --------------------------------------------------------------------------------------------
# the engine core: prefix-cache keys; the front end: request validation
# --------------------------------------------------------------------------------------------

#: The engine core's configuration, recorded when its scheduler is built (``None`` elsewhere).
_engine_cfg: Optional[VllmSteeringConfig] = None


def block_hash_key(cfg: VllmSteeringConfig, catalog: Catalog, request, end_token_idx: int):
    """The extra prefix-cache key of a block ending at ``end_token_idx``, or ``None``.

    A block holds steered KV when the request is steered and (token mode) always, (prompt mode,
    "from_last") when the block reaches the last prompt token. Such a block is keyed by the
    choice (and, in prompt mode, the prompt length: which position is "last"); the hash is
    chained, so every later block differs too. Unsteered blocks keep vLLM's own key and are
    shared by every request, steered or not.
    """
    params = getattr(request, "sampling_params", None)
    if params is None:
        return None
    choice = getattr(request, "_finesteer_choice", None)
    if choice is None:
        choice = request_choice(catalog, params)
        request._finesteer_choice = choice
    if all(c < 0 for c in choice):
        return None
    if cfg.mode == "token":
        return ("finesteer", choice)
    if end_token_idx >= request.num_prompt_tokens:
        return ("finesteer", choice, request.num_prompt_tokens)
    return None


def _wrap_block_hash_extra_keys(orig):
    @functools.wraps(orig)
    def generate_block_hash_extra_keys(request, start_token_idx, end_token_idx, *args, **kwargs):
        keys, next_idx = orig(request, start_token_idx, end_token_idx, *args, **kwargs)
        cfg = _engine_cfg
        if cfg is not None:
            extra = block_hash_key(cfg, catalog_for(cfg), request, end_token_idx)
            if extra is not None:
                keys = (*(keys or ()), extra)
        return keys, next_idx
    generate_block_hash_extra_keys._finesteer_wrapped = True
    return generate_block_hash_extra_keys


def _wrap_scheduler_init(orig):
    @functools.wraps(orig)
    def __init__(self, vllm_config, *args, **kwargs):
        global _engine_cfg
        _engine_cfg = parse_config(getattr(vllm_config, "additional_config", None))
        if _engine_cfg is not None:
            catalog_for(_engine_cfg)
        return orig(self, vllm_config, *args, **kwargs)
    __init__._finesteer_wrapped = True
    return __init__


def _wrap_validate_params(orig):
    @functools.wraps(orig)
    def _validate_params(self, params, *args, **kwargs):
        out = orig(self, params, *args, **kwargs)
        cfg = parse_config(getattr(self.vllm_config, "additional_config", None))
        extra = getattr(params, "extra_args", None) or {}
        if cfg is None:
            if CONFIG_KEY in extra:
                from vllm.exceptions import VLLMValidationError
                raise VLLMValidationError(f"extra_args['{CONFIG_KEY}'] was given, but this server has no FineSteer "
                                          f"steerers configured", parameter=CONFIG_KEY)
            return out
        try:
            request_choice(catalog_for(cfg), params)
        except ValueError as exc:
            from vllm.exceptions import VLLMValidationError
            raise VLLMValidationError(str(exc), parameter=CONFIG_KEY) from None
        return out
    _validate_params._finesteer_wrapped = True
    return _validate_params


# --------------------------------------------------------------------------------------------
# the plugin: config creation (front end) and model loading (workers)
# --------------------------------------------------------------------------------------------

_registered = False

#: What :func:`register` could not hook in this process ("module.name"); filled when it runs.
_missing_hooks: list = []


def missing_hooks() -> list:
    """The vLLM functions the plugin wraps that this vLLM lacks (empty when it can serve).

    :func:`register`'s hooks are recorded when it runs; the V1 model runner, which workers hook
    when they load the model, is only looked up here (importing it in the front end is avoided).
    """
    missing = list(_missing_hooks)
    try:
        runner = importlib.util.find_spec(RUNNER_MODULE)
    except ImportError:  # a parent package is missing
        runner = None
    if runner is None:
        missing.append(f"{RUNNER_MODULE} (the V1 model runner)")
    return missing


def unsupported_vllm_message(missing) -> str:
    """One line: which vLLM functions are missing, this vLLM's version and the tested one."""
    try:
        import vllm
        version = getattr(vllm, "__version__", "unknown")
    except ImportError:
        version = "not importable"
    return (f"the FineSteer vLLM plugin cannot serve with vLLM {version}: it hooks private vLLM functions "
            f"that this version lacks ({', '.join(missing)}); it is tested with vLLM {TESTED_VLLM}.x "
            f"(pip install 'finesteer[vllm]' installs it)")


def check_vllm_hooks() -> None:
    """Raise :class:`FineSteerConfigError` when this vLLM lacks a function the plugin hooks."""
    missing = missing_hooks()
    if missing:
        raise FineSteerConfigError(unsupported_vllm_message(missing))


def _wrap_create_engine_config(orig):
    @functools.wraps(orig)
    def create_engine_config(self, *args, **kwargs):
        config = orig(self, *args, **kwargs)
        checked = check_vllm_config(config, verify_fingerprint=False)
        if checked is not None:
            cfg, steerers = checked
            # Into vLLM's compilation-cache key (VllmConfig.compute_hash hashes additional_config).
            config.additional_config[CONFIG_KEY]["fingerprint"] = fingerprint(cfg)
            logger.info("finesteer: configuration checked (%s mode): %s", cfg.mode, ", ".join(
                f"{spec.label} at layer {s.layer} (λ={s.strength:g})" for spec, s in zip(cfg.steerers, steerers)))
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
        if is_served_model(vllm_config, model_config) and getattr(model, _STATE_ATTR, None) is None:
            checked = check_vllm_config(vllm_config)
            if checked is not None:
                cfg, steerers = checked
                _patch_model_runner()
                sc = vllm_config.scheduler_config
                attach(model, steerers, cfg.backend, dtype=model_config.dtype, mode=cfg.mode,
                       prompt_positions=cfg.prompt_positions, max_tokens=sc.max_num_batched_tokens,
                       max_seqs=sc.max_num_seqs, catalog=catalog_for(cfg))
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

    def patch(module: str, owner: Optional[str], name: str, wrapper, subclasses: bool = False) -> None:
        where = f"{module}.{owner + '.' if owner else ''}{name}"
        try:
            mod = importlib.import_module(module)
        except ImportError:
            _missing_hooks.append(where)
            return
        target = mod if owner is None else getattr(mod, owner, None)  # a module-level function, or a method
        if target is None or not _patch(target, name, wrapper):
            _missing_hooks.append(where)
            return
        for sub in _all_subclasses(target) if subclasses else ():
            _patch(sub, name, wrapper)

    # Never raises: vLLM runs this in every process, also where nobody configured steering. What
    # is missing is refused when steering is configured (check_vllm_hooks) and logged here.
    patch("vllm.engine.arg_utils", "EngineArgs", "create_engine_config", _wrap_create_engine_config)
    patch("vllm.v1.engine.input_processor", "InputProcessor", "_validate_params", _wrap_validate_params)
    patch("vllm.v1.core.sched.scheduler", "Scheduler", "__init__", _wrap_scheduler_init)
    patch("vllm.v1.core.kv_cache_utils", None, "generate_block_hash_extra_keys", _wrap_block_hash_extra_keys)
    # Loaders that override load_model are wrapped too; the state guard in the wrapper keeps a
    # loader that calls super().load_model from attaching twice.
    patch("vllm.model_executor.model_loader", "BaseModelLoader", "load_model", _wrap_load_model, subclasses=True)
    missing = missing_hooks()
    if missing:
        logger.warning("finesteer: %s; steering configured in additional_config['%s'] will be refused",
                       unsupported_vllm_message(missing), CONFIG_KEY)
    _registered = True
