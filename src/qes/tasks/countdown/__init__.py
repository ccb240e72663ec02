"""Countdown: reach a target with + - * / using each given number exactly once.

Split by idea: :mod:`~qes.tasks.countdown.problems` (the problem type and JSON loader),
:mod:`~qes.tasks.countdown.generator` (seeded problems), :mod:`~qes.tasks.countdown.prompt` (chat prompts
with worked examples), :mod:`~qes.tasks.countdown.reward` (answer parser and reward),
:mod:`~qes.tasks.countdown.settings` (the ``task`` block and its rules) and
:mod:`~qes.tasks.countdown.calibration` (the problems the quantize stage calibrates on). This module holds
the task stage: the task data files, :data:`TASK` (Countdown behind the task interface of
:mod:`qes.tasks.base`) and :class:`Countdown`, the task as the registry knows it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from qes.tasks.base import RewardRecord, Task, TaskKind
from qes.tasks.countdown.generator import CountdownConfig, generate_split
from qes.tasks.countdown.problems import Problem, TaskDataError, check_disjoint, load_problems_json
from qes.tasks.countdown.prompt import (
    ASSISTANT_PREFIX,
    DEMONSTRATIONS,
    SYSTEM_PROMPT,
    USER_TEMPLATE,
    Demonstration,
    PromptStyle,
    _assistant_message,
    _user_message,
    build_prompt,
)
from qes.tasks.countdown.reward import (
    CORRECT_WEIGHT,
    DESCRIPTION,
    FORMAT_WEIGHT,
    MAX_ANSWER_CHARS,
    MAX_BITS,
    MAX_DEPTH,
    MAX_LITERAL_DIGITS,
    STOP_STRINGS,
    AnswerError,
    check_answer,
    evaluate_expression,
    extract_answer,
    format_ok,
    reward,
)
from qes.tasks.countdown.settings import TaskSettings, config_conflicts
from qes.tasks.registry import register

__all__ = [
    "ASSISTANT_PREFIX", "CORRECT_WEIGHT", "DEMONSTRATIONS", "FORMAT_WEIGHT", "MAX_ANSWER_CHARS", "MAX_BITS",
    "MAX_DEPTH", "MAX_LITERAL_DIGITS", "STOP_STRINGS", "SYSTEM_PROMPT", "TASK", "TASK_COLUMNS", "USER_TEMPLATE",
    "AnswerError", "Countdown", "CountdownConfig", "Demonstration", "Problem", "PromptStyle", "RewardRecord",
    "TaskDataError", "TaskSettings", "_assistant_message", "_user_message", "build_prompt", "check_answer",
    "check_disjoint", "evaluate_expression", "extract_answer", "format_ok", "generate_split", "load_problems_json",
    "make_task_data", "read_task_parquet", "reward", "task_problems", "write_task_parquet",
]


def score_row(response: str, problem: Problem, prefix: str) -> RewardRecord:
    """The task interface's reward of one completion of `problem` (its prompt ended with `prefix`)."""
    return reward(response, problem.numbers, problem.target, prefix)


def describe_rows(problems: Sequence[Problem]) -> dict[str, list]:
    """The numbers and target of each problem, for the per-example evaluation output."""
    return {"numbers": [list(p.numbers) for p in problems], "target": [p.target for p in problems]}


#: Countdown behind the task interface
TASK = Task(name="countdown", stop_strings=STOP_STRINGS, score=score_row, describe=describe_rows)


TASK_COLUMNS = ("id", "numbers", "target", "solution", "prompt", "assistant_prefix")


def write_task_parquet(problems: Sequence[Problem], prompts: Sequence[str], prefix: str, path: str | Path) -> None:
    """Write problems and their prompts (columns ``TASK_COLUMNS``) to a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if len(problems) != len(prompts):
        raise ValueError("problems and prompts differ in length")
    table = pa.table(
        {
            "id": pa.array([p.id for p in problems], pa.string()),
            "numbers": pa.array([list(p.numbers) for p in problems], pa.list_(pa.int64())),
            "target": pa.array([p.target for p in problems], pa.int64()),
            "solution": pa.array([p.solution for p in problems], pa.string()),
            "prompt": pa.array(list(prompts), pa.string()),
            "assistant_prefix": pa.array([prefix] * len(problems), pa.string()),
        }
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def read_task_parquet(path: str | Path, limit: int | None = None) -> tuple[list[Problem], list[str], list[str]]:
    """Problems, prompt texts and assistant prefixes from a task Parquet file (first ``limit``)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = [c for c in TASK_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    rows = table.slice(0, limit).to_pylist() if limit is not None else table.to_pylist()
    problems = [Problem(r["id"], tuple(r["numbers"]), r["target"], r["solution"]) for r in rows]
    return problems, [r["prompt"] for r in rows], [r["assistant_prefix"] for r in rows]


def task_problems(settings: TaskSettings) -> tuple[list[Problem], list[Problem]]:
    """Train and held-out problems of ``settings``, checked disjoint.

    A split read from a file is used as given; a generated split skips every problem of the other split's
    file, so a user-given set never collides with a generated one.
    """
    gen = settings.generator
    files = {"train": settings.train_file, "eval": settings.eval_file}
    sizes = {"train": gen.train_size, "eval": gen.eval_size}
    loaded = {split: load_problems_json(f, split=split, limit=sizes[split]) for split, f in files.items() if f}
    out = {}
    for split, other in (("train", "eval"), ("eval", "train")):
        if split in loaded:
            out[split] = loaded[split]
        else:
            exclude = frozenset(p.key for p in loaded.get(other, ()))
            out[split] = generate_split(gen, split, exclude)
    check_disjoint(out["train"], out["eval"])
    return out["train"], out["eval"]


def make_task_data(
    settings: TaskSettings, tokenizer: Any, train_path: str | Path, eval_path: str | Path
) -> dict[str, Any]:
    """Write the train and held-out Parquet files of the task stage; returns a short summary."""
    summary: dict[str, Any] = {}
    for split, problems, path in zip(("train", "eval"), task_problems(settings), (train_path, eval_path), strict=True):
        prompts = [build_prompt(tokenizer, p, settings.prompt) for p in problems]
        write_task_parquet(problems, prompts, settings.prompt.assistant_prefix, path)
        summary[split] = {
            "n": len(problems),
            "path": str(path),
            "prompt_chars_max": max((len(p) for p in prompts), default=0),
        }
    return summary


@register
class Countdown(TaskKind):
    """Countdown as the registry knows it. Its task data files carry no task description (they predate
    one), so a file without one reads as Countdown's."""

    name = "countdown"
    title = "Countdown"

    def config_conflicts(self, block: Mapping[str, Any], workdir: Path | None = None) -> list[str]:
        return config_conflicts(block, workdir)

    def input_files(self, block: Mapping[str, Any]) -> list[str]:
        return [name for name in (block.get("train_file"), block.get("eval_file")) if name]

    def make_data(self, block: Mapping[str, Any], tokenizer: Any, train_path: str | Path, eval_path: str | Path,
                  base_dir: str | Path | None = None) -> dict[str, Any]:
        return make_task_data(TaskSettings.from_dict(block), tokenizer, train_path, eval_path)

    def read_file(self, path: str | Path, limit: int | None = None) -> tuple[list[Any], list[str], list[str]]:
        problems, prompts, prefixes = read_task_parquet(path, limit)
        return list(problems), prompts, prefixes

    def scorer(self, meta: Mapping[str, Any], base_dir: str | Path | None = None) -> Task:
        return TASK

    def reward_description(self, meta: Mapping[str, Any]) -> str:
        return DESCRIPTION
