"""Countdown problems for calibrating GPTQ and for measuring what quantization cost.

The quantize stage calibrates on chat conversations of these problems, so they fix the codes of every
quantized base (and with them every seed log trained on one). They come from a sha256 of (namespace, index)
and are asked in an instruction of their own, not from :func:`~qes.tasks.countdown.generator.generate_split`
and the task's prompt: the base does not depend on the task settings, and a change here would change it.
"""

from __future__ import annotations

import hashlib

from qes.tasks.countdown.problems import Problem

INSTRUCTION = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. "
    "And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)


def calibration_problem(namespace: str, index: int) -> Problem:
    """A solvable problem derived from a hash of (namespace, index): 3 or 4 numbers and a target."""
    digest = hashlib.sha256(f"{namespace}:{index}".encode()).digest()
    count = 3 + digest[0] % 2
    numbers = [1 + digest[1 + j] % 99 for j in range(count)]
    ops = [digest[8 + j] % 3 for j in range(count - 1)]
    value = numbers[0]
    for op, number in zip(ops, numbers[1:], strict=True):
        if op == 0:
            value += number
        elif op == 1:
            value = abs(value - number)
        else:
            value = value * number if value * number <= 999 else value + number
    return Problem(f"{namespace}-{index:06d}", tuple(numbers), value)


def calibration_conversations(namespace: str, count: int) -> list[list[dict[str, str]]]:
    """The first ``count`` problems of ``namespace``, each a one-message chat conversation."""
    conversations = []
    for index in range(count):
        problem = calibration_problem(namespace, index)
        text = INSTRUCTION.format(numbers=list(problem.numbers), target=problem.target)
        conversations.append([{"role": "user", "content": text}])
    return conversations
