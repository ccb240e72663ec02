"""Settings of the quantize stage (the ``quantize`` block of the workflow config)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from qes.packing import SUPPORTED_BITS
from qes.schema import allowed, complete

#: the code widths the quantize stage makes: those qes packs and runs that the config offers (quantize.bits)
QUANTIZE_BITS = tuple(bits for bits in SUPPORTED_BITS if bits in allowed(("quantize", "bits")))


@dataclass(frozen=True)
class QuantizeConfig:
    """Settings of the quantize stage (the ``quantize`` block of the workflow config)."""

    bits: int = 4
    group_size: int = 64
    calibration_samples: int = 128
    batch_size: int = 8
    damp_percent: float = 0.05
    eval_prompts: int = 16
    offload_to_disk: bool = False

    def __post_init__(self) -> None:
        if self.bits not in QUANTIZE_BITS:
            raise ValueError(f"quantize.bits must be one of {QUANTIZE_BITS}, got {self.bits}")
        if self.group_size < 1:
            raise ValueError(f"quantize.group_size must be a positive integer, got {self.group_size}")
        if self.calibration_samples < 1:
            raise ValueError(f"quantize.calibration_samples must be >= 1, got {self.calibration_samples}")
        if self.batch_size < 1:
            raise ValueError(f"quantize.batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.damp_percent < 1.0:
            raise ValueError(f"quantize.damp_percent must lie in (0, 1), got {self.damp_percent}")
        if self.eval_prompts < 0:
            raise ValueError(f"quantize.eval_prompts must be >= 0, got {self.eval_prompts}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> QuantizeConfig:
        """Build from the ``quantize`` block of the config, validated by the config schema (defaults fill gaps)."""
        return cls(**complete(dict(values), "quantize", source="quantize settings"))

    @property
    def tag(self) -> str:
        """Suffix naming the quantized model, e.g. ``w4g64``."""
        return f"w{self.bits}g{self.group_size}"
