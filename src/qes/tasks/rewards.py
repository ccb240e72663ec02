"""Rewards a task can name: built-in ``exact_match``, ``numeric`` and ``countdown``, or a user function.

Every reward returns ``0.1 * format + 1.0 * correct`` as a :class:`~qes.tasks.base.RewardRecord` (a user
function may return its own value). Model output is hostile input: a built-in reads at most
``MAX_COMPLETION_CHARS`` characters of a completion and uses only linear-time scans and anchored regular
expressions without nested quantifiers, so its time is bounded by the completion's length.

The answer of a completion (``exact_match``, ``numeric``): the text of its first ``<answer>...</answer>``
block when it has one, else its last non-empty line. ``format`` means an answer was found (for ``numeric``:
one holding a number).

A user reward is ``path/to/file.py:function``, called as ``function(completion, row)`` where ``row`` is a
dict with ``id``, ``prompt``, ``reference`` and ``fields`` (the extra columns the task keeps). It returns
a bool (correct or not), a number (the reward; correct when it is at least 1) or a dict with ``reward``
and optionally ``correct``, ``format_ok`` and ``answer``. An exception inside it fails the run, naming the
row; it never counts as a zero.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import re
from collections.abc import Callable, Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from qes.tasks.base import RewardRecord
from qes.tasks.countdown.reward import DESCRIPTION as COUNTDOWN_DESCRIPTION
from qes.tasks.countdown.reward import reward as countdown_reward

FORMAT_WEIGHT = 0.1
CORRECT_WEIGHT = 1.0
MAX_COMPLETION_CHARS = 8192
MAX_ANSWER_CHARS = 256
BUILTIN = ("exact_match", "numeric", "countdown")
#: each built-in reward in a sentence, for the model card
DESCRIPTIONS = {
    "exact_match": "1 when the answer equals the reference (normalised), 0.1 for giving an answer at all",
    "numeric": "1 when the answer's last number equals the reference number, 0.1 for giving a number at all",
    "countdown": COUNTDOWN_DESCRIPTION,
}

_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
# A number: optional sign, digits with optional thousands separators, optional decimals. No nested
# quantifiers, and it is only ever run on at most MAX_ANSWER_CHARS characters.
_NUMBER = re.compile(r"[-+]?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?")
_SPACES = re.compile(r"\s+")


class RewardError(RuntimeError):
    """A reward could not score a row (a user function raised or returned something unusable)."""


def answer_of(completion: str) -> str | None:
    """The completion's answer: its first <answer> block, else its last non-empty line (None if neither)."""
    text = completion[:MAX_COMPLETION_CHARS]
    start = text.find(_ANSWER_OPEN)
    if start >= 0:
        end = text.find(_ANSWER_CLOSE, start)
        if end >= 0:
            return text[start + len(_ANSWER_OPEN) : end].strip()[:MAX_ANSWER_CHARS]
    for line in reversed(text.splitlines()):
        if line.strip():
            return line.strip()[-MAX_ANSWER_CHARS:]
    return None


def normalise(text: str) -> str:
    """Case-folded, single-spaced, without surrounding whitespace, quotes and a final full stop."""
    return _SPACES.sub(" ", text.casefold()).strip().strip("\"'`").rstrip(".").strip()


def _record(found: str | None, correct: bool, reason: str) -> RewardRecord:
    fmt = found is not None
    return RewardRecord(fmt, correct, FORMAT_WEIGHT * fmt + CORRECT_WEIGHT * correct, found or "", reason)


def exact_match(completion: str, reference: str) -> RewardRecord:
    """Correct when the normalised answer equals the normalised reference."""
    answer = answer_of(completion)
    if answer is None:
        return _record(None, False, "no answer")
    correct = normalise(answer) == normalise(reference)
    return _record(answer, correct, "ok" if correct else "answer differs from the reference")


def parse_number(text: str) -> Decimal | None:
    """The number a text spells (thousands separators allowed), or None."""
    match = _NUMBER.fullmatch(text.strip())
    if match is None:
        return None
    try:
        return Decimal(match.group().replace(",", ""))
    except InvalidOperation:
        return None


def numeric(completion: str, reference: str, tolerance: float = 1e-6) -> RewardRecord:
    """Correct when the last number of the answer is within ``tolerance`` of the reference number."""
    answer = answer_of(completion)
    numbers = _NUMBER.findall(answer[-MAX_ANSWER_CHARS:]) if answer else []
    if not numbers:
        return _record(None, False, "no number in the answer")
    expected = parse_number(str(reference))
    if expected is None:
        raise RewardError(f"numeric reward: the reference {reference!r} is not a number")
    got = Decimal(numbers[-1].replace(",", ""))
    correct = abs(got - expected) <= Decimal(str(tolerance))
    return _record(numbers[-1], correct, "ok" if correct else f"{numbers[-1]} is not {reference}")


def countdown_row(completion: str, reference: str, fields: Mapping[str, Any], prefix: str) -> RewardRecord:
    """The Countdown reward of a dataset row with a ``numbers`` field; the reference is the target."""
    if "numbers" not in fields:
        raise RewardError("countdown reward: the row has no 'numbers' field (list it in task.dataset.fields)")
    numbers = [int(n) for n in fields["numbers"]]
    return countdown_reward(completion[:MAX_COMPLETION_CHARS], numbers, int(reference), prefix)


def file_sha256(spec: str, base_dir: str | Path | None = None) -> str | None:
    """sha256 of the file of a user reward (None for a built-in)."""
    if spec in BUILTIN:
        return None
    path = _user_file(spec, base_dir)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _user_file(spec: str, base_dir: str | Path | None) -> Path:
    file, sep, function = spec.rpartition(":")
    if not sep or not file.endswith(".py") or not function.isidentifier():
        raise RewardError(
            f"reward {spec!r}: expected one of {', '.join(BUILTIN)} or <file>.py:<function>, e.g. my_rewards.py:score"
        )
    path = Path(file) if Path(file).is_absolute() else Path(base_dir or Path.cwd()) / file
    if not path.is_file():
        raise RewardError(f"reward {spec!r}: {path} does not exist")
    return path


def load_user_reward(spec: str, base_dir: str | Path | None = None) -> Callable[..., Any]:
    """The function ``spec`` (``file.py:function``) names, imported from its file."""
    path = _user_file(spec, base_dir)
    function = spec.rpartition(":")[2]
    module_spec = importlib.util.spec_from_file_location(f"qes_user_reward_{path.stem}", path)
    if module_spec is None or module_spec.loader is None:
        raise RewardError(f"reward {spec!r}: cannot import {path}")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as error:
        raise RewardError(f"reward {spec!r}: importing {path} failed: {type(error).__name__}: {error}") from error
    found = getattr(module, function, None)
    if not callable(found):
        raise RewardError(f"reward {spec!r}: {path} defines no function {function!r}")
    return found


def user_record(value: Any, spec: str, row_id: str) -> RewardRecord:
    """A user function's return value as a reward record; anything unusable is an error naming the row."""
    where = f"reward {spec!r} on row {row_id!r}"
    if isinstance(value, bool):
        return RewardRecord(True, value, float(value), "", "ok" if value else "not correct")
    if isinstance(value, (int, float)):
        if not math.isfinite(value):
            raise RewardError(f"{where} returned {value!r}; a reward must be a finite number")
        return RewardRecord(True, value >= 1, float(value), "", "ok" if value >= 1 else "below 1")
    if isinstance(value, Mapping) and "reward" in value:
        reward = value["reward"]
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
            raise RewardError(f"{where} returned reward {reward!r}; a reward must be a finite number")
        correct = bool(value.get("correct", reward >= 1))
        return RewardRecord(bool(value.get("format_ok", True)), correct, float(reward),
                            str(value.get("answer", ""))[:MAX_ANSWER_CHARS], "ok" if correct else "not correct")
    raise RewardError(f"{where} returned {type(value).__name__} {value!r:.80}; expected a bool, a number or a "
                      "dict with a 'reward' key")
