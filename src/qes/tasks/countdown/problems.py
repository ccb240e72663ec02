"""Countdown problems: the problem type, a loader for JSON files holding a list of
``{"numbers": [...], "target": n}`` and the check that train and held-out sets share no problem."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qes.tasks.base import TaskDataError

__all__ = ["Problem", "TaskDataError", "check_disjoint", "load_problems_json"]


@dataclass(frozen=True)
class Problem:
    """One Countdown problem; ``solution`` is a reference expression ('' when unknown)."""

    id: str
    numbers: tuple[int, ...]
    target: int
    solution: str = ""

    @property
    def key(self) -> tuple[tuple[int, ...], int]:
        """Canonical identity: sorted numbers and target (what train/eval disjointness uses)."""
        return tuple(sorted(self.numbers)), self.target


def _int_field(entry: dict[str, Any], field: str, where: str) -> int:
    value = entry[field]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TaskDataError(f"{where}: field '{field}' must be an integer, got {value!r}")
    return value


def load_problems_json(path: str | Path, split: str = "file", limit: int | None = None) -> list[Problem]:
    """Problems from a JSON file holding a list of ``{"numbers": [ints], "target": int}``.

    ``nums`` is accepted for ``numbers``; an optional string ``solution`` is kept.  Every error
    names the entry index and the field.  ``limit`` keeps the first entries (error if fewer).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise TaskDataError(f"{path}: expected a JSON list of problems, got {type(data).__name__}")
    if limit is not None:
        if len(data) < limit:
            raise TaskDataError(f"{path}: {len(data)} problems, but {limit} were asked for")
        data = data[:limit]
    out = []
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict):
            raise TaskDataError(f"{where}: expected an object, got {type(entry).__name__}")
        if "numbers" not in entry and "nums" in entry:
            entry = {**entry, "numbers": entry["nums"]}
        for field in ("numbers", "target"):
            if field not in entry:
                raise TaskDataError(f"{where}: missing field '{field}'")
        numbers = entry["numbers"]
        if not isinstance(numbers, list) or not numbers:
            raise TaskDataError(f"{where}: field 'numbers' must be a non-empty list, got {numbers!r}")
        for j, n in enumerate(numbers):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise TaskDataError(f"{where}: field 'numbers'[{j}] must be a non-negative integer, got {n!r}")
        target = _int_field(entry, "target", where)
        solution = entry.get("solution", "")
        if not isinstance(solution, str):
            raise TaskDataError(f"{where}: field 'solution' must be a string, got {solution!r}")
        out.append(Problem(f"{split}-{i:06d}", tuple(numbers), target, solution))
    return out


def check_disjoint(train: Sequence[Problem], held_out: Sequence[Problem]) -> None:
    """Raise if a held-out problem's canonical key also occurs in the training problems."""
    train_keys = {p.key for p in train}
    for p in held_out:
        if p.key in train_keys:
            raise ValueError(f"held-out problem {p.id} {p.key} also occurs in the training set")
