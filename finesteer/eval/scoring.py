"""Likelihood scoring of token sequences under a steered model: one forward per sequence, no generate().

A scored sequence is ``prompt + continuation`` as token ids, with ``last_prompt`` = the position of
the last prompt token and the continuation tokens at positions ``last_prompt + 1 .. len − 1``.
For every configuration (a :class:`~finesteer.Steerer` at its strength, or ``None`` = unsteered)
one forward pass over the whole sequence gives, for every continuation token ``y_t``:

- ``log p(y_t | y_<t)`` (summed per sequence: the log-likelihood of the continuation);
- with ``compare=True``, against the unsteered model in the same batch: the KL divergence
  ``KL(p_unsteered ‖ p_steered)`` of the next-token distributions at the positions that predict the
  continuation (averaged per sequence), and whether the steered argmax equals the unsteered argmax
  at every one of them.

Why this equals generation: in ``prompt`` mode the steering vector is computed from ``h`` at the
last prompt token during prefill and added at every position (DESIGN §4), which is exactly what the
forward hook here does with ``last_index = last_prompt``. And a steered greedy decode reproduces an
unsteered greedy continuation ``y`` token for token iff, teacher-forced on ``y``, the steered argmax
equals ``y_t`` at every step (induction on ``t``); comparing with the unsteered argmax of the same
teacher-forced pass makes the unsteered configuration score exactly 1. So the metrics need no
decode-path detection and no ``generate()``; only the unsteered continuation itself is generated
(:func:`greedy_continuations`, with no hook attached).

Sequences that share their prompt (several responses scored after one prompt: openings, TruthfulQA
answers) share its forward pass: the prompts of several groups run once as a left-padded batch with
``use_cache=True``, and all their responses run as one batch on the cache rows of their prompts
(``Cache.batch_select_indices``), with the steering vector of each prompt's last token added at
every response position, exactly as in prompt-mode generation. Token mode steers every position
either way. Models with a sliding attention window shorter than the sequence take the plain path,
and so do models that return no cache unless one is passed in (Gemma 2 under transformers 4.44).

Blocks ``0 .. layer`` compute the same thing under every configuration, because steering starts at
the output of block ``layer``. So within one batch the unsteered forward records that output and
each steered forward of the same batch replays it instead of running those blocks again
(:class:`_BlockReplay`); the steering hook still runs on the replayed output. The result is bit
for bit the same. It applies to whole-sequence forwards and to both passes of the shared-prefix
path; there a replayed prompt pass gets the unsteered pass's key/value cache entries of those
blocks copied in (where the cache keeps a per-block list, transformers ≥ 4.56; otherwise the prompt
pass runs in full).

The same recording decides which steered forwards need not run at all. In prompt mode the vectors
a configuration adds are a function of that recorded output at the last prompt tokens, so they are
computed from it before the forward (and handed to the hook, so the forward adds exactly those).
When every one of them is exactly zero (hard gates closed on every prompt of the batch), the
operator leaves the hidden states bit-identical (DESIGN §4) and the forward would repeat the
unsteered one; its scores are the unsteered scores. ``batch_key`` lets the caller put prompts whose
gates are expected to close together in the same batches.

Logits are computed only at the positions that are scored: a forward pre-hook on the model's output
embedding (``model.get_output_embeddings()``, the LM head) gathers those rows first, so a 262k-word
vocabulary costs ``d × V`` per scored token instead of per sequence position. Whatever the model does
after the LM head (e.g. Gemma's logit soft-capping) is elementwise and still applies.
"""
from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from ..extract import pad_batch
from ..integrations.hf import _hidden_of, _with_hidden
from ..models import find_decoder_layers, full_forward_kwargs, model_device
from ..ops import add_vectors, as_bank, sequence_slots, steer, steering_vectors

__all__ = ["ScoredSeq", "SeqScores", "greedy_continuations", "score_sequences", "steering_hook"]


@dataclass(frozen=True)
class ScoredSeq:
    """Token ids ``ids`` (prompt then continuation); ``last_prompt`` indexes the last prompt token.

    The continuation is ``ids[last_prompt + 1:]`` and must be non-empty.
    """

    ids: tuple
    last_prompt: int

    def __post_init__(self):
        if not 0 <= self.last_prompt < len(self.ids) - 1:
            raise ValueError(f"ScoredSeq: last_prompt={self.last_prompt} must leave at least one continuation "
                             f"token in a sequence of {len(self.ids)} tokens")

    @property
    def n_scored(self) -> int:
        return len(self.ids) - 1 - self.last_prompt


@dataclass
class SeqScores:
    """Per-sequence results of one configuration: ``logprob`` [N] (sum over the continuation),
    ``n_tokens`` [N]; with ``compare``: ``kl`` [N] (mean over positions) and ``identical`` [N] bool."""

    logprob: torch.Tensor
    n_tokens: torch.Tensor
    kl: Optional[torch.Tensor] = None
    identical: Optional[torch.Tensor] = None


class steering_hook:
    """Context manager: steer the output of decoder block ``layer`` with ``steerer`` in this forward.

    ``last_index`` [B] (prompt mode) gives each row's last prompt position; the vector computed there
    is added at every position of the row. In token mode every position gets its own gate and vector.
    ``vectors`` [B, fp32 d] (prompt mode, optional): the rows' vectors, already computed by
    :meth:`_BlockReplay.prompt_vectors` from the very hidden states this forward will see; they are
    added as :func:`~finesteer.ops.steer` would add its own.
    ``steerer=None`` registers nothing (the unsteered model, bit for bit).
    """

    def __init__(self, model, steerer, layer: int, mode: str, backend: str, last_index: Optional[torch.Tensor],
                 module_path: Optional[str] = None, vectors: Optional[torch.Tensor] = None):
        self.handle = None
        if steerer is None:
            return
        block = find_decoder_layers(model, module_path)[layer]
        bank = as_bank(steerer, model_device(model))

        def hook(module, args, output):
            h = _hidden_of(output)
            if vectors is not None:
                slot = sequence_slots(torch.arange(h.shape[0], device=h.device), h.shape[1])
                out = add_vectors(h.reshape(-1, h.shape[-1]), vectors, slot, backend).reshape(h.shape)
            else:
                out = steer(h, bank, mode=mode, backend=backend, last_index=last_index if mode == "prompt" else None,
                            check_index_range=False)
            return _with_hidden(output, out)

        self.handle = block.register_forward_hook(hook)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def _clone_output(output):
    """A copy of a decoder block's output (a tensor, or a tuple whose tensors are copied)."""
    if isinstance(output, torch.Tensor):
        return output.clone()
    if isinstance(output, tuple):
        return tuple(x.clone() if isinstance(x, torch.Tensor) else x for x in output)
    raise TypeError(f"decoder block returned {type(output).__name__}; expected a tensor or a tuple")


class _BlockReplay:
    """Record the unsteered output of decoder block ``layer`` once; replay it in steered forwards.

    Steering adds to the output of block ``layer``, so blocks ``0 .. layer`` see the same inputs and
    produce the same output under every configuration, given the same batch. :meth:`record` (an
    unsteered forward) keeps a copy of that output under a key (one per kind of forward of the
    batch: the whole sequences, or the prompt and the response pass of the shared-prefix path).
    :meth:`replay` (a later forward over the same batch) makes each of those blocks return a copy
    of the recording without computing anything. Forward hooks still run, so the steering hook on
    block ``layer`` steers the replayed output exactly as it would steer the computed one. Each
    block's own ``forward`` is restored on exit, including one set on the instance (accelerate's
    device hooks).

    Replayed blocks add nothing to a key/value cache. A prompt pass that fills one for the response
    pass therefore keeps the unsteered cache entries of those blocks (:meth:`keep_cache`) and puts
    copies back after each replayed prompt pass (:meth:`restore_cache`); that needs a cache with a
    per-block ``layers`` list (transformers ≥ 4.56). Without one the prompt pass runs in full.
    """

    _MISSING = object()

    def __init__(self, model, layer: int, module_path: Optional[str]):
        self.blocks = list(find_decoder_layers(model, module_path))[:layer + 1]
        self.outputs: dict = {}
        self.cache_layers: Optional[list] = None

    def reset(self):
        """Forget every recording (a new batch begins)."""
        self.outputs = {}
        self.cache_layers = None

    @contextmanager
    def record(self, key: str = "whole"):
        def hook(module, args, output):
            self.outputs[key] = _clone_output(output)

        handle = self.blocks[-1].register_forward_hook(hook)
        try:
            yield self
        finally:
            handle.remove()

    @contextmanager
    def replay(self, key: str = "whole"):
        if key not in self.outputs:
            raise RuntimeError(f"_BlockReplay.replay: nothing recorded for {key!r} yet")
        recorded = self.outputs[key]
        shape = (recorded if isinstance(recorded, torch.Tensor) else recorded[0]).shape

        def replayed(*args, **kwargs):
            h = args[0] if args else kwargs.get("hidden_states")
            if isinstance(h, torch.Tensor) and h.shape != shape:
                raise RuntimeError(f"_BlockReplay: recorded a block output of shape {tuple(shape)} but the "
                                   f"forward passes {tuple(h.shape)}; replay needs the recorded batch")
            return _clone_output(recorded)

        saved = [block.__dict__.get("forward", self._MISSING) for block in self.blocks]
        try:
            for block in self.blocks:
                block.forward = replayed
            yield self
        finally:
            for block, fwd in zip(self.blocks, saved):
                if fwd is self._MISSING:
                    block.__dict__.pop("forward", None)
                else:
                    block.forward = fwd

    def around(self, steerer, key: str = "whole"):
        """The context for one forward under ``steerer`` over the current batch: record when it is
        unsteered, replay when it is steered and a recording exists, else nothing."""
        if steerer is None:
            return self.record(key)
        return self.replay(key) if key in self.outputs else nullcontext()

    def prompt_vectors(self, key: str, steerer, last_index: torch.Tensor, backend: str) -> torch.Tensor:
        """The prompt-mode vectors [B, d] fp32 that ``steerer`` adds in a forward replaying ``key``:
        computed by the operator from the recorded output at each row's last prompt position
        ``last_index`` [B], which are the hidden states that forward's steering hook sees."""
        h = _hidden_of(self.outputs[key])
        rows = h[torch.arange(h.shape[0], device=h.device), last_index.to(h.device)]
        return steering_vectors(rows, as_bank(steerer, h.device), None, backend)

    def keep_cache(self, cache) -> None:
        """Keep copies of the cache entries of the replayable blocks, right after the unsteered
        prompt pass filled them (before anything reorders the cache)."""
        layers = getattr(cache, "layers", None)
        n = len(self.blocks)
        self.cache_layers = [copy.deepcopy(x) for x in layers[:n]] \
            if isinstance(layers, list) and len(layers) >= n else None

    def can_replay_cached(self, key: str) -> bool:
        """Whether a prompt pass recorded under ``key`` can be replayed (its cache entries were kept)."""
        return key in self.outputs and self.cache_layers is not None

    def restore_cache(self, cache, seq_length: int) -> bool:
        """Put copies of the kept entries into ``cache`` after a replayed prompt pass; True when the
        cache then holds ``seq_length`` positions, as the full pass would have left it."""
        layers = getattr(cache, "layers", None)
        if self.cache_layers is None or not isinstance(layers, list) or len(layers) < len(self.cache_layers):
            return False
        for i, kept in enumerate(self.cache_layers):
            layers[i] = copy.deepcopy(kept)
        return int(cache.get_seq_length()) == seq_length


def _block_replay(model, configs: Sequence, layer: int, module_path: Optional[str], enabled: bool):
    """A :class:`_BlockReplay` when ``configs`` mix the unsteered model with steered ones, else None."""
    if enabled and any(c is None for c in configs) and any(c is not None for c in configs):
        return _BlockReplay(model, layer, module_path)
    return None


def _around(replay: Optional[_BlockReplay], steerer, key: str = "whole"):
    return nullcontext() if replay is None else replay.around(steerer, key)


def _replayed_vectors(replay: Optional[_BlockReplay], steerer, mode: str, backend: str, last_index: torch.Tensor,
                      key: str = "whole") -> Optional[torch.Tensor]:
    """Prompt-mode vectors [B, d] of ``steerer`` for the next forward over the recorded batch (see
    :meth:`_BlockReplay.prompt_vectors`), or None: unsteered, token mode, or nothing recorded."""
    if replay is None or steerer is None or mode != "prompt" or key not in replay.outputs:
        return None
    return replay.prompt_vectors(key, steerer, last_index, backend)


def _all_zero(vectors: Optional[torch.Tensor]) -> bool:
    """Whether a steered forward adds nothing (every vector exactly zero: closed hard gates), so
    that it would reproduce the unsteered forward of the same batch bit for bit (DESIGN §4)."""
    return vectors is not None and not bool(vectors.any())


def _unsteered_first(configs: Sequence) -> List[int]:
    """Indices of ``configs`` with the unsteered ones first: their forward records what the others replay."""
    return sorted(range(len(configs)), key=lambda k: configs[k] is not None)


class _gather_logit_rows:
    """Forward pre-hook on the LM head: keep only rows ``(b, t)`` of its input, as one [1, P, d] batch."""

    def __init__(self, model, rows: torch.Tensor, cols: torch.Tensor):
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise ValueError(f"{type(model).__name__} has no output embedding (LM head); likelihood scoring needs "
                             f"a causal language model")

        def pre_hook(module, args):
            x = args[0]
            return (x[rows, cols].unsqueeze(0), *args[1:])

        self.handle = head.register_forward_pre_hook(pre_hook)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _forward_logprobs(model, batch: List[ScoredSeq], steerer, layer: int, mode: str, backend: str, pad_id: int,
                      module_path: Optional[str], replay: Optional[_BlockReplay] = None,
                      vectors: Optional[torch.Tensor] = None):
    """Log-softmax [P, V] (fp32) at every position that predicts a continuation token of ``batch``,
    rows ordered by sequence then position, plus the target token ids [P]. ``replay``: record or
    replay blocks ``0 .. layer`` for this batch (see :class:`_BlockReplay`); ``vectors``: the
    prompt-mode vectors, already computed (see :class:`steering_hook`)."""
    device = model_device(model)
    ids, mask, pos, _ = pad_batch([list(s.ids) for s in batch], pad_id, "right", device)
    rows, cols, targets = [], [], []
    for b, s in enumerate(batch):
        for t in range(s.last_prompt, len(s.ids) - 1):
            rows.append(b)
            cols.append(t)
            targets.append(s.ids[t + 1])
    rows_t = torch.tensor(rows, device=device)
    cols_t = torch.tensor(cols, device=device)
    last = torch.tensor([s.last_prompt for s in batch], device=device)
    kwargs = full_forward_kwargs(model, ids, mask, pos)
    with torch.no_grad(), steering_hook(model, steerer, layer, mode, backend, last, module_path, vectors), \
            _gather_logit_rows(model, rows_t, cols_t), _around(replay, steerer):
        out = model(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    logits = logits.reshape(-1, logits.shape[-1]).float()
    if logits.shape[0] != len(rows):
        raise RuntimeError(f"{type(model).__name__}: the LM head produced {logits.shape[0]} rows, expected "
                           f"{len(rows)}; the model post-processes logits in a way scoring does not support")
    return torch.log_softmax(logits, dim=-1), torch.tensor(targets, device=device)


class _NoKVCache(RuntimeError):
    """The model returned no key/value cache for ``use_cache=True`` (e.g. Gemma 2 under transformers
    4.44, which builds its cache only when one is passed in); scoring falls back to whole sequences."""


def _prefix_groups(seqs: Sequence[ScoredSeq]) -> dict:
    """Sequence indices grouped by their prompt tokens ``ids[:last_prompt + 1]``."""
    groups: dict = {}
    for i, s in enumerate(seqs):
        groups.setdefault(s.ids[:s.last_prompt + 1], []).append(i)
    return groups


def _cache_keyword(model) -> Optional[str]:
    """The forward keyword that takes a key/value cache: ``cache`` (transformers ≥ 5.2x, where
    ``past_key_values`` is deprecated) or ``past_key_values`` (4.x); None when there is neither."""
    params = inspect.signature(model.forward).parameters
    if "use_cache" not in params:
        return None
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


def _fits_window(model, seq: ScoredSeq) -> bool:
    # A sliding-window cache drops states older than the window; keep such sequences on the plain path.
    window = getattr(getattr(model, "config", None), "sliding_window", None)
    return window is None or len(seq.ids) < int(window)


def _prefix_logprobs(model, prefixes: List[tuple], suffixes: List[List[tuple]], steerer, layer: int, mode: str,
                     backend: str, pad_id: int, module_path: Optional[str],
                     replay: Optional[_BlockReplay] = None,
                     vectors: Optional[torch.Tensor] = None) -> List[List[torch.Tensor]]:
    """``log p`` of every suffix token after its prefix: ``out[g][j]`` [len(suffixes[g][j])] fp64.

    The G prefixes run as one left-padded batch with ``use_cache=True``; then all suffixes run as
    one right-padded batch on the cache rows of their prefixes (``Cache.batch_select_indices``).
    In prompt mode the vector of each prefix's last token is added at every position of the prefix
    and of its suffixes; in token mode every position gets its own. ``replay`` records or replays
    blocks ``0 .. layer`` in both passes (see :class:`_BlockReplay` for the prompt pass's cache).
    ``vectors`` [G, d] (prompt mode): the prefixes' vectors, already computed from the hidden states
    the prompt pass will produce (see :class:`steering_hook`).
    """
    device = model_device(model)
    G = len(prefixes)
    P = max(len(x) for x in prefixes)
    owner = [g for g, sufs in enumerate(suffixes) for _ in sufs]
    flat_suf = [suf for sufs in suffixes for suf in sufs]
    R, L = len(flat_suf), max(len(x) for x in flat_suf)
    block = find_decoder_layers(model, module_path)[layer]
    bank = as_bank(steerer, device) if steerer is not None else None
    state = {}

    def hook(module, args, output):
        h = _hidden_of(output)
        flat = h.reshape(-1, h.shape[-1])
        if mode == "token":
            out = steer(flat, bank, mode="token", backend=backend, check_index_range=False)
        else:
            if state["pass"] == "prompt":  # left-padded: every last token sits at P − 1
                if state["v"] is None:
                    state["v"] = steering_vectors(h[:, -1], bank, None, backend)
                rows = torch.arange(h.shape[0], device=h.device)
            else:
                rows = state["owner"]
            slot = sequence_slots(rows, h.shape[1])
            out = add_vectors(flat, state["v"], slot, backend)
        return _with_hidden(output, out.reshape(h.shape))

    ids = torch.full((G, P), pad_id, dtype=torch.long)
    pmask = torch.zeros((G, P), dtype=torch.long)
    for g, pre in enumerate(prefixes):
        ids[g, P - len(pre):] = torch.tensor(pre)
        pmask[g, P - len(pre):] = 1
    ppos = (pmask.cumsum(-1) - 1).clamp(min=0)
    sel = torch.tensor(owner)
    sids = torch.full((R, L), pad_id, dtype=torch.long)
    smask = torch.zeros((R, L), dtype=torch.long)
    for j, suf in enumerate(flat_suf):
        sids[j, :len(suf)] = torch.tensor(suf)
        smask[j, :len(suf)] = 1
    spos = pmask.sum(-1)[sel].unsqueeze(-1) + torch.arange(L)
    state["owner"] = sel.to(device)
    kw = _cache_keyword(model)
    handle = block.register_forward_hook(hook) if steerer is not None else None

    def prompt_pass(blocks_ctx):
        """The prompt pass: logits at each prompt's last token and the filled key/value cache."""
        state["pass"], state["v"] = "prompt", vectors  # the steering hook computes v here unless given
        with _gather_logit_rows(model, torch.arange(G, device=device), torch.full((G,), P - 1, device=device)), \
                blocks_ctx:
            pre = model(input_ids=ids.to(device), attention_mask=pmask.to(device), position_ids=ppos.to(device),
                        use_cache=True)
        cache = getattr(pre, "cache", None) or getattr(pre, "past_key_values", None)
        if cache is None:
            raise _NoKVCache(f"{type(model).__name__} returned no key/value cache with use_cache=True")
        if isinstance(cache, tuple):  # transformers 4.x may return the legacy per-layer tuple format
            from transformers import DynamicCache

            cache = DynamicCache.from_legacy_cache(cache)
        return pre, cache

    try:
        with torch.no_grad():
            if replay is not None and steerer is None:
                pre, cache = prompt_pass(replay.record("prompt"))
                replay.keep_cache(cache)
            elif replay is not None and replay.can_replay_cached("prompt"):
                pre, cache = prompt_pass(replay.replay("prompt"))
                if not replay.restore_cache(cache, P):  # the cache would not take the kept entries
                    pre, cache = prompt_pass(nullcontext())
            else:
                pre, cache = prompt_pass(nullcontext())
            first = torch.log_softmax(pre.logits.reshape(G, -1).float(), -1)
            cache.batch_select_indices(sel.to(device))
            first_lp = first[sel.to(device), torch.tensor([suf[0] for suf in flat_suf], device=device)]
            rows = [j for j, suf in enumerate(flat_suf) for _ in range(len(suf) - 1)]
            cols = [t for suf in flat_suf for t in range(len(suf) - 1)]
            tok_lp = torch.zeros(0, dtype=torch.float64)
            state["pass"] = "response"
            if rows:
                with _gather_logit_rows(model, torch.tensor(rows, device=device), torch.tensor(cols, device=device)), \
                        _around(replay, steerer, "response"):
                    rest = model(input_ids=sids.to(device), attention_mask=torch.cat([pmask[sel], smask], 1).to(device),
                                 position_ids=spos.to(device), use_cache=True, **{kw: cache})
                logp = torch.log_softmax(rest.logits.reshape(len(rows), -1).float(), -1)
                targets = torch.tensor([suf[t + 1] for suf in flat_suf for t in range(len(suf) - 1)], device=device)
                tok_lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double().cpu()
    finally:
        if handle is not None:
            handle.remove()
    out: List[List[torch.Tensor]] = [[] for _ in range(G)]
    k = 0
    for j, suf in enumerate(flat_suf):
        out[owner[j]].append(torch.cat([first_lp[j:j + 1].double().cpu(), tok_lp[k:k + len(suf) - 1]]))
        k += len(suf) - 1
    return out


def _score_shared_prefix(model, seqs, configs, layer, mode, backend, pad_id, module_path, progress, desc,
                         max_rows: int, replay_blocks: bool = True, batch_key: Optional[Sequence] = None):
    """Score ``seqs`` group by group (groups = same prompt), several groups per forward (≤ ``max_rows``
    response rows, at least one group; groups whose first sequences' ``batch_key`` differ never share one)."""
    from tqdm.auto import tqdm

    def key_of(members):
        return 0 if batch_key is None else batch_key[members[0]]

    groups = list(_prefix_groups(seqs).items())
    groups.sort(key=lambda kv: (key_of(kv[1]), len(kv[0])))  # similar prompt lengths pad little
    chunks, cur, rows = [], [], 0
    for prefix, members in groups:
        if cur and (rows + len(members) > max_rows or key_of(members) != key_of(cur[0][1])):
            chunks.append(cur)
            cur, rows = [], 0
        cur.append((prefix, members))
        rows += len(members)
    chunks.append(cur)
    n = len(seqs)
    lp = [torch.zeros(n, dtype=torch.float64) for _ in configs]
    replay = _block_replay(model, configs, layer, module_path, replay_blocks)
    with tqdm(total=len(chunks) * len(configs), desc=desc, disable=not progress, unit="fwd") as bar:
        for chunk in chunks:
            prefixes = [prefix for prefix, _ in chunk]
            suffixes = [[seqs[i].ids[seqs[i].last_prompt + 1:] for i in members] for _, members in chunk]
            last = torch.full((len(prefixes),), max(len(x) for x in prefixes) - 1)  # the prompt pass pads left
            if replay is not None:
                replay.reset()
            unsteered = None
            for k in _unsteered_first(configs):
                cfg = configs[k]
                vectors = _replayed_vectors(replay, cfg, mode, backend, last, key="prompt")
                if _all_zero(vectors):
                    per = unsteered
                else:
                    per = _prefix_logprobs(model, prefixes, suffixes, cfg, layer, mode, backend, pad_id, module_path,
                                           replay, vectors)
                if cfg is None:
                    unsteered = per
                for (_, members), vals in zip(chunk, per):
                    lp[k][members] = torch.stack([x.sum() for x in vals])
                bar.update()
    counts = torch.tensor([s.n_scored for s in seqs], dtype=torch.long)
    return [SeqScores(lp[k], counts) for k in range(len(configs))]


def _inverse(order: List[int]) -> torch.Tensor:
    """Index that puts results computed in ``order`` back into input order."""
    inv = torch.empty(len(order), dtype=torch.long)
    inv[torch.tensor(order)] = torch.arange(len(order))
    return inv


def score_sequences(model, seqs: Sequence[ScoredSeq], configs: Sequence, layer: int, mode: str = "prompt",
                    backend: str = "auto", batch_size: int = 8, pad_id: int = 0, compare: bool = False,
                    module_path: Optional[str] = None, progress: bool = True, desc: str = "score",
                    share_prefix: bool = True, replay_blocks: bool = True,
                    batch_key: Optional[Sequence] = None) -> List[SeqScores]:
    """Score every sequence under every configuration (see the module docstring).

    ``configs``: Steerers (each applied alone, at its own strength) or ``None`` (unsteered).
    Returns one :class:`SeqScores` per configuration, in order. With ``compare`` the unsteered
    distributions are computed once per batch and every configuration is compared with them.
    Sequences are processed in length-sorted batches; results come back in input order. With
    ``share_prefix`` (and without ``compare``), sequences with the same prompt share its forward.
    With ``replay_blocks`` the steered forwards of a batch reuse the unsteered forward's blocks
    ``0 .. layer`` (when ``configs`` hold both kinds or ``compare`` is set; same results bit for bit),
    and in prompt mode a steered configuration whose vectors, computed from that recording, are all
    exactly zero on a batch (its hard gates closed on every prompt) is not run there: its scores are
    the unsteered ones, which is what its forward would compute bit for bit.

    ``batch_key``: one sortable value per sequence (default: all equal). Sequences with different
    keys never share a batch. Give the same key to sequences whose gates are expected to open
    under the same configurations (e.g. the gates' decisions on the prompt's states from an
    earlier pass), so whole batches skip; a key only orders the work, so a wrong guess costs time,
    never a number.
    """
    from tqdm.auto import tqdm

    if mode not in ("prompt", "token"):
        raise ValueError(f"mode must be 'prompt' or 'token', got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not seqs:
        raise ValueError("score_sequences: no sequences")
    if share_prefix and not compare and _cache_keyword(model) is not None:
        shared = [i for idx in _prefix_groups(seqs).values() if len(idx) > 1 for i in idx
                  if _fits_window(model, seqs[i])]
        out = None
        if shared:
            try:
                out = _score_shared_prefix(model, [seqs[i] for i in shared], configs, layer, mode, backend, pad_id,
                                           module_path, progress, desc, max_rows=4 * batch_size,
                                           replay_blocks=replay_blocks,
                                           batch_key=None if batch_key is None else [batch_key[i] for i in shared])
            except _NoKVCache:  # raised by the first forward, before any score is kept
                out = None
        if out is not None:
            rest = sorted(set(range(len(seqs))) - set(shared))
            if rest:
                plain = score_sequences(model, [seqs[i] for i in rest], configs, layer, mode, backend, batch_size,
                                        pad_id, False, module_path, progress, desc, share_prefix=False,
                                        replay_blocks=replay_blocks,
                                        batch_key=None if batch_key is None else [batch_key[i] for i in rest])
                for a, b in zip(out, plain):
                    a.logprob = torch.cat([a.logprob, b.logprob])[_inverse(shared + rest)]
                    a.n_tokens = torch.cat([a.n_tokens, b.n_tokens])[_inverse(shared + rest)]
            else:
                for a in out:
                    a.logprob, a.n_tokens = a.logprob[_inverse(shared)], a.n_tokens[_inverse(shared)]
            return out
    n = len(seqs)
    lp = [torch.zeros(n, dtype=torch.float64) for _ in configs]
    kl = [torch.zeros(n, dtype=torch.float64) for _ in configs]
    same = [torch.zeros(n, dtype=torch.bool) for _ in configs]
    counts = torch.tensor([s.n_scored for s in seqs], dtype=torch.long)
    key = (lambda i: 0) if batch_key is None else batch_key.__getitem__
    order = sorted(range(n), key=lambda i: (key(i), len(seqs[i].ids)))
    groups = []
    for i in order:
        if groups and len(groups[-1]) < batch_size and key(groups[-1][0]) == key(i):
            groups[-1].append(i)
        else:
            groups.append([i])
    bar = tqdm(total=len(groups) * (len(configs) + (1 if compare else 0)), desc=desc, disable=not progress,
               unit="fwd")
    replay = _block_replay(model, list(configs) + ([None] if compare else []), layer, module_path, replay_blocks)
    for group in groups:
        batch = [seqs[i] for i in group]
        seg = torch.tensor([s.n_scored for s in batch])
        owner = torch.repeat_interleave(torch.arange(len(batch)), seg)
        last = torch.tensor([s.last_prompt for s in batch])
        base = None
        if replay is not None:
            replay.reset()
        if compare:
            base, targets = _forward_logprobs(model, batch, None, layer, mode, backend, pad_id, module_path, replay)
            base = base.cpu()
            base_arg = base.argmax(-1)
            bar.update()
        unsteered = base
        for k in _unsteered_first(configs):
            cfg = configs[k]
            vectors = _replayed_vectors(replay, cfg, mode, backend, last)
            if cfg is None and unsteered is not None:
                logp = unsteered
                bar.update()
            elif _all_zero(vectors):
                logp = unsteered
                bar.update()
            else:
                logp, targets = _forward_logprobs(model, batch, cfg, layer, mode, backend, pad_id, module_path,
                                                  replay, vectors)
                logp = logp.cpu()
                bar.update()
            if cfg is None:
                unsteered = logp
            tok_lp = logp.gather(-1, targets.cpu().unsqueeze(-1)).squeeze(-1).double()
            lp[k][group] = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, owner, tok_lp)
            if compare:
                # KL(base ‖ steered) per position; exp(base) is the unsteered distribution.
                pos_kl = (base.exp() * (base - logp)).sum(-1).double().clamp_min(0.0)
                kl[k][group] = torch.zeros(len(batch), dtype=torch.float64).index_add_(0, owner, pos_kl) / seg
                diff = (logp.argmax(-1) != base_arg).long()
                same[k][group] = torch.zeros(len(batch), dtype=torch.long).index_add_(0, owner, diff) == 0
    bar.close()
    return [SeqScores(lp[k], counts, kl[k] if compare else None, same[k] if compare else None)
            for k in range(len(configs))]


@torch.no_grad()
def greedy_continuations(model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int,
                         eos_id: Optional[int], batch_size: int = 8, progress: bool = True) -> List[List[int]]:
    """The unsteered model's greedy continuation (token ids, at most ``max_new_tokens``, ending at and
    including the first EOS) of every prompt. No steering hook is attached here."""
    from tqdm.auto import tqdm

    from ..generation import batches

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = model_device(model)
    out: List[List[int]] = []
    for rows in tqdm(batches(len(prompt_ids), batch_size), desc="greedy continuations", disable=not progress,
                     unit="batch"):
        ids, mask, _, _ = pad_batch([prompt_ids[i] for i in rows], pad_id, "left", device)
        gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, num_beams=1,
                             max_new_tokens=max_new_tokens, min_new_tokens=1, pad_token_id=pad_id)
        for j in range(len(rows)):
            new = gen[j, ids.shape[1]:].tolist()
            if eos_id is not None and eos_id in new:
                new = new[:new.index(eos_id) + 1]
            out.append(new)
    return out
