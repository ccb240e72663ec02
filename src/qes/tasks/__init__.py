"""Tasks the fine-tuning optimises: rows in, prompts out, and a reward of each completion.

:mod:`qes.tasks.base` defines the interface; :mod:`qes.tasks.countdown` and :mod:`qes.tasks.dataset`
implement it and register themselves by name in :mod:`qes.tasks.registry`, through which every lookup of a
task name goes. The task stage writes a task's train and held-out rows with their rendered prompts to
Parquet, with the task's description in the file's metadata (``qes.task``), so finetune and evaluate
know how to score a file without being told which task wrote it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qes.tasks import countdown, dataset  # noqa: F401  (each registers itself)
from qes.tasks.base import RewardRecord, Task, TaskDataError, TaskKind
from qes.tasks.registry import UnknownTaskError, known_tasks, register, task_kind

__all__ = [
    "DEFAULT_TASK", "RewardRecord", "Task", "TaskDataError", "TaskKind", "UnknownTaskError", "default_task",
    "known_tasks", "make_task_data", "read_task_data", "register", "task_conflicts", "task_inputs", "task_kind",
    "task_of",
]

META_KEY = b"qes.task"
#: the task of a block without a name and of a task data file without a description
DEFAULT_TASK = "countdown"


def _kind_of(block: Mapping[str, Any]) -> TaskKind:
    return task_kind(block.get("name") or DEFAULT_TASK)


def task_of(path: str | Path) -> dict[str, Any]:
    """The task description a task data file carries (files without one are the default task's)."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata[META_KEY]) if META_KEY in metadata else {"name": DEFAULT_TASK}


def default_task() -> Task:
    """The default task behind the task interface (what scores rows when no task is named)."""
    return task_kind(DEFAULT_TASK).scorer({"name": DEFAULT_TASK})


def read_task_data(path: str | Path, limit: int | None = None,
                   base_dir: str | Path | None = None) -> tuple[Task, list[Any], list[str], list[str]]:
    """The task of a task data file and its first ``limit`` rows, prompts and assistant prefixes."""
    meta = task_of(path)
    kind = task_kind(meta["name"], where=f"{path} (its task metadata)")
    rows, prompts, prefixes = kind.read_file(path, limit)
    return kind.scorer(meta, base_dir), rows, prompts, prefixes


def make_task_data(task: Mapping[str, Any], tokenizer: Any, train_path: str | Path, eval_path: str | Path,
                   base_dir: str | Path | None = None) -> dict[str, Any]:
    """The task stage: write the train and held-out files of the config's ``task`` block."""
    return _kind_of(task).make_data(task, tokenizer, train_path, eval_path, base_dir)


def task_conflicts(task: Mapping[str, Any], workdir: Path | None = None) -> list[str]:
    """What makes a complete ``task`` block unable to run that the schema cannot say (its task's rules)."""
    return _kind_of(task).config_conflicts(task, workdir)


def task_inputs(task: Mapping[str, Any]) -> list[str]:
    """Local files the task stage of the ``task`` block reads, so that editing one reruns it."""
    return _kind_of(task).input_files(task)
