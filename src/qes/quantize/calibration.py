"""The quantize stage's prompts: the conversations GPTQ calibrates on, and held-out ones that measure what
quantization cost, each rendered with the tokenizer's chat template.

Calibration uses Countdown problems (:mod:`qes.tasks.countdown.calibration`); the held-out set mixes
Countdown problems of another namespace with general instructions, and never shares a prompt with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qes.quantize.settings import QuantizeConfig
from qes.tasks.countdown.calibration import calibration_conversations

Conversation = list[dict[str, str]]

_HELDOUT_GENERAL = (
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a lighthouse at night.",
    "What is the capital of France, and what river runs through it?",
    "List three uses of a paper clip.",
    "Translate 'good morning, my friend' into Spanish.",
    "Give a one-line definition of an integer.",
    "How many legs does a spider have? Answer briefly.",
    "Summarise the rules of tic-tac-toe.",
)


def builtin_calibration_prompts(count: int) -> list[Conversation]:
    """``count`` deterministic Countdown-style chat conversations used to calibrate GPTQ."""
    return calibration_conversations("qes-calibration", count)


def builtin_heldout_prompts(count: int) -> list[Conversation]:
    """Evaluation conversations disjoint from the calibration set: Countdown problems from another seed
    namespace interleaved with general instructions."""
    countdown = calibration_conversations("qes-heldout", count)
    general = [[{"role": "user", "content": text}] for text in _HELDOUT_GENERAL]
    mixed: list[Conversation] = []
    for index in range(count):
        if index % 4 == 3:
            mixed.append(general[(index // 4) % len(general)])
        else:
            mixed.append(countdown[index])
    return mixed


def render_prompts(tokenizer: Any, conversations: Sequence[Sequence[Mapping[str, str]]]) -> list[str]:
    """Render conversations with the tokenizer's chat template (with the assistant generation prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        return ["\n".join(message["content"] for message in conversation) for conversation in conversations]
    return [
        tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True)
        for conversation in conversations
    ]


def prompt_texts(
    tokenizer: Any, cfg: QuantizeConfig, calibration: Sequence[Sequence[Mapping[str, str]]] | None = None
) -> tuple[list[str], list[str]]:
    """The rendered calibration texts (``calibration``, else :func:`builtin_calibration_prompts`) and held-out
    texts of a quantization; a held-out text that is also a calibration text is an error."""
    conversations = calibration if calibration is not None else builtin_calibration_prompts(cfg.calibration_samples)
    calibration_texts = render_prompts(tokenizer, conversations)
    heldout_texts = render_prompts(tokenizer, builtin_heldout_prompts(cfg.eval_prompts))
    overlap = set(calibration_texts) & set(heldout_texts)
    if overlap:
        raise ValueError(f"{len(overlap)} evaluation prompt(s) also appear in the calibration set")
    return calibration_texts, heldout_texts
