"""Checks before quantizing: every linear layer GPTQ will quantize must fit the group size and the packing."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch

from qes.quantize.settings import QuantizeConfig


def linear_in_features(model_dir: str | Path) -> dict[str, tuple[int, int]]:
    """``{module name: (in_features, out_features)}`` of every linear layer GPTQ will quantize.

    The model is instantiated on the meta device from its config, so no weights are read. ``lm_head`` is
    skipped (GPTQModel leaves it in float by default).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    widths = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            widths[name] = (int(module.in_features), int(module.out_features))
    return widths


def check_group_size(widths: Mapping[str, tuple[int, int]], cfg: QuantizeConfig) -> None:
    """Fail before quantizing when the group size or packing does not fit some layer, naming it."""
    if not widths:
        raise ValueError("the model has no linear layers to quantize")
    per_word = 32 // cfg.bits
    gcd = 0
    for in_features, _ in widths.values():
        gcd = math.gcd(gcd, in_features)
    fitting = [g for g in (16, 32, 64, 128, 256) if gcd % g == 0]
    for name, (in_features, out_features) in sorted(widths.items()):
        if in_features % cfg.group_size:
            all_widths = sorted({w for w, _ in widths.values()})
            hint = f"; group sizes that fit every layer: {', '.join(map(str, fitting))}" if fitting else ""
            raise ValueError(
                f"quantize.group_size={cfg.group_size} does not divide the input width of layer {name} "
                f"({in_features} in_features); every quantized layer's in_features "
                f"({', '.join(map(str, all_widths))}) must be a multiple of the group size{hint}"
            )
        if in_features % per_word or out_features % per_word:
            raise ValueError(
                f"layer {name} ({in_features} -> {out_features}) cannot be packed as {cfg.bits}-bit codes: "
                f"both widths must be multiples of {per_word}"
            )
