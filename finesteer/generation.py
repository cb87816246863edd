"""Batched generation from token ids: the loop the CLI, the demo and the evaluation share.

Prompts arrive as token-id lists (see :func:`finesteer.extract.encode_prompts`, which formats and
validates them), are left-padded per batch so every row's new tokens follow its prompt directly,
and come back as decoded strings of the new tokens only. Whatever is attached to the model
(:class:`~finesteer.FusedSteerer`) steers these calls like any other forward.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .extract import pad_batch
from .models import model_device

__all__ = ["batches", "generate_ids"]


def batches(n: int, batch_size: int) -> List[List[int]]:
    """Row indices ``0..n-1`` in consecutive chunks of at most ``batch_size``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


@torch.no_grad()
def generate_ids(model, tokenizer, seqs: Sequence[Sequence[int]], max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, seed: Optional[int] = None) -> List[str]:
    """Generate a continuation of every prompt in ``seqs`` (one batch) → decoded new text per row.

    ``seqs``: token-id lists, one per prompt, already formatted. Greedy unless ``do_sample``;
    ``seed`` seeds torch's generator first (so two runs of one batch sample alike). Special tokens
    are dropped from the decoded text.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    ids, mask, _, _ = pad_batch(seqs, tokenizer.pad_token_id, "left", model_device(model))
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=1,
                  pad_token_id=tokenizer.pad_token_id)
    if do_sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    S = ids.shape[1]
    return tokenizer.batch_decode(out[:, S:], skip_special_tokens=True)

