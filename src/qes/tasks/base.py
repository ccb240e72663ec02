"""The task interface: what finetune, evaluate and the experiments need to know about a task.

A task turns rows into prompts (the task stage writes them, already rendered with the model's chat
template, to the train and held-out Parquet files) and scores a completion of a row. Its score has a
format part and a correctness part; the held-out metrics are their rates and the mean reward. Generation
of a row stops at EOS or at the end of one of the task's stop strings.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class RewardRecord:
    """Both parts of one example's reward; ``reason`` says why it is not correct ('ok' if it is)."""

    format_ok: bool
    correct: bool
    reward: float
    answer: str
    reason: str


@dataclass(frozen=True)
class Task:
    """A task as the training and evaluation code see it.

    ``score(completion, row, prefix)`` rewards one completion of ``row`` (what the task data file holds
    for it); ``prefix`` is the assistant prefix its prompt ended with, which the completion continues.
    ``describe(rows)`` gives the columns that identify the rows in the per-example evaluation output.
    """

    name: str
    stop_strings: tuple[str, ...]
    score: Callable[[str, Any, str], RewardRecord]
    describe: Callable[[Sequence[Any]], dict[str, list]]
