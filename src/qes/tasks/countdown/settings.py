"""The ``task`` block of a Countdown task: which problems, how they are prompted, and the rules across its keys."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qes.tasks.base import complete_block
from qes.tasks.countdown.generator import CountdownConfig
from qes.tasks.countdown.prompt import DEMONSTRATIONS, PromptStyle, _user_message

_RANGES = (("num_count_min", "num_count_max"), ("number_min", "number_max"), ("target_min", "target_max"))
_TOP_KEYS = {"name", "train_file", "eval_file", "prompt", "reward", "tolerance", "dataset"}  # last 3: datasets'
_PROMPT_KEYS = {"system", "user_template", "assistant_prefix", "few_shot"}


def config_conflicts(block: Mapping[str, Any], workdir: Path | None = None) -> list[str]:
    """Ranges that are empty, problem files that do not exist and a reward Countdown does not use."""
    problems = [f"task.{low} ({block[low]}) is greater than task.{high} ({block[high]})"
                for low, high in _RANGES if block[low] > block[high]]
    for key in ("train_file", "eval_file"):
        name = block.get(key)
        if name is not None and not ((workdir or Path.cwd()) / name).is_file():
            problems.append(f"task.{key}: {name} does not exist")
    if block.get("reward") not in (None, "countdown"):
        problems.append(f"task.reward: {block['reward']!r} applies to dataset tasks; countdown scores with its own")
    return problems


def _prompt_style(block: Mapping[str, Any]) -> PromptStyle:
    prompt = {k: v for k, v in (block.get("prompt") or {}).items() if v is not None}  # null: built-in
    unknown = sorted(set(prompt) - _PROMPT_KEYS)
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
    return style


@dataclass(frozen=True)
class TaskSettings:
    """The ``task`` block of the workflow config: which problems, and how they are prompted.

    ``train_file`` / ``eval_file`` (JSON, see :func:`~qes.tasks.countdown.problems.load_problems_json`)
    replace the generated split of the same name; the first ``train_size`` / ``eval_size`` entries are used.
    """

    name: str = "countdown"
    generator: CountdownConfig = CountdownConfig()
    prompt: PromptStyle = PromptStyle()
    train_file: str | None = None
    eval_file: str | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TaskSettings:
        """Build from the config's ``task`` block, validated by the config schema (its defaults fill the gaps)."""
        values = complete_block(values, config_conflicts)
        gen_keys = set(CountdownConfig.__dataclass_fields__)
        unknown = sorted(set(values) - gen_keys - _TOP_KEYS)
        if unknown:
            raise ValueError(f"unknown task setting(s): {', '.join(unknown)}")
        style = _prompt_style(values)
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
