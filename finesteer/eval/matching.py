"""Target matching: the strength at which a method moves the target sets as far as a baseline point.

The trade-off check (:func:`finesteer.eval.metrics.tradeoff_comparison`) compares a baseline point
with the weakest strength of the method that moves the target prompts at least as far. On a fixed λ
grid that strength can overshoot by a whole grid step (on gemma, FineSteer's λ = 1 moved the targets
+3.63 where CAST-style λ = 1.5 moved them +2.78), and the check then charges the method the benign
cost of a stronger steer than the comparison asks for. Matching scores the method at further
strengths, found by interpolating its own measured curve, until one moves the targets at least as
far as the baseline point and at most ``tolerance`` further. Every added strength is a measured
point of the same curve: no fit or setting changes, and the baseline's points are untouched.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

__all__ = ["next_strength", "round_strength", "weakest_reaching"]


def round_strength(lam: float) -> float:
    """``lam`` to 4 significant digits (the strengths matching adds stay readable in the tables)."""
    return float(f"{lam:.4g}")


def weakest_reaching(curve: Sequence[Tuple[float, float]], target: float) -> Optional[Tuple[float, float]]:
    """The (λ, shift) point of ``curve`` with the smallest λ whose shift is at least ``target``; None
    when no point reaches it."""
    return next((p for p in sorted(curve) if p[1] >= target), None)


def next_strength(curve: Sequence[Tuple[float, float]], target: float, tolerance: float) -> Optional[float]:
    """The next strength to score so that the method's target shift lands in
    ``[target, target·(1 + tolerance)]``, or None when there is nothing to do.

    ``curve``: the method's measured (λ, pooled target margin shift) points, any order. ``target``:
    the baseline point's target shift. None when ``target`` ≤ 0 (any strength that moves the targets
    at all matches), when no measured strength reaches ``target`` (the baseline is out of the method's
    reach; nothing between measured points would change that without a larger λ), when the weakest
    strength that reaches it already lies in the window, or when the next guess rounds
    (:func:`round_strength`) onto a measured strength.

    The guess interpolates linearly between the weakest strength ``hi`` that reaches ``target`` and
    the strongest measured strength below ``hi`` (or λ = 0, shift 0: unsteered); every measured
    strength below ``hi`` falls short of ``target`` by the choice of ``hi``. It aims at the middle of
    the window so that a curve bending either way between the two points still lands inside it often.
    """
    if not target > 0:
        return None
    points = sorted(curve)
    hi = weakest_reaching(points, target)
    if hi is None or hi[1] <= target * (1.0 + tolerance):
        return None
    lo = max((p for p in points if p[0] < hi[0]), default=(0.0, 0.0))
    aim = target * (1.0 + tolerance / 2.0)
    lam = round_strength(lo[0] + (aim - lo[1]) / (hi[1] - lo[1]) * (hi[0] - lo[0]))
    if lam <= lo[0] or lam >= hi[0] or any(lam == p[0] for p in points):
        return None
    return lam
