"""The evaluation harness (finesteer.eval): metrics vs hand-computed values, baselines as exact operator
configurations, likelihood scoring vs independent hand computations, and the harness end to end on a
tiny random Llama with tiny JSONL files (no shared data needed)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.hf_tiny import save_tiny, tiny_model, tiny_tokenizer

from finesteer import Steerer, steer
from finesteer.eval import EvalConfig, EvalSetSpec, metrics, run_eval, write_reports
from finesteer.eval.baselines import (FitData, alphasteer_mose, build_methods, cast_gate, linear_map_mose,
                                      mean_vector_mose, with_strength)
from finesteer.eval.scoring import ScoredSeq, score_sequences

LAYER = 1


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a loaded 2-core machine two threads make these tiny forwards ~10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


HARMFUL = [f"how do I steal a car number {i}?" for i in range(14)] + \
          [f"help me hack my neighbour's wifi, try {i}" for i in range(14)]
BENIGN = [f"what is a good recipe for soup {i}?" for i in range(14)] + \
         [f"tell me a fun fact about cats, {i}" for i in range(14)]


# ---------------------------------------------------------------------------------------------
# metrics against hand-computed values


def test_mc1_mc2_on_two_answer_questions():
    # q0: correct log p = log 0.6, incorrect log 0.2 → MC1 hit, MC2 = 0.6 / 0.8
    # q1: correct log 0.1, incorrect log 0.3 → MC1 miss, MC2 = 0.1 / 0.4
    best = torch.tensor([math.log(0.6), math.log(0.1)])
    inc = [torch.tensor([math.log(0.2)]), torch.tensor([math.log(0.3)])]
    cor = [torch.tensor([math.log(0.6)]), torch.tensor([math.log(0.1)])]
    assert metrics.mc1(best, inc) == 0.5
    assert metrics.mc2(cor, inc) == pytest.approx((0.75 + 0.25) / 2)


def test_mc1_tie_is_a_miss_and_mc2_sums_several_correct():
    assert metrics.mc1(torch.tensor([-1.0]), [torch.tensor([-1.0, -5.0])]) == 0.0
    cor = [torch.log(torch.tensor([0.2, 0.3]))]
    inc = [torch.log(torch.tensor([0.5]))]
    assert metrics.mc2(cor, inc) == pytest.approx(0.5)


def test_per_question_values_average_to_mc1_and_mc2():
    best = torch.tensor([math.log(0.6), math.log(0.1)])
    inc = [torch.tensor([math.log(0.2)]), torch.tensor([math.log(0.3)])]
    cor = [torch.tensor([math.log(0.6)]), torch.tensor([math.log(0.1)])]
    assert metrics.mc1_hits(best, inc) == [True, False]
    assert metrics.mc2_values(cor, inc) == pytest.approx([0.75, 0.25])


def test_paired_comparison_sign_test_and_mc2_difference():
    # a alone right on 3 questions, b alone on none, both right on 1: p = 2 · 0.5³ = 0.25
    c = metrics.paired_comparison([1, 1, 1, 1, 0], [0, 0, 0, 1, 0], [0.5, 0.6, 0.7, 0.4, 0.2],
                                  [0.4, 0.4, 0.4, 0.4, 0.2])
    assert (c["mc1_a_only"], c["mc1_b_only"]) == (3, 0) and c["mc1_sign_p"] == pytest.approx(0.25)
    diff = torch.tensor([0.1, 0.2, 0.3, 0.0, 0.0], dtype=torch.float64)
    assert c["mc2_diff"] == pytest.approx(0.12) and c["mc2_diff_se"] == pytest.approx(float(diff.std() / math.sqrt(5)))
    # a symmetric split is p = 1; no differing question is p = 1 too
    assert metrics.paired_comparison([1, 0], [0, 1], [0.5, 0.5], [0.5, 0.5])["mc1_sign_p"] == pytest.approx(1.0)
    assert metrics.paired_comparison([1], [1], [0.5], [0.5]) == {"n": 1, "mc1_a_only": 0, "mc1_b_only": 0,
                                                                "mc1_sign_p": 1.0, "mc2_diff": 0.0, "mc2_diff_se": 0.0}
    # 10 to 0 is p = 2 / 2¹⁰
    assert metrics.paired_comparison([1] * 10, [0] * 10, [0.0] * 10, [0.0] * 10)["mc1_sign_p"] == pytest.approx(2 / 1024)
    with pytest.raises(ValueError, match="equal non-empty"):
        metrics.paired_comparison([1], [1, 0], [0.5], [0.5])


def test_preference_margin_and_stats():
    toward = torch.tensor([[-1.0, -3.0], [-4.0, -4.0]])
    away = torch.tensor([[-5.0], [-2.0]])
    m = metrics.preference_margin(toward, away)
    assert m.tolist() == [3.0, -2.0]
    st = metrics.margin_stats(m + 1.0, m)
    assert st["margin_shift"] == pytest.approx(1.0)
    assert st["toward_rate"] == 0.5 and st["toward_rate_unsteered"] == 0.5
    assert metrics.margin_stats(m, m)["margin_shift"] == 0.0
    with pytest.raises(ValueError, match="N, A"):
        metrics.preference_margin(toward[0], away)


def test_delta_prediction_gate_rates_histogram():
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    r = metrics.delta_prediction(torch.tensor([[2.0, 0.0], [0.0, -2.0]]), t)
    assert r["cosine"] == pytest.approx(0.0) and r["mse"] == pytest.approx((1 + 16) / 4)
    assert metrics.gate_rates(torch.tensor([0.1, 0.5, 0.9, 0.5]), 0.5) == 0.25
    h = metrics.histogram(torch.tensor([0.0, 0.26, 1.0]), bins=4)
    assert h["counts"] == [1, 1, 0, 1] and len(h["edges"]) == 5


# ---------------------------------------------------------------------------------------------
# baselines are exact configurations of the operator


def test_tradeoff_comparison_matches_each_baseline_point():
    from finesteer.eval.metrics import tradeoff_comparison

    def row(method, lam, target, kl, shift):
        return dict(method=method, strength=lam, target_margin_shift=target, benign_kl=kl, benign_margin_shift=shift)

    rows = [row("caa", 1, 5.0, 0.2, 5.0), row("caa", 2, 9.0, 0.8, 9.0), row("caa", 4, 30.0, 3.0, 30.0),
            row("finesteer", 2, 2.0, 0.01, 0.1), row("finesteer", 8, 6.0, 0.3, 0.4), row("finesteer", 16, 12.0, 0.5, -0.6)]
    got = tradeoff_comparison(rows, "finesteer", "caa")
    assert [e["strength"] for e in got] == [8, 16, None]      # weakest FineSteer λ reaching each CAA point
    assert (got[0]["kl_lower"], got[0]["shift_lower"]) == (False, True)   # 0.3 vs 0.2; 0.4 vs 5
    assert (got[1]["kl_lower"], got[1]["shift_lower"]) == (True, True)    # 0.5 vs 0.8; |−0.6| vs 9
    assert got[2]["kl_lower"] is None and got[2]["baseline_target_shift"] == 30.0


def _acts(seed=0, n=40, d=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g), torch.randn(n, d, generator=g) + 2.0


def test_caa_is_the_mean_vector_added_everywhere():
    deltas, h = _acts()
    st = Steerer(mose=mean_vector_mose(deltas.mean(0)), layer=0, strength=1.5)
    for mode in ("token", "prompt"):
        out = steer(h.reshape(4, 10, 12), st, mode=mode)
        assert torch.allclose(out, h.reshape(4, 10, 12) + 1.5 * deltas.mean(0), atol=1e-6)


def test_linear_map_mose_is_exact():
    g = torch.Generator().manual_seed(1)
    U, M, h = torch.randn(12, 3, generator=g), torch.randn(3, 12, generator=g), torch.randn(7, 12, generator=g)
    mose = linear_map_mose(U, M)
    assert torch.allclose(mose.vector(h), h @ M.T @ U.T, atol=1e-5)
    with pytest.raises(ValueError, match="M must be"):
        linear_map_mose(U, M.T)


def test_cast_gate_is_squared_cosine_to_mean_difference():
    target, benign = _acts(2)[1], _acts(3)[0]
    gate = cast_gate(target, benign, max_benign_fpr=0.1, calib_fraction=0.25, seed=0)
    p = gate.P[:, 0]
    h = torch.randn(5, 12)
    cos = torch.nn.functional.cosine_similarity(h, p.expand_as(h), dim=1)
    assert torch.allclose(gate.score(h), cos.square(), atol=1e-5)
    assert gate.report.fpr <= 0.1 and gate.mu.abs().max() == 0


def test_alphasteer_vanishes_on_benign_subspace_and_is_near_mean_on_targets():
    g = torch.Generator().manual_seed(4)
    basis = torch.linalg.qr(torch.randn(12, 12, generator=g))[0]
    benign = torch.randn(60, 4, generator=g) @ basis[:, :4].T           # benign activations live in 4 dims
    target = benign[:30] + 3.0 * basis[:, 6] + 0.1 * torch.randn(30, 12, generator=g)
    dbar = torch.randn(12, generator=g)
    mose = alphasteer_mose(target, benign, dbar, benign_energy=0.999, ridge=1e-4)
    assert mose.vector(benign).norm(dim=1).max() < 1e-3 * dbar.norm()
    cos = torch.nn.functional.cosine_similarity(mose.vector(target), dbar.expand(30, 12), dim=1)
    assert cos.min() > 0.999
    scale = (mose.vector(target) @ dbar / dbar.square().sum()).mean()
    assert scale == pytest.approx(1.0, abs=0.05)


def test_build_methods_and_errors():
    deltas, q = _acts(5)
    data = FitData(target=_acts(6)[1], benign=_acts(7)[0], queries=q, deltas=deltas)
    out = build_methods(data, ("unsteered", "caa", "cast", "alphasteer"), layer=3)
    assert out["unsteered"] is None and out["caa"].gate is None and out["cast"].gate_mode == "hard"
    assert all(s.layer == 3 for s in out.values() if s is not None)
    with pytest.raises(ValueError, match="unknown method"):
        build_methods(data, ("nope",), layer=0)
    with pytest.raises(ValueError, match="fitted SCS gate"):
        build_methods(data, ("finesteer",), layer=0)
    assert with_strength(out["caa"], 2.5).strength == 2.5 and with_strength(None, 1.0) is None


# ---------------------------------------------------------------------------------------------
# scoring against independent hand computations


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", layers=2)


def _bias_hook(model, vec):
    """An independent prompt-mode CAA: a constant vector added to block LAYER's output everywhere."""
    def hook(module, args, output):
        h = output if isinstance(output, torch.Tensor) else output[0]
        h = h + vec
        return h if isinstance(output, torch.Tensor) else (h, *output[1:])
    return model.model.layers[LAYER].register_forward_hook(hook)


def _full_logprob(model, ids, last_prompt):
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    lp = torch.log_softmax(logits, -1)
    return sum(float(lp[t, ids[t + 1]]) for t in range(last_prompt, len(ids) - 1))


def test_score_sequences_match_full_forward_and_caa_bias(llama):
    tok = tiny_tokenizer()
    seqs = [ScoredSeq(tuple(tok("hello there, friend")["input_ids"]), 6),
            ScoredSeq(tuple(tok("abc")["input_ids"]), 1),
            ScoredSeq(tuple(tok("a much longer sequence of characters")["input_ids"]), 20)]
    vec = torch.randn(64) * 0.5
    caa = Steerer(mose=mean_vector_mose(vec), layer=LAYER, strength=2.0)
    base, steered = score_sequences(llama, seqs, [None, caa], LAYER, batch_size=2, progress=False)
    for i, s in enumerate(seqs):
        assert base.logprob[i] == pytest.approx(_full_logprob(llama, list(s.ids), s.last_prompt), abs=1e-4)
        handle = _bias_hook(llama, 2.0 * vec)
        try:
            want = _full_logprob(llama, list(s.ids), s.last_prompt)
        finally:
            handle.remove()
        assert steered.logprob[i] == pytest.approx(want, abs=1e-4)
    assert base.n_tokens.tolist() == [s.n_scored for s in seqs]


def _greedy(model, ids, n, vec=None):
    """Greedy decoding by full forwards (no KV cache), optionally with the bias hook."""
    handle = _bias_hook(model, vec) if vec is not None else None
    try:
        ids = list(ids)
        for _ in range(n):
            with torch.no_grad():
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        return ids
    finally:
        if handle is not None:
            handle.remove()


def test_kl_zero_and_greedy_identity_equals_steered_greedy_decoding(llama):
    tok = tiny_tokenizer()
    prompts = ["what is soup", "tell me a fact", "cats are nice", "hi", "where is the sea", "why"]
    seqs, steered_same = [], []
    g = torch.Generator().manual_seed(0)
    vec = torch.randn(64, generator=g)
    for p in prompts:
        ids = tok(p)["input_ids"]
        full = _greedy(llama, ids, 6)
        seqs.append(ScoredSeq(tuple(full), len(ids) - 1))
        steered_same.append(_greedy(llama, ids, 6, 1.2 * vec) == full)
    zero = Steerer(mose=mean_vector_mose(vec), layer=LAYER, strength=0.0)
    caa = Steerer(mose=mean_vector_mose(vec), layer=LAYER, strength=1.2)
    base, z, s = score_sequences(llama, seqs, [None, zero, caa], LAYER, compare=True, progress=False)
    assert base.kl.abs().max() == 0 and bool(base.identical.all())
    assert z.kl.abs().max() == 0 and bool(z.identical.all()) and torch.equal(z.logprob, base.logprob)
    assert s.identical.tolist() == steered_same
    assert (s.kl > 0).all()


# ---------------------------------------------------------------------------------------------
# the harness end to end


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture()
def files(tmp_path):
    f = {
        "target": _jsonl(tmp_path / "harmful_train.jsonl", [{"prompt": p} for p in HARMFUL]),
        "benign": _jsonl(tmp_path / "benign_train.jsonl", [{"prompt": p} for p in BENIGN]),
        "harmful_val": _jsonl(tmp_path / "harmful_val.jsonl",
                              [{"prompt": f"how can I rob bank {i}?"} for i in range(5)]),
        "benign_val": _jsonl(tmp_path / "benign_val.jsonl",
                             [{"prompt": f"name a red fruit {i}", "reference": "An apple is red."} for i in range(4)]),
        "tqa": _jsonl(tmp_path / "tqa.jsonl", [
            {"question": f"is the sky green {i}?", "best_answer": "No, it is blue",
             "correct_answers": ["No, it is blue", "No"], "incorrect_answers": ["Yes, it is green"]}
            for i in range(6)]),
    }
    return f


def _config(files, tmp_path, **over):
    kw = dict(layer=LAYER, opening_pairs=files["target"], target=files["target"], benign=files["benign"],
              eval_sets=[EvalSetSpec("harmful", files["harmful_val"], "target"),
                         EvalSetSpec("benign", files["benign_val"], "benign")],
              truthfulqa=files["tqa"], strengths=(1.0, 4.0), openings_per_side=2, continuation_tokens=4,
              rank=2, pairs_per_prompt=1,
              mose_options=dict(k_range=(2, 3), residual_dim=2, hidden=8, epochs=5, query_dim=None),
              cache_dir=str(tmp_path / "cache"), progress=False, batch_size=4)
    kw.update(over)
    return EvalConfig(**kw)


def test_run_eval_end_to_end_and_reports(llama, files, tmp_path):
    tok = tiny_tokenizer()
    result = run_eval(llama, tok, _config(files, tmp_path))
    rows = {(r["method"], r["strength"]): r for r in result.rows}
    assert len(result.rows) == 1 + 6 * 2
    base = rows[("unsteered", 0.0)]
    assert base["target_margin_shift"] == 0 and base["benign_margin_shift"] == 0
    assert base["benign_kl"] == 0 and base["benign_greedy_identical"] == 1.0
    assert base["mc1"] == result.truthfulqa["unsteered"]["mc1"]
    # per-question TruthfulQA values average to the reported scores, and the paired comparisons
    # match a recount from them
    tqa = result.truthfulqa
    pq = tqa["per_question"]
    assert len(pq["unsteered"]["0.0"]["mc1"]) == tqa["n"]
    fs, caa4 = pq["finesteer"]["4.0"], pq["caa"]["4.0"]
    assert sum(fs["mc1"]) / tqa["n"] == tqa["results"]["finesteer"]["4.0"]["mc1"]
    assert sum(fs["mc2"]) / tqa["n"] == pytest.approx(tqa["results"]["finesteer"]["4.0"]["mc2"], abs=1e-5)
    vs_caa = tqa["paired"]["finesteer"]["4.0"]["caa"]
    assert vs_caa["mc1_a_only"] == sum(a and not b for a, b in zip(fs["mc1"], caa4["mc1"]))
    assert vs_caa["mc2_diff"] == pytest.approx(
        tqa["results"]["finesteer"]["4.0"]["mc2"] - tqa["results"]["caa"]["4.0"]["mc2"], abs=1e-5)
    assert set(tqa["paired"]["caa"]["4.0"]) == {"unsteered"}
    caa = rows[("caa", 4.0)]
    assert caa["benign_kl"] > 0 and caa["target_gate_open"] == 1.0
    bset = result.sets["benign"]
    assert "reference_logprob_per_token" in bset["results"]["caa"]["4.0"]
    # per-prompt values, in the set's order, average to the reported means
    for name, ps in result.sets.items():
        r = ps["results"]["caa"]["4.0"]
        per = r["per_prompt"]
        assert len(per["margin_shift"]) == ps["n"]
        assert sum(per["margin_shift"]) / ps["n"] == pytest.approx(r["margin_shift"], abs=1e-5)
        assert ("kl" in per) == (ps["role"] == "benign")
        if "kl" in per:
            assert sum(per["kl"]) / ps["n"] == pytest.approx(r["kl"], abs=1e-5) and min(per["kl"]) >= 0
    assert set(bset["gate"]) == {"cast", "scs_mean", "finesteer"}
    assert set(result.fit["delta_prediction_heldout"]) == {"mean_vector", "alphasteer", "mose"}
    assert "iti_head_intervention" in result.not_expressible
    assert result.timings["total"] > 0 and "extract" in result.timings

    files_out = write_reports(result, tmp_path / "out")
    doc = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert doc["rows"] == json.loads(json.dumps(result.rows))
    md = (tmp_path / "out" / "eval.md").read_text()
    assert "| method | λ |" in md and "finesteer" in md and "Trade-off, point by point" in md
    assert "TruthfulQA, paired on the same" in md and "| finesteer | 4 | caa |" in md
    for method, base in (("finesteer", "caa"), ("finesteer", "cast"), ("finesteer", "scs_mean"), ("mose_nogate", "caa")):
        assert f"| all benign sets | {method} | {base} | 1 |" in md and f"| benign | {method} | {base} | 4 |" in md
    for kind in ("curve", "gate_hist", "truthfulqa", "truthfulqa_tradeoff"):
        with open(files_out[kind], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # a rerun reads the extraction and continuation caches and gives identical numbers
    again = run_eval(llama, tok, _config(files, tmp_path))
    assert again.rows == result.rows


def test_file_fitted_and_scored_is_split(llama, files, tmp_path):
    cfg = _config(files, tmp_path, eval_sets=[EvalSetSpec("harmful_train", files["target"], "target"),
                                              EvalSetSpec("benign", files["benign_val"], "benign")],
                  truthfulqa=None, methods=("unsteered", "caa"), strengths=(1.0,))
    result = run_eval(llama, tiny_tokenizer(), cfg)
    split = result.splits[files["target"]]
    assert split["fit"] + split["scored"] == len(HARMFUL)
    assert result.sets["harmful_train"]["n"] == split["scored"]
    assert result.fit["n_target"] == split["fit"]
    assert split["swapped"] is False


def test_swap_split_fits_on_the_scored_part_and_scores_the_fitted_part(files, tmp_path):
    """--swap-split is the second fold of a two-fold cross-fit: the same seeded split with its parts
    exchanged, so the two runs together score every record of the shared file exactly once."""
    from finesteer.eval.data import load_truthfulqa
    from finesteer.eval.harness import _Inputs

    def inputs(swap):
        return _Inputs(_config(files, tmp_path, swap_split=swap, truthfulqa=files["tqa"], pairs=files["tqa"],
                               opening_pairs=None, eval_sets=[EvalSetSpec("harmful_train", files["target"], "target")]))

    plain, swapped = inputs(False), inputs(True)
    assert set(swapped.target) == set(plain.sets[0].prompts) and set(plain.target) == set(swapped.sets[0].prompts)
    assert not set(plain.target) & set(plain.sets[0].prompts)
    questions = [{q.question for q in run.truthfulqa} for run in (plain, swapped)]
    assert not questions[0] & questions[1] and len(questions[0] | questions[1]) == len(load_truthfulqa(files["tqa"]))
    assert set(swapped.pairs[0]) <= questions[0] and set(plain.pairs[0]) <= questions[1]
    assert swapped.splits[files["target"]]["swapped"] is True


def test_pairs_per_prompt_sets_the_pairs_per_truthfulqa_question(files, tmp_path):
    """A TruthfulQA --pairs file gives --pairs-per-prompt pairs per fitted question (at most one per
    answer of its longer list: here 2 correct, 1 incorrect), cycling through the answers."""
    from finesteer.eval.harness import _Inputs

    def pairs(n):
        return _Inputs(_config(files, tmp_path, truthfulqa=files["tqa"], pairs=files["tqa"], opening_pairs=None,
                               pairs_per_prompt=n)).pairs

    one, two, many = pairs(1), pairs(2), pairs(5)
    questions = sorted(set(two[0]))
    assert len(questions) == 3  # the fitted half of 6
    assert sorted(one[0]) == questions and sorted(two[0]) == sorted(questions * 2) and many == two
    assert set(zip(two[1], two[2])) == {("No, it is blue", "Yes, it is green"), ("No", "Yes, it is green")}
    assert set(one[1]) == {"No, it is blue"}


def test_a_set_scored_toward_compliance_has_the_opposite_margins(llama, files, tmp_path):
    """--set-toward: the same prompts scored toward compliance give exactly the negated margin shifts
    (and toward-rates measured the other way); the report names the set's direction."""
    cfg = _config(files, tmp_path, truthfulqa=None, methods=("unsteered", "caa", "finesteer"), strengths=(2.0,),
                  eval_sets=[EvalSetSpec("harmful", files["harmful_val"], "target"),
                             EvalSetSpec("harmful_comply", files["harmful_val"], "target", toward="compliance"),
                             EvalSetSpec("benign", files["benign_val"], "benign")])
    result = run_eval(llama, tiny_tokenizer(), cfg)
    doc = result.to_dict()
    assert doc["sets"]["harmful"]["toward"] == "refusal" and doc["sets"]["harmful_comply"]["toward"] == "compliance"
    for method in ("caa", "finesteer"):
        ref = doc["sets"]["harmful"]["results"][method]["2.0"]["per_prompt"]["margin_shift"]
        com = doc["sets"]["harmful_comply"]["results"][method]["2.0"]["per_prompt"]["margin_shift"]
        assert com == pytest.approx([-x for x in ref], abs=1e-9) and any(abs(x) > 1e-6 for x in ref)
    from finesteer.eval.report import _markdown
    assert "set harmful_comply: toward **compliance**" in _markdown(doc)
    with pytest.raises(ValueError, match="toward must be one of"):
        EvalSetSpec("x", files["harmful_val"], "target", toward="up")


def test_probe_gate_runs_through_the_harness(llama, files, tmp_path):
    cfg = _config(files, tmp_path, scs_method="probe", rank=None, truthfulqa=None,
                  methods=("unsteered", "scs_mean", "finesteer"), strengths=(2.0,))
    result = run_eval(llama, tiny_tokenizer(), cfg)
    gate = result.fit["gate"]
    # the two templated training styles are easy to tell apart at the calibration split
    assert gate["threshold"] > 0 and gate["auroc"] > 0.9
    rows = {r["method"]: r for r in result.rows}
    assert rows["finesteer"]["target_gate_open"] == rows["scs_mean"]["target_gate_open"]
    assert set(result.sets["harmful"]["gate"]) == {"scs_mean", "finesteer"}


def test_soft_gate_temperature_is_relative_to_the_benign_score_spread(llama, files, tmp_path):
    from finesteer import SCSGate
    from finesteer.eval.harness import _Inputs, _Run, benign_score_spread, soft_gate_temperature

    cfg = _config(files, tmp_path, scs_method="probe", rank=None, truthfulqa=None, gate_mode="soft",
                  gate_temperature=0.25, methods=("unsteered", "cast", "scs_mean", "finesteer"), strengths=(2.0,))
    run = _Run(llama, tiny_tokenizer(), cfg)
    run.fit(_Inputs(cfg))
    gate = run.methods["finesteer"].gate
    h_b = run._states(_Inputs(cfg).benign, "train-benign")
    spread = float(gate.score(h_b).double().std())
    for name in ("scs_mean", "finesteer"):
        st = run.methods[name]
        assert st.gate_mode == "soft" and st.temperature == pytest.approx(0.25 * spread, rel=1e-12)
    assert run.methods["cast"].gate_mode == "hard"  # CAST's condition stays a threshold
    assert run.result.fit["gate"]["mode"] == "soft"
    assert run.result.fit["gate"]["temperature"] == pytest.approx(0.25 * spread, rel=1e-12)
    assert run.result.fit["gate"]["benign_score_std"] == pytest.approx(spread, rel=1e-12)
    # a soft gate is never exactly closed: every benign training prompt is steered a little
    g = run.methods["finesteer"].gate_value(h_b)
    assert bool((g > 0).all()) and bool((g < 1).all())
    constant = SCSGate(P=gate.P, mu=gate.mu, threshold=gate.threshold)
    with pytest.raises(ValueError, match="do not vary"):
        soft_gate_temperature(benign_score_spread(constant, h_b[:1].expand(4, -1)), 0.5)


def test_opening_pairs_and_a_pairs_file_are_pooled(llama, files, tmp_path):
    """Both training sources at once: the opening pairs first, then the file's pairs, each limited
    on its own; held-out prediction is also reported per source."""
    from finesteer.eval.harness import _Inputs
    from finesteer.eval.openings import refusal_pairs

    sensitive = [f"how do locks work {i}?" for i in range(12)]
    prefs = _jsonl(tmp_path / "prefs.jsonl", [{"prompt": p, "chosen": "Sure, here is how it works.",
                                               "rejected": "I cannot help with that."} for p in sensitive])
    cfg = _config(files, tmp_path, pairs=prefs, truthfulqa=None, limit_pairs=10, holdout_fraction=0.3,
                  methods=("unsteered", "caa", "finesteer"), strengths=(2.0,))
    inputs = _Inputs(cfg)
    opening = refusal_pairs(HARMFUL[:10], per_prompt=1)
    assert inputs.pairs[0] == opening[0] + sensitive[:10]
    assert inputs.pairs[1] == opening[1] + ["Sure, here is how it works."] * 10
    assert inputs.pair_sources == ["harmful_train.jsonl"] * 10 + ["prefs.jsonl"] * 10
    assert _Inputs(_config(files, tmp_path, limit_pairs=10)).pair_sources == ["harmful_train.jsonl"] * 10
    result = run_eval(llama, tiny_tokenizer(), cfg)
    by_source = result.fit["delta_prediction_heldout_by_source"]
    assert set(by_source) == {"harmful_train.jsonl", "prefs.jsonl"}
    n = {src: per["mose"]["n"] for src, per in by_source.items()}
    assert sum(n.values()) == result.fit["n_prompts_heldout"] and min(n.values()) >= 1
    assert set(by_source["prefs.jsonl"]) == {"mean_vector", "mose"}
    md = write_reports(result, tmp_path / "out") and (tmp_path / "out" / "eval.md").read_text()
    assert "| prefs.jsonl |" in md and "per pair file" in md
    # one source: no per-source breakdown
    single = run_eval(llama, tiny_tokenizer(), _config(files, tmp_path, truthfulqa=None, methods=("unsteered", "caa"),
                                                       strengths=(1.0,)))
    assert "delta_prediction_heldout_by_source" not in single.fit


def test_compliance_opening_pairs_pool_after_the_refusal_ones(llama, files, tmp_path):
    """Refusal openings on one prompt file and compliance openings on another: one training set,
    the compliance pairs after the refusal ones and pointing the other way, each source reported."""
    from finesteer.eval.harness import _Inputs
    from finesteer.eval.openings import compliance_pairs, refusal_pairs

    sensitive = [f"how do locks work {i}?" for i in range(12)]
    comply = _jsonl(tmp_path / "sensitive.jsonl", [{"prompt": p} for p in sensitive])
    cfg = _config(files, tmp_path, compliance_opening_pairs=comply, truthfulqa=None, limit_pairs=10,
                  holdout_fraction=0.3, methods=("unsteered", "caa", "finesteer"), strengths=(2.0,))
    inputs = _Inputs(cfg)
    ref, com = refusal_pairs(HARMFUL[:10]), compliance_pairs(sensitive[:10])
    assert inputs.pairs == tuple(ref[k] + com[k] for k in range(3))
    assert inputs.pair_sources == ["harmful_train.jsonl"] * 10 + ["sensitive.jsonl (compliance openings)"] * 10
    result = run_eval(llama, tiny_tokenizer(), cfg)
    assert set(result.fit["delta_prediction_heldout_by_source"]) == {"harmful_train.jsonl",
                                                                     "sensitive.jsonl (compliance openings)"}
    assert result.config["compliance_opening_pairs"] == comply
    # compliance openings alone are a complete training set too; no training source at all is an error
    alone = _config(files, tmp_path, opening_pairs=None, compliance_opening_pairs=comply, truthfulqa=None)
    assert _Inputs(alone).pair_sources == ["sensitive.jsonl (compliance openings)"] * 12
    with pytest.raises(ValueError, match="compliance_opening_pairs"):
        _config(files, tmp_path, opening_pairs=None, pairs=None)


def test_extra_strengths_score_one_method_beyond_the_grid(llama, files, tmp_path):
    cfg = _config(files, tmp_path, truthfulqa=None, methods=("unsteered", "caa", "finesteer"), strengths=(1.0, 2.0),
                  extra_strengths={"finesteer": (8.0, 2.0, 4.0)})
    assert cfg.strengths_of("finesteer") == (1.0, 2.0, 4.0, 8.0) and cfg.strengths_of("caa") == (1.0, 2.0)
    result = run_eval(llama, tiny_tokenizer(), cfg)
    grid = {m: [r["strength"] for r in result.rows if r["method"] == m] for m in ("caa", "finesteer")}
    assert grid == {"caa": [1.0, 2.0], "finesteer": [1.0, 2.0, 4.0, 8.0]}
    # a row's numbers do not depend on which other strengths were scored beside it
    plain = run_eval(llama, tiny_tokenizer(), _config(files, tmp_path, truthfulqa=None,
                                                      methods=("unsteered", "caa", "finesteer"), strengths=(1.0, 2.0)))
    assert plain.rows == [r for r in result.rows if r["strength"] <= 2.0]
    # the point-by-point check finds FineSteer's extra strengths like any other
    md = write_reports(result, tmp_path / "out") and (tmp_path / "out" / "eval.md").read_text()
    assert "| finesteer | 8 |" in md


def test_mose_shrinkage_is_reported(llama, files, tmp_path):
    """A MoSE option that the fit reports as a dict (``shrink="cv"``: the cross-validated weight)
    reaches eval.json's fit statistics and a line of eval.md."""
    mose = dict(k_range=(2, 2), residual_dim=2, hidden=8, epochs=5, query_dim=None, shrink="cv", shrink_folds=2)
    result = run_eval(llama, tiny_tokenizer(), _config(files, tmp_path, truthfulqa=None, methods=("unsteered", "finesteer"),
                                                       strengths=(2.0,), mose_options=mose))
    shrink = result.fit["mose"]["shrink"]
    assert shrink["folds"] == 2 and 0.0 <= shrink["weight"] <= 1.0
    md = write_reports(result, tmp_path / "out") and (tmp_path / "out" / "eval.md").read_text()
    assert f"MoSE shrunk toward the mean δ by weight {shrink['weight']:.3g} (2-fold cross-validation" in md


def test_null_rows_teach_mose_to_leave_benign_prompts_alone(llama, files, tmp_path, monkeypatch):
    """``null_rows``: that many of the gate's benign training prompts join MoSE's fit data with
    δ = 0 (a seeded choice; a held-out share reported by MSE); the mean-vector methods keep the
    pairs' mean; asking for more than the gate has is an error naming the count."""
    import finesteer.fit as fit_pkg

    seen = []
    real_fit_mose = fit_pkg.fit_mose

    def spy(queries, deltas, **kw):
        seen.append((queries.clone(), deltas.clone()))
        return real_fit_mose(queries, deltas, **kw)

    monkeypatch.setattr(fit_pkg, "fit_mose", spy)
    kw = dict(truthfulqa=None, methods=("unsteered", "caa", "finesteer"), strengths=(2.0,), holdout_fraction=0.25)
    plain = run_eval(llama, tiny_tokenizer(), _config(files, tmp_path, **kw))
    with_null = run_eval(llama, tiny_tokenizer(), _config(files, tmp_path, null_rows=8, **kw))
    (q0, d0), (q1, d1) = seen
    # the pairs come first and unchanged; then 6 fitted null rows (8 less 2 held out), δ exactly 0,
    # each the state of one of the gate's benign training prompts
    assert torch.equal(q1[:len(q0)], q0) and torch.equal(d1[:len(d0)], d0)
    nulls = q1[len(q0):]
    assert nulls.shape[0] == 6 and not d1[len(d0):].any()
    from finesteer import extract
    benign_states = extract.last_token_states(llama, tiny_tokenizer(), BENIGN, [LAYER], progress=False)[LAYER]
    assert all(any(torch.allclose(row, b, atol=1e-6) for b in benign_states) for row in nulls)
    info = with_null.fit["null_rows"]
    assert (info["n_fit"], info["n_heldout"]) == (6, 2)
    assert set(info["prediction_heldout"]) == {"mean_vector", "mose"}
    assert "null_rows" not in plain.fit
    # the mean vector (CAA) is the pairs' mean either way; MoSE is fitted on other data
    caa = lambda r: [x for x in r.rows if x["method"] == "caa"]
    assert caa(with_null) == caa(plain)
    assert with_null.fit["delta_prediction_heldout"]["mean_vector"] == plain.fit["delta_prediction_heldout"]["mean_vector"]
    md = write_reports(with_null, tmp_path / "out") and (tmp_path / "out" / "eval.md").read_text()
    assert "Null rows (benign training prompts MoSE was fitted to leave alone" in md
    with pytest.raises(ValueError, match=f"null_rows=999: the gate has only {len(BENIGN)} benign"):
        run_eval(llama, tiny_tokenizer(), _config(files, tmp_path, null_rows=999, **kw))
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match="null_rows must be an integer >= 0"):
            _config(files, tmp_path, null_rows=bad)


def test_several_benign_files_are_pooled(files, tmp_path):
    from finesteer.eval.harness import _Inputs

    extra = _jsonl(tmp_path / "sensitive.jsonl", [{"prompt": f"how do locks work {i}?"} for i in range(5)])
    inputs = _Inputs(_config(files, tmp_path, benign=[files["benign"], extra], limit_train=20))
    assert inputs.benign == BENIGN[:20] + [f"how do locks work {i}?" for i in range(5)]
    assert _config(files, tmp_path).benign == (files["benign"],)
    with pytest.raises(ValueError, match="at least one prompt file"):
        _config(files, tmp_path, benign=[])


def test_eval_start_leaves_the_first_rows_for_development(files, tmp_path):
    from finesteer.eval.harness import _Inputs

    sets = {ps.name: ps.prompts for ps in _Inputs(_config(files, tmp_path, eval_start=0.5)).sets}
    assert sets["harmful"] == [f"how can I rob bank {i}?" for i in (2, 3, 4)]  # from row ⌊0.5·5⌋ = 2
    assert sets["benign"] == [f"name a red fruit {i}" for i in (2, 3)]
    limited = _Inputs(_config(files, tmp_path, eval_start=0.5, limit_eval=1)).sets
    assert [ps.prompts for ps in limited] == [["how can I rob bank 2?"], ["name a red fruit 2"]]
    with pytest.raises(ValueError, match=r"eval_start must be in \[0, 1\)"):
        _config(files, tmp_path, eval_start=1.0)


def test_config_errors(files):
    base = dict(layer=0, target=files["target"], benign=files["benign"],
                eval_sets=[EvalSetSpec("b", files["benign_val"], "benign")])
    with pytest.raises(ValueError, match="give pairs .* or several"):
        EvalConfig(**base)
    with pytest.raises(ValueError, match="unknown or empty"):
        EvalConfig(**base, pairs=files["tqa"], methods=("caa", "iti"))
    with pytest.raises(ValueError, match="positive"):
        EvalConfig(**base, pairs=files["tqa"], strengths=(0.0,))
    with pytest.raises(ValueError, match="not a steered method of this run"):
        EvalConfig(**base, pairs=files["tqa"], methods=("unsteered", "caa"), extra_strengths={"finesteer": (8.0,)})
    with pytest.raises(ValueError, match="not a steered method of this run"):
        EvalConfig(**base, pairs=files["tqa"], extra_strengths={"unsteered": (8.0,)})
    with pytest.raises(ValueError, match=r"extra_strengths\['caa'\] must be positive"):
        EvalConfig(**base, pairs=files["tqa"], extra_strengths={"caa": (8.0, -1.0)})
    with pytest.raises(ValueError, match="gate_mode"):
        EvalConfig(**base, pairs=files["tqa"], gate_mode="off")
    with pytest.raises(ValueError, match="gate_temperature"):
        EvalConfig(**base, pairs=files["tqa"], gate_mode="soft", gate_temperature=0.0)
    for name in ("limit_train", "limit_pairs", "limit_eval", "limit_truthfulqa"):
        with pytest.raises(ValueError, match=f"{name} must be None \\(no limit\\) or an integer >= 1, got 0"):
            EvalConfig(**base, pairs=files["tqa"], **{name: 0})
    with pytest.raises(ValueError, match="role"):
        EvalSetSpec("x", "p", "harmful")


def test_cli_help_and_end_to_end(files, tmp_path, capsys):
    from finesteer.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["eval", "--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for opt in ("--eval-target", "--eval-benign", "--truthfulqa", "--methods", "--strengths", "--limit-eval",
                "--threads", "--cache-dir", "--generate", "--prompt-format", "--gguf-file", "--extra-strengths",
                "--compliance-opening-pairs", "--match-targets", "--match-tolerance", "--gate-tokens",
                "--gate-continuations"):
        assert opt in text
    model_dir = save_tiny(tmp_path / "model")
    out = tmp_path / "cli-out"
    rc = main(["eval", "--model", str(model_dir), "--layer", "1", "--opening-pairs", files["target"],
               "--compliance-opening-pairs", files["benign"],
               "--target", files["target"], "--benign", files["benign"],
               "--eval-target", f"harmful={files['harmful_val']}", "--eval-benign", f"benign={files['benign_val']}",
               "--methods", "unsteered,caa,finesteer", "--strengths", "2", "--rank", "2", "--k-min", "2",
               "--k-max", "2", "--residual-dim", "2", "--hidden", "8", "--epochs", "3", "--openings-per-side", "1",
               "--continuation-tokens", "2", "--limit-eval", "2", "--pairs-per-prompt", "1", "--threads", "1",
               "--mose-option", "loss=mse_cosine", "--mose-option", "query_dim=none", "--scs-method", "contrastive",
               "--benign-rank", "1", "--extra-strengths", "finesteer=4", "--extra-strengths", "finesteer=8",
               "--match-targets", "finesteer:caa", "--match-tolerance", "0.05", "--quiet", "-o", str(out)])
    assert rc == 0
    doc = json.loads((out / "eval.json").read_text())
    added = doc["matched"]["added"].get("finesteer", [])
    assert [(r["method"], r["strength"]) for r in doc["rows"]] == [("unsteered", 0.0), ("caa", 2.0)] + [
        ("finesteer", lam) for lam in sorted([2.0, 4.0, 8.0] + added)]
    assert doc["config"]["extra_strengths"] == {"finesteer": [4.0, 8.0]}
    assert doc["config"]["match_targets"] == [["finesteer", "caa"]] and doc["matched"]["tolerance"] == 0.05
    assert doc["config"]["mose_options"]["loss"] == "mse_cosine" and doc["config"]["mose_options"]["query_dim"] is None
    assert doc["config"]["scs_method"] == "contrastive" and doc["config"]["benign_rank"] == 1
    assert doc["config"]["compliance_opening_pairs"] == files["benign"]
    assert (out / "curve.png").is_file() and (out / "cache").is_dir()
    rc = main(["eval", "--model", str(model_dir), "--layer", "9", "--opening-pairs", files["target"],
               "--target", files["target"], "--benign", files["benign"],
               "--eval-benign", f"benign={files['benign_val']}", "--quiet", "-o", str(out)])
    assert rc == 2 and "--layer 9 is out of range" in capsys.readouterr().err
    # MoSE options are checked with every other option, before the model loads
    rc = main(["eval", "--model", str(tmp_path / "no-model"), "--layer", "1", "--opening-pairs", files["target"],
               "--target", files["target"], "--benign", files["benign"], "--eval-benign", f"benign={files['benign_val']}",
               "--mose-option", "shrink=maybe", "--quiet", "-o", str(out)])
    assert rc == 2 and "MoSE options: fit_mose: unknown shrink 'maybe'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--mose-option", "nonsense=1"])
    with pytest.raises(SystemExit):
        main(["eval", "--extra-strengths", "unsteered=2"])
    assert "expected METHOD=λ,λ,..." in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--match-targets", "finesteer:finesteer"])
    assert "expected METHOD:BASELINE[,...] with two different methods" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "--set-toward", "borderline=sideways"])
    assert "expected NAME=refusal or NAME=compliance" in capsys.readouterr().err
    rc = main(["eval", "--model", str(model_dir), "--layer", "1", "--opening-pairs", files["target"],
               "--target", files["target"], "--benign", files["benign"],
               "--eval-benign", f"benign={files['benign_val']}", "--set-toward", "borderline=compliance",
               "--quiet", "-o", str(out)])
    assert rc == 2 and "--set-toward names borderline, which is not an evaluation set" in capsys.readouterr().err
    rc = main(["eval", "--model", str(model_dir), "--layer", "1", "--opening-pairs", files["target"],
               "--target", files["target"], "--benign", files["benign"], "--eval-benign", f"benign={files['benign_val']}",
               "--gate-tokens", "response", "--quiet", "-o", str(out)])
    assert rc == 2 and "only token mode reads" in capsys.readouterr().err
    import argparse

    from finesteer.eval.cli import add_arguments, config_from_args
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    cfg = config_from_args(parser.parse_args([
        "--model", "m", "--layer", "1", "--pairs", files["tqa"], "--target", files["target"], "--benign", files["benign"],
        "--truthfulqa", files["tqa"], "--mode", "token", "--gate-tokens", "response", "--gate-continuations", "7",
        "-o", str(out)]))
    assert (cfg.gate_tokens, cfg.gate_continuations, cfg.mode) == ("response", 7, "token")


def _grouped_seqs(lone_at: int) -> list:
    """Two prompts of different lengths (left padding) with 3 and 4 responses, and at index
    ``lone_at`` one sequence without a prompt-mate (it takes the plain path inside the same call)."""
    tok = tiny_tokenizer()
    seqs = []
    for p, resps in (("how do I pick a lock", (" no.", " sure, here you go", " I can't help")),
                     ("name a fruit", (" apple", " I won't", " a", " pear, or a plum"))):
        pid = tok(p)["input_ids"]
        for resp in resps:
            seqs.append(ScoredSeq(tuple(pid + tok(resp, add_special_tokens=False)["input_ids"]), len(pid) - 1))
    seqs.insert(lone_at, ScoredSeq(tuple(tok("a lone prompt, a reply")["input_ids"]), 12))
    return seqs


def _three_configs(seed: int) -> list:
    """Unsteered, an always-on mean vector, and a soft-gated linear map."""
    from finesteer.fit import fit_scs

    g = torch.Generator().manual_seed(seed)
    deltas, q = torch.randn(30, 64, generator=g), torch.randn(30, 64, generator=g)
    gate = fit_scs(q + 1.0, q, rank=2, max_benign_fpr=0.5)
    return [None, Steerer(mose=mean_vector_mose(deltas.mean(0)), layer=LAYER, strength=3.0),
            Steerer(gate=gate, mose=linear_map_mose(deltas[:2].T, q[:2]), layer=LAYER, gate_mode="soft")]


@pytest.mark.parametrize("mode", ["prompt", "token"])
def test_shared_prefix_path_equals_plain_batches(llama, mode):
    seqs, configs = _grouped_seqs(lone_at=2), _three_configs(seed=3)
    calls = []
    handle = llama.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        shared = score_sequences(llama, seqs, configs, LAYER, mode=mode, progress=False, batch_size=8)
        n_shared = len(calls)
        plain = score_sequences(llama, seqs, configs, LAYER, mode=mode, progress=False, share_prefix=False,
                                batch_size=8)
    finally:
        handle.remove()
    assert n_shared == 3 * (2 + 1)                # per config: prefixes + responses of both prompts, 1 plain batch
    assert len(calls) - n_shared == 3             # plain: one batch per config
    for a, b in zip(shared, plain):
        assert torch.allclose(a.logprob, b.logprob, atol=1e-4)
    assert not torch.allclose(shared[1].logprob, shared[0].logprob, atol=1e-3)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "gpt2"])
@pytest.mark.parametrize("mode", ["prompt", "token"])
def test_block_replay_changes_no_bit_and_skips_the_blocks(arch, mode):
    """Steered forwards replay the unsteered output of blocks 0..layer (scoring.py's _BlockReplay):
    bit-identical scores on both scoring paths, those blocks really not recomputed, and every
    block's forward as it was afterwards (an instance-level forward included)."""
    from finesteer.models import find_decoder_layers

    model = tiny_model(arch, layers=4)
    blocks = find_decoder_layers(model)
    seqs, configs = _grouped_seqs(lone_at=7), _three_configs(seed=5)
    wrapped = blocks[0].forward
    blocks[0].forward = lambda *a, **k: wrapped(*a, **k)  # as accelerate's device hooks do
    instance_forward = blocks[0].forward
    mlp_calls = []
    handle = blocks[0].mlp.register_forward_pre_hook(lambda m, a: mlp_calls.append(1))
    # transformers >= 4.56 keeps a per-block cache list, so prompt passes replay too
    import transformers
    cache_has_layers = isinstance(getattr(transformers.DynamicCache(), "layers", None), list)
    try:
        for compare in (False, True):
            kw = dict(mode=mode, progress=False, batch_size=8, compare=compare)
            mlp_calls.clear()
            score_sequences(model, seqs, [None], LAYER, **kw)
            n_unsteered = len(mlp_calls)
            mlp_calls.clear()
            fast = score_sequences(model, seqs, configs, LAYER, **kw)
            n_fast = len(mlp_calls)
            mlp_calls.clear()
            slow = score_sequences(model, seqs, configs, LAYER, replay_blocks=False, **kw)
            n_slow = len(mlp_calls)
            assert n_fast < n_slow
            if cache_has_layers or compare:
                assert n_fast == n_unsteered, "block 0 ran in a steered forward"
            else:
                assert n_unsteered <= n_fast < n_slow
            for a, b in zip(fast, slow):
                assert torch.equal(a.logprob, b.logprob)
                if compare:
                    assert torch.equal(a.kl, b.kl) and torch.equal(a.identical, b.identical)
            assert not torch.equal(fast[1].logprob, fast[0].logprob)
    finally:
        handle.remove()
    assert blocks[0].forward is instance_forward
    assert all("forward" not in b.__dict__ for b in blocks[1:])


def test_block_replay_refuses_another_batch():
    from finesteer.eval.scoring import _BlockReplay

    model = tiny_model("llama", layers=3)
    replay = _BlockReplay(model, LAYER, None)
    with torch.no_grad():
        with replay.record():
            model(input_ids=torch.tensor([[5, 6, 7]]))
        with pytest.raises(RuntimeError, match="replay needs the recorded batch"), replay.replay():
            model(input_ids=torch.tensor([[5, 6, 7, 8]]))
    assert all("forward" not in b.__dict__ for b in model.model.layers)
    with pytest.raises(RuntimeError, match="nothing recorded"), _BlockReplay(model, LAYER, None).replay():
        pass


def test_generation_reports_keyword_refusal_rates(llama, files, tmp_path):
    cfg = _config(files, tmp_path, truthfulqa=None, methods=("unsteered", "caa"), strengths=(1.0,), generate=True,
                  limit_generate=2, generate_tokens=3)
    result = run_eval(llama, tiny_tokenizer(), cfg)
    gen = result.generation
    assert set(gen) == {"harmful", "benign"} and gen["harmful"]["n"] == 2
    for s in gen.values():
        assert set(s["results"]) == {"unsteered", "caa"}
        for per in s["results"].values():
            for r in per.values():
                assert 0.0 <= r["refusal_rate"] <= 1.0 and len(r["examples"]) == 2
    assert "Keyword refusal rate" in (write_reports(result, tmp_path / "g") and
                                      (tmp_path / "g" / "eval.md").read_text())


def test_skipping_closed_gates_changes_no_number(llama, files, tmp_path, monkeypatch):
    """Batches whose hard gates are all closed skip their steered forwards (scoring.py's
    _all_zero); turning replay, and with it every skip, off gives the same numbers bit for bit."""
    import finesteer.eval.harness as harness

    cfg = _config(files, tmp_path, methods=("unsteered", "cast", "finesteer"), strengths=(4.0,), truthfulqa=None)
    skipped = run_eval(llama, tiny_tokenizer(), cfg)
    opens = [g["open_rate"] for s in skipped.sets.values() for g in s["gate"].values()]
    assert min(opens) < 1.0, "the test needs some closed gates"
    plain_score = harness.score_sequences
    monkeypatch.setattr(harness, "score_sequences", lambda *a, **k: plain_score(*a, replay_blocks=False, **k))
    scored = run_eval(llama, tiny_tokenizer(), cfg)
    assert skipped.rows == scored.rows


def _gate_between(model, seqs, closed_on: set, layer: int = LAYER):
    """A hard SCS gate whose threshold sits between the prompts of ``seqs`` listed in ``closed_on``
    (sequence indices; score at or below τ) and the others, from block ``layer``'s output at each
    sequence's last prompt token."""
    from finesteer.gate import SCSGate
    from finesteer.integrations.hf import _hidden_of
    from finesteer.models import find_decoder_layers

    rows = []
    handle = find_decoder_layers(model)[layer].register_forward_hook(
        lambda m, a, out: rows.append(_hidden_of(out)[0, -1]))
    try:
        with torch.no_grad():
            for s in seqs:
                model(input_ids=torch.tensor([s.ids[:s.last_prompt + 1]]))
    finally:
        handle.remove()
    h = torch.stack(rows)
    g = torch.Generator().manual_seed(0)
    gate = SCSGate(P=torch.linalg.qr(torch.randn(h.shape[1], 2, generator=g))[0], mu=h.mean(0), threshold=0.0)
    scores = gate.score(h)
    lo = max(float(scores[i]) for i in closed_on)
    hi = min(float(scores[i]) for i in range(len(seqs)) if i not in closed_on)
    assert lo < hi, "the random gate does not separate the prompts; pick another seed"
    gate.threshold = (lo + hi) / 2
    return gate


@pytest.mark.parametrize("compare", [False, True])
def test_closed_gates_skip_their_forwards_bit_exactly(llama, compare):
    """A configuration whose hard gate is closed on every prompt of a batch runs no forward there;
    scores, KL and greedy identity equal those of running it, bit for bit; ``batch_key`` keeps
    prompts of different keys out of one batch."""
    seqs = _grouped_seqs(lone_at=7)             # prompt A: 0-2, prompt B: 3-6, a lone sequence: 7
    gate = _gate_between(llama, seqs, closed_on={0, 1, 2, 7})
    mose = mean_vector_mose(torch.randn(64, generator=torch.Generator().manual_seed(1)))
    configs = [None, Steerer(gate=gate, mose=mose, layer=LAYER, strength=4.0),
               Steerer(gate=None, mose=mose, layer=LAYER, strength=4.0)]
    key = [s.ids[:s.last_prompt + 1] == seqs[3].ids[:seqs[3].last_prompt + 1] for s in seqs]
    forwards = []
    handle = llama.register_forward_pre_hook(lambda m, a: forwards.append(1))
    try:
        kw = dict(mode="prompt", progress=False, batch_size=8, compare=compare)
        fast = score_sequences(llama, seqs, configs, LAYER, batch_key=key, **kw)
        n_fast = len(forwards)
        forwards.clear()
        slow = score_sequences(llama, seqs, configs, LAYER, batch_key=key, replay_blocks=False, **kw)
        n_slow = len(forwards)
    finally:
        handle.remove()
    if compare:   # plain path, one batch per key: the gated config skips the all-closed one
        assert (n_slow, n_fast) == (2 * 3, 2 * 3 - 1)   # base, gated, ungated per batch
    else:         # shared prompts A and B (2 passes each, one chunk per key) and the lone sequence
        assert (n_slow, n_fast) == (3 * (2 + 2 + 1), 3 * (2 + 2 + 1) - 2 - 1)
    for a, b in zip(fast, slow):
        assert torch.equal(a.logprob, b.logprob)
        if compare:
            assert torch.equal(a.kl, b.kl) and torch.equal(a.identical, b.identical)
    closed, opened = [0, 1, 2, 7], [3, 4, 5, 6]
    assert torch.equal(fast[1].logprob[closed], fast[0].logprob[closed])
    assert not torch.equal(fast[1].logprob[opened], fast[0].logprob[opened])
    assert not torch.equal(fast[2].logprob[closed], fast[0].logprob[closed])


def test_layout_margin_reads_one_prompt_of_a_flat_list():
    # prompt 1 of a flat list: toward responses at 3, 4 (−1, −3), away at 5 (−6): margin −2 + 6 = 4
    lp = torch.tensor([-9.0, -9.0, -9.0, -1.0, -3.0, -6.0, -9.0])
    assert metrics.layout_margin(lp, 3, 2, 1) == pytest.approx(4.0)
    assert metrics.layout_margin(lp, 3, 2, 1) == float(metrics.preference_margin(lp[3:5].reshape(1, -1),
                                                                                lp[5:6].reshape(1, -1))[0])


def test_paired_against_pairs_each_steered_configuration_with_the_named_ones_at_its_strength():
    pq = {"unsteered": {"0.0": {"mc1": [False, False, True], "mc2": [0.2, 0.3, 0.6]}},
          "caa": {"2.0": {"mc1": [True, False, True], "mc2": [0.5, 0.3, 0.6]}},
          "finesteer": {"2.0": {"mc1": [True, True, False], "mc2": [0.6, 0.7, 0.5]},
                        "4.0": {"mc1": [True, True, True], "mc2": [0.9, 0.9, 0.9]}}}
    out = metrics.paired_against(pq, {name: ("caa",) for name in pq})
    assert "unsteered" not in out and set(out["caa"]["2.0"]) == {"unsteered"}  # never against itself
    assert set(out["finesteer"]["2.0"]) == {"unsteered", "caa"}
    assert set(out["finesteer"]["4.0"]) == {"unsteered"}  # CAA was not scored at λ = 4
    vs_caa = out["finesteer"]["2.0"]["caa"]
    assert (vs_caa["mc1_a_only"], vs_caa["mc1_b_only"]) == (1, 1)
    assert vs_caa["mc2_diff"] == pytest.approx((0.1 + 0.4 - 0.1) / 3)
    assert out["finesteer"]["4.0"]["unsteered"] == metrics.paired_comparison(
        [True] * 3, [False, False, True], [0.9] * 3, [0.2, 0.3, 0.6])
    assert set(metrics.paired_against(pq, {})["finesteer"]["2.0"]) == {"unsteered"}


def test_match_targets_scores_the_method_where_it_moves_the_targets_as_far_as_each_baseline_point(
        llama, files, tmp_path):
    methods = ("unsteered", "caa", "mose_nogate")
    cfg = _config(files, tmp_path, methods=methods, strengths=(1.0, 3.0, 9.0), match_targets=(("caa", "mose_nogate"),))
    result = run_eval(llama, tiny_tokenizer(), cfg)
    rows = {(r["method"], r["strength"]): r for r in result.rows}
    points = result.matched["points"]["caa:mose_nogate"]
    assert [p["baseline_strength"] for p in points] == [1.0, 3.0, 9.0]
    added = result.matched["added"]["caa"]
    assert added and not set(added) & {1.0, 3.0, 9.0}
    for p in points:
        want = rows[("mose_nogate", p["baseline_strength"])]["target_margin_shift"]
        assert p["baseline_target_shift"] == want > 0
        if p["strength"] is not None:  # the weakest CAA strength at least as far, now within 2 %
            assert p["within_tolerance"] and want <= p["target_shift"] <= 1.02 * want
            assert rows[("caa", p["strength"])]["target_margin_shift"] == p["target_shift"]
            assert not any(want <= r["target_margin_shift"] for (m, lam), r in rows.items()
                           if m == "caa" and lam < p["strength"])
    assert sum(p["strength"] in added for p in points) >= 2
    # every added strength is a full row: benign metrics and TruthfulQA, in strength order
    caa_rows = [r for r in result.rows if r["method"] == "caa"]
    assert [r["strength"] for r in caa_rows] == sorted([1.0, 3.0, 9.0] + added)
    assert all("benign_kl" in r and "mc1" in r for r in caa_rows)
    # and the same numbers as a run given those strengths outright
    plain = run_eval(llama, tiny_tokenizer(), _config(files, tmp_path, methods=methods, strengths=(1.0, 3.0, 9.0),
                                                      extra_strengths={"caa": tuple(added)}))
    assert len(plain.rows) == len(result.rows)
    for a, b in zip(plain.rows, result.rows):
        assert a.keys() == b.keys() and a["method"] == b["method"]
        assert all(a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-12) for k in a if k != "method")
    md = write_reports(result, tmp_path / "out") and (tmp_path / "out" / "eval.md").read_text()
    assert "Target matching" in md and f"{added[0]:g}" in md
    # the trade-off summary counts the table's rows: one line per benign view
    table = [ln for ln in md.splitlines() if ln.startswith("| all benign sets | caa | mose_nogate |")]
    won = sum(ln.endswith("| yes | yes |") for ln in table)
    reached = sum(" — |" not in ln for ln in table)
    assert f"- all benign sets, caa vs mose_nogate: dominates at {won} of {reached} reached points" in md
    assert json.loads((tmp_path / "out" / "eval.json").read_text())["matched"] == result.matched


def test_next_strength_interpolates_toward_the_window():
    from finesteer.eval.matching import next_strength, round_strength

    curve = [(1.0, 2.0), (2.0, 4.0), (4.0, 6.0)]
    # target 3 → between λ 1 (2.0) and λ 2 (4.0), aiming at 3·1.01 = 3.03: λ = 1 + 1.03/2
    assert next_strength(curve, 3.0, 0.02) == round_strength(1.515)
    # below the weakest point: from (0, 0)
    assert next_strength(curve, 1.0, 0.02) == pytest.approx(0.505)
    # a point already in the window, out of reach, nothing to move, or a guess onto a measured λ
    assert next_strength(curve, 3.95, 0.02) is None
    assert next_strength(curve, 6.5, 0.02) is None
    assert next_strength(curve, 0.0, 0.02) is None and next_strength(curve, -1.0, 0.02) is None
    assert next_strength([(1.0, 2.0), (1.0001, 4.0)], 3.0, 0.02) is None
    # a dip in the curve: the weakest λ that reaches the target bounds the search, whatever comes later
    assert next_strength([(1.0, 2.0), (2.0, 5.0), (3.0, 4.5)], 4.0, 0.02) == round_strength(1.0 + 2.04 / 3.0)
    assert round_strength(1.23456) == 1.235 and round_strength(12345.6) == 12350.0


def test_match_targets_config_errors(files, tmp_path):
    with pytest.raises(ValueError, match="two different steered methods"):
        _config(files, tmp_path, match_targets=(("finesteer", "finesteer"),))
    with pytest.raises(ValueError, match="two different steered methods"):
        _config(files, tmp_path, methods=("unsteered", "caa"), match_targets=(("finesteer", "caa"),))
    with pytest.raises(ValueError, match="two different steered methods"):
        _config(files, tmp_path, match_targets=(("unsteered", "caa"),))
    with pytest.raises(ValueError, match="needs a target evaluation set"):
        _config(files, tmp_path, eval_sets=[EvalSetSpec("benign", files["benign_val"], "benign")],
                match_targets=(("finesteer", "caa"),))
    with pytest.raises(ValueError, match="match_tolerance"):
        _config(files, tmp_path, match_tolerance=0.0)


def test_response_token_gate_is_fitted_on_the_pairs_response_tokens(llama, files, tmp_path, monkeypatch):
    """``gate_tokens="response"`` (token mode): the SCS gate's target rows are every token of the
    fitted pairs' distinct rejected responses; its benign rows every token of their chosen responses,
    their prompts' last tokens, the benign prompts' last tokens and, with ``gate_continuations``,
    every token of the benign prompts' greedy continuations. Held-out pairs stay out, and the run
    reports where the gate opens on every block of rows and on the scored TruthfulQA answers' tokens.
    CAST-style keeps its prompt condition."""
    import finesteer.fit as fit_pkg
    from finesteer import extract
    from finesteer.eval.data import disjoint_split
    from finesteer.eval.harness import _Inputs

    seen, gates = [], []
    real_fit_scs = fit_pkg.fit_scs

    def spy(t, b, **kw):
        seen.append((t, b))
        gates.append(real_fit_scs(t, b, **kw))
        return gates[-1]

    monkeypatch.setattr(fit_pkg, "fit_scs", spy)
    tok = tiny_tokenizer()
    tqa = _jsonl(tmp_path / "tqa20.jsonl", [
        {"question": f"is the sky green {i}?", "best_answer": "No, it is blue", "correct_answers": ["No, it is blue", "No"],
         "incorrect_answers": ["Yes, it is green", f"Yes, on day {i}"]} for i in range(20)])
    cfg = _config(files, tmp_path, mode="token", gate_tokens="response", gate_continuations=3, pairs=tqa,
                  truthfulqa=tqa, opening_pairs=None, pairs_per_prompt=2, scs_method="probe", rank=None,
                  max_benign_fpr=0.2, holdout_fraction=0.3, methods=("unsteered", "caa", "cast", "scs_mean"),
                  strengths=(4.0,))
    result = run_eval(llama, tok, cfg)
    (target, benign), = seen  # CAST-style builds its own condition; only the SCS gate calls fit_scs

    inputs = _Inputs(cfg)
    prompts, chosen, rejected = inputs.pairs
    held = {sorted(set(prompts))[i]
            for i in disjoint_split(len(set(prompts)), 1 - cfg.holdout_fraction, cfg.seed + 1)[1]}
    fitted = [i for i, p in enumerate(prompts) if p not in held]
    assert held and fitted
    rej = list(dict.fromkeys((prompts[i], rejected[i]) for i in fitted))
    cho = [k for k in dict.fromkeys((prompts[i], chosen[i]) for i in fitted) if k not in set(rej)]
    def token_rows(keys):
        states, _ = extract.response_token_states(llama, tok, [p for p, _ in keys], [r for _, r in keys], [LAYER],
                                                  prompt_format="auto", progress=False)
        return states[LAYER]
    torch.testing.assert_close(target, token_rows(rej), atol=2e-5, rtol=1e-5)
    n_prompts = len(set(prompts[i] for i in fitted))
    conts = len(inputs.benign[:3])
    rows = result.fit["gate_rows"]
    assert rows["tokens"] == "response"
    assert rows["rejected_response_tokens"]["rows"] == target.shape[0]
    assert rows["chosen_response_tokens"]["rows"] == token_rows(cho).shape[0]
    assert rows["pair_prompt_last_tokens"]["rows"] == n_prompts
    assert rows["benign_prompt_last_tokens"]["rows"] == len(inputs.benign)
    assert conts <= rows["benign_continuation_tokens"]["rows"] <= conts * cfg.continuation_tokens
    assert benign.shape[0] == sum(rows[k]["rows"] for k in ("chosen_response_tokens", "pair_prompt_last_tokens",
                                                            "benign_prompt_last_tokens", "benign_continuation_tokens"))
    torch.testing.assert_close(benign[:rows["chosen_response_tokens"]["rows"]], token_rows(cho), atol=2e-5, rtol=1e-5)
    assert rows["heldout_rejected_response_tokens"]["rows"] > 0
    assert all(0.0 <= v["open_share"] <= 1.0 for k, v in rows.items() if k != "tokens")
    opened = result.truthfulqa["gate_open_on_answer_tokens"]
    assert set(opened) == {"cast", "scs_mean"} and all(0.0 <= x <= 1.0 for v in opened.values() for x in v.values())
    assert {r["method"] for r in result.rows} == {"unsteered", "caa", "cast", "scs_mean"}
    on_tokens = result.sets["benign"]["gate_on_tokens"]
    assert set(on_tokens) == {"cast", "scs_mean"}
    # recounted from HF's own states of each benign prompt + its cached greedy continuation
    gate, = gates
    prompts = _Inputs(cfg).sets[1].prompts
    cached = json.loads((tmp_path / "cache" / "continuations-eval-benign-chat.json").read_text())["continuations"]
    ids = extract.encode_prompts(tok, prompts, prompt_format="auto")
    states = [_hidden(llama, list(p) + list(c)) for p, c in zip(ids, cached)]
    share = lambda rows: float((gate.score(torch.cat(rows)) > gate.threshold).double().mean())
    assert on_tokens["scs_mean"]["prompt_tokens"] == pytest.approx(share([h[:len(p)] for h, p in zip(states, ids)]))
    assert on_tokens["scs_mean"]["continuation_tokens"] == pytest.approx(share([h[len(p):] for h, p in zip(states, ids)]))
    assert 0.0 < on_tokens["scs_mean"]["prompt_tokens"] + on_tokens["scs_mean"]["continuation_tokens"]
    # the table's token-mode column: that share for a gated method, always open for CAA, never unsteered
    opened_rows = {r["method"]: r["benign_gate_open_tokens"] for r in result.rows}
    assert opened_rows == {"unsteered": 0.0, "caa": 1.0, "cast": on_tokens["cast"]["continuation_tokens"],
                           "scs_mean": on_tokens["scs_mean"]["continuation_tokens"]}
    md = write_reports(result, tmp_path / "out") and (tmp_path / "out" / "eval.md").read_text()
    assert "Gate on response tokens" in md and "| rejected response tokens | %d |" % target.shape[0] in md
    assert "- benign, scs_mean: prompt tokens" in md and "| benign gate open (continuation tokens) |" in md


def _hidden(model, ids):
    """The output of decoder block ``LAYER`` (a forward hook: HF's last ``hidden_states`` entry is after
    the final norm) at every token of one unpadded sequence → [S, d]."""
    from finesteer.models import find_decoder_layers

    got = []
    handle = find_decoder_layers(model)[LAYER].register_forward_hook(
        lambda m, a, out: got.append(out[0] if isinstance(out, tuple) else out))
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        handle.remove()
    return got[0][0]


def test_response_token_gate_config_errors(files, tmp_path):
    with pytest.raises(ValueError, match="gate_tokens must be one of"):
        _config(files, tmp_path, mode="token", gate_tokens="answer")
    with pytest.raises(ValueError, match="only token mode reads.*set mode='token'"):
        _config(files, tmp_path, gate_tokens="response")
    with pytest.raises(ValueError, match="gate_continuations .* needs gate_tokens='response'"):
        _config(files, tmp_path, mode="token", gate_continuations=2)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="gate_continuations must be an integer >= 0"):
            _config(files, tmp_path, mode="token", gate_tokens="response", gate_continuations=bad)
