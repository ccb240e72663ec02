"""The ``int4pack`` backend: torch's CPU int4 matmul (``aten._weight_int4pack_mm_for_cpu``) on INT4 codes.

torch's packed layout differs between CPU instruction sets (AVX-512, AVX2, the scalar fallback), so it is
never assumed: :func:`int4pack_layout` reads it off torch's own converter on the machine at hand, and a
layer whose layout is not an exact shuffle of its codes is not run here. After the engine changes codes,
the arena adds the same deltas to the packed nibbles.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from qes.backends.base import Backend, CacheArena, LayerSpec, offsets
from qes.packing import unpack_along_rows

if TYPE_CHECKING:
    from qes.qlinear import GPTQLinear

__all__ = ["INT4PACK_GROUPS", "Int4PackBackend", "Int4PackLayout", "int4pack_kernel_dtype", "int4pack_layout",
           "pack_int4"]

#: group sizes torch's int4 CPU kernel runs
INT4PACK_GROUPS = (32, 64, 128, 256)


def int4pack_kernel_dtype(requested: str | torch.dtype, model_dtype: torch.dtype) -> torch.dtype:
    """The int4 kernel's dtype: the model's, except bf16 under ``auto`` where the model runs in float32.

    torch's int4 CPU kernel is vectorised in bf16 on every instruction set, while its float32 path is a slow
    fallback (measured on AVX2: 13x slower at 16 rows x a 1536x576 layer). So ``auto`` keeps float32 for the
    rest of the model and rounds only the int4 matmuls' inputs to bf16; an explicit ``float32`` means float32
    everywhere.
    """
    return torch.bfloat16 if requested == "auto" and model_dtype == torch.float32 else model_dtype


@dataclass(frozen=True)
class Int4PackLayout:
    """Where torch's int4 packing puts code ``Q[o, i]``: nibble ``row[o] + col[i]`` of the packed bytes."""

    row: torch.Tensor
    col: torch.Tensor


_layouts: dict[tuple[int, int, str], Int4PackLayout | str] = {}


def int4pack_layout(out_features: int, in_features: int) -> Int4PackLayout:
    """Read torch's int4 packing for this shape off its own converter; raises if it is not a plain shuffle.

    Each code's nibble is found by packing probe matrices whose codes spell out, four bits at a time, the
    code's own index. The layout is accepted only if it places every code once, keeps its value, and splits
    into a row part plus a column part (as it does for every instruction set seen: blocks of output rows,
    interleaved differently per ISA), which is what lets an arena address it with two small tables.
    """
    key = (out_features, in_features, torch.backends.cpu.get_cpu_capability())
    if key not in _layouts:
        try:
            _layouts[key] = _probe_int4pack_layout(out_features, in_features)
        except (RuntimeError, ValueError) as error:
            _layouts[key] = str(error).splitlines()[0]
    found = _layouts[key]
    if isinstance(found, str):
        raise ValueError(f"torch's int4 packing cannot hold a {out_features}x{in_features} layer exactly: {found}")
    return found


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``Q[out, in]`` in torch's int4 CPU packing (its own converter)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    data = packed.reshape(-1).view(torch.uint8).long()
    return torch.stack([data & 15, data >> 4], dim=1).reshape(-1)


def _probe_int4pack_layout(out_features: int, in_features: int) -> Int4PackLayout:
    count = out_features * in_features
    index = torch.arange(count, dtype=torch.int64)
    slots = _nibbles(pack_int4(torch.zeros(out_features, in_features))).numel()
    slot_holds = torch.zeros(slots, dtype=torch.int64)
    digits = max(1, ((count - 1).bit_length() + 3) // 4)
    for d in range(digits):
        probe = ((index >> (4 * d)) & 15).view(out_features, in_features)
        slot_holds += _nibbles(pack_int4(probe)) << (4 * d)
    if slot_holds.numel() != count or not torch.equal(torch.sort(slot_holds).values, index):
        raise ValueError("the packed nibbles are not a permutation of the codes")
    where = torch.empty(count, dtype=torch.int64)
    where[slot_holds] = torch.arange(count)
    where = where.view(out_features, in_features)
    row, col = where[:, 0].clone(), where[0, :] - where[0, 0]
    if not torch.equal(where, row[:, None] + col[None, :]):
        raise ValueError("the packed layout does not split into row and column offsets")
    # Values must be stored as they are (no offset or sign flip): check with a scrambled matrix.
    values = ((index * 2654435761) >> 11) % 16
    if not torch.equal(_nibbles(pack_int4(values.view(out_features, in_features)))[where.reshape(-1)], values):
        raise ValueError("the packed nibbles do not hold the code values as they are")
    return Int4PackLayout(row, col)


class Int4PackBackend(Backend):
    """torch's CPU int4 matmul; the result is cast back to the input's dtype.

    The kernel computes ``(q - 8) * scale + offset``; GPTQ's ``(q - z) * s`` is that with ``offset = (8 - z) * s``.
    ``kernel_dtype`` is the dtype the kernel computes in. Under ``dtype: auto`` the model computes in float32
    but this kernel in bf16 (see :func:`int4pack_kernel_dtype`).
    """

    name = "int4pack"

    def __init__(self, kernel_dtype: torch.dtype):
        self.kernel_dtype = self.input_dtype = kernel_dtype

    @classmethod
    def can_implement(cls, layer: LayerSpec) -> tuple[bool, str]:
        """INT4 on the CPU, a group size the kernel runs, and a shape torch's packing holds exactly."""
        if layer.bits != 4 or layer.device != "cpu":
            return False, f"int4pack runs INT4 codes on the CPU only (the layer is {layer.bits}-bit on {layer.device})"
        if layer.group_size not in INT4PACK_GROUPS or layer.in_features % layer.group_size:
            groups = ", ".join(map(str, INT4PACK_GROUPS[:-1])) + f" or {INT4PACK_GROUPS[-1]}"
            return False, (f"int4pack needs a group size of {groups} dividing in_features, got {layer.group_size} "
                           f"for in_features {layer.in_features}")
        try:
            int4pack_layout(layer.out_features, layer.in_features)
        except ValueError as error:
            return False, str(error)
        return True, ""

    def prepare(self, module: GPTQLinear) -> None:
        packed, scales_zeros = self._pack(module)
        module.register_buffer("int4_packed", packed, persistent=False)
        module.register_buffer("int4_scales_zeros", scales_zeros, persistent=False)

    def rebuild(self, module: GPTQLinear) -> None:
        packed, scales_zeros = self._pack(module)
        module.int4_packed.copy_(packed)
        module.int4_scales_zeros.copy_(scales_zeros)

    def _pack(self, module: GPTQLinear) -> tuple[torch.Tensor, torch.Tensor]:
        packed = pack_int4(unpack_along_rows(module.qweight, 4).t())  # from Q[out, in]
        scales = module.scales.to(torch.float32)
        zero_offsets = (8 - module.zero_points()).to(torch.float32) * scales
        return packed, torch.stack([scales, zero_offsets], dim=2).to(self.kernel_dtype).contiguous()

    def forward(self, module: GPTQLinear, x: torch.Tensor) -> torch.Tensor:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(self.kernel_dtype).contiguous(), module.int4_packed, module.group_size, module.int4_scales_zeros
        )
        return out.to(x.dtype)

    def arena(self, modules: list[GPTQLinear]) -> CacheArena:
        return _Int4PackArena(modules)


class _Int4PackArena(CacheArena):
    def __init__(self, modules: list[GPTQLinear]):
        packed = [m.int4_packed for m in modules]
        self.bytes = torch.cat([p.reshape(-1).view(torch.uint8) for p in packed])
        start = 0
        for module, p in zip(modules, packed):
            n = p.numel() * p.element_size()
            module.int4_packed = self.bytes[start : start + n].view(p.dtype).view(p.shape)
            start += n
        layouts = [int4pack_layout(m.out_features, m.in_features) for m in modules]
        device = self.bytes.device
        self.nibble_offsets = 2 * offsets([p.numel() * p.element_size() for p in packed], device)
        self.row = torch.cat([x.row for x in layouts]).to(device)
        self.row_offsets = offsets([m.out_features for m in modules], device)
        self.col = torch.cat([x.col for x in layouts]).to(device)
        self.col_offsets = offsets([m.in_features for m in modules], device)

    def update(self, layer, o, i, k, delta, codes) -> None:
        row = self.row[self.row_offsets[layer] + o]
        nibble = self.nibble_offsets[layer] + row + self.col[self.col_offsets[layer] + i]
        # Adds never carry into the neighbouring nibble (codes stay in [0, 15]); uint8 wraps mod 256.
        self.bytes.index_add_(0, nibble >> 1, (delta << ((nibble & 1) * 4)).to(torch.uint8))
