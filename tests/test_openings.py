"""The fixed refusal/compliance openings: training and scoring sets never share a string."""
from __future__ import annotations

import pytest

from finesteer.eval.openings import (SCORE_COMPLIANCES, SCORE_REFUSALS, TRAIN_COMPLIANCES, TRAIN_REFUSALS,
                                     compliance_pairs, refusal_pairs)


def _norm(s: str) -> str:
    return " ".join(s.lower().replace("’", "'").split())


def test_training_and_scoring_sets_are_disjoint():
    train = {_norm(s) for s in TRAIN_REFUSALS + TRAIN_COMPLIANCES}
    score = {_norm(s) for s in SCORE_REFUSALS + SCORE_COMPLIANCES}
    assert not train & score
    # not even a shared opening clause (up to the first punctuation mark)
    def first_clause(s):
        for ch in ",.!:;":
            s = s.split(ch)[0]
        return s.strip()
    assert not {first_clause(s) for s in train} & {first_clause(s) for s in score}
    for group in (TRAIN_REFUSALS, TRAIN_COMPLIANCES, SCORE_REFUSALS, SCORE_COMPLIANCES):
        assert len(set(map(_norm, group))) == len(group) >= 6


def test_refusal_pairs_rotate_through_the_training_openings():
    p, c, r = refusal_pairs(["a", "b", "c"], per_prompt=2)
    assert p == ["a", "a", "b", "b", "c", "c"]
    assert c == list(TRAIN_REFUSALS[:6]) and r == list(TRAIN_COMPLIANCES[:6])
    assert set(c) <= set(TRAIN_REFUSALS) and set(r) <= set(TRAIN_COMPLIANCES)
    with pytest.raises(ValueError, match="per_prompt"):
        refusal_pairs(["a"], per_prompt=0)


def test_compliance_pairs_are_the_refusal_pairs_the_other_way_round():
    p, c, r = compliance_pairs(["a", "b"], per_prompt=3, offset=1)
    rp, rc, rr = refusal_pairs(["a", "b"], per_prompt=3, offset=1)
    assert (p, c, r) == (rp, rr, rc)
    assert set(c) <= set(TRAIN_COMPLIANCES) and set(r) <= set(TRAIN_REFUSALS)
    with pytest.raises(ValueError, match="per_prompt"):
        compliance_pairs(["a"], per_prompt=0)
