"""benchmarks/quality/borderline_bound.py: the per-opened decomposition and the dominance boxes,
on hand-made eval.json sets (no model)."""
import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "borderline_bound.py"


@pytest.fixture(scope="module")
def bound():
    spec = importlib.util.spec_from_file_location("borderline_bound", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sets(p, f, fs, caa):
    """fs / caa: {λ: (target shift, borderline KL, borderline shift)}."""
    def res(d):
        return {str(k): {"margin_shift": t} for k, (t, _, _) in d.items()}

    def bres(d):
        return {str(k): {"margin_shift": s, "kl": kl} for k, (_, kl, s) in d.items()}

    return {"harmful": {"gate": {"finesteer": {"open_rate": p}}, "results": {"finesteer": res(fs), "caa": res(caa)}},
            "borderline": {"gate": {"finesteer": {"open_rate": f}},
                           "results": {"finesteer": bres(fs), "caa": bres(caa)}}}


def test_per_opened_divides_by_open_rates(bound):
    sets = _sets(0.5, 0.25, {2.0: (4.0, 0.5, 1.0)}, {1.0: (5.0, 0.3, 6.0)})
    p, a, f, k, b = bound.per_opened(sets, "finesteer", "harmful", "borderline")[2.0]
    assert (p, a, f, k, b) == (0.5, 8.0, 0.25, 2.0, 4.0)


def test_boxes_and_dominance(bound):
    # per opened prompt: target shift 8, borderline KL 2, borderline shift 4 at λ = 2
    sets = _sets(0.5, 0.25, {2.0: (4.0, 0.5, 1.0)}, {1.0: (6.0, 0.3, 6.0)})
    rows = bound.required_boxes(sets, "caa", "finesteer", "harmful", "borderline")
    (box,) = rows[0]["boxes"]
    assert box["min_tpr"] == pytest.approx(6.0 / 8.0, abs=1e-3)
    assert box["max_borderline_open"] == pytest.approx(min(0.3 / 2.0, 6.0 / 4.0), abs=1e-4)
    # the observed gate (0.5, 0.25) does not dominate; one with TPR 0.8, borderline open 0.1 does
    assert bound.dominated(rows, 0.5, 0.25) == []
    assert bound.dominated(rows, 0.8, 0.1) == [1.0]
    assert bound.dominated(rows, 0.8, 0.15) == []  # the bound on the open rate is strict


def test_unreachable_points_have_no_box(bound):
    sets = _sets(0.5, 0.25, {2.0: (4.0, 0.5, 1.0)}, {8.0: (20.0, 9.0, 20.0)})
    rows = bound.required_boxes(sets, "caa", "finesteer", "harmful", "borderline")
    assert rows[0]["boxes"] == []  # needs TPR 2.5 > 1
    assert bound.dominated(rows, 1.0, 0.0) == []
