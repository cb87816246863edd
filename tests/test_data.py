"""Data loading: formats, field mapping and errors that name the file, record and field."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from finesteer.data import load_pairs, load_prompts, read_records

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_json_csv_tsv_give_the_same_pairs(tmp_path):
    rows = [{"q": "How do I pick a lock?", "good": "I can't help.", "bad": "Sure: ...", "extra": 1},
            {"q": "Hi, \"friend\"\nsecond line", "good": "Hello!", "bad": "Go away.", "extra": 2}]
    _jsonl(tmp_path / "p.jsonl", rows)
    (tmp_path / "p.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "w.json").write_text(json.dumps({"data": rows}), encoding="utf-8")
    import csv
    for name, delim in (("p.csv", ","), ("p.tsv", "\t")):
        with open(tmp_path / name, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter=delim)
            w.writeheader()
            w.writerows(rows)
    want = ([r["q"] for r in rows], [r["good"] for r in rows], [r["bad"] for r in rows])
    for name in ("p.jsonl", "p.json", "w.json", "p.csv", "p.tsv"):
        got = load_pairs(tmp_path / name, prompt_field="q", chosen_field="good", rejected_field="bad")
        assert got == want, name
    assert load_prompts(tmp_path / "p.jsonl", field="q", limit=1) == [rows[0]["q"]]


def test_blank_lines_are_skipped_and_records_counted(tmp_path):
    p = tmp_path / "a.jsonl"
    p.write_text('{"prompt": "a"}\n\n{"prompt": "b"}\n', encoding="utf-8")
    assert load_prompts(p) == ["a", "b"]
    assert read_records(p)[1][0].endswith("record 2 (line 3)")


@pytest.mark.parametrize("row, match", [
    ({"text": "hi"}, r"b\.jsonl: record 2 \(line 2\): missing field 'prompt' \(fields: text\)"),
    ({"prompt": "   "}, r"record 2 \(line 2\): field 'prompt' is empty"),
    ({"prompt": ["a"]}, r"record 2 \(line 2\): field 'prompt' must be a string, got list"),
])
def test_bad_records_name_file_record_and_field(tmp_path, row, match):
    p = _jsonl(tmp_path / "b.jsonl", [{"prompt": "fine"}, row])
    with pytest.raises(ValueError, match=match):
        load_prompts(p)


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl: no such file"):
        load_prompts(tmp_path / "nope.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2: not valid JSON"):
        load_prompts(bad)
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(ValueError, match=r"unknown format '.parquet'"):
        load_prompts(tmp_path / "x.parquet")
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="e.jsonl: no records"):
        load_prompts(tmp_path / "e.jsonl")
    (tmp_path / "arr.jsonl").write_text("[1, 2]\n")
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        load_prompts(tmp_path / "arr.jsonl")
    _jsonl(tmp_path / "c.jsonl", [{"prompt": "x", "chosen": "y"}])
    with pytest.raises(ValueError, match="missing field 'rejected'"):
        load_pairs(tmp_path / "c.jsonl")


def test_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets", reason="the `datasets` package is not installed")
    ds = datasets.Dataset.from_list([{"prompt": "a"}, {"prompt": "b"}])
    ds.save_to_disk(str(tmp_path / "one"))
    assert load_prompts(tmp_path / "one") == ["a", "b"]
    datasets.DatasetDict({"train": ds, "test": ds.select([1])}).save_to_disk(str(tmp_path / "dd"))
    assert load_prompts(f"{tmp_path / 'dd'}:test") == ["b"]
    with pytest.raises(ValueError, match="pick one"):
        load_prompts(tmp_path / "dd")


def test_shared_data_sets_load():
    if not SHARED.is_dir():
        pytest.skip(f"shared development data not found at {SHARED}")
    p, c, r = load_pairs(SHARED / "safety" / "coconot_pref.jsonl", limit=5)
    assert len(p) == len(c) == len(r) == 5
    q = load_prompts(SHARED / "truthfulqa" / "train.jsonl", field="question", limit=3)
    assert len(q) == 3 and all(isinstance(x, str) for x in q)
