"""The quality study scripts' own logic, on hand-made inputs (no model): borderline_bound.py (the
per-opened decomposition and the dominance boxes), mose_splits.py (re-splitting pairs by prompt),
fit_stability.py (seed spread and input perturbation of one split's fits),
gate_shape.py (re-gating per-prompt CAA curves), margin_transfer.py (its vectors, split and scored
sequences), truthfulqa_crossfit.py (pooling two cross-fit folds), null_rows_routing.py (the kept
push), budget_ladder.py (re-gating at a tighter τ, the choice rules, the report, a run against
another run's baselines), truthfulqa_nested.py (each fold's training half, pooling, the layer rule),
truthfulqa_oracle.py (the oracle map through the operator, graded targets, pooling),
truthfulqa_token_gate.py (answer-token states, the gate's rows, pooling) and bench_quality.py's task options."""
import argparse
import importlib.util
import json
from pathlib import Path

import pytest

import torch

_DIR = Path(__file__).resolve().parents[1] / "benchmarks" / "quality"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, _DIR / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bound():
    return _load("borderline_bound")


@pytest.fixture(scope="module")
def splits():
    return _load("mose_splits")


@pytest.fixture(scope="module")
def shape():
    return _load("gate_shape")


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


def test_mose_splits_holds_out_whole_prompts(splits, tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    prompts = torch.randn(40, 32, generator=g)
    q = prompts.repeat_interleave(3, dim=0)  # 3 pairs per prompt
    d = torch.randn(120, 32, generator=g) + 2.0
    path = tmp_path / "train-pairs-plain-layer3.safetensors"
    save_file({"queries_3": q, "deltas_3": d}, str(path))
    q2, d2 = splits.load_pairs(str(path))
    assert torch.equal(q2, q) and torch.equal(d2, d)
    uniq, prompt_of = torch.unique(q, dim=0, return_inverse=True)
    row = splits.one_split(q, d, prompt_of, len(uniq), seed=1, holdout=0.2)
    assert row["n_prompts_heldout"] == 8  # 20 % of 40 prompts, each prompt's 3 pairs merged
    for name in ("mean_vector", "mose"):
        assert set(row[name]) == {"cosine", "mse", "n"} and row[name]["n"] == 8
    assert row["n_fit_pairs"] == 96
    # fitted on the first pair of each training prompt only; the held-out prompts keep all three
    one = splits.one_split(q, d, prompt_of, len(uniq), seed=1, holdout=0.2, fit_pairs_per_prompt=1)
    assert one["n_fit_pairs"] == 32 and one["n_prompts_heldout"] == 8
    assert one["mean_vector"]["n"] == 8 and one["mean_vector"] != row["mean_vector"]
    assert splits.rank_within_prompt(torch.tensor([2, 0, 2, 2, 0])).tolist() == [0, 0, 1, 2, 1]


def test_mose_splits_scores_named_variants_on_every_split(splits, tmp_path):
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    q = torch.randn(60, 32, generator=g)
    d = q @ torch.randn(32, 32, generator=g) + 2.0
    path = tmp_path / "train-pairs-plain-layer3.safetensors"
    save_file({"queries_3": q, "deltas_3": d}, str(path))
    out = tmp_path / "splits.json"
    assert splits.main(["--pairs-cache", str(path), "--splits", "2", "--variant", "ridge:init=ridge,hidden=32",
                        "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["variants"] == {"ridge": {"init": "ridge", "hidden": "32"}}
    assert {"ridge_cosine_mean", "ridge_cosine_higher", "ridge_mse_lower"} <= set(result["summary"])
    assert all(set(r) >= {"mean_vector", "mose", "ridge"} for r in result["splits"])
    assert splits.parse_variant("q:cluster_on=query,k_range=2,4,residual_dim=1") == (
        "q", {"cluster_on": "query", "k_range": (2, 4), "residual_dim": 1})
    for bad in ("ridge", "mose:init=ridge", "x:no_such_option=1"):
        with pytest.raises(argparse.ArgumentTypeError):
            splits.parse_variant(bad)


def test_fit_stability_reports_seed_spread_on_the_mose_splits_split(splits, tmp_path):
    from safetensors.torch import save_file

    stab = _load("fit_stability")
    g = torch.Generator().manual_seed(0)
    prompts = torch.randn(50, 32, generator=g)
    q = prompts.repeat_interleave(2, dim=0)
    d = q @ torch.randn(32, 32, generator=g) / 6 + 2.0 + torch.randn(100, 32, generator=g)
    path = tmp_path / "train-pairs-plain-layer3.safetensors"
    save_file({"queries_3": q, "deltas_3": d}, str(path))
    held = stab.split_by_prompt(q, 0.2, 1000)
    uniq, prompt_of = torch.unique(q, dim=0, return_inverse=True)
    row = splits.one_split(q, d, prompt_of, len(uniq), seed=1000, holdout=0.2)
    assert int(held.sum()) == 2 * row["n_prompts_heldout"] == 20  # the same prompts mose_splits holds out
    out = tmp_path / "stability.json"
    assert stab.main(["--pairs-cache", str(path), "--seeds", "3", "--variant", "cv:stopping=cv,hidden=32",
                      "-o", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["variants"] == {"cv": {"stopping": "cv", "hidden": "32"}} and result["seeds"] == 3
    for name in ("mose", "cv"):
        r = result["results"][name]
        assert len(r["best_epochs"]) == 3 and r["seed_spread"] >= 0.0 and r["perturbation_change"] >= 0.0
        assert -1.0 <= r["cosine_mean"] <= 1.0 and r["mse_mean"] > 0.0
    # seeds move the fit (split, clustering, start, batches): the spread is not zero
    assert result["results"]["mose"]["seed_spread"] > 0.0
    with pytest.raises(SystemExit):
        stab.main(["--pairs-cache", str(path), "--seeds", "1"])
    for bad in ("0,5", "1,x", ""):
        with pytest.raises(SystemExit):
            stab.main(["--pairs-cache", str(path), "--trace-epochs", bad])


def test_fit_stability_epoch_trace_separates_clustering_from_training(tmp_path):
    stab = _load("fit_stability")
    g = torch.Generator().manual_seed(1)
    prompts = torch.randn(40, 16, generator=g)
    q = prompts.repeat_interleave(2, dim=0)
    d = q @ torch.randn(16, 16, generator=g) / 4 + 1.0 + torch.randn(80, 16, generator=g)
    held = stab.split_by_prompt(q, 0.2, 1000)
    rows = stab.epoch_trace(q, d, held, {"hidden": 16, "k_range": (2, 3)}, [1, 3])
    assert [r["epochs"] for r in rows] == [1, 3]
    for r in rows:
        assert r["best_epoch"] <= r["epochs"] and r["best_epoch_perturbed"] <= r["epochs"]
        assert r["change"] >= 0.0 and sum(r["cluster_sizes"]) == sum(r["cluster_sizes_perturbed"])
    # here K-means ends in the same clusters on both inputs, and one epoch keeps the change below 1 %
    assert rows[0]["cluster_sizes"] == rows[0]["cluster_sizes_perturbed"] and rows[0]["change"] < 1e-2
    v = torch.randn(5, 4, generator=g)
    assert stab.relative_change(v, v) == 0.0
    assert abs(stab.relative_change(2 * v, v) - 1.0) < 1e-6


def test_mose_splits_rejects_a_cache_without_one_layer(splits, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "x.safetensors"
    save_file({"deltas_3": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ValueError, match="expected one queries_<layer>"):
        splits.load_pairs(str(path))


def _per_prompt_sets():
    """Two prompts per set; CAA per-prompt curves at λ = 1, 2 (KL on the benign set only)."""
    def res(shifts, kls=None):
        out = {}
        for k, lam in enumerate(("1.0", "2.0")):
            pp = {"margin_shift": [row[k] for row in shifts]}
            r = {"margin_shift": sum(pp["margin_shift"]) / len(shifts)}
            if kls is not None:
                pp["kl"] = [row[k] for row in kls]
                r["kl"] = sum(pp["kl"]) / len(kls)
            out[lam] = {**r, "per_prompt": pp}
        return out

    return {"harmful": {"role": "target", "results": {"caa": res([[2.0, 4.0], [1.0, 3.0]])}},
            "borderline": {"role": "benign", "results": {"caa": res([[1.0, 2.0], [3.0, 5.0]],
                                                                    [[0.1, 0.4], [0.2, 1.0]])}}}


def test_gate_shape_reads_each_prompt_at_its_own_strength(shape):
    sets = _per_prompt_sets()
    lams, vals = shape.curves(sets["harmful"]["results"]["caa"], "margin_shift")
    assert lams.tolist() == [0.0, 1.0, 2.0] and vals[0].tolist() == [0.0, 0.0]
    # prompt 0 at 1.5 (between its 2 and 4), prompt 1 at 0.5 (between 0 and its 1), and beyond the grid
    got = shape.read_at(lams, vals, torch.tensor([1.5, 0.5], dtype=torch.float64))
    assert got.tolist() == [3.0, 0.5]
    assert shape.read_at(lams, vals, torch.tensor([3.0, 3.0], dtype=torch.float64)).tolist() == [6.0, 5.0]
    # a hard gate that opens on prompt 0 of each set: set means are half of that prompt's values
    gate = {"harmful": torch.tensor([1.0, 0.0], dtype=torch.float64),
            "borderline": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    rows = shape.simulate(sets, gate, [2.0], ["borderline"])
    assert rows == [{"method": "sim", "strength": 2.0, "target_margin_shift": 2.0, "benign_kl": 0.2,
                     "benign_margin_shift": 1.0}]


def test_gate_shape_dominance_uses_the_report_rule(shape):
    sets = _per_prompt_sets()
    base = shape.pooled_rows(sets, "caa", ["borderline"], points=(1.0, 2.0))
    assert [r["target_margin_shift"] for r in base] == [1.5, 3.5]
    # gate open on harmful prompt 0 only: at λ = 2 it moves the target set 2.0 ≥ CAA λ = 1's 1.5, with
    # borderline KL 0 < 0.15 and shift 0 < 2; nothing it reaches matches CAA λ = 2 (3.5)
    gate = {"harmful": torch.tensor([1.0, 0.0], dtype=torch.float64),
            "borderline": torch.tensor([0.0, 0.0], dtype=torch.float64)}
    rows = shape.simulate(sets, gate, [1.0, 2.0], ["borderline"])
    assert shape.dominated(rows, base) == [1.0]


def test_dev_tradeoff_lists_dominated_and_unreached_caa_points():
    tradeoff = _load("dev_tradeoff")
    sets = _per_prompt_sets()
    # FineSteer as a hard gate open on harmful prompt 0 only (borderline closed): its results are
    # CAA's for that prompt, halved over the set, and zero on the borderline set
    caa = sets["harmful"]["results"]["caa"]
    sets["harmful"]["results"]["finesteer"] = {
        lam: {"margin_shift": r["per_prompt"]["margin_shift"][0] / 2} for lam, r in caa.items()}
    sets["borderline"]["results"]["finesteer"] = {lam: {"margin_shift": 0.0, "kl": 0.0} for lam in caa}
    got = tradeoff.summarise({"sets": sets}, grid=(1.0, 2.0))
    # targets: FineSteer 1.0 / 2.0, CAA 1.5 / 3.5 → CAA λ = 1 matched by FineSteer λ = 2, CAA λ = 2 never
    assert got == {"pooled benign": {"dominated": [1.0], "unreached": [2.0], "compared": 2},
                   "borderline": {"dominated": [1.0], "unreached": [2.0], "compared": 2}}


def _bench_quality():
    spec = importlib.util.spec_from_file_location("bench_quality", _DIR.parent / "bench_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_quality_limits_are_the_tasks_own_unless_given():
    import argparse

    bench = _bench_quality()

    def task_args(task, **given):
        return bench.task_args(task, argparse.Namespace(**{**bench.DEFAULTS, "strengths": None, "limit_pairs": None,
                                                           "limit_eval": None, "max_benign_fpr": None, "threads": 1,
                                                           "prompt_format": "auto", **given}))

    def option(task, flag, **given):
        args = task_args(task, **given)
        return args[args.index(flag) + 1]

    assert option("safety", "--limit-pairs") == "300" and option("safety_mixed", "--limit-pairs") == "1000"
    assert option("safety_mixed", "--limit-pairs", limit_pairs=50) == "50"
    # the safety run scores more prompts per set than the others, unless told
    assert option("safety", "--limit-eval") == str(bench.TASK_LIMIT_EVAL["safety"]) != str(bench.DEFAULT_LIMIT_EVAL)
    assert option("safety_mixed", "--limit-eval") == option("truthfulness", "--limit-eval") == str(bench.DEFAULT_LIMIT_EVAL)
    assert option("safety", "--limit-eval", limit_eval=7) == "7"
    # 0 is passed on (finesteer eval refuses it), not replaced by the task's default
    assert option("safety", "--limit-eval", limit_eval=0) == "0"
    # safety_mixed is the safety run plus the CoCoNot pairs: same gate data, δ positions, scored sets
    for flag in ("--target", "--delta-positions", "--opening-pairs", "--eval-target", "--limit-train"):
        assert option("safety_mixed", flag) == option("safety", flag)
    assert option("safety_mixed", "--pairs").endswith("coconot_pref.jsonl")
    # refuse_or_comply: safety_mixed's experts, borderline prompts scored toward compliance
    for flag in ("--pairs", "--opening-pairs", "--limit-pairs", "--delta-positions", "--pairs-per-prompt"):
        assert option("refuse_or_comply", flag) == option("safety_mixed", flag)
    assert option("refuse_or_comply", "--set-toward") == "borderline=compliance"
    # refuse_or_comply_openings: the same run with written compliance openings on CoCoNot's prompts
    assert option("refuse_or_comply_openings", "--compliance-opening-pairs") == option("refuse_or_comply", "--pairs")
    swapped = [x if x != "--compliance-opening-pairs" else "--pairs" for x in task_args("refuse_or_comply_openings")]
    assert swapped == task_args("refuse_or_comply")
    # safety_budget: the safety run at a 30 % gate budget, FineSteer and CAA only; a given budget wins
    assert option("safety", "--max-benign-fpr") == str(bench.DEFAULTS["max_benign_fpr"])
    assert option("safety_budget", "--max-benign-fpr") == "0.3"
    assert option("safety", "--max-benign-fpr", max_benign_fpr=0.2) == option("safety_budget", "--max-benign-fpr",
                                                                              max_benign_fpr=0.2) == "0.2"
    budget = task_args("safety_budget")
    assert budget[budget.index("--methods") + 1] == "unsteered,caa,finesteer"
    same = [x for x in budget if x not in ("0.3", "--methods", "unsteered,caa,finesteer")]
    assert same == [x for x in task_args("safety") if x != str(bench.DEFAULTS["max_benign_fpr"])]
    # safety_tight: the same at a 2 % budget, FineSteer beside CAST-style
    tight = task_args("safety_tight")
    assert option("safety_tight", "--max-benign-fpr") == "0.02"
    assert tight[tight.index("--methods") + 1] == "unsteered,cast,finesteer"
    same = [x for x in tight if x not in ("0.02", "--methods", "unsteered,cast,finesteer")]
    assert same == [x for x in task_args("safety") if x != str(bench.DEFAULTS["max_benign_fpr"])]
    # truthfulness_tokens(_swapped): each truthfulness fold in token mode with the gate on response
    # tokens at a 20 % budget, on its own λ grid and methods; everything else the fold's
    for fold in ("truthfulness", "truthfulness_swapped"):
        tokens = task_args(fold.replace("truthfulness", "truthfulness_tokens"))
        assert option(fold, "--max-benign-fpr") == "0.05"
        changed = {"--max-benign-fpr": "0.2", "--strengths": "8,16,32", "--methods": "unsteered,caa,scs_mean,finesteer",
                   "--limit-pairs": "1000"}
        for flag, value in changed.items():
            assert tokens[tokens.index(flag) + 1] == value
        plain = task_args(fold)
        for flag in changed:
            i = plain.index(flag)
            plain = plain[:i + 1] + [changed[flag]] + plain[i + 2:]
        assert tokens == plain + ["--mode", "token", "--gate-tokens", "response", "--gate-continuations", "300"]
    cfg = bench.task_config("truthfulness_tokens_swapped", "/tmp/unused-cache")
    assert (cfg.mode, cfg.gate_tokens, cfg.gate_continuations, cfg.max_benign_fpr, cfg.swap_split) == (
        "token", "response", 300, 0.2, True)
    assert bench.cache_folder("truthfulness_tokens", "/c") == str(Path("/c") / "truthfulness")


def test_bench_quality_gives_extra_strengths_to_the_gated_methods_it_runs():
    bench = _bench_quality()
    grid, low = bench.GATED_EXTRA_STRENGTHS["safety"], bench.FINESTEER_BELOW_GRID["safety"]
    assert bench.gated_extra_args("safety", []) == [
        "--extra-strengths", f"cast={grid}", "--extra-strengths", f"scs_mean={grid}",
        "--extra-strengths", f"finesteer={grid}", "--extra-strengths", f"finesteer={low}"]
    assert bench.gated_extra_args("safety", ["--methods", "unsteered,caa,finesteer"]) == [
        "--extra-strengths", f"finesteer={grid}", "--extra-strengths", f"finesteer={low}"]
    assert bench.gated_extra_args("safety", ["--methods", "unsteered,caa"]) == []
    assert bench.gated_extra_args("truthfulness", []) == []
    # the token-mode truthfulness runs: CAA below their grid, the gate with the mean vector above it
    assert bench.gated_extra_args("truthfulness_tokens", []) == bench.gated_extra_args("truthfulness_tokens_swapped", []) == [
        "--extra-strengths", "caa=2,4", "--extra-strengths", "scs_mean=64"]
    assert bench.gated_extra_args("truthfulness_tokens", ["--methods", "unsteered,caa"]) == ["--extra-strengths", "caa=2,4"]
    # a task that names its own methods (safety_budget: unsteered, caa, finesteer) gets FineSteer's only
    assert bench.gated_extra_args("safety_budget", []) == bench.gated_extra_args("safety", ["--methods", "finesteer"])
    # what it gives is what `finesteer eval` parses: FineSteer's two lists pooled
    from finesteer.eval.cli import _merged, _method_strengths
    args = bench.gated_extra_args("safety", [])
    merged = _merged([_method_strengths(v) for v in args[1::2]])
    assert sorted(merged["finesteer"]) == sorted(float(x) for x in (grid + "," + low).split(","))
    assert merged["cast"] == tuple(float(x) for x in grid.split(","))


def test_bench_quality_matches_finesteer_to_the_baselines_it_runs():
    bench = _bench_quality()
    assert bench.match_args("safety", []) == ["--match-targets", "finesteer:caa,finesteer:cast,finesteer:scs_mean"]
    assert bench.match_args("safety", ["--methods", "unsteered,caa,finesteer"]) == ["--match-targets", "finesteer:caa"]
    assert bench.match_args("safety", ["--methods", "unsteered,caa"]) == []
    assert bench.match_args("safety", ["--match-targets", "finesteer:cast"]) == []  # the caller's own wins
    assert bench.match_args("truthfulness", []) == []
    assert bench.match_args("safety_budget", []) == ["--match-targets", "finesteer:caa"]
    assert bench.match_args("safety_tight", []) == ["--match-targets", "finesteer:cast"]
    # they extract exactly what the safety run does, so they share that run's cache folder
    assert bench.cache_folder("safety_budget", "/c") == bench.cache_folder("safety", "/c") == str(Path("/c") / "safety")
    assert bench.cache_folder("safety_tight", "/c") == str(Path("/c") / "safety")
    assert bench.cache_folder("safety_mixed", "/c") == str(Path("/c") / "safety_mixed")
    from finesteer.eval.cli import _method_pairs
    assert _method_pairs(bench.match_args("safety", [])[1]) == (("finesteer", "caa"), ("finesteer", "cast"),
                                                                ("finesteer", "scs_mean"))


@pytest.fixture(scope="module")
def transfer():
    return _load("margin_transfer")


def test_margin_transfer_vectors_per_kind(transfer):
    """oracle = the prompt's own δ (mean over its pairs), class_mean = its file's mean δ over the fit
    prompts, mean = the mean over all fit pairs, mose = a fitted MoSE's prediction for its query."""
    torch.manual_seed(0)
    prompts = [f"h{i}" for i in range(12) for _ in range(2)] + [f"c{i}" for i in range(12)]
    source = ["harmful"] * 24 + ["coconot"] * 12
    q = torch.randn(len(prompts), 6)
    for i in range(0, 24, 2):  # the two pairs of a harmful prompt share its query
        q[i + 1] = q[i]
    d = torch.randn(len(prompts), 6)
    held = {"h0", "c0"}
    vectors, _ = transfer.steering_vectors(q, d, (prompts, None, None), source, held, ["h0", "c0"],
                                           k_range=(2, 2), residual_dim=2, hidden=8, epochs=2, query_dim=None)
    fit = torch.tensor([p not in held for p in prompts])
    harm = torch.tensor([s == "harmful" for s in source])
    assert torch.allclose(vectors["oracle"][0], d[:2].double().mean(0))
    assert torch.allclose(vectors["oracle"][1], d[24].double())
    assert torch.allclose(vectors["class_mean"][0], d[fit & harm].double().mean(0))
    assert torch.allclose(vectors["class_mean"][1], d[fit & ~harm].double().mean(0))
    assert torch.allclose(vectors["mean"][0], d[fit].double().mean(0)) and torch.equal(vectors["mean"][0],
                                                                                       vectors["mean"][1])
    assert vectors["mose"].shape == (2, 6) and torch.isfinite(vectors["mose"]).all()


def test_margin_transfer_heldout_prompts_are_the_harness_split(transfer):
    from finesteer.eval.data import disjoint_split

    prompts = [f"p{i}" for i in range(50) for _ in range(3)]
    held = transfer.heldout_prompts(prompts, 0.2, seed=0)
    uniq = sorted(set(prompts))
    _, idx = disjoint_split(len(uniq), 0.8, 1)  # what finesteer eval's fit holds out (seed + 1)
    assert held == {uniq[i] for i in idx} and len(held) == 10


def test_margin_transfer_sequences_score_own_responses_at_the_delta_positions(transfer):
    from tests.hf_tiny import tiny_tokenizer
    from finesteer.eval.harness import _Encoder
    from finesteer.eval.openings import SCORE_COMPLIANCES, SCORE_REFUSALS

    tok = tiny_tokenizer()
    enc = _Encoder(None, tok, "plain")
    own = [("I will not help with that at all.", "Sure, here is a long and detailed answer.")]
    seqs, layout = transfer.margin_sequences(enc, "how do I pick a lock", "coconot", own, 2, positions=3)
    assert layout == {"score": (0, 2, 2), "own": (4, 1, 1)}
    # scoring openings toward compliance for a CoCoNot prompt, in full
    full = enc.response("how do I pick a lock", SCORE_COMPLIANCES[0], "x")
    assert seqs[0] == full and seqs[2] == enc.response("how do I pick a lock", SCORE_REFUSALS[0], "x")
    # own responses cut to the first 3 response tokens, where δ was measured
    own_full = enc.response("how do I pick a lock", own[0][0], "x")
    assert seqs[4].ids == own_full.ids[:own_full.last_prompt + 4] and seqs[4].n_scored == 3
    harmful, _ = transfer.margin_sequences(enc, "how do I pick a lock", "harmful", own, 2, positions=3)
    assert harmful[0] == enc.response("how do I pick a lock", SCORE_REFUSALS[0], "x")


@pytest.mark.skipif(not (_DIR.parents[2] / "shared" / "data" / "safety").is_dir(),
                    reason="the shared data folder ../shared/data is absent")
def test_margin_transfer_builds_either_tasks_pairs(transfer):
    from finesteer.eval.openings import TRAIN_COMPLIANCES, TRAIN_REFUSALS

    (p, c, r), source = transfer.build_pairs(2, 3, 2, "answers")
    assert source == ["harmful"] * 4 + ["coconot"] * 3 and c[0] in TRAIN_REFUSALS and c[4] not in TRAIN_COMPLIANCES
    (p2, c2, r2), source2 = transfer.build_pairs(2, 3, 2, "openings")
    assert source2 == ["harmful"] * 4 + ["coconot"] * 6 and p2[4] == p2[5] == p[4]
    assert set(c2[4:]) <= set(TRAIN_COMPLIANCES) and set(r2[4:]) <= set(TRAIN_REFUSALS)
    with pytest.raises(ValueError, match="comply"):
        transfer.build_pairs(2, 3, 2, "both")


def _fold(swapped, hits, values, n_records=8):
    """A minimal eval.json of one cross-fit fold: per-question MC1 hits / MC2 values per configuration
    ``{(method, λ): ([bool], [float])}``."""
    tqa = "/data/tqa.jsonl"
    per = {}
    for (m, lam), h in hits.items():
        per.setdefault(m, {})[lam] = {"mc1": h, "mc2": values[(m, lam)]}
    results = {m: {lam: {"mc1": sum(v["mc1"]) / len(v["mc1"]), "mc2": sum(v["mc2"]) / len(v["mc2"])}
                   for lam, v in p.items()} for m, p in per.items()}
    n = len(next(iter(hits.values())))
    return {"config": {"truthfulqa": tqa},
            "splits": {tqa: {"records": n_records, "fit": n_records - n, "scored": n, "fit_fraction": 0.5,
                             "seed": 0, **({"swapped": True} if swapped else {})}},
            "truthfulqa": {"n": n, "per_question": per, "results": results}}


def _fold_with_kl(swapped, cfgs, kl):
    """:func:`_fold` of two questions (unsteered: both wrong, MC2 0.2) plus ``cfgs`` ``{(method, λ):
    (hits, values)}``, with each configuration's benign KL in ``rows``: ``kl(method, λ, swapped)``."""
    doc = _fold(swapped, {("unsteered", "0.0"): [False, False], **{k: v[0] for k, v in cfgs.items()}},
                {("unsteered", "0.0"): [0.2, 0.2], **{k: v[1] for k, v in cfgs.items()}}, 4)
    doc["rows"] = [{"method": "unsteered", "strength": 0.0, "benign_kl": 0.0}] + [
        {"method": m, "strength": float(lam), "benign_kl": kl(m, lam, swapped)} for m, lam in cfgs]
    return doc


def test_truthfulqa_crossfit_pools_both_folds_and_pairs_them():
    cf = _load("truthfulqa_crossfit")
    a = _fold(False, {("unsteered", "0.0"): [False, False, True, False], ("caa", "2.0"): [True, False, True, False],
                      ("finesteer", "2.0"): [True, True, True, False]},
              {("unsteered", "0.0"): [0.1, 0.2, 0.6, 0.3], ("caa", "2.0"): [0.5, 0.2, 0.6, 0.3],
               ("finesteer", "2.0"): [0.6, 0.7, 0.6, 0.3]})
    b = _fold(True, {("unsteered", "0.0"): [True, False, False, False], ("caa", "2.0"): [True, True, False, False],
                     ("finesteer", "2.0"): [True, False, False, True]},
              {("unsteered", "0.0"): [0.6, 0.1, 0.1, 0.2], ("caa", "2.0"): [0.6, 0.5, 0.1, 0.2],
               ("finesteer", "2.0"): [0.7, 0.1, 0.2, 0.8]})
    out = cf.pool(a, b)
    assert out["n"] == 8 and out["folds"] == [4, 4]
    assert out["results"]["finesteer"]["2.0"]["mc1"] == pytest.approx(5 / 8)
    assert out["results"]["caa"]["2.0"]["mc2"] == pytest.approx((1.6 + 1.4) / 8)
    assert out["results"]["finesteer"]["2.0"]["fold_mc1"] == [0.75, 0.5]
    vs_caa = out["paired"]["finesteer"]["2.0"]["caa"]
    # finesteer-only: fold a question 1, fold b question 3; caa-only: fold b question 1
    assert (vs_caa["mc1_a_only"], vs_caa["mc1_b_only"], vs_caa["n"]) == (2, 1, 8)
    assert vs_caa["mc2_diff"] == pytest.approx((0.1 + 0.5 + 0.1 - 0.4 + 0.1 + 0.6) / 8)
    assert set(out["paired"]["caa"]["2.0"]) == {"unsteered"} and "unsteered" not in out["paired"]
    assert set(out["paired"]["finesteer"]["2.0"]) == {"unsteered", "caa"}  # no scs_mean run here
    md = cf.markdown(out)
    assert "8 questions (4 + 4)" in md and "| finesteer | 2 | caa | 2 | 1 |" in md


def test_truthfulqa_crossfit_compares_finesteer_with_its_mean_vector_ablation():
    cf = _load("truthfulqa_crossfit")
    hits = {("unsteered", "0.0"): [False, False], ("caa", "4.0"): [True, False],
            ("scs_mean", "4.0"): [True, False], ("finesteer", "4.0"): [True, True]}
    vals = {k: [0.5, 0.5] for k in hits}
    out = cf.pool(_fold(False, hits, vals, 4), _fold(True, hits, vals, 4))
    assert set(out["paired"]["finesteer"]["4.0"]) == {"unsteered", "caa", "scs_mean"}
    assert set(out["paired"]["scs_mean"]["4.0"]) == {"unsteered", "caa"}
    assert out["paired"]["finesteer"]["4.0"]["scs_mean"]["mc1_a_only"] == 2


def test_truthfulqa_crossfit_refuses_runs_that_are_not_two_folds():
    cf = _load("truthfulqa_crossfit")
    cfg = {("unsteered", "0.0"): [True, False]}
    val = {("unsteered", "0.0"): [0.5, 0.5]}
    with pytest.raises(ValueError, match="both runs have swapped=False"):
        cf.pool(_fold(False, cfg, val, 4), _fold(False, cfg, val, 4))
    with pytest.raises(ValueError, match="records"):
        cf.pool(_fold(False, cfg, val, 4), _fold(True, cfg, val, 6))
    other = _fold(True, {**cfg, ("caa", "2.0"): [True, True]}, {**val, ("caa", "2.0"): [0.1, 0.2]}, 4)
    with pytest.raises(ValueError, match="different configurations"):
        cf.pool(_fold(False, cfg, val, 4), other)
    no_split = _fold(True, cfg, val, 4)
    no_split["splits"] = {}
    with pytest.raises(ValueError, match="not split"):
        cf.pool(_fold(False, cfg, val, 4), no_split)


def test_truthfulqa_crossfit_extends_each_fold_and_reads_the_kl_tradeoff():
    cf = _load("truthfulqa_crossfit")

    def run(swapped, cfgs, kl):
        return _fold_with_kl(swapped, cfgs, lambda m, lam, _: kl[(m, lam)])

    # λ = 8 in the committed folds; λ = 16 in the extensions. CAA: MC1 1/2 at 8, 1 at 16; FineSteer:
    # MC1 1/2 at 8 (MC2 below CAA's), 1 at 16 (MC2 above) with less benign KL than CAA at 8
    base = {("caa", "8.0"): ([True, False], [0.6, 0.2]), ("finesteer", "8.0"): ([False, True], [0.3, 0.4])}
    more = {("caa", "16.0"): ([True, True], [0.6, 0.6]), ("finesteer", "16.0"): ([True, True], [0.7, 0.7])}
    kl = {("caa", "8.0"): 0.8, ("finesteer", "8.0"): 0.02, ("caa", "16.0"): 3.0, ("finesteer", "16.0"): 0.1}
    a, b = cf.extend(run(False, base, kl), run(False, more, kl), "a"), cf.extend(run(True, base, kl), run(True, more, kl), "b")
    out = cf.pool(a, b)
    assert set(out["results"]["finesteer"]) == {"8.0", "16.0"} and out["n"] == 4
    got = [(e["baseline_strength"], e["strength"], e["kl_lower"]) for e in cf.tradeoff(out, a, b)]
    assert got == [(8.0, 16.0, True), (16.0, 16.0, True)]
    assert "| 8 | 0.500 / 0.400 / 0.800 | 16 | 1.000 / 0.700 / 0.100 | yes |" in cf.markdown(dict(out, tradeoff=cf.tradeoff(out, a, b)))
    # float rounding of another batch composition in the unsteered MC2 is the same scores
    rounded = run(False, more, kl)
    rounded["truthfulqa"]["per_question"]["unsteered"]["0.0"]["mc2"] = [0.200004, 0.2]
    assert set(cf.extend(run(False, base, kl), rounded, "a")["truthfulqa"]["results"]["caa"]) == {"8.0", "16.0"}
    # an extension that is not the same fold, or repeats a configuration, is refused
    other = run(False, more, kl)
    other["truthfulqa"]["per_question"]["unsteered"]["0.0"]["mc2"] = [0.3, 0.2]
    with pytest.raises(ValueError, match="unsteered per-question scores differ"):
        cf.extend(run(False, base, kl), other, "a")
    with pytest.raises(ValueError, match="repeats configurations"):
        cf.extend(run(False, base, kl), run(False, base, kl), "a")
    with pytest.raises(ValueError, match="splits the TruthfulQA file differently"):
        cf.extend(run(False, base, kl), run(True, more, kl), "a")


def test_truthfulqa_crossfit_adds_a_finesteer_variant_as_a_method_of_its_own(tmp_path):
    """--variant NAME A B: each fold's run of FineSteer fitted another way joins the fold as method
    NAME (its other steered methods dropped), compared with CAA, SCS + mean and FineSteer at each
    λ, with a trade-off table of its own; the CLI writes both."""
    cf = _load("truthfulqa_crossfit")

    def run(swapped, cfgs, kl):
        return _fold_with_kl(swapped, cfgs, lambda m, lam, _: kl)

    base = {("caa", "8.0"): ([True, False], [0.6, 0.2]), ("scs_mean", "8.0"): ([True, False], [0.6, 0.2]),
            ("finesteer", "8.0"): ([False, False], [0.3, 0.2])}
    shrunk = {("caa", "8.0"): ([False, False], [0.0, 0.0]), ("finesteer", "8.0"): ([True, True], [0.7, 0.6])}
    folds = [run(False, base, 0.5), run(True, base, 0.5)]
    variants = [run(False, shrunk, 0.1), run(True, shrunk, 0.1)]
    v = cf.as_variant(variants[0], "fs_shrink")
    assert set(v["truthfulqa"]["results"]) == {"unsteered", "fs_shrink"}
    assert [r["method"] for r in v["rows"]] == ["unsteered", "fs_shrink"]
    a, b = (cf.extend(f, cf.as_variant(x, "fs_shrink"), "fold") for f, x in zip(folds, variants))
    out = cf.pool(a, b, variants=["fs_shrink"])
    assert out["results"]["caa"]["8.0"]["mc1"] == 0.5  # the variant run's CAA did not replace the fold's
    assert out["results"]["fs_shrink"]["8.0"]["mc1"] == 1.0
    assert set(out["paired"]["fs_shrink"]["8.0"]) == {"unsteered", "caa", "scs_mean", "finesteer"}
    assert out["paired"]["fs_shrink"]["8.0"]["finesteer"]["mc1_a_only"] == 4
    for bad, match in (("finesteer", "needs a name of its own"), ("unsteered", "needs a name of its own")):
        with pytest.raises(ValueError, match=match):
            cf.as_variant(variants[0], bad)
    paths = []
    for i, doc in enumerate(folds + variants):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(doc))
    out_path = tmp_path / "cf.json"
    assert cf.main([str(paths[0]), str(paths[1]), "--variant", "fs_shrink", str(paths[2]), str(paths[3]),
                    "-o", str(out_path)]) == 0
    doc = json.loads(out_path.read_text())
    entry = doc["tradeoff_variants"]["fs_shrink"][0]
    assert (entry["strength"], entry["kl_lower"]) == (8.0, True) and doc["tradeoff"][0]["strength"] is None
    md = out_path.with_suffix(".md").read_text()
    assert "the weakest fs_shrink λ with pooled MC1 and MC2 at least CAA's" in md
    assert "| 8 | 0.500 / 0.400 / 0.500 | 8 | 1.000 / 0.650 / 0.100 | yes |" in md


def test_truthfulqa_crossfit_gives_further_methods_the_tradeoff(tmp_path):
    """--tradeoff-methods scs_mean: the same trade-off against CAA as FineSteer's, in the JSON and the
    Markdown; a method the pooled results lack (or CAA itself) is refused before anything is written."""
    cf = _load("truthfulqa_crossfit")
    cfgs = {("caa", "8.0"): ([True, False], [0.6, 0.2]), ("scs_mean", "16.0"): ([True, True], [0.7, 0.6]),
            ("finesteer", "16.0"): ([False, False], [0.3, 0.2])}
    kl = {"caa": 0.8, "scs_mean": 0.05, "finesteer": 0.1}
    paths = []
    for swapped in (False, True):
        paths.append(str(tmp_path / f"{swapped}.json"))
        Path(paths[-1]).write_text(json.dumps(_fold_with_kl(swapped, cfgs, lambda m, lam, _: kl[m])))
    out_path = tmp_path / "cf.json"
    assert cf.main([*paths, "--tradeoff-methods", "scs_mean", "-o", str(out_path)]) == 0
    doc = json.loads(out_path.read_text())
    entry, = doc["tradeoff_methods"]["scs_mean"]
    assert (entry["baseline_strength"], entry["strength"], entry["benign_kl"], entry["kl_lower"]) == (8.0, 16.0, 0.05, True)
    assert doc["tradeoff"][0]["strength"] is None
    md = out_path.with_suffix(".md").read_text()
    assert "the weakest scs_mean λ with pooled MC1 and MC2 at least CAA's" in md
    assert "| 8 | 0.500 / 0.400 / 0.800 | 16 | 1.000 / 0.650 / 0.050 | yes |" in md
    for bad in ("mose_nogate", "caa"):
        gone = tmp_path / f"{bad}.json"
        assert cf.main([*paths, "--tradeoff-methods", bad, "-o", str(gone)]) == 2 and not gone.exists()


def test_truthfulqa_crossfit_extends_a_variant_and_plots_mc_against_benign_kl(tmp_path):
    """--extend-variant NAME A B: a variant's runs at further strengths join NAME, their CAA at those
    strengths joins CAA; --plot draws each method's pooled MC1/MC2 against the folds' mean benign KL,
    and a bad --plot-methods is refused before anything is written."""
    pytest.importorskip("matplotlib")
    cf = _load("truthfulqa_crossfit")

    def run(swapped, cfgs, kl):  # the swapped fold measures twice the KL
        return _fold_with_kl(swapped, cfgs, lambda m, lam, sw: kl[m] * (2 if sw else 1))

    base = {("caa", "8.0"): ([True, False], [0.6, 0.2]), ("finesteer", "8.0"): ([False, False], [0.3, 0.2])}
    variant = {("finesteer", "8.0"): ([True, True], [0.7, 0.6])}
    further = {("caa", "16.0"): ([True, True], [0.6, 0.6]), ("finesteer", "16.0"): ([True, False], [0.8, 0.2])}
    kl = {"caa": 1.0, "finesteer": 0.1}
    docs = [run(False, base, kl), run(True, base, kl), run(False, variant, kl), run(True, variant, kl),
            run(False, further, kl), run(True, further, kl)]
    r = cf.renamed(docs[4], "fs_qc")
    assert set(r["truthfulqa"]["results"]) == {"unsteered", "caa", "fs_qc"}
    assert sorted(x["method"] for x in r["rows"]) == ["caa", "fs_qc", "unsteered"]
    paths = []
    for i, doc in enumerate(docs):
        paths.append(str(tmp_path / f"{i}.json"))
        Path(paths[-1]).write_text(json.dumps(doc))
    out_path, png = tmp_path / "cf.json", tmp_path / "cf.png"
    argv = [paths[0], paths[1], "--variant", "fs_qc", paths[2], paths[3], "--extend-variant", "fs_qc", paths[4],
            paths[5], "-o", str(out_path), "--plot", str(png)]
    assert cf.main(argv) == 0
    doc = json.loads(out_path.read_text())
    assert set(doc["results"]["fs_qc"]) == {"8.0", "16.0"} and set(doc["results"]["caa"]) == {"8.0", "16.0"}
    assert set(doc["results"]["finesteer"]) == {"8.0"}  # the extension's FineSteer is the variant's
    assert doc["results"]["fs_qc"]["16.0"]["mc1"] == 0.5
    assert doc["variant_extensions"] == {"fs_qc": [[paths[4], paths[5]]]}
    assert png.is_file() and png.stat().st_size > 1000
    a = cf.extend(cf.extend(docs[0], cf.as_variant(docs[2], "fs_qc"), "x"), cf.renamed(docs[4], "fs_qc"), "x")
    b = cf.extend(cf.extend(docs[1], cf.as_variant(docs[3], "fs_qc"), "x"), cf.renamed(docs[5], "fs_qc"), "x")
    pooled = cf.pool(a, b, variants=["fs_qc"])
    assert pooled["results"] == doc["results"]
    # KL: the mean of the folds (0.1 and 0.2), points ordered by λ
    assert cf.curve(pooled, a, b, "fs_qc") == [
        {"strength": 8.0, "benign_kl": pytest.approx(0.15), "mc1": 1.0, "mc2": pytest.approx(0.65)},
        {"strength": 16.0, "benign_kl": pytest.approx(0.15), "mc1": 0.5, "mc2": pytest.approx(0.5)}]
    # refused before anything is written: a method the results lack, an extension of no --variant
    bad = argv[:-4] + ["-o", str(tmp_path / "bad.json"), "--plot", str(tmp_path / "bad.png"), "--plot-methods", "caa,cast"]
    assert cf.main(bad) == 2
    assert not (tmp_path / "bad.json").exists() and not (tmp_path / "bad.png").exists()
    with pytest.raises(SystemExit):
        cf.main([paths[0], paths[1], "--extend-variant", "fs_qc", paths[4], paths[5], "-o", str(tmp_path / "x.json")])
    assert not (tmp_path / "x.json").exists()


def test_truthfulqa_tradeoff_plot_draws_zero_kl_points_and_skips_empty_input(tmp_path):
    """A gate closed on every benign prompt gives benign KL 0, which a log axis cannot show: the plot
    then uses a symmetric-log axis; with no points at all nothing is written."""
    pytest.importorskip("matplotlib")
    from finesteer.eval.report import plot_truthfulqa_tradeoff, truthfulqa_tradeoff_points

    curves = {"caa": [{"strength": 2.0, "benign_kl": 0.04, "mc1": 0.23, "mc2": 0.43}],
              "cast": [{"strength": 2.0, "benign_kl": 0.0, "mc1": 0.22, "mc2": 0.41},
                       {"strength": 4.0, "benign_kl": 0.01, "mc1": 0.24, "mc2": 0.44}]}
    assert plot_truthfulqa_tradeoff(curves, {"mc1": 0.2, "mc2": 0.4}, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000
    assert not plot_truthfulqa_tradeoff({"caa": []}, {"mc1": 0.2, "mc2": 0.4}, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    # the points: steered methods only, ordered by λ, where a benign KL was measured
    results = {"unsteered": {"0.0": {"mc1": 0.2, "mc2": 0.4}},
               "caa": {"8.0": {"mc1": 0.3, "mc2": 0.5}, "2.0": {"mc1": 0.25, "mc2": 0.45}}}
    kl = {("caa", 2.0): 0.04, ("caa", 8.0): 0.7}
    assert truthfulqa_tradeoff_points(results, lambda m, lam: kl.get((m, float(lam)))) == {"caa": [
        {"strength": 2.0, "benign_kl": 0.04, "mc1": 0.25, "mc2": 0.45},
        {"strength": 8.0, "benign_kl": 0.7, "mc1": 0.3, "mc2": 0.5}]}
    assert truthfulqa_tradeoff_points(results, lambda m, lam: None) == {}  # no benign set scored


def test_truthfulqa_push_measures_along_the_mean_in_units_of_caa():
    push_mod = _load("truthfulqa_push")
    mean = torch.tensor([2.0, 0.0, 0.0])
    vectors = torch.tensor([[4.0, 0.0, 0.0], [1.0, 2.0, 0.0], [-2.0, 0.0, 2.0]])
    push, off = push_mod.push_along_mean(vectors, mean)
    assert push.tolist() == [2.0, 0.5, -1.0] and off.tolist() == [0.0, 1.0, 1.0]
    split = push_mod.split_at_median(torch.tensor([0.2, 0.5, 1.5, 2.0]), torch.tensor([-0.1, 0.0, 0.2, 0.3]))
    assert split["all"] == pytest.approx(0.1) and split["push_above_median"] == pytest.approx(0.25)
    assert split["push_at_or_below_median"] == pytest.approx(-0.05) and split["corr"] > 0.9


def test_truthfulqa_push_reads_one_method_over_a_folds_runs(tmp_path):
    push_mod = _load("truthfulqa_push")
    paths = []
    for i, lams in enumerate((("2.0", "4.0"), ("12.0",))):
        doc = {"truthfulqa": {"per_question": {"finesteer": {lam: {"mc1": [True], "mc2": [float(lam)]} for lam in lams},
                                               "caa": {lam: {"mc1": [False], "mc2": [0.0]} for lam in lams}}}}
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps(doc))
    assert push_mod.per_question(paths, "finesteer") == {2.0: [2.0], 4.0: [4.0], 12.0: [12.0]}
    assert push_mod.per_question(paths, "scs_mean") == {}


def test_null_rows_routing_reads_the_safety_config_and_the_kept_push():
    """null_rows_routing.py: the safety task's fit settings as bench_quality passes them, and the
    push kept on opened prompts, hand-computed."""
    routing = _load("null_rows_routing")
    cfg = routing.safety_config("/tmp/unused-cache")
    assert (cfg.layer, cfg.scs_method, cfg.delta_positions, cfg.limit_pairs, cfg.null_rows) == (11, "probe", 6, 300, 0)
    assert [Path(b).name for b in cfg.benign] == ["benign_train.jsonl", "coconot_pref.jsonl"]

    class Gate:  # opens on rows whose first coordinate is positive
        threshold = 0.0

        @staticmethod
        def score(h):
            return h[:, 0]

    u = torch.tensor([0.0, 1.0])
    dev = {"harmful_val": torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]]),
           "benign_val": torch.tensor([[-1.0, 0.0]]),
           "borderline_val": torch.tensor([[1.0, 2.0], [-1.0, 0.0]])}
    base = lambda h: torch.stack([h[:, 0], torch.full_like(h[:, 0], 4.0)], 1)  # noqa: E731 push 4 everywhere
    half_on_second = lambda h: torch.stack([h[:, 0], 4.0 / (1.0 + h[:, 1])], 1)  # noqa: E731
    r = routing.push_report(Gate, u, dev, half_on_second, base)
    # harmful: opened rows push 4 and 2 (kept 1 and 0.5), the closed one 0 → set push 6/3
    assert r["harmful_val"] == {"n": 3, "opened": 2, "kept": 0.75, "kept_over_half": 0.5, "set_push": 2.0}
    # borderline: one opened row, push 4/3 (kept 1/3), set push (4/3)/2
    assert r["borderline_val"]["opened"] == 1 and r["borderline_val"]["kept"] == pytest.approx(1 / 3)
    assert r["borderline_over_harmful"] == pytest.approx((2 / 3) / 2.0)
    assert r["benign_val"] == {"n": 1, "opened": 0, "kept": None, "kept_over_half": None, "set_push": 0.0}


@pytest.fixture(scope="module")
def ladder():
    return _load("budget_ladder")


def _ladder_run(fs_harmful, fs_border, caa, scores=((0.9, 0.5), (0.6, 0.3)), tau=0.4, budget=0.3):
    """A safety eval.json's ``sets`` and ``fit`` with FineSteer's per-prompt results and gate scores.
    fs_harmful: {λ: [shift per prompt]}; fs_border: {λ: ([shift], [kl])}; caa: {λ: (target, KL, shift)}."""
    def mean(x):
        return sum(x) / len(x)

    harmful = {"role": "target", "n": 2, "gate": {"finesteer": {"threshold": tau, "scores": list(scores[0])}},
               "results": {"finesteer": {str(k): {"margin_shift": mean(v), "per_prompt": {"margin_shift": v}}
                                         for k, v in fs_harmful.items()},
                           "caa": {str(k): {"margin_shift": t} for k, (t, _, _) in caa.items()}}}
    border = {"role": "benign", "n": 2, "gate": {"finesteer": {"threshold": tau, "scores": list(scores[1])}},
              "results": {"finesteer": {str(k): {"margin_shift": mean(s), "kl": mean(kl),
                                                 "per_prompt": {"margin_shift": s, "kl": kl}}
                                        for k, (s, kl) in fs_border.items()},
                          "caa": {str(k): {"margin_shift": s, "kl": kl} for k, (_, kl, s) in caa.items()}}}
    return {"sets": {"harmful": harmful, "borderline": border}, "fit": {"gate": {"max_benign_fpr": budget}}}


_CAA = {1.0: (3.0, 0.5, 3.0), 2.0: (6.5, 2.0, 6.0)}


def test_budget_ladder_regates_per_prompt_results(ladder):
    run = _ladder_run({1.0: [4.0, 2.0], 2.0: [8.0, 6.0]}, {1.0: ([1.0, 0.0], [0.1, 0.0]), 2.0: ([2.0, 0.0], [0.4, 0.0])}, _CAA)
    at_run = ladder.regated_rows(run["sets"], "finesteer", 0.4, ["borderline"])
    assert [(r["target_margin_shift"], r["benign_kl"], r["benign_margin_shift"]) for r in at_run] == \
        [(3.0, 0.05, 0.5), (7.0, 0.2, 1.0)]
    # τ = 0.5: harmful prompt 1 scores exactly 0.5 and a hard gate opens only above τ
    tight = ladder.regated_rows(run["sets"], "finesteer", 0.5, ["borderline"])
    assert [(r["target_margin_shift"], r["benign_kl"], r["benign_margin_shift"]) for r in tight] == \
        [(2.0, 0.05, 0.5), (4.0, 0.2, 1.0)]
    # τ = 0.7 closes the borderline prompt 0 (0.6) as well
    tighter = ladder.regated_rows(run["sets"], "finesteer", 0.7, ["borderline"])
    assert [(r["target_margin_shift"], r["benign_kl"], r["benign_margin_shift"]) for r in tighter] == \
        [(2.0, 0.0, 0.0), (4.0, 0.0, 0.0)]
    assert (tight[0]["target_gate_open"], tight[0]["benign_gate_open"]) == (0.5, 0.5)
    assert (tighter[0]["target_gate_open"], tighter[0]["benign_gate_open"]) == (0.5, 0.0)
    with pytest.raises(ValueError, match="below the run's own τ"):
        ladder.regated_rows(run["sets"], "finesteer", 0.3, ["borderline"])


def test_budget_ladder_select_takes_the_smallest_budget_that_reaches_and_dominates(ladder):
    run = _ladder_run({1.0: [4.0, 2.0], 2.0: [8.0, 6.0]}, {1.0: ([1.0, 0.0], [0.1, 0.0]), 2.0: ([2.0, 0.0], [0.4, 0.0])}, _CAA)
    # task budget τ 0.7 and 0.1's τ 0.5 open harmful prompt 0 only (at most +4: CAA λ = 2's +6.5 out of
    # reach); the run's 0.3 reaches both CAA points with lower benign cost, so it is chosen
    res = ladder.select(run, {ladder.TASK_BUDGET: 0.7, 0.1: 0.5, 0.3: 0.4}, 0.3)
    assert res["task_budget_unreached_caa"] == [2.0]
    assert res["budgets"]["0.1"]["passes"] == {"reaches_every_caa_point": False, "dominates_beyond_task_budget": False}
    assert res["budgets"]["0.3"]["passes"] == {"reaches_every_caa_point": True, "dominates_beyond_task_budget": True}
    assert res["chosen"] == 0.3
    # a loose point that reaches but costs more than CAA on the borderline prompts is not chosen
    costly = _ladder_run({1.0: [4.0, 2.0], 2.0: [8.0, 6.0]}, {1.0: ([1.0, 0.0], [0.1, 0.0]), 2.0: ([13.0, 0.0], [0.4, 0.0])}, _CAA)
    assert ladder.select(costly, {ladder.TASK_BUDGET: 0.7, 0.3: 0.4}, 0.3)["chosen"] is None
    with pytest.raises(ValueError, match="not the run's"):
        ladder.select(run, {ladder.TASK_BUDGET: 0.7, 0.3: 0.41}, 0.3)


def test_budget_ladder_report_falls_back_to_the_loose_budget_only_beyond_reach(ladder):
    committed = _ladder_run({1.0: [4.0, 2.0], 4.0: [5.0, 0.0]}, {1.0: ([0.2, 0.0], [0.02, 0.0]), 4.0: ([0.4, 0.0], [0.04, 0.0])},
                            _CAA, budget=0.05)
    loose = _ladder_run({1.0: [4.0, 4.0], 2.0: [8.0, 7.0]}, {1.0: ([1.0, 1.0], [0.1, 0.1]), 2.0: ([2.0, 2.0], [0.4, 0.4])}, _CAA)
    res = ladder.report(committed, loose)
    got = [(e["baseline_strength"], e["operating_point"], e["strength"], e["dominates"])
           for e in res["views"]["pooled benign"]["ladder"]]
    assert got == [(1.0, "task budget", 1.0, True), (2.0, "loose budget", 2.0, True)]
    assert res["views"]["borderline"]["dominates"] == 2 and res["loose_budget"] == 0.3
    loose["sets"]["harmful"]["results"]["caa"]["2.0"]["margin_shift"] = 6.6
    with pytest.raises(ValueError, match="CAA λ = 2 differs"):
        ladder.report(committed, loose)


def test_budget_ladder_match_open_takes_the_closest_share_ties_to_the_looser(ladder):
    class Gate:  # scores a row by its first feature
        def score(self, h):
            return h[:, 0]

    states = {"harmful": torch.tensor([[0.1], [0.5], [0.9], [0.95]]), "borderline": torch.tensor([[0.2], [0.6]])}
    assert ladder.open_shares(Gate(), states, 0.5) == {"harmful": 0.5, "borderline": 0.5}
    shares = {0.01: {"harmful": 0.25}, 0.02: {"harmful": 0.75}, 0.03: {"harmful": 0.9}}
    res = ladder.match_open(shares, {"harmful": 0.5})
    assert res["chosen"] == 0.02 and res["gap"] == {"0.01": 0.25, "0.02": 0.25, "0.03": 0.4}
    assert ladder.match_open(shares, {"harmful": 0.3})["chosen"] == 0.01


def test_budget_ladder_dev_states_name_the_command_that_caches_them(ladder, tmp_path):
    with pytest.raises(FileNotFoundError, match="gate_study.py --layers 11 --n-dev 500"):
        ladder.load_dev_states(str(tmp_path))
    from safetensors.torch import save_file
    for stem in ladder.DEV_STATE_FILES.values():
        save_file({"11": torch.zeros(2, 3), "13": torch.zeros(2, 3)}, str(tmp_path / f"{stem}.safetensors"))
    with pytest.raises(ValueError, match="holds 2 layers"):
        ladder.load_dev_states(str(tmp_path))


def test_budget_ladder_versus_compares_with_both_runs_baselines(ladder):
    committed = _ladder_run({1.0: [4.0, 2.0], 2.0: [8.0, 6.0]}, {1.0: ([1.0, 0.0], [0.1, 0.0]), 2.0: ([2.0, 0.0], [0.4, 0.0])},
                            _CAA, budget=0.05)
    # the tighter run (τ 0.5) opens harmful prompt 0 only: exactly the committed run re-gated there
    tight = _ladder_run({1.0: [4.0, 0.0], 2.0: [8.0, 0.0]}, {1.0: ([1.0, 0.0], [0.1, 0.0]), 2.0: ([2.0, 0.0], [0.4, 0.0])},
                        {1.0: (1.0, 0.05, 1.0), 2.0: (5.0, 0.1, 0.5)}, tau=0.5, budget=0.02)
    res = ladder.versus(tight, committed, ["caa"])
    assert res["regate_check"] == {"common_strengths": 2, "max_relative_difference": 0.0}
    assert res["budget"] == 0.02 and res["committed_budget"] == 0.05
    e = res["views"]["pooled benign"]["versus"]
    # committed CAA: λ = 1 (+3.0, KL 0.5, shift 3.0) is met by λ = 2 (+4.0, 0.2, 1.0); λ = 2's +6.5 out of reach
    assert (e["caa"]["dominates"], e["caa"]["reached"], e["caa"]["points"]) == (1, 1, 2)
    # the run's own "caa" rows are another baseline: λ = 1 is met by λ = 1 (+2.0) but costs more there
    own = e["caa (run's budget)"]["comparison"]
    assert [(c["strength"], c["dominates"]) for c in own] == [(1.0, False), (None, False)]
    assert res["gate_open"] == {"finesteer": {"harmful": 0.5, "borderline": 0.5}}
    tight["sets"]["harmful"]["results"]["finesteer"]["1.0"]["margin_shift"] = 2.2  # not the committed fit re-gated
    with pytest.raises(ValueError, match=r"differ by 0\.1 .* not the same prompts and fit"):
        ladder.versus(tight, committed, ["caa"])
    other = _ladder_run({1.0: [4.0, 0.0]}, {1.0: ([1.0, 0.0], [0.1, 0.0])}, _CAA, tau=0.5)
    other["sets"]["harmful"]["n"] = 3
    with pytest.raises(ValueError, match="same sets and prompts"):
        ladder.versus(other, committed, ["caa"])


def test_budget_ladder_report_takes_the_tightest_budget_that_reaches(ladder):
    committed = _ladder_run({1.0: [4.0, 2.0], 4.0: [5.0, 0.0]}, {1.0: ([0.2, 0.0], [0.02, 0.0]), 4.0: ([0.4, 0.0], [0.04, 0.0])},
                            _CAA, budget=0.05)
    loose = _ladder_run({1.0: [4.0, 4.0], 2.0: [8.0, 7.0]}, {1.0: ([1.0, 1.0], [0.1, 0.1]), 2.0: ([2.0, 2.0], [0.4, 0.4])}, _CAA)
    # the tight run (τ 0.5) is the committed one re-gated: harmful prompt 0 only, +2.0 at λ = 1 (short of
    # CAA λ = 1's +3.0) and +2.5 at λ = 4; it reaches nothing, so the ladder is the two-budget one
    tight = _ladder_run({1.0: [4.0, 0.0], 4.0: [5.0, 0.0]}, {1.0: ([0.2, 0.0], [0.02, 0.0]), 4.0: ([0.4, 0.0], [0.04, 0.0])},
                        _CAA, tau=0.5, budget=0.02)
    two = ladder.report(committed, loose)
    three = ladder.report(committed, loose, tight)
    assert three["tight_budget"] == 0.02 and three["tight_regate_check"]["max_relative_difference"] == 0.0
    assert three["views"]["pooled benign"]["ladder"] == two["views"]["pooled benign"]["ladder"]
    assert "tight_budget" not in two and not any(e["reached"] for e in three["views"]["pooled benign"]["tight_alone"])
    # where it reaches, it is taken before the task budget
    for s in tight["sets"].values():
        s["gate"]["finesteer"]["scores"] = [0.9, 0.3]
    tight["sets"]["harmful"]["results"]["finesteer"]["4.0"]["margin_shift"] = 3.5
    committed["sets"]["harmful"]["results"]["finesteer"]["4.0"]["per_prompt"]["margin_shift"] = [7.0, 0.0]
    got = [(e["baseline_strength"], e["operating_point"], e["strength"])
           for e in ladder.report(committed, loose, tight)["views"]["pooled benign"]["ladder"]]
    assert got == [(1.0, "tight budget", 4.0), (2.0, "loose budget", 2.0)]


def test_truthfulqa_nested_pools_the_folds_and_applies_the_rule():
    nested = _load("truthfulqa_nested")

    def doc(caa, fs):
        """caa / fs: (mc1 hits, mc2 values) per λ of nested.STRENGTHS, two questions each."""
        per = {"unsteered": {"0": {"mc1": [0, 1], "mc2": [0.2, 0.6]}}}
        for name, vals in (("caa", caa), ("finesteer", fs)):
            per[name] = {str(lam): {"mc1": v[0], "mc2": v[1]} for lam, v in zip(nested.STRENGTHS, vals)}
        return {"truthfulqa": {"per_question": per}}

    even = [([1, 0], [0.5, 0.5])] * 4
    ahead = [([1, 1], [0.6, 0.6])] * 4
    behind = [([0, 0], [0.4, 0.4])] + [([1, 1], [0.9, 0.9])] * 3
    s = nested.layer_summary(nested.pool([doc(even, ahead), doc(even, even)]))
    assert s["questions"] == 4 and s["unsteered_mc1"] == 0.5 and s["unsteered_mc2"] == pytest.approx(0.4)
    assert s["rows"][0] == {"strength": 2.0, "caa_mc1": 0.5, "caa_mc2": 0.5, "finesteer_mc1": 0.75,
                            "finesteer_mc2": pytest.approx(0.55)}
    assert s["candidate"] and s["mean_mc2_gain"] == pytest.approx(0.05)
    # one λ below CAA on MC1 is enough to drop a layer, however large its gain elsewhere
    assert not nested.layer_summary(nested.pool([doc(even, behind), doc(even, behind)]))["candidate"]
    lay = {7: {"candidate": True, "mean_mc2_gain": 0.03}, 9: {"candidate": True, "mean_mc2_gain": 0.05},
           11: {"candidate": False, "mean_mc2_gain": 0.0}}
    assert nested.choose(lay) == 9
    assert nested.choose({**lay, 11: {"candidate": True, "mean_mc2_gain": 0.01}}) is None  # the task's layer holds
    assert nested.choose({11: {"candidate": False, "mean_mc2_gain": 0.0}}) is None


def test_truthfulqa_nested_judges_a_fit_variant_against_the_plain_run(tmp_path, capsys):
    """A variant's runs hold FineSteer only; summarize takes CAA and the unsteered model from the
    plain runs, and adopts the variant only when it is a candidate with at least the default's gain."""
    nested = _load("truthfulqa_nested")

    def doc(fs, caa=None):
        per = {"unsteered": {"0": {"mc1": [0, 1], "mc2": [0.2, 0.6]}},
               "finesteer": {str(lam): {"mc1": v[0], "mc2": v[1]} for lam, v in zip(nested.STRENGTHS, fs)}}
        if caa is not None:
            per["caa"] = {str(lam): {"mc1": v[0], "mc2": v[1]} for lam, v in zip(nested.STRENGTHS, caa)}
        return {"truthfulqa": {"per_question": per}}

    even = [([1, 0], [0.5, 0.5])] * 4
    slightly = [([1, 0], [0.52, 0.52])] * 4
    ahead = [([1, 1], [0.6, 0.6])] * 4
    for fold in (1, 2):
        for variant, d in ((None, doc(slightly, caa=even)), ("qc", doc(ahead))):
            run = nested.run_dir(tmp_path, fold, 11, variant)
            run.mkdir(parents=True)
            (run / "eval.json").write_text(json.dumps(d))
    assert nested.run_dir(tmp_path, 1, 11, "qc").name == "f1_L11_qc"
    out = tmp_path / "variant.json"
    assert nested.main(["summarize", "--out", str(tmp_path), "--layers", "11", "--variant", "qc", "-o", str(out)]) == 0
    res = json.loads(out.read_text())
    v, plain = res["variant_layers"]["11"], res["layers"]["11"]
    assert v["adopt"] and v["mean_mc2_gain"] == pytest.approx(0.1) and plain["mean_mc2_gain"] == pytest.approx(0.02)
    assert v["rows"][0]["caa_mc2"] == 0.5 and "chosen" not in res
    assert "adopt qc at layer 11: True" in capsys.readouterr().out
    # judged against an earlier adopted variant instead: its gain is the bar
    for fold in (1, 2):
        run = nested.run_dir(tmp_path, fold, 11, "qc_more")
        run.mkdir(parents=True)
        (run / "eval.json").write_text(json.dumps(doc([([1, 1], [0.58, 0.58])] * 4)))
    assert nested.main(["summarize", "--out", str(tmp_path), "--layers", "11", "--variant", "qc_more",
                        "--bar-variant", "qc", "-o", str(out)]) == 0
    v = json.loads(out.read_text())["variant_layers"]["11"]
    assert v["candidate"] and not v["adopt"] and v["bar"] == {"fit": "qc", "mean_mc2_gain": pytest.approx(0.1)}
    assert "at least the qc fit's +0.1000" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        nested.main(["summarize", "--out", str(tmp_path), "--layers", "11", "--bar-variant", "qc", "-o", str(out)])
    assert "--bar-variant needs --variant" in capsys.readouterr().err
    # a smaller gain than the default's, or one λ below CAA, is not adopted
    assert not nested.adopt_variant({"mean_mc2_gain": 0.03}, {"candidate": True, "mean_mc2_gain": 0.02})
    assert not nested.adopt_variant({"mean_mc2_gain": 0.0}, {"candidate": False, "mean_mc2_gain": 0.5})
    with pytest.raises(ValueError, match="lack FineSteer at λ = 16"):
        nested.with_variant({}, {("finesteer", lam): {} for lam in nested.STRENGTHS[:-1]})
    argv = nested.inner_argv(Path("/x/f.jsonl"), 11, Path("/o"), Path("/c"), "m.gguf", ("cluster_on=query", "k_range=2,4"))
    assert argv[argv.index("--methods") + 1] == "unsteered,finesteer"
    assert [argv[i + 1] for i, x in enumerate(argv) if x == "--mose-option"] == ["cluster_on=query", "k_range=2,4"]
    with pytest.raises(SystemExit):
        nested.main(["run", "--fold", "1", "--layers", "11", "--out", str(tmp_path), "--cache-dir", str(tmp_path),
                     "--variant", "qc"])
    assert "--variant NAME and --mose-option go together" in capsys.readouterr().err


def test_truthfulqa_nested_takes_each_folds_training_half():
    nested = _load("truthfulqa_nested")
    from finesteer.eval.data import disjoint_split

    rows = [f"q{i}" for i in range(10)]
    fit, scored = disjoint_split(10, 0.5, 0)
    one, two = nested.training_half(rows, 1), nested.training_half(rows, 2)
    assert one == [rows[i] for i in fit] and two == [rows[i] for i in scored] and sorted(one + two) == sorted(rows)
    with pytest.raises(ValueError, match="fold must be 1 or 2"):
        nested.training_half(rows, 3)
    argv = nested.inner_argv(Path("/x/fold1_train.jsonl"), 9, Path("/o"), Path("/c"), "m.gguf")
    assert argv[argv.index("--layer") + 1] == "9" and argv[argv.index("--methods") + 1] == "unsteered,caa,finesteer"
    for flag in ("--pairs", "--target", "--truthfulqa"):
        assert argv[argv.index(flag) + 1] == "/x/fold1_train.jsonl"
    assert argv[argv.index("--strengths") + 1] == "2,4,8,16"


@pytest.fixture(scope="module")
def oracle():
    return _load("truthfulqa_oracle")


def test_truthfulqa_oracle_map_gives_each_state_its_target_through_the_operator(oracle):
    """The oracle is the operator's own MoSE: on the states it was fitted on, the fused reference
    computes each target (n states in general position, n ≤ d + 1), also under a 1e-5 perturbation."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(12, 32, generator=g) + 5.0  # a large common part, as real prompt states have
    t = torch.randn(12, 32, generator=g)
    mose = oracle.oracle_mose(h, t)
    assert mose.fit_stats["rank"] == 11  # the centred targets of 12 rows span 11 directions
    torch.testing.assert_close(mose.vector(h).double(), t.double(), rtol=1e-4, atol=1e-4)
    check = oracle._cosines(mose, h, t.double())
    assert check["min"] > 0.9999 and check["perturbed_min"] > 0.999


def test_truthfulqa_oracle_graded_targets_turn_from_the_mean_to_the_own_delta(oracle):
    mean = torch.tensor([2.0, 0.0, 0.0])
    own = torch.tensor([[1.0, 1.0, 0.0],     # 45° from the mean
                        [0.0, 0.0, 3.0],     # orthogonal
                        [5.0, 0.5, 0.0]])    # already close to the mean (cosine 0.995)
    for c in (0.9, 0.8):  # both above the first two rows' cosines with the mean (0.707, 0)
        t = oracle.graded_targets(own, mean, c, norm=7.0)
        torch.testing.assert_close(t.norm(dim=1), torch.full((3,), 7.0, dtype=torch.float64))
        cos_own = torch.nn.functional.cosine_similarity(t, own.double(), dim=1)
        cos_mean = torch.nn.functional.cosine_similarity(t, mean.double()[None], dim=1)
        # rows the mean agrees with less than c are turned exactly to c; the third stays on the mean
        torch.testing.assert_close(cos_own[:2], torch.full((2,), c, dtype=torch.float64))
        torch.testing.assert_close(cos_mean[2], torch.tensor(1.0, dtype=torch.float64))
        assert float(t[0, 2]) == 0.0 and float(t[1, 1]) == 0.0  # in the plane of the mean and the own row
    torch.testing.assert_close(oracle.graded_targets(own, mean, 1.0, 1.0), own.double() / own.double().norm(dim=1, keepdim=True))
    with pytest.raises(ValueError, match="own cosine"):
        oracle.graded_targets(own, mean, 0.0, 1.0)
    assert oracle.oracle_name(1.0) == "oracle" and oracle.oracle_name(0.5) == "oracle_cos0.5"


def test_truthfulqa_oracle_first_pairs_are_the_pairs_a_smaller_count_builds(oracle):
    from finesteer.eval.data import MCQuestion, truthfulqa_pairs

    qs = [MCQuestion(question="a", best="c0", correct=["c0", "c1", "c2"], incorrect=["i0", "i1"]),
          MCQuestion(question="b", best="d0", correct=["d0"], incorrect=["j0", "j1", "j2", "j3"])]
    p8, c8, r8 = truthfulqa_pairs(qs, 8)
    mask = oracle.first_pairs(p8, 2).tolist()
    kept = tuple([x for x, k in zip(v, mask) if k] for v in (p8, c8, r8))
    assert kept == truthfulqa_pairs(qs, 2)


def test_truthfulqa_oracle_averages_each_questions_pairs_and_refuses_a_question_without_one(oracle):
    d = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0]])
    got = oracle.per_question_deltas(["b", "a", "b"], d, ["a", "b"])
    assert got.tolist() == [[3.0, 2.0], [0.5, 2.0]]
    with pytest.raises(ValueError, match="no answer pair for 1 question"):
        oracle.per_question_deltas(["a"], d[:1], ["a", "c"])


def test_truthfulqa_oracle_pools_the_two_folds_and_picks_each_methods_best(oracle):
    def fold(task, caa, orc):
        pq = {"unsteered": {"0.0": {"mc1": [False, False], "mc2": [0.2, 0.4]}},
              "caa": {lam: {"mc1": v[0], "mc2": v[1]} for lam, v in caa.items()},
              "oracle": {lam: {"mc1": v[0], "mc2": v[1]} for lam, v in orc.items()}}
        return {"task": task, "n": 2, "per_question": pq, "oracles": {"oracle": {}},
                "own_delta_cosine_with_caa_mean": 0.2}

    f1 = fold("truthfulness", {"2.0": ([True, False], [0.5, 0.5]), "8.0": ([True, True], [0.6, 0.4])},
              {"2.0": ([True, True], [0.9, 0.7]), "8.0": ([False, True], [0.8, 0.8])})
    f2 = fold("truthfulness_swapped", {"2.0": ([False, False], [0.3, 0.3]), "8.0": ([True, False], [0.6, 0.6])},
              {"2.0": ([True, False], [0.5, 0.5]), "8.0": ([True, True], [0.7, 0.9])})
    doc = oracle.pool([f1, f2])
    assert doc["n"] == 4
    assert doc["pooled"]["caa"]["8.0"] == {"mc1": 0.75, "mc2": pytest.approx(0.55)}
    assert doc["best"]["caa"] == {"mc1": 0.75, "mc2": pytest.approx(0.55)}
    assert doc["best"]["oracle"] == {"mc1": 0.75, "mc2": pytest.approx(0.8)}  # MC1 ties at 2 and 8
    with pytest.raises(ValueError, match="one run of each"):
        oracle.pool([f1, f1])


def test_bench_quality_task_config_takes_further_eval_options_after_the_tasks_own():
    """The studies refit a task's steerers from task_config; further `finesteer eval` options (the
    adopted TruthfulQA fit's, for truthfulqa_oracle.py) change only what they name."""
    bench = _bench_quality()
    plain = bench.task_config("truthfulness", "/tmp/unused-cache")
    adopted = bench.task_config("truthfulness", "/tmp/unused-cache",
                                ("--mose-cluster-on", "query", "--k-min", "2", "--k-max", "4", "--mose-stopping", "cv"))
    assert plain.mose_options["cluster_on"] == "delta" and plain.mose_options["stopping"] == "holdout"
    assert adopted.mose_options["cluster_on"] == "query" and adopted.mose_options["stopping"] == "cv"
    assert tuple(adopted.mose_options["k_range"]) == (2, 4)
    assert (adopted.layer, adopted.limit_pairs, adopted.truthfulqa) == (plain.layer, plain.limit_pairs, plain.truthfulqa)


def test_truthfulqa_oracle_query_predictions_and_their_agreement_with_the_own_delta(oracle):
    """Ridge recovers a linear state → δ map as its penalty vanishes and tends to the mean as it
    grows; k-NN averages the nearest training questions; agreement reads mean cosines and the best
    single training question in hindsight."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(30, 8, generator=g, dtype=torch.float64)
    W = torch.randn(8, 5, generator=g, dtype=torch.float64)
    d = 3.0 + q @ W  # δ is the mean plus a linear function of the (centred) state
    q_new = torch.randn(4, 8, generator=g, dtype=torch.float64)
    pred = oracle.query_predictions(q, d, q_new, penalties=(1e-9, 1e6), neighbours=(1, 30))
    truth = d.mean(0) + (q_new - q.mean(0)) @ W
    torch.testing.assert_close(pred["ridge1e-09"], truth, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pred["ridge1e+06"], d.mean(0).expand(4, -1), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pred["knn30"], d.mean(0).expand(4, -1))
    assert pred["mean"].shape == (4, 5)
    centred = q - q.mean(0)
    nearest = torch.nn.functional.cosine_similarity((q_new - q.mean(0))[:, None], centred[None], dim=2).argmax(1)
    torch.testing.assert_close(pred["knn1"], d[nearest])
    agree = oracle.agreement(truth, {"exact": truth, "opposite": -truth}, d)
    assert agree["exact"]["cosine"] == pytest.approx(1.0) and agree["exact"]["mse"] == 0.0
    assert agree["opposite"]["cosine"] == pytest.approx(-1.0)
    assert agree["opposite"]["mse"] == pytest.approx(float((2 * truth).square().mean()))
    assert -1.0 <= agree["hindsight_best_training_question"]["cosine"] <= 1.0
    own_rows = oracle.agreement(d[:3], {}, d)["hindsight_best_training_question"]
    assert own_rows["cosine"] == pytest.approx(1.0) and own_rows["mse"] == 0.0 and own_rows["n"] == 3


def test_bench_quality_block_states_are_the_extracted_blocks_outputs(oracle):
    """The pooled query's per-token states: at the last token, exactly what extraction records after
    the same block, the last block included (HF's last hidden_states entry is after the final norm);
    the pool is their mean."""
    from tests.hf_tiny import tiny_model, tiny_tokenizer

    from finesteer import extract

    model, tok = tiny_model(layers=3), tiny_tokenizer()
    prompts = ["what is the moon made of", "is water wet"]
    last = extract.last_token_states(model, tok, prompts, [0, 2], progress=False, prompt_format="plain")
    ids = extract.encode_prompts(tok, prompts, prompt_format="plain")
    for i, seq in enumerate(ids):
        per_token = _bench_quality().block_states(model, seq, [0, 2])
        for layer in (0, 2):
            assert per_token[layer].shape == (len(seq), 64)
            torch.testing.assert_close(per_token[layer][-1].float(), last[layer][i], rtol=1e-5, atol=1e-5)
    pooled = oracle.pooled_prompt_states(model, tok, prompts, [2], "plain")
    torch.testing.assert_close(pooled[2][1], _bench_quality().block_states(model, ids[1], [2])[2].mean(0))


@pytest.fixture(scope="module")
def token_gate():
    return _load("truthfulqa_token_gate")


def test_truthfulqa_token_gate_answer_states_are_the_blocks_outputs_and_are_cached(token_gate, tmp_path):
    """Each answer's states are the steered block's outputs from the sequence's last prompt token on,
    one row per answer token after it, as the harness encodes the scored sequence; a second call
    reads the cache and runs no model."""
    from types import SimpleNamespace

    from tests.hf_tiny import tiny_model, tiny_tokenizer

    from finesteer.eval.data import MCQuestion
    from finesteer.eval.harness import _Encoder

    model, tok = tiny_model(layers=3), tiny_tokenizer()
    run = SimpleNamespace(enc=_Encoder(model, tok, "plain"), cfg=SimpleNamespace(layer=1))
    q = MCQuestion("is water wet", "yes it is", ["yes it is", "yes"], ["no never", "yes"])
    cache = tmp_path / "states.pt"
    states = token_gate.answer_token_states(model, run, [q], cache)
    assert set(states) == {(q.question, a) for a in ("yes it is", "yes", "no never")}
    for answer in ("yes it is", "no never"):
        seq = run.enc.response(q.question, answer, "test")
        with torch.no_grad():  # block 1 of 3 is not the last, so hidden_states[2] is its output
            want = model(torch.tensor([seq.ids]), output_hidden_states=True).hidden_states[2][0, seq.last_prompt:]
        h = states[(q.question, answer)]
        assert h.dtype == torch.float16 and h.shape == (seq.n_scored + 1, 64)
        torch.testing.assert_close(h.float(), want.half().float(), rtol=0, atol=0)
    model.forward = None  # a second call must not run the model
    again = token_gate.answer_token_states(model, run, [q], cache)
    assert all(torch.equal(again[k], states[k]) for k in states)


def test_truthfulqa_token_gate_rows_put_incorrect_answer_tokens_on_the_target_side(token_gate):
    from finesteer.eval.data import MCQuestion

    d = 4
    q = MCQuestion("q", "best", ["best", "right", "both"], ["wrong", "both"])
    states = {("q", "best"): torch.full((3, d), 1.0), ("q", "right"): torch.full((2, d), 2.0),
              ("q", "both"): torch.full((4, d), 3.0), ("q", "wrong"): torch.full((3, d), 4.0)}
    states[("q", "wrong")][0] = 9.0  # row 0: the last prompt token
    benign_prompts = torch.full((5, d), -1.0)
    target, benign = token_gate.gate_rows([q], states, benign_prompts)
    # "both" is listed as correct and incorrect: it counts as incorrect only
    assert sorted(target[:, 0].tolist()) == [3.0] * 3 + [4.0] * 2
    assert sorted(benign[:, 0].tolist()) == [-1.0] * 5 + [1.0] * 2 + [2.0] + [9.0]


def test_truthfulqa_token_gate_random_direction_is_seeded_with_the_given_norm(token_gate):
    like = torch.tensor([3.0, 4.0, 0.0])
    a, b = token_gate.random_direction(like, 0), token_gate.random_direction(like, 0)
    assert torch.equal(a, b) and a.dtype == like.dtype
    assert abs(float(a.norm()) - 5.0) < 1e-5
    assert not torch.equal(a, token_gate.random_direction(like, 1))


def test_truthfulqa_token_gate_pools_the_folds_and_pairs_against_caa(token_gate):
    def fold(task, caa8, caa16, gate8, gate16):
        per = {"unsteered": {"0.0": {"mc1": [False, False], "mc2": [0.2, 0.3]}},
               "caa": {"8.0": caa8, "16.0": caa16}, "answer_gate_0.2": {"8.0": gate8, "16.0": gate16}}
        return {"task": task, "n": 2, "per_question": per, "gates": {"0.2": {}},
                "benign_kl": {"caa": {"8.0": 1.0, "16.0": 2.0}, "answer_gate_0.2": {"8.0": 0.1, "16.0": 0.2}}}

    hit = lambda *x: {"mc1": list(x[:2]), "mc2": list(x[2:])}
    f1 = fold("truthfulness", hit(True, False, 0.5, 0.4), hit(False, False, 0.3, 0.3),
              hit(True, True, 0.6, 0.5), hit(False, True, 0.2, 0.9))
    f2 = fold("truthfulness_swapped", hit(False, False, 0.4, 0.4), hit(True, False, 0.3, 0.4),
              hit(True, False, 0.5, 0.5), hit(False, False, 0.1, 0.1))
    out = token_gate.pool([f2, f1])
    assert out["n"] == 4 and out["caa_best_mc2_strength"] == "8.0"
    assert out["pooled"]["caa"]["8.0"]["mc1"] == pytest.approx(0.25)
    assert out["pooled"]["caa"]["8.0"]["mc2"] == pytest.approx(0.425)
    assert out["pooled"]["answer_gate_0.2"]["8.0"]["benign_kl"] == [0.1, 0.1]
    assert out["best"]["answer_gate_0.2"] == {"mc1": pytest.approx(0.75), "mc2": pytest.approx(0.525)}
    p = out["paired"]["answer_gate_0.2"]["16.0"]
    assert p["caa_same_strength"]["mc2_diff"] == pytest.approx((0.2 + 0.9 + 0.1 + 0.1 - 1.3) / 4)
    assert p["caa_best_mc2_8.0"]["mc1_a_only"] == 1 and p["caa_best_mc2_8.0"]["mc1_b_only"] == 1
    with pytest.raises(ValueError, match="runs of each"):
        token_gate.pool([f1, f1])


def test_truthfulqa_token_gate_merges_a_folds_runs_and_refuses_disagreeing_ones(token_gate):
    base = {"unsteered": {"0.0": {"mc1": [False], "mc2": [0.2]}}, "caa": {"8.0": {"mc1": [True], "mc2": [0.6]}}}
    first = {"task": "truthfulness", "n": 1, "per_question": base, "gates": {"0.2": {"a": 1}},
             "benign_kl": {"caa": {"8.0": 1.5}}}
    second = {"task": "truthfulness", "n": 1, "gates": {},
              "per_question": {"unsteered": base["unsteered"],
                               "answer_gate_0.2_random": {"2.0": {"mc1": [False], "mc2": [0.3]}}},
              "benign_kl": {"answer_gate_0.2_random": {"2.0": 0.4}}}
    (fold,) = token_gate.merge_runs([first, second])
    assert set(fold["per_question"]) == {"unsteered", "caa", "answer_gate_0.2_random"}
    assert fold["benign_kl"]["answer_gate_0.2_random"]["2.0"] == 0.4 and fold["benign_kl"]["caa"]["8.0"] == 1.5
    assert fold["gates"] == {"0.2": {"a": 1}}
    other = json.loads(json.dumps(second))
    other["per_question"]["unsteered"]["0.0"]["mc2"] = [0.21]
    with pytest.raises(ValueError, match="disagree on unsteered"):
        token_gate.merge_runs([first, other])
    with pytest.raises(ValueError, match="score 1 and 2 questions"):
        token_gate.merge_runs([first, {**second, "n": 2}])


def test_bench_quality_study_document_skips_without_data_and_write_json_makes_folders(tmp_path, monkeypatch, capsys):
    """The study scripts' command body: without the shared data folder it says so and computes nothing
    (no model is loaded); write_json writes indented JSON into folders it makes."""
    bench = _bench_quality()
    monkeypatch.setattr(bench, "DATA", tmp_path / "absent")
    called = []
    assert bench.study_document("some_study", 1, None, lambda model, tok: called.append(1)) is None
    assert not called and "some_study: skipped" in capsys.readouterr().out
    out = tmp_path / "a" / "b" / "doc.json"
    bench.write_json({"x": [1, 2]}, out)
    assert json.loads(out.read_text()) == {"x": [1, 2]} and out.read_text().endswith("\n")


def test_truthfulqa_token_gate_benign_token_states_split_prompt_and_continuation(token_gate):
    """The benign set's rows: the steered block's output at every prompt token, then at every token of
    the run's continuation of it; the open share counts rows whose score passes τ."""
    from types import SimpleNamespace

    from tests.hf_tiny import tiny_model, tiny_tokenizer

    from finesteer.eval.harness import _Encoder

    model, tok = tiny_model(layers=3), tiny_tokenizer()
    conts = {"hello there": [31, 11, 25], "is it cold": [15, 26]}
    asked = []
    run = SimpleNamespace(enc=_Encoder(model, tok, "plain"), cfg=SimpleNamespace(layer=1),
                          _continuations=lambda name, ids: asked.append(name) or list(conts.values()))
    prompts = SimpleNamespace(name="benign", prompts=list(conts))
    prompt_rows, cont_rows = token_gate.benign_token_states(model, run, prompts)
    ids = run.enc.prompts(prompts.prompts)
    want_p, want_c = [], []
    for p, c in zip(ids, conts.values()):
        with torch.no_grad():
            h = model(torch.tensor([list(p) + c]), output_hidden_states=True).hidden_states[2][0]
        want_p.append(h[:len(p)])
        want_c.append(h[len(p):])
    torch.testing.assert_close(prompt_rows, torch.cat(want_p), rtol=0, atol=0)
    torch.testing.assert_close(cont_rows, torch.cat(want_c), rtol=0, atol=0)
    assert cont_rows.shape[0] == 5 and asked == ["eval-benign"]  # the harness's cache name of the set's continuations
    gate = SimpleNamespace(score=lambda x: x[:, 0], threshold=0.5)
    assert token_gate.gate_open_share(gate, torch.tensor([[0.0], [0.6], [1.0], [0.5]])) == 0.5


def test_truthfulqa_token_gate_continuation_rows_are_the_greedy_continuations_states(token_gate):
    """The extra benign rows: every token of each prompt's unsteered greedy continuation, as
    benign_token_states reads them from those continuations."""
    from types import SimpleNamespace

    from tests.hf_tiny import tiny_model, tiny_tokenizer

    from finesteer.eval.harness import _Encoder
    from finesteer.eval.scoring import greedy_continuations

    model, tok = tiny_model(layers=3), tiny_tokenizer()
    enc = _Encoder(model, tok, "plain")
    run = SimpleNamespace(enc=enc, tok=tok, cfg=SimpleNamespace(layer=1, continuation_tokens=3, batch_size=2))
    prompts = ["hello there", "is it cold", "why"]
    rows = token_gate.continuation_token_states(model, run, prompts)
    conts = greedy_continuations(model, enc.prompts(prompts), 3, enc.pad_id, tok.eos_token_id, 2, progress=False)
    assert rows.shape == (sum(len(c) for c in conts), 64)
    _, want = token_gate.benign_token_states(model, run, SimpleNamespace(prompts=prompts),
                                             continuations=dict(zip(prompts, conts)))
    torch.testing.assert_close(rows, want, rtol=0, atol=0)
