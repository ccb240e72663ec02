"""The ``dense`` backend: a dequantized weight ``W[out, in]`` in the compute dtype, on any device, any code width.

Wherever codes change, ``(q - z) * s`` is recomputed from the integers at exactly those positions (never
``W += delta * s``, which drifts), so the cache equals a full dequantization bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from qes.backends.base import Backend, CacheArena, LayerSpec, concatenate_into_views, offsets
from qes.packing import SUPPORTED_BITS, unpack_along_rows

if TYPE_CHECKING:
    from qes.qlinear import GPTQLinear

__all__ = ["DenseBackend", "dequantize_weight"]


def dequantize_weight(module: GPTQLinear, dtype: torch.dtype) -> torch.Tensor:
    """Full dequantization ``W[out, in] = (q - z[g_idx]) * s[g_idx]``, in float32 and then cast to ``dtype``.

    :class:`DenseBackend` computes every refreshed position with exactly these operations.
    """
    codes = unpack_along_rows(module.qweight, module.bits)[: module.in_features]  # [I, O]
    zeros = module.zero_points()  # [G, O]
    g_idx = module.g_idx.long()
    weight = (codes - zeros[g_idx]).to(torch.float32) * module.scales.to(torch.float32)[g_idx]
    return weight.t().contiguous().to(dtype)


class DenseBackend(Backend):
    """``W[out, in]`` in the compute dtype; refreshed from the integers wherever codes change."""

    name = "dense"

    def __init__(self, dtype: torch.dtype):
        self.dtype = self.input_dtype = dtype

    @classmethod
    def can_implement(cls, layer: LayerSpec) -> tuple[bool, str]:
        """Any device and shape; every code width the GPTQ packing holds."""
        if layer.bits not in SUPPORTED_BITS:
            return False, f"dense runs codes of {SUPPORTED_BITS} bits, not {layer.bits}"
        return True, ""

    def prepare(self, module: GPTQLinear) -> None:
        module.register_buffer("dense_weight", dequantize_weight(module, self.dtype), persistent=False)

    def rebuild(self, module: GPTQLinear) -> None:
        module.dense_weight.copy_(dequantize_weight(module, self.dtype))

    def forward(self, module: GPTQLinear, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.dtype), module.dense_weight)

    def arena(self, modules: list[GPTQLinear]) -> CacheArena:
        return _DenseArena(modules, self.dtype)


class _DenseArena(CacheArena):
    def __init__(self, modules: list[GPTQLinear], dtype: torch.dtype):
        self.dtype = dtype
        self.weight, self.weight_offsets = concatenate_into_views(modules, "dense_weight")
        device = self.weight.device
        self.zeros = torch.cat([m.zero_points().reshape(-1) for m in modules])
        self.scales = torch.cat([m.scales.to(torch.float32).reshape(-1) for m in modules])
        self.group_offsets = offsets([m.scales.numel() for m in modules], device)
        self.g_idx = torch.cat([m.g_idx.long() for m in modules])
        self.g_idx_offsets = offsets([m.in_features for m in modules], device)
        self.out_features = torch.tensor([m.out_features for m in modules], dtype=torch.int64, device=device)

    def update(self, layer, o, i, k, delta, codes) -> None:
        group = self.g_idx[self.g_idx_offsets[layer] + i]
        at = self.group_offsets[layer] + group * self.out_features[layer] + o
        value = (codes - self.zeros[at]).to(torch.float32) * self.scales[at]
        self.weight[self.weight_offsets[layer] + k] = value.to(self.dtype)
