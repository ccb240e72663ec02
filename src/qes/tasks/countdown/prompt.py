"""Countdown prompts: chat-template prompts asking for reasoning in ``<think>`` tags and the final expression in
``<answer>`` tags.

The default was calibrated on SmolLM2-135M-Instruct (greedy, 64 new tokens): zero-shot it almost never writes
answer tags (format rate 0); an assistant prefix of ``<think>`` alone makes it stop after ``</think>``.  Two
worked examples as earlier chat turns, the assistant turn opened with ``Let me solve this step by step.\n<think>``
(the QES paper's opening), and answers written as ``expression = target`` bring the format rate to ~95% and the
accuracy on easy problems above zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from qes.tasks.countdown.problems import Problem
from qes.tasks.countdown.reward import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, THINK_OPEN

SYSTEM_PROMPT = (
    "You are a careful assistant who is good at arithmetic puzzles. Think the problem through "
    "first, then give a short final answer."
)
USER_TEMPLATE = (
    "Make the number {target} from the numbers {numbers_text}. Combine them with +, -, * and /, "
    "using every number exactly once, and use parentheses if you need them. Write your reasoning "
    "between <think> and </think>, then write only the final expression between <answer> and "
    "</answer>."
)
ASSISTANT_PREFIX = "Let me solve this step by step.\n<think>"


@dataclass(frozen=True)
class Demonstration:
    """A worked example shown as an earlier chat turn: the reasoning and the answer of a problem."""

    problem: Problem
    think: str
    answer: str


#: Worked examples for few-shot prompts. Each reasoning tries a wrong combination first, and each answer
#: ends with ``= target``: small models copy that shape, and it keeps their answer next to the arithmetic
#: they just did (the checker accepts a trailing ``= target``).
DEMONSTRATIONS: tuple[Demonstration, ...] = (
    Demonstration(Problem("demo-0", (7, 4), 3), "7 + 4 = 11, not 3. 7 - 4 = 3, that is the target.", "7 - 4 = 3"),
    Demonstration(
        Problem("demo-1", (6, 3, 5), 7),
        "6 + 3 + 5 = 14, not 7. 6 / 3 = 2 and 2 + 5 = 7, that is the target.",
        "6 / 3 + 5 = 7",
    ),
)


RESERVED = frozenset(d.problem.key for d in DEMONSTRATIONS)


@dataclass(frozen=True)
class PromptStyle:
    """How a problem becomes chat messages.

    ``examples`` are shown as earlier user/assistant turns. ``assistant_prefix`` is appended after the
    template's generation prompt, so the model continues it; it counts as part of the assistant text when
    the format is checked, and the examples' assistant turns start with it too.
    """

    system: str = SYSTEM_PROMPT
    user_template: str = USER_TEMPLATE
    assistant_prefix: str = ASSISTANT_PREFIX
    examples: tuple[Demonstration, ...] = DEMONSTRATIONS


def _numbers_text(numbers: Sequence[int]) -> str:
    if len(numbers) == 1:
        return str(numbers[0])
    return ", ".join(str(n) for n in numbers[:-1]) + f" and {numbers[-1]}"


def _user_message(style: PromptStyle, problem: Problem) -> str:
    return style.user_template.format(
        target=problem.target, numbers=list(problem.numbers), numbers_text=_numbers_text(problem.numbers)
    )


def _assistant_message(style: PromptStyle, demo: Demonstration) -> str:
    opener = "" if style.assistant_prefix.endswith(THINK_OPEN) else THINK_OPEN
    return f"{style.assistant_prefix}{opener}{demo.think}{THINK_CLOSE}\n{ANSWER_OPEN}{demo.answer}{ANSWER_CLOSE}"


def build_prompt(tokenizer: Any, problem: Problem, style: PromptStyle | None = None) -> str:
    """The full prompt text: the tokenizer's chat template (system, examples, user; generation prompt
    on) followed by the assistant prefix."""
    style = style or PromptStyle()
    messages = [{"role": "system", "content": style.system}]
    for demo in style.examples:
        messages.append({"role": "user", "content": _user_message(style, demo.problem)})
        messages.append({"role": "assistant", "content": _assistant_message(style, demo)})
    messages.append({"role": "user", "content": _user_message(style, problem)})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text + style.assistant_prefix
