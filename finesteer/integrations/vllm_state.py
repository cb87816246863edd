"""Per-step steering tables for vLLM: what each token of the next forward uses, filled on the host.

vLLM compiles the model with ``fullgraph=True`` and replays CUDA graphs in which only the token
count varies, so the layer hooks may read only tensors allocated once and updated in place. This
module owns those tensors and fills them before every step from the runner's batch (see
:func:`finesteer.integrations.vllm._fill_from_runner`), outside any graph:

Token mode (bank ``k`` = the k-th steered layer, ascending)::

    token_index [n_banks, max_tokens] int32   bank entry of each token's request (−1 = none)

Prompt mode (``S = max_num_seqs``)::

    vectors[k]  [2·S, d] fp32   rows 0..S−1: one slot per running request that is steered;
                                rows S..2S−1: scratch (writes of unused selection rows land there)
    sel_pos     [S] int64       flattened token position of each last prompt token in this step
    sel_slot    [S] int64       the slot its vector is written to (scratch when unused)
    sel_index   [n_banks, S] int32   bank entry used for it (−1 = zero vector)
    slot        [max_tokens] int32   vector-cache row added to each token (−1 = none)

A step holds request r's last prompt token when ``computed < prompt_len ≤ computed + scheduled``
(not ``==``: after preemption the recompute covers prompt plus earlier outputs). The hook first
writes the selected vectors into their slots, then adds ``vectors[slot[t]]`` to every token, so
the last prompt token gets its own vector in the step that computes it.

Slots belong to requests, not to batch rows: a request keeps its slot (and its vector) across
steps, chunks and preemption, and frees it on a true finish only. When more requests hold slots
than there are rows (preempted requests waiting while new ones run), the vector of one that is
not in the current batch is parked in a side tensor and copied back when it runs again.
Everything is a device op enqueued before the forward: nothing synchronises with the host.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch


@dataclass(frozen=True)
class ScheduledRequest:
    """One request of a step, in batch order: its tokens are the next ``num_scheduled`` rows."""

    req_id: str
    num_computed: int     # tokens already computed before this step
    num_scheduled: int    # tokens computed in this step
    num_prompt: int       # prompt length
    choice: tuple         # bank entry per bank (−1 = unsteered at that layer)


class StepTables:
    """The persistent buffers described in the module docstring, and the host logic filling them.

    ``bank_sizes[k]``: steerers at the k-th steered layer. ``mode``: "token" or "prompt";
    ``prompt_positions``: "from_last" or "all" (prompt mode). ``max_tokens`` bounds the tokens of
    one step (vLLM's ``max_num_batched_tokens``); ``max_seqs`` the requests of one step.
    """

    def __init__(self, bank_sizes: Sequence[int], mode: str, prompt_positions: str, max_tokens: int,
                 max_seqs: int, hidden_size: int, device: torch.device):
        self.mode, self.prompt_positions = mode, prompt_positions
        self.num_banks, self.max_tokens, self.max_seqs = len(bank_sizes), int(max_tokens), int(max_seqs)
        self.device = torch.device(device)
        pin = self.device.type == "cuda"
        nb, T, S = self.num_banks, self.max_tokens, self.max_seqs

        def pair(shape, dtype):
            host = torch.empty(shape, dtype=dtype, pin_memory=pin)
            return host, torch.empty(shape, dtype=dtype, device=self.device)

        if mode == "token":
            self._host_token_index, self.token_index = pair((nb, T), torch.int32)
        else:
            self._host_slot, self.slot = pair((T,), torch.int32)
            self._host_sel_pos, self.sel_pos = pair((S,), torch.int64)
            self._host_sel_slot, self.sel_slot = pair((S,), torch.int64)
            self._host_sel_index, self.sel_index = pair((nb, S), torch.int32)
            self.vectors = [torch.zeros(2 * S, hidden_size, dtype=torch.float32, device=self.device)
                            for _ in range(nb)]
            self._scratch = np.arange(S, 2 * S, dtype=np.int64)
            self._slots: dict = {}          # req_id → slot row
            self._free = list(range(S - 1, -1, -1))
            self._parked: dict = {}         # req_id → [n_banks] vectors of a request without a slot
        self._clear_host()
        self._upload()

    # ------------------------------------------------------------------ filling
    def _clear_host(self) -> None:
        if self.mode == "token":
            self._host_token_index.fill_(-1)
        else:
            self._host_slot.fill_(-1)
            self._host_sel_pos.fill_(0)
            self._host_sel_slot.numpy()[:] = self._scratch
            self._host_sel_index.fill_(-1)

    def _upload(self) -> None:
        non_blocking = self.device.type == "cuda"
        if self.mode == "token":
            self.token_index.copy_(self._host_token_index, non_blocking=non_blocking)
        else:
            for dev, host in ((self.slot, self._host_slot), (self.sel_pos, self._host_sel_pos),
                              (self.sel_slot, self._host_sel_slot), (self.sel_index, self._host_sel_index)):
                dev.copy_(host, non_blocking=non_blocking)

    def reset(self) -> None:
        """Nothing steered and nothing written to a real slot: the state for vLLM's dummy runs
        (profiling, warm-up, graph capture), which skip the batch preparation."""
        self._clear_host()
        self._upload()

    def fill(self, batch: Sequence[ScheduledRequest]) -> None:
        """Fill the tables for one step from its requests in batch order (tokens concatenated)."""
        self._clear_host()
        total = sum(r.num_scheduled for r in batch)
        if total > self.max_tokens:
            raise RuntimeError(f"finesteer: a step of {total} tokens exceeds the {self.max_tokens} rows the steering "
                               f"tables were sized for (max_num_batched_tokens)")
        if self.mode == "token":
            self._fill_token(batch)
        else:
            self._fill_prompt(batch)
        self._upload()

    def _fill_token(self, batch) -> None:
        index = self._host_token_index.numpy()
        start = 0
        for r in batch:
            if any(c >= 0 for c in r.choice):
                index[:, start:start + r.num_scheduled] = np.asarray(r.choice, dtype=np.int32)[:, None]
            start += r.num_scheduled

    def _fill_prompt(self, batch) -> None:
        slot_np, pos_np = self._host_slot.numpy(), self._host_sel_pos.numpy()
        sel_slot_np, sel_index_np = self._host_sel_slot.numpy(), self._host_sel_index.numpy()
        in_batch = {r.req_id for r in batch}
        n_sel = start = 0
        for r in batch:
            n = r.num_scheduled
            if any(c >= 0 for c in r.choice):
                s = self._slot_for(r.req_id, in_batch)
                last = r.num_prompt - 1 - r.num_computed     # offset of the last prompt token in this chunk
                if 0 <= last < n:
                    pos_np[n_sel], sel_slot_np[n_sel] = start + last, s
                    sel_index_np[:, n_sel] = r.choice
                    n_sel += 1
                first = 0 if self.prompt_positions == "all" else max(last, 0)
                slot_np[start + first:start + n] = s
            start += n

    def _slot_for(self, req_id, in_batch) -> int:
        s = self._slots.get(req_id)
        if s is not None:
            return s
        if not self._free:
            # Every row is held; at most max_seqs requests run in one step, so some holder is not
            # in this batch (preempted or unscheduled): park its vectors and take its row.
            victim = next(rid for rid in self._slots if rid not in in_batch)
            row = self._slots.pop(victim)
            self._parked[victim] = [v[row].clone() for v in self.vectors]
            self._free.append(row)
        s = self._free.pop()
        self._slots[req_id] = s
        parked = self._parked.pop(req_id, None)
        if parked is not None:
            for v, saved in zip(self.vectors, parked):
                v[s].copy_(saved)
        return s

    def finish(self, req_ids: Iterable) -> None:
        """Requests that truly finished (or were aborted): free their slots and parked vectors."""
        if self.mode != "prompt":
            return
        for rid in req_ids:
            s = self._slots.pop(rid, None)
            if s is not None:
                self._free.append(s)
            self._parked.pop(rid, None)

    @property
    def slots_in_use(self) -> int:
        return len(self._slots) if self.mode == "prompt" else 0
