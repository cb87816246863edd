"""Activation extraction at the steering hook point (DESIGN §1, §3).

``h`` at layer ``ℓ`` is the residual stream after decoder block ``ℓ`` (HF's
``output_hidden_states[ℓ + 1]``), read with forward hooks on the blocks themselves: HF's last
``hidden_states`` entry is taken after the final norm in many models, the block output is not.
Steering (:class:`finesteer.FusedSteerer`) adds at the same point, so fitting and inference agree.

Two quantities:

- :func:`last_token_states` — ``q = h`` at the last prompt token (the query the gate and the
  MoSE router read);
- :func:`response_deltas` — ``δ = mean(h over chosen-response tokens) − mean(h over rejected-response
  tokens)``, each response following the same prompt (the paper's definition), plus the queries.

and, for a gate that reads every token (token mode, DESIGN §4), ``h`` at every token of a response
(:func:`response_token_states`) or of any span of token ids (:func:`span_token_states`).

Prompt formats (:data:`PROMPT_FORMATS`, option ``prompt_format`` of every function here, recorded
in the steerer artifact so generation and evaluation format prompts exactly as fitting did):

- ``"chat"`` — the tokenizer's chat template: one user turn, then the generation prompt;
- ``"plain"`` — :data:`PLAIN_TEMPLATE`, ``"User: {prompt}\nAssistant:"``, for models without a
  chat template (base models, GGUF files); a response follows after one space;
- ``"raw"`` — the prompt text unchanged;
- ``"auto"`` — ``"chat"`` when the tokenizer has a chat template, else ``"plain"``.

Without ``prompt_format`` the older switch ``chat_template`` decides: true → ``"auto"``, false →
``"raw"``. Non-chat text is tokenized with the tokenizer's special tokens (BOS); a rendered chat
template already carries them. Batches are padded on the tokenizer's ``padding_side`` with explicit
attention masks and position ids, sorted by length to waste little compute; results are
independent of batching and padding up to float rounding. Outputs are fp32 on the CPU.

Prompts must be non-empty and, with their responses, no longer than the model's context:
longer inputs are **refused** (a ``ValueError`` naming the row), never truncated, because
truncation would silently move the token whose state is measured.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Optional, Sequence, Union

import torch

from .models import find_decoder_layers, full_forward_kwargs, model_context_length, model_device, model_hidden_size

__all__ = ["PLAIN_TEMPLATE", "PROMPT_FORMATS", "ChatTemplateError", "encode_prompts", "format_prompt",
           "last_token_states", "long_rows", "pad_batch", "pad_token_id", "resolve_prompt_format", "response_deltas",
           "response_token_states", "span_token_states"]

log = logging.getLogger(__name__)

Positions = Union[str, int]


class ChatTemplateError(ValueError):
    """The tokenizer's chat template does not render a response verbatim (format without the template)."""


# ---------------------------------------------------------------------------------------------
# tokenisation


#: Prompt formats accepted by ``prompt_format`` (see the module docstring).
PROMPT_FORMATS = ("auto", "chat", "plain", "raw")
#: The ``"plain"`` format: a documented user/assistant frame for models without a chat template.
PLAIN_TEMPLATE = "User: {prompt}\nAssistant:"


def resolve_prompt_format(tokenizer, prompt_format: Optional[str] = None, chat_template: bool = True) -> str:
    """The concrete format (``"chat"``, ``"plain"`` or ``"raw"``) used for ``tokenizer``.

    ``prompt_format`` ``None`` defers to ``chat_template`` (true → ``"auto"``, false → ``"raw"``);
    ``"auto"`` is ``"chat"`` when the tokenizer has a chat template, else ``"plain"``. Raises
    ``ValueError`` for an unknown format, or ``"chat"`` with a tokenizer that has no template.
    """
    if prompt_format is None:
        prompt_format = "auto" if chat_template else "raw"
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if prompt_format == "auto":
        return "chat" if has_template else "plain"
    if prompt_format == "chat" and not has_template:
        raise ValueError("prompt_format='chat' but the tokenizer has no chat template; use 'plain' (the "
                         "'User: ...\\nAssistant:' format) or 'raw'")
    return prompt_format


def format_prompt(tokenizer, prompt: str, chat_template: bool = True, prompt_format: Optional[str] = None) -> str:
    """The text the model sees for ``prompt`` in the format :func:`resolve_prompt_format` picks:
    one chat-templated user turn plus the generation prompt, ``PLAIN_TEMPLATE`` filled in, or the
    prompt unchanged."""
    fmt = resolve_prompt_format(tokenizer, prompt_format, chat_template)
    if fmt == "chat":
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    if fmt == "plain":
        return PLAIN_TEMPLATE.format(prompt=prompt)
    return prompt


def _encode(tokenizer, text: str, templated: bool) -> list:
    # A rendered chat template already carries BOS etc.; adding special tokens again would double them.
    return list(tokenizer(text, add_special_tokens=not templated)["input_ids"])


def _check_text(value, what: str, row: int) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} {row}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{what} {row}: empty or whitespace-only text")
    return value


def _check_length(n: int, context: Optional[int], what: str, row: int) -> None:
    if n == 0:
        raise ValueError(f"{what} {row}: tokenizes to zero tokens")
    if context is not None and n > context:
        raise ValueError(f"{what} {row}: {n} tokens, longer than the model's context of {context} tokens; "
                         f"shorten or drop it (finesteer refuses rather than truncates, because truncation "
                         f"would move the measured token)")


def encode_prompts(tokenizer, prompts: Sequence[str], chat_template: bool = True,
                   context: Optional[int] = None, prompt_format: Optional[str] = None) -> list:
    """Token ids of every prompt as the model sees it (see :func:`format_prompt`); validates each."""
    fmt = resolve_prompt_format(tokenizer, prompt_format, chat_template)
    templated = fmt == "chat"
    out = []
    for i, p in enumerate(prompts):
        ids = _encode(tokenizer, format_prompt(tokenizer, _check_text(p, "prompt", i), prompt_format=fmt), templated)
        _check_length(len(ids), context, "prompt", i)
        out.append(ids)
    return out


def long_rows(tokenizer, prompts: Sequence[str], chosen: Optional[Sequence[str]] = None,
              rejected: Optional[Sequence[str]] = None, chat_template: bool = True,
              context: Optional[int] = None, prompt_format: Optional[str] = None,
              positions: Positions = "all") -> list:
    """Indices of the rows longer than ``context`` tokens: the rows :func:`last_token_states`
    (prompts only) or :func:`response_deltas` (with ``chosen`` and ``rejected``: prompt + either
    response, up to its ``positions``-th response token when that is an int n, as that function
    runs it) would refuse as too long. Lets a caller drop them first instead of failing.

    Tokenised exactly as the extraction functions do (``prompt_format``/``chat_template`` as in
    :func:`resolve_prompt_format`); other bad rows (empty text, a response the chat template does
    not render verbatim) raise as they would there. ``context=None`` → ``[]``.
    """
    _check_positions(positions)
    if context is None:
        return []
    fmt = resolve_prompt_format(tokenizer, prompt_format, chat_template)
    out = []
    for i, p in enumerate(prompts):
        _check_text(p, "prompt", i)
        if chosen is None or rejected is None:
            n = len(_encode(tokenizer, format_prompt(tokenizer, p, prompt_format=fmt), fmt == "chat"))
        else:
            n = 0
            for name, resp in (("chosen", chosen[i]), ("rejected", rejected[i])):
                _check_text(resp, f"{name} response of pair", i)
                ids, _, _ = _pair_tokens(tokenizer, p, resp, fmt, f"pair {i} ({name})", positions)
                n = max(n, len(ids))
        if n > context:
            out.append(i)
    return out


def _check_positions(positions) -> None:
    if not (positions == "all" or (isinstance(positions, int) and not isinstance(positions, bool)
                                   and positions > 0)):
        raise ValueError(f"positions must be 'all' or a positive int (first n response tokens), got {positions!r}")


def _pair_tokens(tokenizer, prompt: str, response: str, fmt: str, where: str, positions: Positions = "all"):
    """``(ids, start, end)`` of the tokens :func:`response_deltas` runs for one response: prompt +
    response (:func:`_encode_response`), and with ``positions`` = n only up to the n-th response
    token. A causal model's states at those tokens do not depend on the tokens after them, so the
    cut changes no δ and makes a long written answer cost no more than a short one."""
    ids, start, end = _encode_response(tokenizer, prompt, response, fmt, where)
    if positions != "all":
        end = min(end, start + positions)
        ids = ids[:end]
    return ids, start, end


def _join_plain(prompt: str, response: str) -> str:
    # Without a template, prompt and response are joined by one space unless one side already
    # has whitespace at the junction.
    if prompt[-1:].isspace() or response[:1].isspace():
        return prompt + response
    return prompt + " " + response


def _common_prefix(a: list, b: list) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _encode_response(tokenizer, prompt: str, response: str, fmt: str, where: str):
    """Ids of prompt+response and the half-open token range ``[start, end)`` covering the response.

    The response occupies characters ``[c0, c1)`` of the full text. ``start`` is the number of
    leading tokens shared by the tokenisation of ``full[:c0]`` and of the full text: when the
    tokenizer merges a token across the boundary, that merged token carries response text and
    counts as a response token. ``end`` likewise from ``full[:c1]``, so trailing chat-template
    tokens (end-of-turn markers) are not averaged.
    """
    templated = fmt == "chat"
    if templated:
        prompt_text = format_prompt(tokenizer, prompt, prompt_format="chat")
        full = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}], tokenize=False)
        base = len(prompt_text) if full.startswith(prompt_text) else 0
        content = response.strip()
        c0 = full.find(content, base)
        if c0 < 0:
            raise ChatTemplateError(f"{where}: the chat template does not render the response text verbatim, so "
                                    f"its tokens cannot be located; use prompt_format='plain' or 'raw'")
        c1 = c0 + len(content)
    else:
        full = _join_plain(format_prompt(tokenizer, prompt, prompt_format=fmt), response)
        c0 = len(full) - len(response)  # the joining space, if any, stays on the prompt side
        c1 = len(full)
    ids = _encode(tokenizer, full, templated)
    head = _encode(tokenizer, full[:c0], templated)
    start = _common_prefix(head, ids)
    if c1 == len(full):
        end = len(ids)
    else:
        upto = _encode(tokenizer, full[:c1], templated)
        shared = _common_prefix(upto, ids)
        end = shared if shared == len(upto) else shared + 1
    end = min(end, len(ids))
    if end <= start:
        raise ValueError(f"{where}: the response produces no tokens of its own")
    return ids, start, end


# ---------------------------------------------------------------------------------------------
# batched forward with capture


class _Stop(Exception):
    """Raised from the hook of the deepest requested layer: later blocks need not run."""


def pad_token_id(tokenizer) -> int:
    """The id padding is filled with: the tokenizer's pad token, else its EOS token, else 0 (the
    attention mask hides padding, so any id will do where the tokenizer has neither)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int, side: str, device):
    """Pad token-id lists into one batch → ``(input_ids, attention_mask, position_ids, offsets)``.

    ``input_ids``/``attention_mask``/``position_ids`` are ``[B, S]`` long tensors on ``device``;
    ``side`` is ``"left"`` or ``"right"``; ``offsets[b]`` is where row ``b``'s first real token sits.
    Positions count real tokens only, so a left-padded row gets the positions of its unpadded self.
    """
    S = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), S), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), S), dtype=torch.long)
    offsets = []
    for b, s in enumerate(seqs):
        off = S - len(s) if side == "left" else 0
        ids[b, off:off + len(s)] = torch.tensor(list(s), dtype=torch.long)
        mask[b, off:off + len(s)] = 1
        offsets.append(off)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device), offsets


def _forward_capture(model, blocks, layers: list, ids, mask, pos, reduce) -> dict:
    """One forward; returns ``{layer: reduce(h_layer)}`` with ``h_layer`` the block output [B, S, d]."""
    out, handles = {}, []
    deepest = max(layers)

    def make(layer):
        def hook(module, args, output):
            h = output if isinstance(output, torch.Tensor) else output[0]
            out[layer] = reduce(h)
            if layer == deepest:
                raise _Stop
        return hook

    for layer in sorted(set(layers)):
        handles.append(blocks[layer].register_forward_hook(make(layer)))
    kwargs = full_forward_kwargs(model, ids, mask, pos)
    try:
        with torch.no_grad():  # not inference_mode: outputs may feed a training loop
            model(**kwargs)
    except _Stop:
        pass
    finally:
        for hd in handles:
            hd.remove()
    missing = [layer for layer in layers if layer not in out]
    if missing:
        raise RuntimeError(f"{type(model).__name__}: the forward pass never ran decoder layer(s) {missing}")
    return out


def _run_batches(model, tokenizer, seqs: list, layers: list, batch_size: int, reduce_for, progress: bool,
                 desc: str, padding_side: Optional[str], module_path: Optional[str], stack: bool = True) -> dict:
    """Run ``seqs`` in length-sorted batches; ``reduce_for(rows, offsets)`` builds each batch's reducer.
    Returns ``{layer: Tensor[N, ...]}``, or with ``stack=False`` ``{layer: [Tensor per sequence]}``
    (for reducers whose per-row output is padded to the batch's longest: the caller trims it)."""
    from tqdm.auto import tqdm

    blocks = find_decoder_layers(model, module_path)
    for layer in layers:
        if not 0 <= layer < len(blocks):
            raise ValueError(f"layer {layer} is out of range: {type(model).__name__} has {len(blocks)} decoder "
                             f"layers (valid: 0..{len(blocks) - 1})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    side = padding_side or getattr(tokenizer, "padding_side", "right") or "right"
    if side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
    pad_id = pad_token_id(tokenizer)
    device = model_device(model)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    results: dict = {layer: [None] * len(seqs) for layer in layers}
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for rows in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        ids, mask, pos, offsets = pad_batch([seqs[i] for i in rows], pad_id, side, device)
        captured = _forward_capture(model, blocks, layers, ids, mask, pos, reduce_for(rows, offsets, ids.shape[1]))
        for layer in layers:
            vals = captured[layer].float().cpu()
            for j, i in enumerate(rows):
                results[layer][i] = vals[j]
    if not stack:
        return results
    if not seqs:
        d = model_hidden_size(model) or 0
        return {layer: torch.zeros(0, d) for layer in layers}
    return {layer: torch.stack(results[layer]) for layer in layers}


# ---------------------------------------------------------------------------------------------
# cache


def _fingerprint(model) -> dict:
    """What identifies the model's function cheaply: name, class, config, dtype, a few weights."""
    config = getattr(model, "config", None)
    conf = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(config)
    params = list(model.parameters())
    probe = []
    for p in (params[:2] + params[-2:]) if params else []:
        flat = p.detach().reshape(-1)[:4096].float().cpu()
        probe.append(hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16])
    return {"name": getattr(config, "_name_or_path", "") or getattr(model, "name_or_path", ""),
            "class": type(model).__name__, "config": hashlib.sha256(conf.encode()).hexdigest(),
            "dtype": str(params[0].dtype) if params else "", "weights": probe}


def _cache_key(model, kind: str, layers: list, payload) -> str:
    doc = {"kind": kind, "model": _fingerprint(model), "layers": list(layers), "payload": payload,
           "format": 1}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


def _cache_load(cache_file, key: str) -> Optional[dict]:
    if cache_file is None or not os.path.isfile(cache_file):
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(cache_file), framework="pt") as f:
            if (f.metadata() or {}).get("finesteer_cache_key") != key:
                log.info("%s: cache is for other inputs; recomputing", cache_file)
                return None
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # a corrupt cache is recomputed, not fatal
        log.warning("%s: unreadable cache (%s); recomputing", cache_file, exc)
        return None


def _cache_save(cache_file, key: str, tensors: dict) -> None:
    if cache_file is None:
        return
    from .artifact import save_safetensors_atomic

    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_safetensors_atomic(tensors, cache_file, {"finesteer_cache_key": key})


def _layer_list(layers) -> list:
    layers = [layers] if isinstance(layers, int) else list(layers)
    if not layers:
        raise ValueError("layers: need at least one layer index")
    for layer in layers:
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"layers: expected integer layer indices, got {layer!r}")
    return sorted(set(layers))


# ---------------------------------------------------------------------------------------------
# public API


def last_token_states(model, tokenizer, prompts: Sequence[str], layers, batch_size: int = 8,
                      chat_template: bool = True, cache_file=None, progress: bool = True,
                      padding_side: Optional[str] = None, module_path: Optional[str] = None,
                      prompt_format: Optional[str] = None) -> dict:
    """``h`` at the last prompt token after each decoder block in ``layers``.

    Semantics::

        out[ℓ][i] = h_ℓ(format(prompts[i]))[last token]       # fp32, CPU

    Shapes: ``prompts`` N strings → ``{ℓ: Tensor[N, d]}``. ``layers`` an int or a list of ints
    (all captured in the same forward pass; blocks after the deepest one are not run).
    ``prompt_format`` (or the older ``chat_template`` switch) as in :func:`resolve_prompt_format`.
    ``cache_file``: a ``.safetensors`` path; when it holds the result for the same model,
    layers, token ids and options it is returned without a forward pass, otherwise it is
    (re)written. ``padding_side`` overrides the tokenizer's.
    """
    layers = _layer_list(layers)
    context = model_context_length(model)
    seqs = encode_prompts(tokenizer, prompts, chat_template, context, prompt_format)
    key = _cache_key(model, "last_token_states", layers, {"ids": seqs})
    hit = _cache_load(cache_file, key)
    if hit is not None:
        return {layer: hit[f"layer_{layer}"] for layer in layers}
    lengths = [len(s) for s in seqs]

    def reduce_for(rows, offsets, S):
        last = torch.tensor([offsets[j] + lengths[i] - 1 for j, i in enumerate(rows)])

        def reduce(h):
            return h[torch.arange(h.shape[0], device=h.device), last.to(h.device)].float()
        return reduce

    out = _run_batches(model, tokenizer, seqs, layers, batch_size, reduce_for, progress,
                       "extract: prompt states", padding_side, module_path)
    _cache_save(cache_file, key, {f"layer_{layer}": t for layer, t in out.items()})
    return out


def response_deltas(model, tokenizer, prompts: Sequence[str], chosen: Sequence[str], rejected: Sequence[str],
                    layers, positions: Positions = "all", batch_size: int = 8, chat_template: bool = True,
                    cache_file=None, progress: bool = True, padding_side: Optional[str] = None,
                    module_path: Optional[str] = None, prompt_format: Optional[str] = None):
    """Queries and response-shift deltas for (prompt, chosen, rejected) triples (DESIGN §3).

    Semantics (``R(x)`` = the response tokens of ``x`` following ``prompts[i]``)::

        queries[ℓ][i] = h_ℓ(prompt_i)[last token]
        deltas[ℓ][i]  = mean_{t ∈ R(chosen_i)} h_ℓ[t] − mean_{t ∈ R(rejected_i)} h_ℓ[t]

    ``positions="all"`` averages every response token (the paper's default); an int ``n``
    averages the first ``n`` (fewer when the response is shorter). Response tokens are the
    tokens of the full prompt+response text that cover the response (with a chat template: the
    assistant message, without its end-of-turn markers; otherwise: the formatted prompt and the
    response joined by a space). Returns ``(queries, deltas)``, each ``{ℓ: Tensor[N, d]}`` fp32 on
    the CPU. ``cache_file``, ``padding_side``, ``module_path`` and ``prompt_format`` as in
    :func:`last_token_states`.
    """
    layers = _layer_list(layers)
    _check_positions(positions)
    n = len(prompts)
    if len(chosen) != n or len(rejected) != n:
        raise ValueError(f"prompts, chosen and rejected must have the same length, got {n}, {len(chosen)}, "
                         f"{len(rejected)}")
    context = model_context_length(model)
    fmt = resolve_prompt_format(tokenizer, prompt_format, chat_template)
    seqs, spans = [], []
    for i in range(n):
        _check_text(prompts[i], "prompt", i)
        for name, resp in (("chosen", chosen[i]), ("rejected", rejected[i])):
            _check_text(resp, f"{name} response of pair", i)
            ids, start, end = _pair_tokens(tokenizer, prompts[i], resp, fmt, f"pair {i} ({name})", positions)
            _check_length(len(ids), context, f"pair {i} ({name}, prompt + response)", i)
            seqs.append(ids)
            spans.append((start, end))
    prompt_seqs = encode_prompts(tokenizer, prompts, context=context, prompt_format=fmt)
    key = _cache_key(model, "response_deltas", layers, {"ids": seqs, "spans": spans, "prompts": prompt_seqs,
                                                        "positions": positions})
    hit = _cache_load(cache_file, key)
    if hit is not None:
        return ({layer: hit[f"queries_{layer}"] for layer in layers},
                {layer: hit[f"deltas_{layer}"] for layer in layers})

    # Several pairs often share a prompt (e.g. many written responses per prompt): run each once.
    unique = list(dict.fromkeys(prompts))
    row_of = {p: r for r, p in enumerate(unique)}
    states = last_token_states(model, tokenizer, unique, layers, batch_size, cache_file=None, progress=progress,
                               padding_side=padding_side, module_path=module_path, prompt_format=fmt)
    index = torch.tensor([row_of[p] for p in prompts], dtype=torch.long)
    queries = {layer: states[layer][index] for layer in layers}

    def reduce_for(rows, offsets, S):
        w = torch.zeros(len(rows), S)
        for j, i in enumerate(rows):
            s, e = spans[i]
            w[j, offsets[j] + s:offsets[j] + e] = 1.0 / (e - s)

        def reduce(h):
            return torch.einsum("bs,bsd->bd", w.to(h.device), h.float())
        return reduce

    means = _run_batches(model, tokenizer, seqs, layers, batch_size, reduce_for, progress,
                         "extract: response means", padding_side, module_path)
    deltas = {layer: means[layer][0::2] - means[layer][1::2] for layer in layers}
    tensors = {f"queries_{layer}": queries[layer] for layer in layers}
    tensors.update({f"deltas_{layer}": deltas[layer] for layer in layers})
    _cache_save(cache_file, key, tensors)
    return queries, deltas


def span_token_states(model, tokenizer, seqs: Sequence[Sequence[int]], spans: Sequence[tuple], layers,
                      batch_size: int = 8, cache_file=None, progress: bool = True,
                      padding_side: Optional[str] = None, module_path: Optional[str] = None):
    """``h`` at every token of a span of each token-id sequence.

    Semantics (``h_ℓ(x)[t]`` the state after block ℓ at token t of ``x``; ``(s_i, e_i) = spans[i]``)::

        states[ℓ][offsets[i] + k] = h_ℓ(seqs[i])[s_i + k]      for 0 <= k < e_i − s_i
        offsets[i] = sum_{j < i} (e_j − s_j)

    Shapes: N sequences and N half-open spans ``0 <= s_i < e_i <= len(seqs[i])`` →
    ``(states, lengths)``: ``{ℓ: Tensor[T, d]}`` fp32 on the CPU, the spans' rows in order
    (``T = sum lengths``), and ``lengths`` Tensor[N] long. Tokens after a span are not run (a causal
    model's states do not depend on them). ``cache_file`` etc. as in :func:`last_token_states`.
    """
    layers = _layer_list(layers)
    if len(spans) != len(seqs):
        raise ValueError(f"seqs and spans must have the same length, got {len(seqs)} and {len(spans)}")
    context = model_context_length(model)
    seqs = [list(s) for s in seqs]
    for i, (ids, span) in enumerate(zip(seqs, spans)):
        s, e = span
        if not (isinstance(s, int) and isinstance(e, int) and 0 <= s < e <= len(ids)):
            raise ValueError(f"span {i}: {span!r} is not a non-empty range inside its {len(ids)} tokens")
        _check_length(e, context, "sequence", i)
    run = [ids[:e] for ids, (_, e) in zip(seqs, spans)]
    lengths = torch.tensor([e - s for s, e in spans], dtype=torch.long)
    key = _cache_key(model, "span_token_states", layers, {"ids": run, "spans": [list(sp) for sp in spans]})
    hit = _cache_load(cache_file, key)
    if hit is not None:
        return {layer: hit[f"states_{layer}"] for layer in layers}, hit["lengths"]

    def reduce_for(rows, offsets, S):
        longest = max(spans[i][1] - spans[i][0] for i in rows)
        index = torch.zeros(len(rows), longest, dtype=torch.long)
        for j, i in enumerate(rows):
            s, e = spans[i]
            # rows past a short span repeat its last token; the caller trims them
            index[j] = offsets[j] + torch.arange(s, s + longest).clamp(max=e - 1)

        def reduce(h):
            return torch.gather(h, 1, index.to(h.device)[..., None].expand(-1, -1, h.shape[-1])).float()
        return reduce

    per_seq = _run_batches(model, tokenizer, run, layers, batch_size, reduce_for, progress,
                           "extract: span tokens", padding_side, module_path, stack=False)
    d = model_hidden_size(model) or 0
    states = {layer: torch.cat([rows[:n] for rows, n in zip(per_seq[layer], lengths.tolist())])
              if run else torch.zeros(0, d) for layer in layers}
    tensors = {f"states_{layer}": states[layer] for layer in layers}
    tensors["lengths"] = lengths
    _cache_save(cache_file, key, tensors)
    return states, lengths


def response_token_states(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], layers,
                          batch_size: int = 8, chat_template: bool = True, cache_file=None, progress: bool = True,
                          padding_side: Optional[str] = None, module_path: Optional[str] = None,
                          prompt_format: Optional[str] = None):
    """``h`` at every token of each response following its prompt: the rows a gate on response tokens
    is fitted on (token mode reads each of them while the response is scored or generated).

    Semantics: :func:`span_token_states` over the tokens of ``prompts[i]`` + ``responses[i]`` with
    the span of the response tokens (as :func:`response_deltas` locates them). Returns
    ``(states {ℓ: Tensor[T, d]}, lengths Tensor[N])``: response i's rows are
    ``states[ℓ][sum(lengths[:i]) : sum(lengths[:i + 1])]``. Options as in :func:`response_deltas`.
    """
    if len(responses) != len(prompts):
        raise ValueError(f"prompts and responses must have the same length, got {len(prompts)}, {len(responses)}")
    fmt = resolve_prompt_format(tokenizer, prompt_format, chat_template)
    seqs, spans = [], []
    for i, (prompt, resp) in enumerate(zip(prompts, responses)):
        _check_text(prompt, "prompt", i)
        _check_text(resp, "response", i)
        ids, start, end = _encode_response(tokenizer, prompt, resp, fmt, f"response {i}")
        seqs.append(ids)
        spans.append((start, end))
    return span_token_states(model, tokenizer, seqs, spans, layers, batch_size, cache_file, progress,
                             padding_side, module_path)
