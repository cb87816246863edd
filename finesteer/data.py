"""Loading prompt sets and preference pairs from JSONL, JSON, CSV/TSV or a local ``datasets`` folder.

Formats (chosen by the path):

- ``*.jsonl`` / ``*.ndjson``: one JSON object per line (blank lines skipped);
- ``*.json``: a JSON array of objects (or an object with a ``"data"`` / ``"rows"`` array);
- ``*.csv`` / ``*.tsv``: a header row, then one record per row;
- a directory written by ``datasets``' ``save_to_disk`` (needs ``pip install datasets``); for a
  ``DatasetDict`` name the split as ``path:split`` or with ``split=``.

Field mapping: every loader takes the names of the fields to read (``prompt``, ``chosen``,
``rejected`` by default). Every value read must be a non-empty string; a missing field, a
non-string or an empty value raises ``ValueError`` naming the file, the record (1-based, with
the line number for text formats) and the field, and listing the fields the record has.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Optional

__all__ = ["MissingFieldError", "read_records", "load_prompts", "load_pairs"]


class MissingFieldError(ValueError):
    """A record lacks a requested field; ``field`` is its name (callers may say how to choose another)."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field

_JSONL = (".jsonl", ".ndjson")
_CSV = {".csv": ",", ".tsv": "\t"}


def _split_spec(path) -> tuple[Path, Optional[str]]:
    """``"dir:split"`` → (dir, split) when ``dir`` exists and the whole string does not."""
    text = str(path)
    if not os.path.exists(text) and ":" in text:
        head, _, split = text.rpartition(":")
        if head and os.path.isdir(head):
            return Path(head), split
    return Path(text), None


def read_records(path, limit: Optional[int] = None, split: Optional[str] = None) -> list:
    """All records of ``path`` as ``(where, dict)`` pairs, ``where`` naming record and line for messages."""
    path, spec_split = _split_spec(path)
    split = split or spec_split
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        rows = _read_datasets_dir(path, split)
    else:
        suffix = path.suffix.lower()
        if suffix in _JSONL:
            rows = _read_jsonl(path)
        elif suffix == ".json":
            rows = _read_json(path)
        elif suffix in _CSV:
            rows = _read_csv(path, _CSV[suffix])
        else:
            raise ValueError(f"{path}: unknown format {suffix or '(no extension)'!r}; use .jsonl, .json, .csv, .tsv "
                             f"or a datasets save_to_disk folder")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        rows = rows[:limit]
    if not rows:
        raise ValueError(f"{path}: no records")
    return rows


def _read_jsonl(path: Path) -> list:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: line {lineno}: not valid JSON ({exc.msg})") from None
            where = f"{path}: record {len(rows) + 1} (line {lineno})"
            if not isinstance(obj, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            rows.append((where, obj))
    return rows


def _read_json(path: Path) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if isinstance(doc, dict):
        doc = doc.get("data", doc.get("rows"))
    if not isinstance(doc, list):
        raise ValueError(f"{path}: expected a JSON array of objects (or an object with a 'data' array)")
    rows = []
    for i, obj in enumerate(doc, 1):
        if not isinstance(obj, dict):
            raise ValueError(f"{path}: record {i}: expected a JSON object, got {type(obj).__name__}")
        rows.append((f"{path}: record {i}", obj))
    return rows


def _read_csv(path: Path, delimiter: str) -> list:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if not reader.fieldnames:
            raise ValueError(f"{path}: no header row")
        # line_num after reading a record is its last physical line (quoted fields may span lines).
        return [(f"{path}: record {i} (line {reader.line_num})", dict(row)) for i, row in enumerate(reader, 1)]


def _read_datasets_dir(path: Path, split: Optional[str]) -> list:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"{path} is a directory: reading a saved `datasets` dataset needs the `datasets` package "
                          f"(pip install datasets), or export it to JSONL/CSV") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise ValueError(f"{path}: not a dataset written by datasets' save_to_disk ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise ValueError(f"{path}: a DatasetDict with splits {sorted(ds)}; pick one as '{path}:SPLIT'")
            split = next(iter(ds))
        if split not in ds:
            raise ValueError(f"{path}: no split {split!r}; splits: {sorted(ds)}")
        ds = ds[split]
    label = f"{path}" + (f":{split}" if split else "")
    return [(f"{label}: record {i}", dict(row)) for i, row in enumerate(ds, 1)]


def _field(where: str, row: dict, name: str) -> str:
    if name not in row:
        raise MissingFieldError(f"{where}: missing field {name!r} (fields: {', '.join(map(str, row)) or 'none'})",
                                name)
    value = row[name]
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{where}: field {name!r} is empty")
    return value


def load_prompts(path, field: str = "prompt", limit: Optional[int] = None, split: Optional[str] = None) -> list:
    """The ``field`` of every record of ``path`` → list of N non-empty strings."""
    return [_field(where, row, field) for where, row in read_records(path, limit, split)]


def load_pairs(path, prompt_field: str = "prompt", chosen_field: str = "chosen", rejected_field: str = "rejected",
               limit: Optional[int] = None, split: Optional[str] = None) -> tuple:
    """Preference triples of ``path`` → ``(prompts, chosen, rejected)``, three lists of N strings."""
    prompts, chosen, rejected = [], [], []
    for where, row in read_records(path, limit, split):
        prompts.append(_field(where, row, prompt_field))
        chosen.append(_field(where, row, chosen_field))
        rejected.append(_field(where, row, rejected_field))
    return prompts, chosen, rejected
