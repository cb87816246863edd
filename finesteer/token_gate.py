"""The rows of a gate fitted on response tokens (``gate_tokens="response"``).

In token mode (DESIGN §4) every position computes its own gate and vector, so a gate read there
sees each token of a response while the response is scored or generated. A gate fitted on prompts
(the default: the last prompt token of target and benign prompts) has never seen such states; a
gate fitted on response tokens opens where a response heads the *rejected* way. Its rows:

- **target**: every token of each distinct rejected response of the fitted pairs;
- **benign**: every token of each distinct chosen response of the fitted pairs (a response that is
  also rejected for the same prompt counts as rejected only), each fitted pair prompt's last token,
  the benign prompts' last tokens, and optionally every token of the model's own greedy
  continuations of benign prompts (ordinary text, on which the gate should stay closed).

Pairs outside the fit (``fitted`` False) are extracted too and returned as held-out blocks, so a
caller can measure where the gate opens on responses it never saw. Used by ``finesteer fit
--gate-tokens response`` and by the evaluation harness (:class:`finesteer.eval.EvalConfig`).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from . import extract

__all__ = ["GATE_TOKENS", "ResponseGateRows", "prompt_and_continuation_states", "response_gate_rows"]

#: What a gate is fitted on: the last prompt token (``"prompt"``) or every response token (``"response"``).
GATE_TOKENS = ("prompt", "response")


class ResponseGateRows:
    """The rows of a response-token gate: ``target`` [Nt, d], ``benign`` [Nb, d] (what
    :func:`finesteer.fit.fit_scs` is fitted on) and ``parts``, every named block of rows in order:
    ``rejected_response_tokens`` (= ``target``), then the blocks ``benign`` is made of
    (``chosen_response_tokens``, ``pair_prompt_last_tokens``, ``benign_prompt_last_tokens`` and,
    when given, ``benign_continuation_tokens``), then the held-out pairs'
    ``heldout_rejected_response_tokens`` and ``heldout_chosen_response_tokens``."""

    HELD_OUT = ("heldout_rejected_response_tokens", "heldout_chosen_response_tokens")

    def __init__(self, parts: Dict[str, torch.Tensor]):
        self.parts = parts
        self.target = parts["rejected_response_tokens"]
        self.benign = torch.cat([v for k, v in parts.items()
                                 if k != "rejected_response_tokens" and k not in self.HELD_OUT])

    def open_shares(self, gate) -> Dict[str, dict]:
        """Per block: ``{"rows": n, "open_share": share of rows whose score passes τ}`` (None when the
        block is empty)."""
        return {name: {"rows": int(v.shape[0]),
                       "open_share": float((gate.score(v) > gate.threshold).double().mean()) if v.shape[0] else None}
                for name, v in self.parts.items()}


def response_gate_rows(model, tokenizer, layer: int, prompts: Sequence[str], chosen: Sequence[str],
                       rejected: Sequence[str], query_states: torch.Tensor, benign_states: torch.Tensor,
                       fitted: Optional[torch.Tensor] = None, continuation_states: Optional[torch.Tensor] = None,
                       batch_size: int = 8, cache_file=None, progress: bool = True,
                       module_path: Optional[str] = None, prompt_format: Optional[str] = None) -> ResponseGateRows:
    """The rows of a gate on response tokens (module docstring) for the preference triples
    (``prompts``, ``chosen``, ``rejected``) at decoder block ``layer``.

    ``query_states`` [N, d]: each pair's last-prompt-token state (``response_deltas``' queries);
    ``benign_states`` [Nb, d]: the benign prompts' last-token states; ``fitted`` [N] bool: which pairs
    the gate is fitted on (default: all; pairs sharing a prompt should share a side); the others are
    returned as held-out blocks. ``continuation_states`` [Nc, d]: states at the tokens of the model's
    own continuations of benign prompts (:func:`prompt_and_continuation_states`), added to the benign
    side. The response tokens are extracted in one pass (:func:`finesteer.extract.response_token_states`,
    cached in ``cache_file``). Raises ``ValueError`` when no fitted pair has a rejected response of
    its own.
    """
    n = len(prompts)
    if len(chosen) != n or len(rejected) != n or query_states.shape[0] != n:
        raise ValueError(f"response_gate_rows: prompts, chosen, rejected and query_states must have one row per "
                         f"pair, got {n}, {len(chosen)}, {len(rejected)}, {query_states.shape[0]}")
    fitted = torch.ones(n, dtype=torch.bool) if fitted is None else fitted.bool()
    responses: Dict[tuple, tuple] = {}  # (prompt, response) → (side, "fit"/"held"); rejected first
    for side, texts in (("rejected", rejected), ("chosen", chosen)):
        for i, (p, r) in enumerate(zip(prompts, texts)):
            responses.setdefault((p, r), (side, "fit" if fitted[i] else "held"))
    keys = list(responses)
    states, lengths = extract.response_token_states(
        model, tokenizer, [p for p, _ in keys], [r for _, r in keys], [layer], batch_size=batch_size,
        cache_file=cache_file, progress=progress, module_path=module_path, prompt_format=prompt_format)
    blocks = torch.split(states[layer], lengths.tolist())
    d = benign_states.shape[1]

    def rows(side: str, part: str) -> torch.Tensor:
        picked = [b for k, b in zip(keys, blocks) if responses[k] == (side, part)]
        return torch.cat(picked) if picked else benign_states.new_zeros(0, d)

    first_of: Dict[str, int] = {}  # each fitted pair prompt's query row, once
    for i, p in enumerate(prompts):
        if fitted[i]:
            first_of.setdefault(p, i)
    parts = {"rejected_response_tokens": rows("rejected", "fit"), "chosen_response_tokens": rows("chosen", "fit"),
             "pair_prompt_last_tokens": query_states[list(first_of.values())].float(),
             "benign_prompt_last_tokens": benign_states.float()}
    if continuation_states is not None:
        parts["benign_continuation_tokens"] = continuation_states.float()
    parts["heldout_rejected_response_tokens"] = rows("rejected", "held")
    parts["heldout_chosen_response_tokens"] = rows("chosen", "held")
    if parts["rejected_response_tokens"].shape[0] == 0:
        raise ValueError("a gate on response tokens needs rejected responses: the fitted pairs have none of their "
                         "own (each is also a chosen response of its prompt)")
    return ResponseGateRows(parts)


def prompt_and_continuation_states(model, tokenizer, layer: int, prompt_ids: List[List[int]],
                                   continuations: List[List[int]], batch_size: int = 8, cache_file=None,
                                   progress: bool = True, module_path: Optional[str] = None) -> tuple:
    """``(prompt_rows [Np, d], continuation_rows [Nc, d])``: the states after block ``layer`` at every
    token of each prompt (token ids) and at every token of its continuation (token ids that follow
    it), one pass over prompt + continuation (:func:`finesteer.extract.span_token_states`)."""
    if len(continuations) != len(prompt_ids):
        raise ValueError(f"prompt_ids and continuations must have the same length, got {len(prompt_ids)}, "
                         f"{len(continuations)}")
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, continuations)]
    states, lengths = extract.span_token_states(model, tokenizer, seqs, [(0, len(ids)) for ids in seqs], [layer],
                                                batch_size=batch_size, cache_file=cache_file, progress=progress,
                                                module_path=module_path)
    blocks = torch.split(states[layer], lengths.tolist())
    d = states[layer].shape[1]
    empty = states[layer].new_zeros(0, d)
    return (torch.cat([b[:len(p)] for b, p in zip(blocks, prompt_ids)]) if seqs else empty,
            torch.cat([b[len(p):] for b, p in zip(blocks, prompt_ids)]) if seqs else empty)
