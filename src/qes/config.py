"""One validation for every entry point.

The workflow, the ``qes`` command line and the library's config dataclasses check settings against the same
schema (:mod:`qes.schema`) and fill in the same defaults. The rules that relate two keys, which a JSON schema
cannot say, are applied here, so the workflow can apply them when it is parsed, before any job runs or any
output is removed; a task's own rules are the task's (:meth:`qes.tasks.TaskKind.config_conflicts`).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from qes.schema import SCHEMA_PATH, ConfigError, check_values, complete, schema, strict_problems
from qes.tasks import task_conflicts

__all__ = [
    "SCHEMA_PATH", "ConfigError", "check_rules", "check_values", "complete", "device_conflicts", "finetune_conflicts",
    "read_block", "schema", "task_conflicts",
]


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
    if block.get("prefix_cache") == "row" and block.get("decode", "eager") != "eager":
        problems.append(f"{prefix}.decode: {block['decode']} needs prefix_cache member (row decodes through "
                        "transformers' generate)")
    if block["shaping"] == "pair_zscore" and population < 4:
        problems.append(
            f"{prefix}.population: {population} with shaping pair_zscore can never update the codes (the z-score "
            f"of a single mirrored pair is always 0); use population >= 4 or shaping centered_rank"
        )
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
    strict = strict_problems(config)
    if strict:
        raise ConfigError("invalid config:\n  " + "\n  ".join(strict))
    problems = task_conflicts(config["task"], workdir) + finetune_conflicts(config["finetune"])
    problems += device_conflicts(config, device or config["finetune"]["device"])
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
