"""The README's Quickstart runs as written (in a fresh process, in an empty folder) and does what
its comments say: the steerer makes the forgery request refuse and leaves the everyday one alone."""
from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from finesteer.demo import corpus  # noqa: E402
from finesteer.demo.pipeline import MODEL_DIR  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"


def _quickstart() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Quickstart (Python)"):]
    section = section[:section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Quickstart section should hold exactly one Python block"
    return blocks[0]


@pytest.mark.slow
@pytest.mark.skipif(not (MODEL_DIR / "config.json").is_file(), reason=f"embedded demo model missing at {MODEL_DIR}")
def test_quickstart_runs_as_written(tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text(_quickstart(), encoding="utf-8")
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "refusal.safetensors").is_file()
    assert "MoSE(d=128, K=" in res.stdout and "AUROC=" in res.stdout
    answers = [ast.literal_eval(line) for line in res.stdout.splitlines() if line.startswith("[")]
    assert len(answers) == 2, res.stdout
    (base_forgery, base_everyday), (steered_forgery, steered_everyday) = answers
    assert not corpus.is_refusal(base_forgery) and corpus.is_refusal(steered_forgery)
    assert steered_everyday == base_everyday
