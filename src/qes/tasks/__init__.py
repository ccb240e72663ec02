"""Tasks the fine-tuning optimises: rows in, prompts out, and a reward of each completion.

:mod:`qes.tasks.base` defines the interface; :mod:`qes.tasks.countdown` and :mod:`qes.tasks.dataset`
implement it. The task stage writes a task's train and held-out rows with their rendered prompts to
Parquet, with the task's description in the file's metadata (``qes.task``), so finetune and evaluate
know how to score a file without being told which task wrote it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qes.tasks.base import RewardRecord, Task

__all__ = ["RewardRecord", "Task", "make_task_data", "read_task_data", "task_of"]

META_KEY = b"qes.task"


def task_of(path: str | Path) -> dict[str, Any]:
    """The task description a task data file carries (files without one are Countdown's)."""
    import pyarrow.parquet as pq

    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata[META_KEY]) if META_KEY in metadata else {"name": "countdown"}


def read_task_data(path: str | Path, limit: int | None = None,
                   base_dir: str | Path | None = None) -> tuple[Task, list[Any], list[str], list[str]]:
    """The task of a task data file and its first ``limit`` rows, prompts and assistant prefixes."""
    import pyarrow.parquet as pq

    meta = task_of(path)
    if meta["name"] == "countdown":
        from qes.tasks.countdown import TASK, read_task_parquet

        problems, prompts, prefixes = read_task_parquet(path, limit)
        return TASK, problems, prompts, prefixes
    if meta["name"] == "dataset":
        from qes.tasks.dataset import dataset_task, read_rows

        table = pq.read_table(path)
        table = table.slice(0, limit) if limit is not None else table
        rows = read_rows(table)
        prefixes = table.column("assistant_prefix").to_pylist()
        return dataset_task(meta, base_dir), rows, [r.prompt for r in rows], prefixes
    raise ValueError(f"{path}: unknown task {meta['name']!r} in its metadata")


def make_task_data(task: Mapping[str, Any], tokenizer: Any, train_path: str | Path, eval_path: str | Path,
                   base_dir: str | Path | None = None) -> dict[str, Any]:
    """The task stage: write the train and held-out files of the config's ``task`` block."""
    if task.get("name", "countdown") == "dataset":
        from qes.config import ConfigError, complete, task_conflicts
        from qes.tasks.dataset import DatasetSettings
        from qes.tasks.dataset import make_task_data as make_dataset

        block = complete(dict(task), "task", source="task settings")
        conflicts = task_conflicts(block, Path(base_dir) if base_dir else None)
        if conflicts:
            raise ConfigError("invalid task settings:\n  " + "\n  ".join(conflicts))
        return make_dataset(DatasetSettings.from_block(block), tokenizer, train_path, eval_path, base_dir)
    from qes.tasks.countdown import TaskSettings
    from qes.tasks.countdown import make_task_data as make_countdown

    return make_countdown(TaskSettings.from_dict(task), tokenizer, train_path, eval_path)
