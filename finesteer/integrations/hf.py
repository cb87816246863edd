"""Steer HuggingFace ``transformers`` models: :class:`FusedSteerer`.

The hook point is DESIGN §1: the residual stream **after** decoder block ``ℓ`` (HF's
``output_hidden_states[ℓ + 1]``). A forward hook on ``layers[ℓ]`` rewrites that block's output,
so everything downstream (later blocks, later steered layers, the KV cache of later layers) sees
the steered stream in the same pass.

Nothing in this module imports ``transformers``: it works on any ``nn.Module`` whose decoder
blocks sit in an ``nn.ModuleList`` (found by :func:`finesteer.models.find_decoder_layers`) and
whose blocks return the hidden states (a tensor, or a tuple whose first element is the hidden
states).
"""
from __future__ import annotations

import inspect
import warnings
import weakref
from typing import Mapping, Optional, Sequence, Union

import torch
from torch import nn

from .._backends import get_backend
from ..bank import SteeringBank
from ..models import find_decoder_layers, model_device, model_hidden_size
from ..ops import sequence_slots
from ..steerer import Steerer

__all__ = ["FusedSteerer", "UnclassifiableCallError", "attached_layers", "past_length"]

def _hidden_of(output):
    """The hidden-state tensor of a block's output (a tensor or a tuple/list starting with it)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"decoder block returned {type(output).__name__}; expected a tensor or a tuple whose first "
                    f"element is the hidden states")


def _with_hidden(output, hidden: torch.Tensor):
    if isinstance(output, torch.Tensor):
        return hidden
    return type(output)((hidden, *output[1:])) if isinstance(output, tuple) else [hidden, *output[1:]]


class UnclassifiableCallError(RuntimeError):
    """A model call that FusedSteerer cannot classify as prefill or decode without a host–device sync."""


def _find_cache(inputs: Mapping[str, object]):
    """The KV-cache object among a forward call's inputs → ``(name, cache)``, or ``(None, None)``.

    Found by duck type, not by keyword: transformers has named it ``past_key_values`` (4.x and early 5.x)
    and ``cache`` (newer 5.x); other models use other names. A cache is an object
    with a callable ``get_seq_length`` or, as in transformers 4.x's legacy format, a non-empty
    tuple/list of per-layer ``(key, value)`` tensors of shape ``[B, heads, past, head_dim]``.
    """
    for name, value in inputs.items():
        if callable(getattr(value, "get_seq_length", None)):
            return name, value
    for name, value in inputs.items():
        if (isinstance(value, (tuple, list)) and value and isinstance(value[0], (tuple, list)) and value[0]
                and isinstance(value[0][0], torch.Tensor) and value[0][0].dim() == 4):
            return name, value
    return None, None


def past_length(inputs: Mapping[str, object], new_tokens: int) -> int:
    """How many tokens each sequence of a causal-LM forward call already has in its KV cache.

    ``inputs``: the call's arguments by name (positional ones bound to the forward's parameter
    names); ``new_tokens``: the sequence length ``S`` of this call's ``input_ids``/``inputs_embeds``.
    ``0`` = a prefill (the call holds the whole prompt); ``> 0`` = a decode step (or a chunk
    continuing a cached prefix). Only host-known facts are read, so a decode step never waits for
    the device, whatever the keyword names of the installed transformers are:

    1. a 2-D ``attention_mask`` covers past + new tokens, so ``past = mask.shape[1] - S``;
    2. else the cache object (found by duck type under any name, :func:`_find_cache`):
       ``get_seq_length()`` when it is a Python int (dynamic caches; static caches before their
       first update), or a tensor on the CPU (reading it costs no device sync); the key length of
       a legacy tuple cache;
    3. else, when the cache gives no usable length (``None``, or a tensor on an accelerator), the
       first entry of a ``cache_position`` tensor on the CPU;
    4. no cache at all: a standalone forward, i.e. a prefill.

    Raises :class:`UnclassifiableCallError` when the only evidence is held on an accelerator
    (e.g. a ``StaticCache`` on CUDA in transformers 5.x, or Gemma2's ``HybridCache`` on CUDA in
    4.x, called without a 2-D mask): reading it would synchronise host and device on every decode
    step, and guessing would steer the wrong tokens.
    """
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return int(mask.shape[1]) - new_tokens
    name, cache = _find_cache(inputs)
    if cache is None:
        return 0
    if isinstance(cache, (tuple, list)):
        return int(cache[0][0].shape[-2])
    n = cache.get_seq_length()
    if isinstance(n, torch.Tensor) and n.device.type == "cpu":
        n = int(n)
    if isinstance(n, int) and not isinstance(n, bool):
        return n
    # The cache does not say (transformers 4.x's HybridCache returns None) or says it on an
    # accelerator: the first cache position is the past length, readable when it is on the CPU.
    pos = inputs.get("cache_position")
    if isinstance(pos, torch.Tensor) and pos.dim() == 1 and pos.numel() and pos.device.type == "cpu":
        return int(pos[0])
    held = f"as a {n.device.type} tensor" if isinstance(n, torch.Tensor) else f"as {type(n).__name__}"
    raise UnclassifiableCallError(
        f"FusedSteerer: cannot tell prefill from decode: the cache passed as {name!r} ({type(cache).__name__}) "
        f"reports its length {held}, and no 2-D attention_mask or CPU cache_position says it either; reading "
        f"a device value would synchronise host and device at every step. Pass a 2-D attention_mask (past + "
        f"new tokens) with each call, or use a dynamic cache")


# Every block FusedSteerer currently has a hook on, so a second attach to the same block fails
# loudly instead of steering twice. Weak keys: a model that is garbage-collected leaves nothing here.
_ATTACHED: "weakref.WeakKeyDictionary[nn.Module, int]" = weakref.WeakKeyDictionary()

IndexLike = Union[None, torch.Tensor, Sequence[int], Mapping[int, object]]

#: Where prompt mode adds the cached vector during prefill: every position, or from the last
#: prompt token on (see :meth:`FusedSteerer.attach`).
PROMPT_POSITIONS = ("all", "from_last")


class _LayerState:
    """One steered block: its bank, bank index and per-sequence vector cache."""

    __slots__ = ("layer", "module", "bank", "device", "impl", "index", "index_rows", "vectors", "prompt_h",
                 "handle")

    def __init__(self, layer: int, module: nn.Module, bank: SteeringBank, device: torch.device, impl):
        self.layer, self.module, self.bank, self.device = layer, module, bank, device
        self.impl = impl  # the backend module, resolved once at attach (no lookup on the hot path)
        self.index: Optional[torch.Tensor] = None       # [B0] as given by the user (validated)
        self.index_rows: Optional[torch.Tensor] = None  # [B] expanded to the running batch (prefill)
        self.vectors: Optional[torch.Tensor] = None     # [B, d] fp32 prompt-mode cache
        self.prompt_h: Optional[torch.Tensor] = None    # [B, d] h at the last prompt token, last prefill
        self.handle = None


class FusedSteerer:
    """Steerers attached to a model's decoder blocks (DESIGN §4, §5).

    Create with :meth:`attach`; use as a context manager or call :meth:`detach`. While attached,
    every forward of the model (``model(...)``, ``model.generate(...)``) is steered:

    Semantics (per steered layer ``ℓ`` with bank ``N`` steerers, batch row ``b`` with bank index
    ``i_b``; ``i_b = −1`` leaves the row bit-identical)::

        prompt mode, prefill (no past tokens):
            v_b = λ·g(h_ℓ[b, last_b])·s(h_ℓ[b, last_b])      # last_b = last REAL prompt token
            out[b, t] = h_ℓ[b, t] + v_b                        # every position t ("all"), or
                                                               # t ≥ last_b only ("from_last")
        prompt mode, decode (past tokens present):
            out[b, t] = h_ℓ[b, t] + v_b                        # the v_b cached at prefill
        token mode:
            out[b, t] = h_ℓ[b, t] + λ·g(h_ℓ[b, t])·s(h_ℓ[b, t])

    ``last_b`` comes from the attention mask seen by a forward pre-hook on ``model`` (left or
    right padding both work); without a 2-D mask the last position is used. Prefill and decode
    are told apart from host-known facts only, whatever the cache keyword is called
    (:func:`past_length`: a 2-D mask longer than the new tokens, else the length of the cache object
    found by duck type, else no cache = a standalone prefill); a call that cannot be classified
    without a sync raises :class:`UnclassifiableCallError`. The decode-path hook does no host–device
    synchronisation and allocates nothing proportional to the sequence length; the vector cache
    (``[B, d]`` fp32 per steered layer) is allocated at prefill and reused while the batch size
    stays the same. Call the model object that was attached (the pre-hook lives on it).
    """

    def __init__(self, model: nn.Module, states: list, mode: str, backend: str, prompt_positions: str = "all"):
        self.model = model
        self.mode = mode
        self.prompt_positions = prompt_positions
        self.backend = backend
        self._states = states
        self._pre_handle = None
        self._attached = False
        # Per-forward facts captured by the pre-hook (host-side Python values and small tensors).
        self._batch = 0
        self._seq = 0
        self._prefill = True
        self._last = None  # [B] long, last real prompt position (prefill only)
        self._forward_params = None

    # ------------------------------------------------------------------ construction
    @classmethod
    def attach(cls, model: nn.Module, steerers, mode: str = "prompt", backend: str = "auto",
               index: IndexLike = None, module_path: Optional[str] = None,
               prompt_positions: str = "all") -> "FusedSteerer":
        """Attach ``steerers`` to ``model`` and return the :class:`FusedSteerer` (a context manager).

        ``steerers``: a :class:`~finesteer.Steerer` or a list of them. Each goes to decoder block
        ``steerer.layer``; several steerers at one layer form a bank (packed once, in list order,
        on that block's device). ``index``: bank index per batch row (``[B]``; −1 = unsteered),
        applied at every steered layer, or a dict ``{layer: index}``; ``None`` = every row uses
        bank entry 0. ``module_path``: dotted path of the block list when it cannot be found
        automatically. ``prompt_positions`` (prompt mode): ``"all"`` (DESIGN §4: the vector is
        added at every prompt position) or ``"from_last"`` (only from the last prompt token on:
        that token and every generated one; the prompt before it is left exactly as unsteered,
        which is what the vLLM plugin computes under chunked prefill and prefix caching).
        Raises on a hidden-size mismatch, a layer out of range, an unknown mode, backend or
        ``prompt_positions``, or a block that already has a FusedSteerer attached.
        """
        if mode not in ("prompt", "token"):
            raise ValueError(f"mode must be 'prompt' or 'token', got {mode!r}")
        if prompt_positions not in PROMPT_POSITIONS:
            raise ValueError(f"prompt_positions must be one of {PROMPT_POSITIONS}, got {prompt_positions!r}")
        if mode == "token" and prompt_positions != "all":
            raise ValueError(f"prompt_positions={prompt_positions!r} applies to prompt mode only (mode='token' "
                             f"steers every position with its own vector)")
        if isinstance(steerers, Steerer):
            steerers = [steerers]
        steerers = list(steerers)
        if not steerers or not all(isinstance(s, Steerer) for s in steerers):
            raise TypeError("FusedSteerer.attach: steerers must be a Steerer or a non-empty list of Steerers")
        if mode == "prompt" and any(s.reads_response_tokens for s in steerers):
            warnings.warn("FusedSteerer.attach: a steerer's gate was fitted on response tokens (gate_tokens="
                          "'response'), but prompt mode reads it at the last prompt token only; use mode='token'",
                          stacklevel=2)
        layers = find_decoder_layers(model, module_path)
        cls_name = type(model).__name__
        hidden = model_hidden_size(model)
        groups: dict[int, list] = {}
        for i, s in enumerate(steerers):
            if s.layer >= len(layers):
                raise ValueError(f"steerer {i} is for layer {s.layer}, but {cls_name} has {len(layers)} decoder "
                                 f"layers (valid: 0..{len(layers) - 1})")
            if hidden is not None and s.hidden_size != hidden:
                raise ValueError(f"steerer {i} (layer {s.layer}) was fitted for hidden size {s.hidden_size}, "
                                 f"{cls_name} has hidden size {hidden}")
            groups.setdefault(s.layer, []).append(s)
        for layer in groups:
            if layers[layer] in _ATTACHED:
                raise RuntimeError(f"layer {layer} of {cls_name} already has a FusedSteerer attached; detach it "
                                   f"first (or pass all steerers for that layer in one attach call: they form a bank)")
        # Resolve the backend once, now: a bad name fails at attach, not inside generate, and the
        # hooks call the backend module directly (no per-call lookup, nothing for torch.compile
        # to trace through).
        default_device = model_device(model)
        states = []
        for layer in sorted(groups):
            module = layers[layer]
            device = model_device(module, default_device)
            impl = get_backend(backend, device)
            bank = SteeringBank.from_steerers(groups[layer], device=device)
            states.append(_LayerState(layer, module, bank, device, impl))
        self = cls(model, states, mode, backend, prompt_positions)
        self.set_index(index)
        self._register()
        return self

    def _register(self) -> None:
        try:
            self._pre_handle = self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
            for st in self._states:
                st.handle = st.module.register_forward_hook(self._make_hook(st))
                _ATTACHED[st.module] = id(self)
            self._attached = True
        except BaseException:
            self.detach()
            raise

    # ------------------------------------------------------------------ public controls
    @property
    def layers(self) -> tuple:
        """The steered layer indices, ascending."""
        return tuple(st.layer for st in self._states)

    def bank(self, layer: int) -> SteeringBank:
        """The packed bank at ``layer`` (its ``strength``/``threshold`` may be edited in place)."""
        for st in self._states:
            if st.layer == layer:
                return st.bank
        raise KeyError(f"no steerer attached at layer {layer}; attached layers: {self.layers}")

    def prompt_states(self, layer: Optional[int] = None) -> torch.Tensor:
        """``h`` at each sequence's last real prompt token at ``layer`` (default: the only/first steered
        layer), as read during the most recent prefill, before that layer's steering → ``[B, d]``.

        In prompt mode these are exactly the rows the gate and vectors were computed from, so e.g.
        ``steerer.gate_value(fs.prompt_states())`` is the gate each sequence got.
        """
        st = self._states[0] if layer is None else next((s for s in self._states if s.layer == layer), None)
        if st is None:
            raise KeyError(f"no steerer attached at layer {layer}; attached layers: {self.layers}")
        if st.prompt_h is None:
            raise RuntimeError("prompt_states: no prefill has run since attach")
        return st.prompt_h

    def set_index(self, index: IndexLike) -> None:
        """Set the per-row bank index used from the next forward on (validated here, on the host).

        ``None``: every row uses bank entry 0. A sequence/tensor ``[B]``: row ``b`` uses entry
        ``index[b]`` (−1 = unsteered) at every steered layer. A dict ``{layer: index}``: per layer
        (layers not in the dict use ``None``). When the running batch is a multiple of ``B`` (as
        with ``num_return_sequences`` or beams), each entry is repeated for its consecutive rows.
        """
        per_layer = index if isinstance(index, Mapping) else {st.layer: index for st in self._states}
        unknown = set(per_layer) - set(self.layers)
        if unknown:
            raise KeyError(f"set_index: no steerer attached at layer(s) {sorted(unknown)}; attached: {self.layers}")
        new = {}
        for st in self._states:
            idx = per_layer.get(st.layer)
            if idx is None:
                new[st.layer] = None
                continue
            t = torch.as_tensor(idx).detach().to("cpu")
            if t.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
                raise TypeError(f"set_index: layer {st.layer}: index must hold integers, got {t.dtype}")
            if t.dim() != 1 or t.numel() == 0:
                raise ValueError(f"set_index: layer {st.layer}: index must be a non-empty 1-D [batch] sequence, "
                                 f"got shape {tuple(t.shape)}")
            lo, hi, n = int(t.min()), int(t.max()), st.bank.num_steerers
            if lo < -1 or hi >= n:
                raise IndexError(f"set_index: layer {st.layer}: index values must be in [-1, {n - 1}] (bank of {n} "
                                 f"steerer{'s' if n != 1 else ''}), got range [{lo}, {hi}]")
            new[st.layer] = t.to(device=st.device, dtype=torch.long)
        for st in self._states:
            st.index, st.index_rows = new[st.layer], None

    def detach(self) -> None:
        """Remove every hook; the model computes exactly what it computed before :meth:`attach`."""
        if self._pre_handle is not None:
            self._pre_handle.remove()
            self._pre_handle = None
        for st in self._states:
            if st.handle is not None:
                st.handle.remove()
                st.handle = None
            if _ATTACHED.get(st.module) == id(self):
                del _ATTACHED[st.module]
            st.vectors = None
            st.index_rows = None
            st.prompt_h = None
        self._last = None
        self._attached = False

    @property
    def attached(self) -> bool:
        return self._attached

    def __enter__(self) -> "FusedSteerer":
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def __repr__(self) -> str:
        sizes = {st.layer: st.bank.num_steerers for st in self._states}
        return (f"FusedSteerer(model={type(self.model).__name__}, mode={self.mode!r}, backend={self.backend!r}, "
                f"steerers per layer={sizes}, attached={self._attached})")

    # ------------------------------------------------------------------ hooks
    def _bind(self, args, kwargs) -> dict:
        if not args:
            return kwargs
        if self._forward_params is None:
            self._forward_params = list(inspect.signature(self.model.forward).parameters)
        named = dict(zip(self._forward_params, args))
        named.update(kwargs)
        return named

    def _pre_hook(self, module, args, kwargs):
        """Record batch size, new-token count, prefill/decode and the last real prompt position.

        Host-side only: shapes and Python objects, plus (at prefill) one small device op on the mask.
        """
        inputs = self._bind(args, kwargs)
        # inputs_embeds first: when it is given it is what the model runs on (input_ids may be empty).
        ref = inputs.get("inputs_embeds")
        if ref is None:
            ref = inputs.get("input_ids")
        if ref is None:
            ref = inputs.get("hidden_states")
        if not isinstance(ref, torch.Tensor) or ref.dim() < 2:
            raise ValueError(f"FusedSteerer: cannot tell batch and sequence sizes of a {type(module).__name__} "
                             f"call without input_ids or inputs_embeds of shape [batch, seq, ...]")
        B, S = int(ref.shape[0]), int(ref.shape[1])
        mask = inputs.get("attention_mask")
        mask2d = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        prefill = past_length(inputs, S) <= 0
        if not prefill and self.mode == "prompt":
            for st in self._states:
                if st.vectors is None or st.vectors.shape[0] != B:
                    # Decoding on a cache this steerer never prefilled (user-supplied past):
                    # compute the vector from the tokens of this call instead.
                    prefill = True
                    break
        if prefill:
            if mask2d is not None:
                # Position of the last non-zero mask entry = last real token (left or right padding).
                pos = torch.arange(S, device=mask2d.device)
                self._last = ((mask2d[:, -S:] != 0).long() * (pos + 1)).argmax(-1)
            else:
                self._last = torch.full((B,), S - 1, dtype=torch.long, device=ref.device)
            for st in self._states:
                st.index_rows = self._expand_index(st, B)
        elif any(st.index_rows is not None and st.index_rows.shape[0] != B for st in self._states):
            raise RuntimeError(f"FusedSteerer: batch size changed from prefill to decode (now {B}); prompt-mode "
                               f"steering needs the batch of the prefill")
        self._batch, self._seq, self._prefill = B, S, prefill
        return None

    def _expand_index(self, st: _LayerState, B: int) -> Optional[torch.Tensor]:
        if st.index is None:
            return None
        n = st.index.shape[0]
        if n == B:
            return st.index
        if B % n == 0:
            return st.index.repeat_interleave(B // n)
        raise ValueError(f"FusedSteerer: layer {st.layer}: the bank index has {n} entries but the batch has {B} "
                         f"rows; call set_index with one entry per row")

    def _prompt_slots(self, B: int, S: int, device: torch.device) -> Optional[torch.Tensor]:
        """Prompt mode: the vector-cache row each of the ``B·S`` rows takes (−1 = none) → [B·S] int32.

        ``None`` when every row takes its own sequence's vector and ``S == 1``. Under
        ``"from_last"`` a prefill row gets its sequence's vector only at or after the last real
        prompt token (``t ≥ last_b``); computed on the device from ``self._last``, no sync.
        """
        if S == 1 and not (self._prefill and self.prompt_positions == "from_last"):
            return None
        slot = sequence_slots(torch.arange(B, device=device), S)
        if self._prefill and self.prompt_positions == "from_last":
            pos = torch.arange(S, device=device).repeat(B)
            slot = torch.where(pos >= self._last.to(device).repeat_interleave(S), slot, -1)
        return slot

    def _make_hook(self, st: _LayerState):
        def hook(module, args, output):
            h = _hidden_of(output)
            shape = h.shape
            d = shape[-1]
            B, S = self._batch, self._seq
            if h.dim() != 3 or shape[0] != B or shape[1] != S:
                raise RuntimeError(f"FusedSteerer: layer {st.layer} produced hidden states of shape {tuple(shape)}, "
                                   f"expected [{B}, {S}, {d}] from the model call; call the model object that "
                                   f"was attached")
            h2 = h.reshape(B * S, d)
            idx = st.index_rows
            if self._prefill:
                # h (before this layer's steering) at each sequence's last real prompt token:
                # what the prompt-mode gate reads; kept for prompt_states().
                st.prompt_h = h[torch.arange(B, device=h.device), self._last.to(h.device)]
            if self.mode == "token":
                rows = idx if (idx is None or S == 1) else idx.repeat_interleave(S)
                out = st.impl.steer_tokens(h2, st.bank, rows)
            else:
                if self._prefill:
                    vec = st.impl.steering_vectors(st.prompt_h, st.bank, idx)
                    if st.vectors is None or st.vectors.shape != vec.shape or st.vectors.device != vec.device:
                        st.vectors = torch.empty_like(vec, dtype=torch.float32)
                    st.vectors.copy_(vec)
                out = st.impl.add_vectors(h2, st.vectors, self._prompt_slots(B, S, h.device))
            return _with_hidden(output, out.reshape(shape))

        return hook


def attached_layers(model: nn.Module, module_path: Optional[str] = None) -> list:
    """Indices of ``model``'s decoder layers that currently carry a FusedSteerer hook."""
    layers = find_decoder_layers(model, module_path)
    return [i for i, m in enumerate(layers) if m in _ATTACHED]

