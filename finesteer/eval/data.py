"""Evaluation inputs: named prompt sets, TruthfulQA questions, response openings, disjoint splits.

Everything here is plain Python over :func:`finesteer.data.read_records`, so every format that
``finesteer fit`` reads (JSONL, JSON, CSV/TSV, a ``datasets`` folder) works here too.

- :class:`PromptSet` — a named list of prompts with a role (``target``: the steerer should move
  them; ``benign``: it should leave them alone) and, per prompt, an optional reference answer and an
  optional (chosen, rejected) response pair.
- :func:`load_truthfulqa` — TruthfulQA records (``question``, ``best_answer``, ``correct_answers``,
  ``incorrect_answers``) as :class:`MCQuestion`.
- :func:`truthfulqa_pairs` — TruthfulQA questions as preference triples (a correct answer
  preferred over an incorrect one), for fitting a truthfulness steerer.
- the fixed openings the safety margin is scored with when a prompt carries no response pair live
  in :mod:`finesteer.eval.openings` (``SCORE_REFUSALS`` / ``SCORE_COMPLIANCES``, disjoint from the
  training openings).
- :func:`disjoint_split` — the seeded split used when a file is both fitted on and scored.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import torch

from ..data import read_records

__all__ = ["MCQuestion", "PromptSet", "disjoint_split",
           "load_prompt_set", "load_train_pairs", "load_train_prompts", "load_truthfulqa", "truthfulqa_pairs"]

#: Field names tried, in order, for the prompt of a record.
PROMPT_FIELDS = ("prompt", "question")
#: Field names tried, in order, for a reference answer.
REFERENCE_FIELDS = ("reference", "response", "answer", "best_answer")


@dataclass
class PromptSet:
    """A named evaluation set.

    ``role`` is ``"target"`` or ``"benign"``. ``references[i]`` is a reference answer or None;
    ``pairs[i]`` is ``(chosen, rejected)`` or None (chosen = the response the steerer should make
    more likely).
    """

    name: str
    role: str
    prompts: List[str]
    references: List[Optional[str]] = field(default_factory=list)
    pairs: List[Optional[Tuple[str, str]]] = field(default_factory=list)
    source: str = ""

    def __post_init__(self):
        if self.role not in ("target", "benign"):
            raise ValueError(f"eval set {self.name!r}: role must be 'target' or 'benign', got {self.role!r}")
        n = len(self.prompts)
        if not self.references:
            self.references = [None] * n
        if not self.pairs:
            self.pairs = [None] * n
        if len(self.references) != n or len(self.pairs) != n:
            raise ValueError(f"eval set {self.name!r}: {n} prompts but {len(self.references)} references and "
                             f"{len(self.pairs)} pairs")

    def __len__(self) -> int:
        return len(self.prompts)

    def subset(self, rows: Sequence[int]) -> "PromptSet":
        rows = list(rows)
        return PromptSet(self.name, self.role, [self.prompts[i] for i in rows], [self.references[i] for i in rows],
                         [self.pairs[i] for i in rows], self.source)


@dataclass
class MCQuestion:
    """One TruthfulQA question: ``best`` (the MC1 answer), ``correct`` and ``incorrect`` answer lists."""

    question: str
    best: str
    correct: List[str]
    incorrect: List[str]


def _text(where: str, row: dict, names: Sequence[str], required: bool = True) -> Optional[str]:
    for name in names:
        if name in row:
            value = row[name]
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{where}: field {name!r} must be a non-empty string, got {value!r:.60}")
            return value
    if required:
        raise ValueError(f"{where}: none of the fields {', '.join(map(repr, names))} is present "
                         f"(fields: {', '.join(map(str, row)) or 'none'})")
    return None


def _text_list(where: str, row: dict, name: str) -> List[str]:
    value = row.get(name)
    if isinstance(value, str):  # CSV exports keep lists as one "; "-separated string
        value = [v.strip() for v in value.split(";")]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{where}: field {name!r} must be a non-empty list of non-empty strings")
    return list(value)


def load_prompt_set(name: str, path, role: str, limit: Optional[int] = None, prompt_field: Optional[str] = None,
                    reference_field: Optional[str] = None) -> PromptSet:
    """Read an evaluation set: prompts (field ``prompt_field``, else ``prompt``/``question``), a reference
    answer when a reference field is present, and a (chosen, rejected) pair when both fields are present."""
    prompt_names = (prompt_field,) if prompt_field else PROMPT_FIELDS
    ref_names = (reference_field,) if reference_field else REFERENCE_FIELDS
    prompts, refs, pairs = [], [], []
    for where, row in read_records(path, limit):
        prompts.append(_text(where, row, prompt_names))
        refs.append(_text(where, row, ref_names, required=False))
        if "chosen" in row and "rejected" in row:
            pairs.append((_text(where, row, ("chosen",)), _text(where, row, ("rejected",))))
        else:
            pairs.append(None)
    return PromptSet(name, role, prompts, refs, pairs, str(path))


def load_train_prompts(path, limit: Optional[int] = None, prompt_field: Optional[str] = None) -> List[str]:
    """Prompts of a gate training file (field ``prompt_field``, else ``prompt``/``question``)."""
    names = (prompt_field,) if prompt_field else PROMPT_FIELDS
    return [_text(where, row, names) for where, row in read_records(path, limit)]


def _is_truthfulqa(row: dict) -> bool:
    return "question" in row and "incorrect_answers" in row and ("best_answer" in row or "correct_answers" in row)


def load_truthfulqa(path, limit: Optional[int] = None) -> List[MCQuestion]:
    """TruthfulQA records → :class:`MCQuestion` list (``best_answer`` defaults to the first correct answer)."""
    out = []
    for where, row in read_records(path, limit):
        q = _text(where, row, ("question",))
        correct = _text_list(where, row, "correct_answers") if "correct_answers" in row else []
        best = _text(where, row, ("best_answer",), required=False) or (correct[0] if correct else None)
        if best is None:
            raise ValueError(f"{where}: needs 'best_answer' or 'correct_answers'")
        if best not in correct:
            correct = [best] + correct
        out.append(MCQuestion(q, best, correct, _text_list(where, row, "incorrect_answers")))
    return out


def truthfulqa_pairs(questions: Sequence[MCQuestion], per_question: int = 2) -> tuple:
    """Preference triples from TruthfulQA: for each question, up to ``per_question`` pairs
    (correct answer i, incorrect answer i), cycling through both lists. Returns (prompts, chosen, rejected)."""
    prompts, chosen, rejected = [], [], []
    for q in questions:
        for i in range(min(per_question, max(len(q.correct), len(q.incorrect)))):
            prompts.append(q.question)
            chosen.append(q.correct[i % len(q.correct)])
            rejected.append(q.incorrect[i % len(q.incorrect)])
    return prompts, chosen, rejected


def load_train_pairs(path, limit: Optional[int] = None, prompt_field: str = "prompt", chosen_field: str = "chosen",
                     rejected_field: str = "rejected", per_question: int = 2) -> tuple:
    """Preference triples from a pairs file, or from a TruthfulQA file (see :func:`truthfulqa_pairs`;
    ``per_question`` pairs per question, ignored for other files)."""
    rows = read_records(path)
    if _is_truthfulqa(rows[0][1]):
        return truthfulqa_pairs(load_truthfulqa(path, limit), per_question)
    from ..data import load_pairs
    return load_pairs(path, prompt_field, chosen_field, rejected_field, limit)


def disjoint_split(n: int, fit_fraction: float, seed: int) -> tuple:
    """A seeded split of ``range(n)`` into (fit rows, scored rows), both sorted lists, neither empty."""
    if not 0.0 < fit_fraction < 1.0:
        raise ValueError(f"fit fraction must be in (0, 1), got {fit_fraction}")
    if n < 2:
        raise ValueError(f"cannot split {n} record(s) into a fitted and a scored part")
    g = torch.Generator().manual_seed(int(seed) + 7919)
    perm = torch.randperm(n, generator=g).tolist()
    k = min(n - 1, max(1, round(fit_fraction * n)))
    return sorted(perm[:k]), sorted(perm[k:])
