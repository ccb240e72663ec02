"""The task interface: what finetune, evaluate, the workflow and the model card need to know about a task.

A task turns rows into prompts (the task stage writes them, already rendered with the model's chat
template, to the train and held-out Parquet files) and scores a completion of a row. Its score has a
format part and a correctness part; the held-out metrics are their rates and the mean reward. Generation
of a row stops at EOS or at the end of one of the task's stop strings.

:class:`Task` is a task as training and evaluation see it (a reward and stop strings); :class:`TaskKind` is
everything else the workflow knows about one kind of task, registered by name in :mod:`qes.tasks.registry`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from qes.schema import ConfigError, complete

#: rules across the keys of a complete task block: ``rules(block, workdir)`` lists what cannot run
Rules = Callable[[Mapping[str, Any], Path | None], list[str]]


class TaskDataError(ValueError):
    """A task data file that does not have the expected layout."""


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


class TaskKind(ABC):
    """One kind of task (the config's ``task.name``): its rules, its data files and its reward's description.

    ``block`` is the config's ``task`` block; ``meta`` is the description a task data file carries
    (:func:`qes.tasks.task_of`).
    """

    #: the config's ``task.name``, which the registry looks the kind up by
    name: ClassVar[str]
    #: how the model card names the task
    title: ClassVar[str]

    @abstractmethod
    def config_conflicts(self, block: Mapping[str, Any], workdir: Path | None = None) -> list[str]:
        """What makes a complete task block unable to run that the schema cannot say (rules across keys, files
        that do not exist; relative paths from ``workdir``, the working directory when None)."""

    @abstractmethod
    def input_files(self, block: Mapping[str, Any]) -> list[str]:
        """Local files the task stage reads, so that editing one reruns it."""

    @abstractmethod
    def make_data(self, block: Mapping[str, Any], tokenizer: Any, train_path: str | Path, eval_path: str | Path,
                  base_dir: str | Path | None = None) -> dict[str, Any]:
        """The task stage: write the train and held-out files of ``block``; returns a short summary."""

    @abstractmethod
    def read_file(self, path: str | Path, limit: int | None = None) -> tuple[list[Any], list[str], list[str]]:
        """The first ``limit`` rows of a task data file, their prompts and their assistant prefixes."""

    @abstractmethod
    def scorer(self, meta: Mapping[str, Any], base_dir: str | Path | None = None) -> Task:
        """The task that scores the rows of a task data file described by ``meta``."""

    @abstractmethod
    def reward_description(self, meta: Mapping[str, Any]) -> str:
        """A sentence on the reward of the task data file described by ``meta``, for the model card."""


def complete_block(block: Mapping[str, Any], rules: Rules, workdir: Path | None = None) -> dict[str, Any]:
    """A task block with the schema's defaults filled in; one ConfigError listing everything ``rules`` find."""
    values = complete(dict(block), "task", source="task settings")
    conflicts = rules(values, workdir)
    if conflicts:
        raise ConfigError("invalid task settings:\n  " + "\n  ".join(conflicts))
    return values
