"""One validation for every entry point.

The workflow, the ``qes`` command line and the library's config dataclasses check settings against the same
schema (``config.schema.yaml`` next to this file; the workflow's ``workflow/schemas/config.schema.yaml`` links
to it) and fill in the same defaults. The rules that relate two keys, which a JSON schema cannot say, live
here too, so the workflow can apply them when it is parsed, before any job runs or any output is removed.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


class ConfigError(ValueError):
    """Settings that cannot run; the message names every offending key, what was expected and what was found."""


@functools.cache
def schema() -> dict:
    """The config schema (every key with a type, a default and a description)."""
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _with_defaults(base: type) -> type:
    """A validator class that also fills in the defaults of missing properties (jsonschema does not by itself)."""
    check_properties = base.VALIDATORS["properties"]

    def fill_then_check(validator: Any, properties: dict, instance: Any, sub: dict) -> Iterator[Any]:
        if isinstance(instance, dict):
            for key, spec in properties.items():
                if key not in instance and "default" in spec:
                    instance[key] = copy.deepcopy(spec["default"])
        yield from check_properties(validator, properties, instance, sub)

    return jsonschema.validators.extend(base, {"properties": fill_then_check})


def _strict_types(base: type) -> type:
    """JSON Schema counts 8.0 as an integer and NaN or infinity as numbers; settings do not: an integer is
    written as one, and a number is finite."""

    def is_integer(_checker: Any, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def is_number(_checker: Any, value: Any) -> bool:
        return is_integer(_checker, value) or (isinstance(value, float) and math.isfinite(value))

    checker = base.TYPE_CHECKER.redefine_many({"integer": is_integer, "number": is_number})
    return jsonschema.validators.extend(base, type_checker=checker)


_STRICT = _strict_types(jsonschema.Draft202012Validator)
_FILLING = _with_defaults(_STRICT)


def _subschema(path: Sequence[str]) -> dict:
    node = schema()
    for key in path:
        node = node["properties"][key]
    return node


def _describe(error: jsonschema.ValidationError, prefix: Sequence[str]) -> str:
    key = ".".join(str(p) for p in [*prefix, *error.absolute_path]) or "(top level)"
    return f"{key}: {error.message}"


def complete(values: Any, section: str | Sequence[str] = (), *, source: str = "config") -> Any:
    """Validate `values` (the whole config, or the block at `section`) and return a copy with defaults filled.

    Raises :class:`ConfigError` naming each bad key as its dotted path (``finetune.residual.window``).
    """
    path = [section] if isinstance(section, str) else list(section)
    sub = _subschema(path)
    data = {} if values is None and sub.get("type") == "object" else copy.deepcopy(values)
    errors = sorted(_FILLING(sub).iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        lines = [_describe(error, path) for error in errors[:8]]
        more = f"\n  ... and {len(errors) - 8} more" if len(errors) > 8 else ""
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(lines) + more)
    return data


def check_values(section: str | Sequence[str], values: Any, *, source: str = "settings") -> None:
    """Validate a partial block (keys left out are fine) without keeping the filled copy."""
    complete(values, section, source=source)


def read_block(path: Path | None, section: str) -> dict:
    """The `section:` block of a YAML file (a whole workflow config or just that block); {} without a file."""
    if path is None:
        return {}
    if not Path(path).is_file():
        raise ConfigError(f"--config {path}: no such file")
    try:
        data = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping with a {section}: block, found {type(data).__name__}")
    sections = list(schema()["properties"])
    unknown = [str(key) for key in data if key not in sections]
    if unknown:
        raise ConfigError(f"--config {path}: unknown top-level key(s) {', '.join(unknown)}: settings go in one of "
                          f"the sections {', '.join(sections)} (here: {section}:)")
    block = data.get(section)
    if block is None:
        return {}
    if not isinstance(block, dict):
        raise ConfigError(f"--config {path}: {section}: expected a mapping of settings, found {block!r}")
    return dict(block)


# --- rules across keys --------------------------------------------------------------------------------


def finetune_conflicts(block: dict, prefix: str = "finetune") -> list[str]:
    """What makes a (complete) finetune block unable to run or to ever update the codes."""
    problems = []
    population, ranks = block["population"], block.get("ranks", 1)
    if ranks > population:
        problems.append(f"{prefix}.ranks: {ranks} ranks for a population of {population}; at most one rank per member")
    member_batch = block.get("member_batch", "auto")
    if block.get("prefix_cache") == "row" and member_batch not in ("auto", 1):
        problems.append(f"{prefix}.member_batch: {member_batch} needs prefix_cache member (row scores one member "
                        "at a time)")
    if block["shaping"] == "pair_zscore" and population < 4:
        problems.append(
            f"{prefix}.population: {population} with shaping pair_zscore can never update the codes (the z-score "
            f"of a single mirrored pair is always 0); use population >= 4 or shaping centered_rank"
        )
    return problems


def task_conflicts(task: dict, workdir: Path | None = None) -> list[str]:
    """Ranges that are empty and problem files that do not exist in a (complete) task block."""
    problems = []
    for low, high in (("num_count_min", "num_count_max"), ("number_min", "number_max"), ("target_min", "target_max")):
        if task[low] > task[high]:
            problems.append(f"task.{low} ({task[low]}) is greater than task.{high} ({task[high]})")
    for key in ("train_file", "eval_file"):
        name = task.get(key)
        if name is not None and not ((workdir or Path.cwd()) / name).is_file():
            problems.append(f"task.{key}: {name} does not exist")
    if task.get("name") == "dataset":
        problems += _dataset_conflicts(task, workdir or Path.cwd())
    elif task.get("reward") not in (None, "countdown"):
        problems.append(f"task.reward: {task['reward']!r} applies to dataset tasks; countdown scores with its own")
    return problems


def _dataset_conflicts(task: dict, workdir: Path) -> list[str]:
    from qes.tasks.rewards import BUILTIN

    problems = []
    data = task.get("dataset") or {}
    if not data.get("train"):
        problems.append("task.dataset.train: a dataset task needs its training rows (a file, saved dataset, hf:<id>)")
    for key in ("train", "eval"):
        name = data.get(key)
        if name and not name.startswith("hf:") and not (workdir / name).exists():
            problems.append(f"task.dataset.{key}: {name} does not exist")
    reward = task.get("reward")
    if reward not in (None, *BUILTIN):
        file, sep, function = reward.rpartition(":")
        if not sep or not file.endswith(".py") or not function.isidentifier():
            problems.append(f"task.reward: {reward!r} is neither one of {', '.join(BUILTIN)} nor <file>.py:<function>")
        elif not (workdir / file).is_file():
            problems.append(f"task.reward: {file} does not exist")
    return problems


def device_conflicts(config: dict, device: str) -> list[str]:
    """Backends the (resolved) device cannot run: int4pack is torch's CPU int4 matmul."""
    return [
        f"{section}.backend: int4pack runs on the CPU only, and finetune.device resolves to cuda here; use auto "
        f"or dense"
        for section in ("finetune", "evaluate")
        if device == "cuda" and config[section]["backend"] == "int4pack"
    ]


def check_rules(config: dict, workdir: Path | None = None, device: str | None = None) -> None:
    """Cross-key rules of a complete workflow config; raises one ConfigError listing every problem.
    ``device``: what ``finetune.device`` resolved to (the config's own value when None).

    Also the strict types (an integer is no float, numbers are finite), which the workflow's own schema
    validation (Snakemake's) does not apply."""
    errors = sorted(_STRICT(schema()).iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(_describe(error, ()) for error in errors[:8]))
    problems = task_conflicts(config["task"], workdir) + finetune_conflicts(config["finetune"])
    problems += device_conflicts(config, device or config["finetune"]["device"])
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
