"""Countdown: reach a target with + - * / using each given number exactly once.

Split by idea: :mod:`~qes.tasks.countdown.problems` (generator and JSON loader),
:mod:`~qes.tasks.countdown.prompt` (chat prompts with worked examples) and
:mod:`~qes.tasks.countdown.reward` (answer parser and reward). This module holds the task stage: the
``task`` settings, the task data files and :data:`TASK`, Countdown behind the task interface of
:mod:`qes.tasks.base`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qes.tasks.base import RewardRecord, Task
from qes.tasks.countdown.problems import (
    CountdownConfig,
    Problem,
    TaskDataError,
    check_disjoint,
    generate_split,
    load_problems_json,
)
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

__all__ = [
    "ASSISTANT_PREFIX", "CORRECT_WEIGHT", "DEMONSTRATIONS", "FORMAT_WEIGHT", "MAX_ANSWER_CHARS", "MAX_BITS",
    "MAX_DEPTH", "MAX_LITERAL_DIGITS", "STOP_STRINGS", "SYSTEM_PROMPT", "TASK", "TASK_COLUMNS", "USER_TEMPLATE",
    "AnswerError", "CountdownConfig", "Demonstration", "Problem", "PromptStyle", "RewardRecord", "TaskDataError",
    "TaskSettings", "_assistant_message", "_user_message", "build_prompt", "check_answer", "check_disjoint",
    "evaluate_expression", "extract_answer", "format_ok", "generate_split", "load_problems_json", "make_task_data",
    "read_task_parquet", "reward", "task_problems", "write_task_parquet",
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


@dataclass(frozen=True)
class TaskSettings:
    """The ``task`` block of the workflow config: which problems, and how they are prompted.

    ``train_file`` / ``eval_file`` (JSON, see :func:`load_problems_json`) replace the generated split
    of the same name; the first ``train_size`` / ``eval_size`` entries are used.
    """

    name: str = "countdown"
    generator: CountdownConfig = CountdownConfig()
    prompt: PromptStyle = PromptStyle()
    train_file: str | None = None
    eval_file: str | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TaskSettings:
        """Build from the config's ``task`` block, validated by the config schema (its defaults fill the gaps)."""
        from qes.config import ConfigError, complete, task_conflicts

        values = complete(dict(values), "task", source="task settings")
        conflicts = task_conflicts(values)
        if conflicts:
            raise ConfigError("invalid task settings:\n  " + "\n  ".join(conflicts))
        gen_keys = set(CountdownConfig.__dataclass_fields__)
        top_keys = {"name", "train_file", "eval_file", "prompt", "reward", "tolerance", "dataset"}  # last 3: datasets
        unknown = sorted(set(values) - gen_keys - top_keys)
        if unknown:
            raise ValueError(f"unknown task setting(s): {', '.join(unknown)}")
        prompt = {k: v for k, v in (values.get("prompt") or {}).items() if v is not None}  # null: built-in
        unknown = sorted(set(prompt) - {"system", "user_template", "assistant_prefix", "few_shot"})
        if unknown:
            raise ValueError(f"unknown task.prompt setting(s): {', '.join(unknown)}")
        few_shot = int(prompt.pop("few_shot", len(DEMONSTRATIONS)))
        if not 0 <= few_shot <= len(DEMONSTRATIONS):
            raise ValueError(f"task.prompt.few_shot must lie in [0, {len(DEMONSTRATIONS)}], got {few_shot}")
        style = PromptStyle(**prompt, examples=DEMONSTRATIONS[:few_shot])
        try:
            _user_message(style, DEMONSTRATIONS[0].problem)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                "task.prompt.user_template may only use the fields {target}, {numbers} and {numbers_text}"
                f" ({type(e).__name__}: {e})"
            ) from None
        name = values.get("name", "countdown")
        if name != "countdown":
            raise ValueError(f"unknown task {name!r} (known: countdown)")
        return cls(
            name=name,
            generator=CountdownConfig(**{k: values[k] for k in gen_keys if k in values}),
            prompt=style,
            train_file=values.get("train_file"),
            eval_file=values.get("eval_file"),
        )


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
