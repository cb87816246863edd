"""Prefill vs decode classification of a model call (``finesteer.integrations.hf.past_length``).

No transformers needed: the cache objects here are stand-ins with the duck type FusedSteerer
relies on (a callable ``get_seq_length``) or transformers 4.x's legacy tuple format.
"""
from __future__ import annotations

import pytest
import torch

from finesteer.integrations.hf import UnclassifiableCallError, past_length


class _Cache:
    """A KV cache stand-in: ``get_seq_length()`` returns whatever it was given."""

    def __init__(self, n):
        self.n = n

    def get_seq_length(self, layer_idx: int = 0):
        return self.n


IDS = torch.ones(2, 1, dtype=torch.long)


def test_no_cache_is_a_standalone_prefill():
    assert past_length({"input_ids": torch.ones(2, 7, dtype=torch.long)}, 7) == 0
    assert past_length({"input_ids": IDS, "use_cache": False, "cache": None, "past_key_values": None}, 1) == 0


def test_two_dimensional_mask_longer_than_the_new_tokens_is_a_decode():
    assert past_length({"input_ids": IDS, "attention_mask": torch.ones(2, 9, dtype=torch.long)}, 1) == 8
    assert past_length({"input_ids": torch.ones(2, 9), "attention_mask": torch.ones(2, 9)}, 9) == 0


@pytest.mark.parametrize("name", ["cache", "past_key_values", "kv_cache", "layer_past"])
def test_cache_is_found_under_any_keyword(name):
    assert past_length({"input_ids": IDS, name: _Cache(12)}, 1) == 12
    assert past_length({"input_ids": IDS, name: _Cache(0)}, 1) == 0


def test_mask_wins_over_the_cache_and_a_four_dimensional_mask_is_ignored():
    inputs = {"input_ids": IDS, "cache": _Cache(5), "attention_mask": torch.ones(2, 1, 1, 64)}
    assert past_length(inputs, 1) == 5  # a 4-D mask's last dim is the cache capacity, not past + new
    inputs["attention_mask"] = torch.ones(2, 6)
    assert past_length(inputs, 1) == 5


def test_legacy_tuple_cache_reports_its_key_length():
    kv = tuple((torch.zeros(2, 4, 11, 16), torch.zeros(2, 4, 11, 16)) for _ in range(3))
    assert past_length({"input_ids": IDS, "past_key_values": kv}, 1) == 11


def test_cpu_tensor_length_is_read_without_a_device_sync():
    assert past_length({"input_ids": IDS, "cache": _Cache(torch.tensor(4))}, 1) == 4
    assert past_length({"input_ids": IDS, "cache": _Cache(torch.tensor(0))}, 1) == 0


def test_accelerator_tensor_length_without_a_mask_raises_instead_of_guessing():
    # A "meta" tensor stands for a CUDA one: anything off the CPU would need a sync to read.
    with pytest.raises(UnclassifiableCallError, match=r"'cache' \(_Cache\).*meta tensor.*attention_mask"):
        past_length({"input_ids": IDS, "cache": _Cache(torch.tensor(4, device="meta"))}, 1)
    # ... but a 2-D mask settles it without reading the cache.
    inputs = {"input_ids": IDS, "cache": _Cache(torch.tensor(4, device="meta")), "attention_mask": torch.ones(2, 5)}
    assert past_length(inputs, 1) == 4


def test_cache_without_a_length_falls_back_to_a_cpu_cache_position():
    # transformers 4.x's HybridCache (Gemma2) returns None from get_seq_length().
    inputs = {"input_ids": IDS, "past_key_values": _Cache(None), "cache_position": torch.tensor([9])}
    assert past_length(inputs, 1) == 9
    inputs["cache_position"] = torch.arange(7)
    assert past_length(inputs, 7) == 0
    inputs["cache_position"] = torch.arange(7, device="meta")
    with pytest.raises(UnclassifiableCallError, match=r"reports its length as NoneType.*CPU cache_position"):
        past_length(inputs, 7)


def test_a_length_that_is_not_an_int_raises():
    with pytest.raises(UnclassifiableCallError, match="reports its length as str"):
        past_length({"input_ids": IDS, "cache": _Cache("7")}, 1)
