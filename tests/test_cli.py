"""The `finesteer` CLI end to end on a tiny local Llama directory, and its errors on bad input."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.hf_tiny import save_tiny
from tests.utils import random_steerer

from finesteer import Steerer
from finesteer.cli import main
from finesteer.models import _explain_load_error

WORDS = "lock bread cat dog safe key door code bank math sun rain".split()
FIT_SMALL = ["--rank", "2", "--k-min", "2", "--k-max", "3", "--residual-dim", "2", "--hidden", "16",
             "--epochs", "5", "--quiet"]


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def _fit(root, files, out, *extra) -> int:
    """``finesteer fit`` on the fixture's model and files, small settings, ``extra`` flags appended."""
    return main(["fit", "--model", str(root / "model"), "--layer", "1", "--pairs", files["pairs"], "--target",
                 files["target"], "--benign", files["benign"], "-o", str(out), "--cache-dir", str(root / "cache"),
                 *FIT_SMALL, *extra])


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A saved tiny Llama + tokenizer, small data files, and a steerer fitted by `finesteer fit`."""
    root = tmp_path_factory.mktemp("cli")
    save_tiny(root / "model")
    g = torch.Generator().manual_seed(0)
    pick = lambda n: " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (n,), generator=g))  # noqa: E731
    files = {
        "pairs": _jsonl(root / "pairs.jsonl", [{"prompt": f"How do I {pick(3)}?", "chosen": f"I can't help with "
                                                f"{pick(2)}.", "rejected": f"Sure, {pick(4)}."} for _ in range(24)]),
        "target": _jsonl(root / "target.jsonl", [{"prompt": f"How do I steal a {pick(2)}?"} for _ in range(20)]),
        "benign": _jsonl(root / "benign.jsonl", [{"prompt": f"What is the {pick(2)} like today"}
                                                 for _ in range(20)]),
        "prompts": _jsonl(root / "prompts.jsonl", [{"prompt": "How do I steal a cat code?"},
                                                   {"prompt": "What is the sun like today"},
                                                   {"prompt": "How do I steal a bank key?"}]),
    }
    artifact = root / "st.safetensors"
    rc = _fit(root, files, artifact)
    assert rc == 0
    return root, files, artifact


def test_fit_writes_a_valid_artifact(work):
    root, files, artifact = work
    s = Steerer.load(artifact, hidden_size=64)
    assert s.layer == 1 and s.gate is not None and s.gate.rank == 2 and 2 <= s.mose.num_experts <= 3
    assert s.mose.residual_dim == 2 and s.mose.mlp_hidden == 16
    assert s.gate.report is not None
    assert s.metadata["model_name_or_path"] == str(root / "model")
    assert sorted(p.name for p in (root / "cache").iterdir()) == ["benign-layer1.safetensors",
                                                                   "pairs-layer1.safetensors",
                                                                   "target-layer1.safetensors"]


def test_fit_prints_calibration_and_mose_stats(work, capsys):
    root, files, _ = work
    out = root / "again.safetensors"
    rc = _fit(root, files, out)
    text = capsys.readouterr().out
    assert rc == 0
    assert "SCS gate (energy, rank 2): tau=" in text and "AUROC=" in text
    assert "MoSE: K=" in text and "cluster sizes" in text and "val_loss=" in text
    # a seeded fit on cached activations reproduces the artifact byte for byte
    assert out.read_bytes() == work[2].read_bytes()


def test_fit_mose_init_ridge_is_recorded_in_the_artifact(work, tmp_path):
    root, files, artifact = work
    out = tmp_path / "ridge.safetensors"
    rc = _fit(root, files, out, "--mose-init", "ridge")
    assert rc == 0
    stats = Steerer.load(out, hidden_size=64).mose.fit_stats
    assert stats["hyperparameters"]["init"] == "ridge" and "ridge_penalty" in stats
    assert Steerer.load(artifact, hidden_size=64).mose.fit_stats["hyperparameters"]["init"] == "mean"


def test_fit_mose_shrink_cv_and_mose_options_are_reported_and_recorded(work, tmp_path, capsys):
    root, files, _ = work
    out = tmp_path / "shrink.safetensors"
    rc = _fit(root, files, out, "--mose-shrink", "cv", "--mose-option", "shrink_folds=3", "--mose-option",
              "loss=mse_cosine", "--mose-cluster-on", "query")
    assert rc == 0
    assert "MoSE shrinkage toward the mean δ (3-fold cross-validation): weight " in capsys.readouterr().out
    stats = Steerer.load(out, hidden_size=64).mose.fit_stats
    assert stats["hyperparameters"]["shrink"] == "cv" and 0.0 <= stats["shrink"]["weight"] <= 1.0
    assert stats["hyperparameters"]["loss"] == "mse_cosine" and stats["shrink"]["folds"] == 3
    assert stats["hyperparameters"]["cluster_on"] == "query"
    assert main(["inspect", str(out)]) == 0
    shown = capsys.readouterr().out
    assert "experts (clustered on queries), cluster sizes" in shown
    assert f"shrinkage:    weight {stats['shrink']['weight']:.3g} toward the mean δ (3-fold" in shown
    # --mose-option applies over the dedicated flags; a bad one is refused before anything runs
    with pytest.raises(SystemExit):
        main(["fit", "--model", str(root / "model"), "--mose-option", "shrink_folds=many"])
    assert "argument --mose-option: shrink_folds: cannot parse 'many'" in capsys.readouterr().err


def test_fit_mose_stopping_cv_is_reported_and_recorded(work, tmp_path, capsys):
    root, files, artifact = work
    out = tmp_path / "cv.safetensors"
    rc = _fit(root, files, out, "--mose-stopping", "cv", "--mose-option", "stopping_folds=3")
    assert rc == 0
    stats = Steerer.load(out, hidden_size=64).mose.fit_stats
    assert stats["hyperparameters"]["stopping"] == "cv" and stats["stopping"]["folds"] == 3
    assert stats["n_val"] == 0 and stats["best_epoch"] == stats["stopping"]["epochs"]
    shown = capsys.readouterr().out
    assert f"MoSE epochs chosen by 3-fold cross-validation: {stats['best_epoch']} (out-of-fold MSE " in shown
    assert main(["inspect", str(out)]) == 0
    assert (f"stopping:     {stats['best_epoch']} epochs on every row, chosen by 3-fold cross-validation"
            in capsys.readouterr().out)
    assert Steerer.load(artifact, hidden_size=64).mose.fit_stats["hyperparameters"]["stopping"] == "holdout"


def test_fit_says_when_mose_was_still_improving_at_its_epoch_limit(capsys):
    from types import SimpleNamespace

    from finesteer.cli import _print_mose

    def shown(best_epoch, limit=40):
        stats = {"best_epoch": best_epoch, "epochs_run": best_epoch, "hyperparameters": {"epochs": limit}}
        _print_mose(SimpleNamespace(fit_stats=stats, cluster_sizes=None, num_experts=2, residual_dim=2, mlp_hidden=8))
        return capsys.readouterr().out

    assert "still falling at the last of the 40 epochs allowed" in shown(40)
    assert "still falling" not in shown(39) and "still falling" not in shown(0)


def test_fit_null_rows_shrink_mose_on_benign_prompts(work, tmp_path, capsys):
    """--null-rows N: MoSE is also fitted on N of the --benign prompts at δ = 0 (recorded in the
    artifact); the gate is the same fit; more null rows than benign prompts is refused before the
    model is loaded."""
    root, files, artifact = work
    out = tmp_path / "null.safetensors"
    rc = _fit(root, files, out, "--null-rows", "12")
    assert rc == 0
    plain, null = Steerer.load(artifact, hidden_size=64), Steerer.load(out, hidden_size=64)
    assert null.metadata["null_rows"] == 12 and plain.metadata["null_rows"] == 0
    assert torch.equal(null.gate.P, plain.gate.P) and null.gate.threshold == plain.gate.threshold
    # the 24 pairs' rows and 12 null rows (before duplicate queries are merged)
    assert (plain.mose.fit_stats["n_rows"], null.mose.fit_stats["n_rows"]) == (24, 36)
    err = _err(capsys, ["fit", "--model", NO_MODEL, "--layer", "0", "--pairs", files["pairs"], "--target",
                        files["target"], "--benign", files["benign"], "-o", str(tmp_path / "x.safetensors"),
                        *FIT_SMALL, "--null-rows", "21"])
    assert "--null-rows 21: --benign has only 20 prompts to draw them from" in err


def test_generate_writes_base_and_steered_side_by_side(work, tmp_path):
    root, files, artifact = work
    out = tmp_path / "out.jsonl"
    rc = main(["generate", "--model", str(root / "model"), "--steerer", str(artifact), "--prompts",
               files["prompts"], "--strength", "8", "--max-new-tokens", "6", "-o", str(out), "--quiet"])
    assert rc == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in recs] == [json.loads(x)["prompt"] for x in open(files["prompts"])]
    for r in recs:
        assert set(r) == {"prompt", "base", "steered", "layer", "gate_score", "gate"}
        assert 0.0 <= r["gate_score"] <= 1.0 and r["gate"] in (0.0, 1.0) and r["layer"] == 1
        if r["gate"] == 0.0:
            assert r["steered"] == r["base"], "a closed gate must leave the answer unchanged"
    opened = [r for r in recs if r["gate"] == 1.0]
    assert opened and any(r["steered"] != r["base"] for r in opened)


def test_calibrate_moves_only_the_threshold(work, tmp_path, capsys):
    """`finesteer calibrate` sets τ on the given prompts' gate scores (at the artifact's layer, in
    its recorded prompt format) and keeps everything else of the artifact."""
    from finesteer.extract import last_token_states
    from finesteer.fit.metrics import threshold_at_fpr
    from finesteer.models import load_model

    root, files, artifact = work
    out = tmp_path / "calibrated.safetensors"
    rc = main(["calibrate", "--model", str(root / "model"), "--steerer", str(artifact), "--target", files["target"],
               "--benign", files["benign"], "--max-benign-fpr", "0.1", "-o", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert rc == 0
    before, after = Steerer.load(artifact), Steerer.load(out)
    model, tok = load_model(str(root / "model"), device="cpu", progress=False)
    fmt = before.metadata["prompt_format"]
    prompts = [json.loads(line)["prompt"] for line in open(files["benign"])]
    h_b = last_token_states(model, tok, prompts, [1], prompt_format=fmt, progress=False)[1]
    assert after.gate.threshold == threshold_at_fpr(before.gate.score(h_b.float()), 0.1)
    rep = after.gate.report
    assert (rep.n_target, rep.n_benign, rep.max_benign_fpr) == (20, 20, 0.1) and rep.fpr <= 0.1
    assert torch.equal(after.gate.P, before.gate.P) and torch.equal(after.gate.mu, before.gate.mu)
    for name in ("R", "c", "V", "U", "W1", "b1", "W2", "b2"):
        assert torch.equal(getattr(after.mose, name), getattr(before.mose, name)), name
    assert (after.layer, after.strength, after.gate_mode) == (before.layer, before.strength, before.gate_mode)
    assert after.metadata["model_name_or_path"] == before.metadata["model_name_or_path"]
    cal = after.metadata["calibrated_on"]
    assert cal["n_benign"] == 20 and cal["prompt_format"] == fmt
    assert cal["previous_threshold"] == before.gate.threshold
    targets = [json.loads(line)["prompt"] for line in open(files["target"])]
    s_t = before.gate.score(last_token_states(model, tok, targets, [1], prompt_format=fmt, progress=False)[1].float())
    tpr = float((s_t > before.gate.threshold).double().mean())
    assert f"previous gate: tau={before.gate.threshold:.6g}, on these prompts TPR={tpr:.3f}" in text
    assert "recalibrated:  tau=" in text
    # in place: the file is replaced by the recalibrated one
    copy = tmp_path / "copy.safetensors"
    shutil.copy(artifact, copy)
    assert main(["calibrate", "--model", str(root / "model"), "--steerer", str(copy), "--target", files["target"],
                 "--benign", files["benign"], "--max-benign-fpr", "0.1", "-o", str(copy), "--quiet"]) == 0
    assert Steerer.load(copy).gate.threshold == after.gate.threshold


def test_calibrate_refuses_what_it_cannot_do(work, tmp_path, capsys):
    root, files, artifact = work
    base = ["calibrate", "--model", str(root / "model"), "--target", files["target"], "--benign", files["benign"],
            "-o", str(tmp_path / "c.safetensors"), "--quiet"]
    gateless = tmp_path / "gateless.safetensors"
    random_steerer(64, layer=1, with_gate=False).save(gateless)
    err = _err(capsys, base + ["--steerer", str(gateless), "--max-benign-fpr", "0.1"])
    assert "has no gate" in err
    err = _err(capsys, base + ["--steerer", str(artifact), "--max-benign-fpr", "1.5"])
    assert "--max-benign-fpr must be a rate in [0, 1)" in err
    recorded = Steerer.load(artifact).metadata["prompt_format"]
    other = "raw" if recorded != "raw" else "plain"
    err = _err(capsys, base + ["--steerer", str(artifact), "--max-benign-fpr", "0.1", "--prompt-format", other])
    assert f"fitted on prompts in the '{recorded}' format" in err
    assert not (tmp_path / "c.safetensors").exists()


def test_inspect_human_and_json(work, capsys):
    _, _, artifact = work
    assert main(["inspect", str(artifact)]) == 0
    text = capsys.readouterr().out
    for needle in ("layer:        1", "hidden size: 64", "SCS energy, rank 2", "calibration:", "cluster sizes",
                   "MoSE:         K="):
        assert needle in text
    assert main(["inspect", str(artifact), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layer"] == 1 and info["hidden_size"] == 64
    assert sum(info["mose"]["cluster_sizes"]) == info["fit"]["n_train"]
    assert info["calibration"]["n_target"] == 4


def _err(capsys, argv) -> str:
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("finesteer: error: ")
    return err


def test_bad_inputs(work, tmp_path, capsys):
    root, files, artifact = work
    model = str(root / "model")
    fit = ["fit", "--model", model, "--pairs", files["pairs"], "--target", files["target"], "--benign",
           files["benign"], "-o", str(tmp_path / "x.safetensors"), *FIT_SMALL]
    assert "--layer 2 is out of range: LlamaForCausalLM has 2 decoder layers" in _err(capsys, fit + ["--layer", "2"])
    assert "--k-min 3 is larger than --k-max 2" in _err(capsys, fit + ["--layer", "0", "--k-min", "3", "--k-max",
                                                                      "2"])
    assert "missing field 'question'" in _err(capsys, fit + ["--layer", "0", "--prompt-field", "question"])
    # a MoSE option the fit would refuse fails before the model loads (the model path does not exist)
    nowhere = [a if a != model else str(tmp_path / "no-model") for a in fit]
    assert "MoSE options: fit_mose: unknown shrink 'bogus'" in _err(capsys, nowhere + ["--layer", "0", "--mose-option",
                                                                                   "shrink=bogus"])
    assert "init='ridge' writes the linear residual" in _err(capsys, nowhere + ["--layer", "0", "--mose-init", "ridge",
                                                                               "--residual-dim", "9"])

    gen = ["generate", "--model", model, "--prompts", files["prompts"], "--max-new-tokens", "2", "--quiet"]
    small = tmp_path / "d32.safetensors"
    random_steerer(32, layer=0).save(small)
    assert "artifact is for hidden size 32" in _err(capsys, gen + ["--steerer", str(small)])
    far = tmp_path / "layer5.safetensors"
    random_steerer(64, layer=5).save(far)
    assert "--layer 5 is out of range" in _err(capsys, gen + ["--steerer", str(far)])
    assert "fitted for layer 1, not the requested --layer 0" in _err(capsys, gen + ["--steerer", str(artifact),
                                                                                   "--layer", "0"])
    gen_ok = ["generate", "--model", model, "--steerer", str(artifact), "--max-new-tokens", "2", "--quiet"]
    missing = _jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}, {"question": "no prompt here"}])
    assert "q.jsonl: record 2 (line 2): missing field 'prompt' (fields: question)" in \
        _err(capsys, gen_ok + ["--prompts", missing])
    empty = _jsonl(tmp_path / "e.jsonl", [{"prompt": ""}])
    assert "record 1 (line 1): field 'prompt' is empty" in _err(capsys, gen_ok + ["--prompts", empty])
    long = _jsonl(tmp_path / "l.jsonl", [{"prompt": "ok"}, {"prompt": "x" * 200}])
    assert "prompt 1: 204 tokens, longer than the model's context of 128 tokens" in \
        _err(capsys, gen_ok + ["--prompts", long])
    assert "no such steerer file" in _err(capsys, gen_ok[:4] + [str(tmp_path / "none.safetensors"), "--prompts",
                                                                files["prompts"]])
    assert "no such directory" in _err(capsys, ["generate", "--model", str(tmp_path / "nomodel"), "--steerer",
                                                str(artifact), "--prompts", files["prompts"]])
    (tmp_path / "empty_dir").mkdir()
    assert "has no config.json" in _err(capsys, ["generate", "--model", str(tmp_path / "empty_dir"), "--steerer",
                                                 str(artifact), "--prompts", files["prompts"]])
    assert "no such steerer file" in _err(capsys, ["inspect", str(tmp_path / "nope.safetensors")])


def test_load_error_messages_say_what_to_do():
    gated = _explain_load_error("meta/llama", OSError("You are trying to access a gated repo. 401 Client Error"))
    assert "gated" in gated and "huggingface-cli login" in gated and "HF_TOKEN" in gated
    offline = _explain_load_error("a/b", OSError("We couldn't connect to 'https://huggingface.co' to load the files, "
                                                 "and couldn't find them in the cached files."))
    assert "cannot be reached" in offline and "local model directory" in offline
    missing = _explain_load_error("a/b", OSError("a/b is not a local folder and is not a valid model identifier"))
    assert "no such model" in missing


def test_help_lists_the_commands_including_demo(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for cmd in ("fit", "calibrate", "generate", "inspect", "demo"):
        assert re.search(rf"^    {cmd}\b", text, re.M), cmd
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    for opt in ("--prompt-field", "--chosen-field", "--rejected-field", "--no-chat-template", "--max-benign-fpr",
                "--delta-positions", "--k-min", "--residual-dim", "--hidden", "--epochs", "--seed", "--strength",
                "--gate-mode", "--device", "--dtype", "--skip-long"):
        assert opt in text


def test_console_script_runs():
    # the script installed beside this interpreter first: a venv used without activating it (as CI
    # does) would otherwise find another environment's `finesteer` earlier on PATH
    exe = shutil.which("finesteer", path=str(Path(sys.executable).parent)) or shutil.which("finesteer")
    cmd = [exe, "--help"] if exe else [sys.executable, "-m", "finesteer.cli", "--help"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "generate" in res.stdout and "demo" in res.stdout


def test_demo_subcommand_is_wired_lazily(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("usage: finesteer demo")


# ---------------------------------------------------------------------------------------------
# checks that run before the model is loaded (a model path that does not exist proves it: the
# option error comes first)

NO_MODEL = "/nonexistent/finesteer-test-model"


@pytest.mark.parametrize("extra,message", [
    (["--strength", "nan"], "--strength must be a finite number, got nan"),
    (["--strength", "inf"], "--strength must be a finite number, got inf"),
    (["--max-benign-fpr", "1.5"], "--max-benign-fpr must be a rate in [0, 1), got 1.5"),
    (["--calib-fraction", "0"], "--calib-fraction must be a fraction in (0, 1), got 0.0"),
    (["--temperature", "-1"], "--temperature must be a finite number > 0"),
    (["--epochs", "0"], "--epochs must be an integer >= 1, got 0"),
    (["--rank", "0"], "--rank must be an integer >= 1, got 0"),
    (["--k-min", "1"], "--k-min must be an integer >= 2, got 1"),
    (["--batch-size", "0"], "--batch-size must be an integer >= 1, got 0"),
    (["--limit", "0"], "--limit must be an integer >= 1, got 0"),
    (["--null-rows", "-1"], "--null-rows must be an integer >= 0, got -1"),
])
def test_fit_checks_numbers_before_loading_the_model(work, tmp_path, capsys, extra, message):
    _, files, _ = work
    argv = ["fit", "--model", NO_MODEL, "--layer", "0", "--pairs", files["pairs"], "--target", files["target"],
            "--benign", files["benign"], "-o", str(tmp_path / "x.safetensors"), *FIT_SMALL, *extra]
    err = _err(capsys, argv)
    assert message in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("extra,message", [
    (["--strength", "nan"], "--strength must be a finite number, got nan"),
    (["--top-p", "0"], "--top-p must be a probability mass in (0, 1], got 0.0"),
    (["--sampling-temperature", "nan"], "--sampling-temperature must be a finite number > 0, got nan"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
])
def test_generate_checks_numbers_before_loading_the_model(work, capsys, extra, message):
    _, files, artifact = work
    argv = ["generate", "--model", NO_MODEL, "--steerer", str(artifact), "--prompts", files["prompts"], *extra]
    assert message in _err(capsys, argv)


def test_output_path_is_checked_before_the_model_load(work, tmp_path, capsys):
    _, files, artifact = work
    fit = ["fit", "--model", NO_MODEL, "--layer", "0", "--pairs", files["pairs"], "--target", files["target"],
           "--benign", files["benign"], *FIT_SMALL]
    err = _err(capsys, fit + ["-o", str(tmp_path)])
    assert f"-o/--output {tmp_path}: is a directory" in err and err.count("\n") == 1
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    assert "is not a directory" in _err(capsys, fit + ["-o", str(a_file / "out.safetensors")])
    gen = ["generate", "--model", NO_MODEL, "--steerer", str(artifact), "--prompts", files["prompts"]]
    assert "is a directory" in _err(capsys, gen + ["-o", str(tmp_path)])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /sys, which refuses new files even to root")
def test_read_only_output_folder_fails_in_one_line_before_the_fit(work, capsys):
    _, files, _ = work
    argv = ["fit", "--model", NO_MODEL, "--layer", "0", "--pairs", files["pairs"], "--target", files["target"],
            "--benign", files["benign"], "-o", "/sys/finesteer-test.safetensors", *FIT_SMALL]
    err = _err(capsys, argv)
    assert "-o/--output /sys/finesteer-test.safetensors: cannot write in /sys" in err and err.count("\n") == 1


def test_operating_system_errors_are_one_line(work, capsys, monkeypatch):
    import finesteer.cli as cli

    def denied(args):
        raise PermissionError(13, "Permission denied", "/some/file.safetensors")
    monkeypatch.setitem(cli.COMMANDS, "inspect", denied)
    err = _err(capsys, ["inspect", "x.safetensors"])
    assert err == "finesteer: error: /some/file.safetensors: Permission denied\n"


def test_directory_given_as_an_artifact_says_so(work, tmp_path, capsys):
    _, files, _ = work
    assert "is a directory, not a steerer file" in _err(capsys, ["inspect", str(tmp_path)])
    assert "is a directory, not a steerer file" in _err(capsys, ["generate", "--model", NO_MODEL, "--steerer",
                                                                 str(tmp_path), "--prompts", files["prompts"]])


def test_inspect_into_a_closed_pipe_prints_no_traceback(work):
    _, _, artifact = work
    proc = subprocess.Popen([sys.executable, "-m", "finesteer.cli", "inspect", "--json", str(artifact)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader goes away before anything is written, as `| head -c0` would
    err = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err
    assert proc.returncode == 1


def test_missing_field_names_the_flag_that_chooses_it(work, tmp_path, capsys):
    _, files, _ = work
    pairs = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b", "bad": "c"}])
    argv = ["fit", "--model", NO_MODEL, "--layer", "0", "--pairs", pairs, "--target", files["target"], "--benign",
            files["benign"], "-o", str(tmp_path / "x.safetensors"), *FIT_SMALL]
    assert "missing field 'rejected' (fields: prompt, chosen, bad); choose the field with --rejected-field" in \
        _err(capsys, argv)


def test_skip_long_drops_and_counts_rows_longer_than_the_context(work, tmp_path, capsys):
    root, files, _ = work
    rows = [json.loads(line) for line in open(files["pairs"])]
    rows[3] = {"prompt": "x" * 150, "chosen": "No.", "rejected": "Sure."}  # > 128-token context
    pairs = _jsonl(tmp_path / "long.jsonl", rows)
    argv = ["fit", "--model", str(root / "model"), "--layer", "1", "--pairs", pairs, "--target", files["target"],
            "--benign", files["benign"], "-o", str(tmp_path / "s.safetensors"), *FIT_SMALL]
    err = _err(capsys, argv)
    assert "--pairs: 1 row(s) (first: record 4) are longer than the model's context of 128 tokens" in err
    assert "--skip-long" in err and not (tmp_path / "s.safetensors").exists()
    assert main(argv + ["--skip-long"]) == 0
    out = capsys.readouterr().out
    assert "skipped (longer than the context of 128 tokens): 1 pairs, 0 target prompts, 0 benign prompts" in out
    s = Steerer.load(tmp_path / "s.safetensors")
    assert s.metadata["n_pairs"] == len(rows) - 1
    assert s.metadata["skipped_long"] == {"pairs": 1, "target": 0, "benign": 0}


def test_library_errors_do_not_name_command_line_flags(tmp_path):
    from finesteer.data import load_prompts

    path = _jsonl(tmp_path / "q.jsonl", [{"question": "hi"}])
    with pytest.raises(ValueError) as exc:
        load_prompts(path)
    assert "--" not in str(exc.value)


def test_fit_gate_on_response_tokens_serves_in_token_mode(work, tmp_path, capsys, monkeypatch):
    """`finesteer fit --gate-tokens response`: the gate is fitted on the pairs' response tokens (rejected
    against chosen, the prompts' and the benign prompts' last tokens, and --gate-continuations of the
    model's own text), recorded in the artifact; `generate` then needs --mode token, `calibrate`
    refuses it (it calibrates on prompts), and attaching it in prompt mode warns."""
    import finesteer.fit as fit_pkg

    from finesteer.extract import last_token_states, response_deltas, response_token_states
    from finesteer.integrations.hf import FusedSteerer
    from finesteer.models import load_model

    root, files, _ = work
    out = tmp_path / "response.safetensors"
    argv = ["fit", "--model", str(root / "model"), "--layer", "1", "--pairs", files["pairs"], "--benign",
            files["benign"], "-o", str(out), *FIT_SMALL, "--scs-method", "probe", "--rank", "1",
            "--gate-tokens", "response", "--gate-continuations", "5", "--continuation-tokens", "3"]
    seen = []
    real = fit_pkg.fit_scs
    monkeypatch.setattr(fit_pkg, "fit_scs", lambda t, b, **kw: seen.append((t, b)) or real(t, b, **kw))
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "gate rows (response tokens): rejected response tokens" in text and "benign continuation tokens" in text
    steerer = Steerer.load(out)
    assert steerer.metadata["gate_tokens"] == "response" and steerer.reads_response_tokens
    assert not Steerer.load(work[2]).reads_response_tokens
    assert steerer.metadata["gate_continuations"] == {"prompts": 5, "tokens": 3}
    # the gate's rows: every token of the distinct rejected responses; then every token of the chosen
    # ones, each pair prompt's last token, the benign prompts' last tokens, 5 continuations' tokens
    model, tok = load_model(str(root / "model"), device="cpu", progress=False)
    fmt = steerer.metadata["prompt_format"]
    recs = [json.loads(line) for line in open(files["pairs"])]
    (target, benign), = seen
    rej = list(dict.fromkeys((r["prompt"], r["rejected"]) for r in recs))
    want, _ = response_token_states(model, tok, [p for p, _ in rej], [x for _, x in rej], [1], prompt_format=fmt,
                                    progress=False)
    torch.testing.assert_close(target, want[1], atol=2e-5, rtol=1e-5)
    cho = [k for k in dict.fromkeys((r["prompt"], r["chosen"]) for r in recs) if k not in set(rej)]
    chosen_rows, _ = response_token_states(model, tok, [p for p, _ in cho], [x for _, x in cho], [1],
                                           prompt_format=fmt, progress=False)
    n_prompts = len({r["prompt"] for r in recs})
    n_cont = benign.shape[0] - chosen_rows[1].shape[0] - n_prompts - 20
    assert 5 <= n_cont <= 15
    torch.testing.assert_close(benign[:chosen_rows[1].shape[0]], chosen_rows[1], atol=2e-5, rtol=1e-5)
    queries, _ = response_deltas(model, tok, [r["prompt"] for r in recs], [r["chosen"] for r in recs],
                                 [r["rejected"] for r in recs], [1], prompt_format=fmt, progress=False)
    first = sorted({r["prompt"]: i for i, r in reversed(list(enumerate(recs)))}.values())
    start = chosen_rows[1].shape[0]
    torch.testing.assert_close(benign[start:start + n_prompts], queries[1][first], atol=2e-5, rtol=1e-5)
    h_b = last_token_states(model, tok, [json.loads(x)["prompt"] for x in open(files["benign"])], [1],
                            prompt_format=fmt, progress=False)[1]
    torch.testing.assert_close(benign[start + n_prompts:start + n_prompts + 20], h_b, atol=2e-5, rtol=1e-5)
    # serving: token mode only
    gen = ["generate", "--model", str(root / "model"), "--steerer", str(out), "--prompts", files["prompts"],
           "--max-new-tokens", "3", "-o", str(tmp_path / "gen.jsonl"), "--quiet"]
    assert "generate with --mode token" in _err(capsys, gen)
    assert main(gen + ["--mode", "token"]) == 0
    assert len((tmp_path / "gen.jsonl").read_text().splitlines()) == 3
    capsys.readouterr()
    err = _err(capsys, ["calibrate", "--model", str(root / "model"), "--steerer", str(out), "--target", files["pairs"],
                        "--benign", files["benign"], "--max-benign-fpr", "0.1", "-o", str(tmp_path / "c.safetensors"),
                        "--quiet"])
    assert "fitted on response tokens" in err and not (tmp_path / "c.safetensors").exists()
    with pytest.warns(UserWarning, match="fitted on response tokens"):
        FusedSteerer.attach(model, steerer, mode="prompt").detach()


def test_fit_gate_tokens_options_are_checked_before_the_model_load(work, tmp_path, capsys):
    root, files, _ = work
    base = ["fit", "--model", NO_MODEL, "--layer", "0", "--pairs", files["pairs"], "--benign", files["benign"],
            "-o", str(tmp_path / "x.safetensors"), *FIT_SMALL]
    assert "--target is required" in _err(capsys, base)
    assert "drop --target" in _err(capsys, base + ["--target", files["target"], "--gate-tokens", "response"])
    assert "needs --gate-tokens response" in _err(capsys, base + ["--target", files["target"],
                                                                  "--gate-continuations", "3"])
    assert "--gate-continuations must be an integer >= 0" in _err(capsys, base + ["--gate-tokens", "response",
                                                                                 "--gate-continuations", "-1"])
    assert "--continuation-tokens must be an integer >= 1" in _err(capsys, base + ["--gate-tokens", "response",
                                                                                  "--continuation-tokens", "0"])
