"""A task from your own data: rows read with `datasets`, prompted with the model's chat template, scored
with a reward of :mod:`qes.tasks.rewards`.

Rows come from local files (``.jsonl``/``.json``, ``.parquet``, ``.csv``) or a folder written by
``Dataset.save_to_disk``; ``hf:<org>/<name>`` loads a Hub dataset (the only case that needs a network).
The config maps columns: the prompt text (or a list of chat messages), the reference answer, an optional
id and the extra fields a reward needs. Without an eval file the held-out rows are a seeded split of the
train file, decided per row by a hash of its content, so the split does not depend on row order.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qes.schema import complete
from qes.tasks.base import RewardRecord, Task, TaskDataError, TaskKind, complete_block
from qes.tasks.registry import register
from qes.tasks.rewards import (
    BUILTIN,
    DESCRIPTIONS,
    RewardError,
    countdown_row,
    exact_match,
    file_sha256,
    load_user_reward,
    numeric,
    user_record,
)

TASK_COLUMNS = ("id", "prompt", "assistant_prefix", "reference", "fields")
_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class DatasetRow:
    """One row as the reward sees it: its id, reference answer and extra fields."""

    id: str
    reference: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    prompt: str = ""


@dataclass(frozen=True)
class DatasetSettings:
    """The ``task`` block for ``name: dataset`` (see the config schema's ``task.dataset``)."""

    train: str
    eval: str | None = None
    eval_fraction: float = 0.2
    prompt_column: str | None = "prompt"
    messages_column: str | None = None
    reference_column: str = "answer"
    id_column: str | None = None
    fields: tuple[str, ...] = ()
    stop_strings: tuple[str, ...] = ()
    reward: str = "exact_match"
    tolerance: float = 1e-6
    train_size: int = 200
    eval_size: int = 128
    seed: int = 0
    system: str | None = None
    user_template: str | None = None
    assistant_prefix: str = ""
    few_shot: int = 0

    @classmethod
    def from_block(cls, task: Mapping[str, Any]) -> DatasetSettings:
        """From the config's task block, validated by the config schema (its defaults fill the gaps)."""
        task = complete(dict(task), "task", source="task settings")
        data = dict(task["dataset"])
        if not data.get("train"):
            raise TaskDataError("task.dataset.train: name the training data (a file, a saved dataset or hf:<id>)")
        if data.get("messages_column") is not None:
            data["prompt_column"] = None  # chat messages replace the prompt text
        elif data.get("prompt_column") is None:
            raise TaskDataError("task.dataset: set prompt_column or messages_column")
        prompt = task.get("prompt") or {}
        reward = task.get("reward") or "exact_match"
        return cls(
            **{k: data[k] for k in ("train", "eval", "eval_fraction", "prompt_column", "messages_column",
                                    "reference_column", "id_column")},
            fields=tuple(data.get("fields") or ()), stop_strings=tuple(data.get("stop_strings") or ()),
            reward=reward, tolerance=float(task.get("tolerance", 1e-6)), train_size=task["train_size"],
            eval_size=task["eval_size"], seed=task["seed"], system=prompt.get("system"),
            user_template=prompt.get("user_template"), assistant_prefix=prompt.get("assistant_prefix") or "",
            few_shot=int(prompt.get("few_shot", 0)),
        )


def config_conflicts(block: Mapping[str, Any], workdir: Path | None = None) -> list[str]:
    """Data and reward files that do not exist, and a reward that names neither a built-in nor a function."""
    workdir = workdir or Path.cwd()
    problems = []
    data = block.get("dataset") or {}
    if not data.get("train"):
        problems.append("task.dataset.train: a dataset task needs its training rows (a file, saved dataset, hf:<id>)")
    for key in ("train", "eval"):
        name = data.get(key)
        if name and not name.startswith("hf:") and not (workdir / name).exists():
            problems.append(f"task.dataset.{key}: {name} does not exist")
    reward = block.get("reward")
    if reward not in (None, *BUILTIN):
        file, sep, function = reward.rpartition(":")
        if not sep or not file.endswith(".py") or not function.isidentifier():
            problems.append(f"task.reward: {reward!r} is neither one of {', '.join(BUILTIN)} nor <file>.py:<function>")
        elif not (workdir / file).is_file():
            problems.append(f"task.reward: {file} does not exist")
    return problems


def load_rows(source: str, base_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Every row of a data file, a saved dataset folder or (``hf:<id>``) a Hub dataset, read with `datasets`."""
    import datasets

    datasets.disable_progress_bars()
    if source.startswith("hf:"):
        return datasets.load_dataset(source[3:], split="train").to_list()
    path = Path(source) if Path(source).is_absolute() else Path(base_dir or Path.cwd()) / source
    if not path.exists():
        raise TaskDataError(f"task data {path} does not exist")
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise TaskDataError(f"{path}: a saved DatasetDict without a 'train' split (has {sorted(loaded)})")
            loaded = loaded["train"]
        return loaded.to_list()
    kind = _FORMATS.get(path.suffix.lower())
    if kind is None:
        raise TaskDataError(f"{path}: unknown data format {path.suffix!r}; use .jsonl, .json, .parquet or .csv")
    with tempfile.TemporaryDirectory() as cache:  # keep `datasets`' Arrow cache out of the user's home
        try:
            table = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=cache)
        except Exception as error:  # `datasets` wraps parse errors in several types; name the file
            raise TaskDataError(f"{path}: cannot read it as {kind}: {type(error).__name__}: {error}") from None
        return table.to_list()


def _check_columns(rows: Sequence[Mapping[str, Any]], settings: DatasetSettings, source: str) -> None:
    wanted = {
        "prompt_column": settings.prompt_column,
        "messages_column": settings.messages_column,
        "reference_column": settings.reference_column,
        "id_column": settings.id_column,
        **{f"fields[{i}]": name for i, name in enumerate(settings.fields)},
    }
    if not rows:
        raise TaskDataError(f"{source} holds no rows")
    columns = list(rows[0])
    for key, name in wanted.items():
        if name is not None and name not in columns:
            raise TaskDataError(f"{source}: no column {name!r} (task.dataset.{key}); its columns are {columns}")


def _row_key(row: Mapping[str, Any]) -> str:
    return json.dumps(row, sort_keys=True, default=str, ensure_ascii=False)


def _in_eval(prompt: Any, seed: int, fraction: float) -> bool:
    """Whether a row is held out: a hash of its prompt and the seed, so a file's row order and column types
    (a CSV reads numbers as numbers) do not matter, and equal prompts always fall on the same side."""
    digest = hashlib.sha256(f"{seed}\0{_row_key(prompt)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_rows(settings: DatasetSettings, base_dir: str | Path | None = None) -> dict[str, list[dict[str, Any]]]:
    """Train and held-out rows (the eval file, else a seeded split of train), checked and disjoint."""
    train = load_rows(settings.train, base_dir)
    _check_columns(train, settings, settings.train)
    if settings.eval:
        held_out = load_rows(settings.eval, base_dir)
        _check_columns(held_out, settings, settings.eval)
    column = settings.prompt_column or settings.messages_column
    if not settings.eval:
        held_out = [r for r in train if _in_eval(r[column], settings.seed, settings.eval_fraction)]
        train = [r for r in train if not _in_eval(r[column], settings.seed, settings.eval_fraction)]
    shared = {_row_key(r[column]) for r in train} & {_row_key(r[column]) for r in held_out}
    if shared:
        raise TaskDataError(f"{len(shared)} prompt(s) are both in the training and the held-out rows")
    return {"train": train, "eval": held_out}


def _messages(settings: DatasetSettings, row: Mapping[str, Any]) -> list[dict[str, str]]:
    if settings.messages_column is not None:
        messages = row[settings.messages_column]
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) and {"role", "content"} <= set(m)
                                                     for m in messages):
            raise TaskDataError(f"column {settings.messages_column!r} must hold lists of {{role, content}} messages")
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    text = str(row[settings.prompt_column])
    if settings.user_template is not None:
        text = settings.user_template.format(**{**row, "prompt": text})
    return [{"role": "user", "content": text}]


def build_prompt(tokenizer: Any, settings: DatasetSettings, row: Mapping[str, Any],
                 examples: Sequence[Mapping[str, Any]] = ()) -> str:
    """Chat-template prompt of a row: the system message, worked examples (earlier rows answered with their
    reference), the row's own messages, the generation prompt and the assistant prefix."""
    messages = [{"role": "system", "content": settings.system}] if settings.system else []
    for example in examples:
        messages += _messages(settings, example)
        answer = f"{settings.assistant_prefix}{example[settings.reference_column]}"
        messages.append({"role": "assistant", "content": answer})
    messages += _messages(settings, row)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text + settings.assistant_prefix


def task_meta(settings: DatasetSettings, base_dir: str | Path | None = None) -> dict[str, Any]:
    """What finetune and evaluate need to score the rows, stored in the task data files."""
    return {"name": "dataset", "reward": settings.reward, "tolerance": settings.tolerance,
            "stop_strings": list(settings.stop_strings), "reward_sha256": file_sha256(settings.reward, base_dir)}


def make_task_data(settings: DatasetSettings, tokenizer: Any, train_path: str | Path, eval_path: str | Path,
                   base_dir: str | Path | None = None) -> dict[str, Any]:
    """Write the train and held-out Parquet files of a dataset task; returns a short summary."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if settings.reward not in BUILTIN:
        load_user_reward(settings.reward, base_dir)  # fail now, not after the model is quantized
    rows = split_rows(settings, base_dir)
    examples, rows["train"] = rows["train"][: settings.few_shot], rows["train"][settings.few_shot :]
    meta = json.dumps(task_meta(settings, base_dir), sort_keys=True)
    summary: dict[str, Any] = {}
    for split, path, size in (("train", train_path, settings.train_size), ("eval", eval_path, settings.eval_size)):
        chosen = rows[split][:size]
        if not chosen:
            raise TaskDataError(f"the {split} split is empty: give more rows, task.dataset.eval or a larger "
                                "task.dataset.eval_fraction")
        ids = [str(r[settings.id_column]) if settings.id_column else f"{split}-{i:06d}" for i, r in enumerate(chosen)]
        prompts = [build_prompt(tokenizer, settings, r, examples) for r in chosen]
        table = pa.table({
            "id": pa.array(ids, pa.string()),
            "prompt": pa.array(prompts, pa.string()),
            "assistant_prefix": pa.array([settings.assistant_prefix] * len(chosen), pa.string()),
            "reference": pa.array([str(r[settings.reference_column]) for r in chosen], pa.string()),
            "fields": pa.array([json.dumps({k: r[k] for k in settings.fields}, default=str) for r in chosen],
                               pa.string()),
        }).replace_schema_metadata({"qes.task": meta})
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        summary[split] = {"n": len(chosen), "path": str(path), "prompt_chars_max": max(map(len, prompts))}
    summary["few_shot"] = len(examples)
    return summary


def dataset_task(meta: Mapping[str, Any], base_dir: str | Path | None = None) -> Task:
    """The task a dataset task file describes (its reward resolved; a user reward file checked unchanged)."""
    spec, tolerance = meta["reward"], float(meta.get("tolerance", 1e-6))
    if spec == "exact_match":
        def score(completion: str, row: DatasetRow, prefix: str) -> RewardRecord:
            return exact_match(completion, row.reference)
    elif spec == "numeric":
        def score(completion: str, row: DatasetRow, prefix: str) -> RewardRecord:
            return numeric(completion, row.reference, tolerance)
    elif spec == "countdown":
        def score(completion: str, row: DatasetRow, prefix: str) -> RewardRecord:
            return countdown_row(completion, row.reference, row.fields, prefix)
    else:
        recorded, now = meta.get("reward_sha256"), file_sha256(spec, base_dir)
        if recorded is not None and recorded != now:
            raise RewardError(f"reward {spec!r}: the file changed since the task data was written (sha256 "
                              f"{recorded[:12]}… then, {now[:12]}… now); rerun the task stage")
        function = load_user_reward(spec, base_dir)

        def score(completion: str, row: DatasetRow, prefix: str) -> RewardRecord:
            view = {"id": row.id, "prompt": row.prompt, "reference": row.reference, "fields": dict(row.fields)}
            try:
                value = function(completion, view)
            except Exception as error:
                message = f"reward {spec!r} raised on row {row.id!r}: {type(error).__name__}: {error}"
                raise RewardError(message) from error
            return user_record(value, spec, row.id)
    return Task(name="dataset", stop_strings=tuple(meta.get("stop_strings") or ()), score=score,
                describe=describe_rows)


def describe_rows(rows: Sequence[DatasetRow]) -> dict[str, list]:
    """The reference answer of each row, for the per-example evaluation output."""
    return {"reference": [row.reference for row in rows]}


def read_rows(table: Any) -> list[DatasetRow]:
    missing = [c for c in TASK_COLUMNS if c not in table.column_names]
    if missing:
        raise TaskDataError(f"dataset task file: missing columns {missing}")
    return [DatasetRow(r["id"], r["reference"], json.loads(r["fields"]), r["prompt"]) for r in table.to_pylist()]


@register
class Dataset(TaskKind):
    """A task from your own rows, as the registry knows it."""

    name = "dataset"
    title = "dataset"

    def config_conflicts(self, block: Mapping[str, Any], workdir: Path | None = None) -> list[str]:
        return config_conflicts(block, workdir)

    def input_files(self, block: Mapping[str, Any]) -> list[str]:
        data = block.get("dataset") or {}
        reward = block.get("reward") or ""
        files = [data.get("train"), data.get("eval"), reward.rpartition(":")[0] if ".py:" in reward else None]
        return [name for name in files if name and not name.startswith("hf:")]

    def make_data(self, block: Mapping[str, Any], tokenizer: Any, train_path: str | Path, eval_path: str | Path,
                  base_dir: str | Path | None = None) -> dict[str, Any]:
        values = complete_block(block, config_conflicts, Path(base_dir) if base_dir else None)
        return make_task_data(DatasetSettings.from_block(values), tokenizer, train_path, eval_path, base_dir)

    def read_file(self, path: str | Path, limit: int | None = None) -> tuple[list[Any], list[str], list[str]]:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        table = table.slice(0, limit) if limit is not None else table
        rows = read_rows(table)
        return rows, [row.prompt for row in rows], table.column("assistant_prefix").to_pylist()

    def scorer(self, meta: Mapping[str, Any], base_dir: str | Path | None = None) -> Task:
        return dataset_task(meta, base_dir)

    def reward_description(self, meta: Mapping[str, Any]) -> str:
        reward = meta.get("reward") or "exact_match"
        return DESCRIPTIONS.get(reward, f"the user function `{reward}` (sha256 `{meta.get('reward_sha256')}`)")
