"""The training loop: AdamW, seeded mini-batches, early stopping on validation loss."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn


@dataclass
class TrainResult:
    """``best_epoch`` is 1-based (0: the starting weights, see ``keep_initial``); losses are
    whatever ``batch_loss``/``val_loss`` measure."""

    best_epoch: int
    best_val_loss: float
    train_loss_at_best: float
    epochs_run: int
    stopped_early: bool
    history: dict = field(default_factory=dict)


class EpochTrainer:
    """AdamW over ``net``'s parameters, one epoch per :meth:`run_epoch`.

    Each epoch shuffles ``range(n_train)`` with ``generator`` and, per mini-batch of ``batch_size``
    row indices ``idx`` (the last may be smaller), takes one AdamW step on
    ``batch_loss(idx) / loss_scale²`` (``loss_scale`` only rescales the optimised objective: raw δ
    can be large). :func:`train_early_stopping` and the cross-validated epoch choice of the MoSE
    fit both drive it, so an epoch means the same in both.
    """

    def __init__(self, net: nn.Module, batch_loss: Callable[[torch.Tensor], torch.Tensor], n_train: int, *,
                 lr: float, weight_decay: float, batch_size: int, generator: torch.Generator,
                 loss_scale: float = 1.0):
        self.net, self.batch_loss, self.n_train = net, batch_loss, n_train
        self.batch_size, self.generator = batch_size, generator
        # fused: one kernel per step over all parameters instead of ~10 elementwise passes each.
        self.opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
        self.inv = 1.0 / (loss_scale * loss_scale)

    def run_epoch(self) -> float:
        """One pass over the training rows; returns the row-weighted mean of the (unscaled) batch losses."""
        self.net.train()
        perm = torch.randperm(self.n_train, generator=self.generator)
        total = 0.0
        for start in range(0, self.n_train, self.batch_size):
            idx = perm[start:start + self.batch_size]
            loss = self.batch_loss(idx)
            self.opt.zero_grad(set_to_none=True)
            (loss * self.inv).backward()
            self.opt.step()
            total += float(loss.detach()) * idx.numel()
        self.net.eval()
        return total / self.n_train


def train_early_stopping(net: nn.Module, batch_loss: Callable[[torch.Tensor], torch.Tensor],
                         val_loss: Callable[[], float], n_train: int, *, epochs: int, lr: float,
                         weight_decay: float, batch_size: int, patience: int, generator: torch.Generator,
                         loss_scale: float = 1.0, progress: bool = True, desc: str = "fit",
                         keep_initial: bool = False) -> TrainResult:
    """Minimise ``batch_loss`` over ``net``'s parameters with AdamW; keep the best-validation weights.

    Semantics: each epoch is one :meth:`EpochTrainer.run_epoch`; then ``val_loss()`` is evaluated
    (no grad, eval mode). Stops after ``epochs`` epochs or after ``patience`` epochs without a
    strictly lower validation loss, then loads the weights of the best epoch into ``net``.
    ``history`` ({"train_loss", "val_loss"}, one entry per epoch; train = row-weighted mean of the
    batch losses) is unscaled. With ``keep_initial`` the starting weights are scored first
    (epoch 0) and kept if no epoch beats them (``best_epoch`` 0, ``train_loss_at_best`` the starting
    weights' loss); the patience counts from epoch 0 then. Raises ``RuntimeError`` if a loss
    becomes NaN/Inf.
    """
    from tqdm.auto import tqdm

    trainer = EpochTrainer(net, batch_loss, n_train, lr=lr, weight_decay=weight_decay, batch_size=batch_size,
                           generator=generator, loss_scale=loss_scale)
    best = dict(epoch=0, val=math.inf, train=math.inf, state=None)
    history = {"train_loss": [], "val_loss": []}
    stopped_early = False
    if keep_initial:
        net.eval()
        with torch.no_grad():
            val0 = float(val_loss())
            train0 = float(batch_loss(torch.arange(n_train)))
        if math.isfinite(val0):
            best.update(epoch=0, val=val0, train=train0,
                        state=_snapshot(net))
    bar = tqdm(range(1, epochs + 1), desc=desc, unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        train = trainer.run_epoch()
        with torch.no_grad():
            val = float(val_loss())
        check_finite(epoch, desc, train_loss=train, val_loss=val)
        history["train_loss"].append(train)
        history["val_loss"].append(val)
        if val < best["val"]:
            best.update(epoch=epoch, val=val, train=train,
                        state=_snapshot(net))
        elif epoch - best["epoch"] >= patience:
            stopped_early = True
            break
        bar.set_postfix(train=f"{train:.4g}", val=f"{val:.4g}", best_epoch=best["epoch"])
    bar.close()
    net.load_state_dict(best["state"])
    return TrainResult(best_epoch=best["epoch"], best_val_loss=best["val"], train_loss_at_best=best["train"],
                       epochs_run=len(history["val_loss"]), stopped_early=stopped_early, history=history)


def check_finite(epoch: int, desc: str, **losses: float) -> None:
    """``RuntimeError`` naming the epoch and ``losses`` (e.g. ``train_loss=…, val_loss=…``) when any
    of them is NaN/Inf."""
    if not all(math.isfinite(v) for v in losses.values()):
        shown = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in losses.items())
        raise RuntimeError(f"{desc}: training diverged at epoch {epoch} ({shown}); lower lr")


def _snapshot(net: nn.Module) -> dict:
    """A detached copy of ``net``'s state (the weights early stopping may return to)."""
    return {k: v.detach().clone() for k, v in net.state_dict().items()}
