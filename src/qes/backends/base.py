"""What every forward backend of a GPTQ layer provides: a cache built from the integers, kept in step by an arena.

A :class:`Backend` is built once from a layer's GPTQ tensors (``prepare``), rebuilt in place when they were
written behind its back (``rebuild``), runs the product (``forward``) and hands out a :class:`CacheArena` that
updates the caches of several layers at exactly the code positions the engine changed. Each backend class
says what it can run through :meth:`Backend.can_implement` on a :class:`LayerSpec`; that is the one place a
backend's limits (bits, device, shapes) are checked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from qes.qlinear import GPTQLinear

__all__ = ["Backend", "CacheArena", "LayerSpec", "concatenate_into_views", "offsets"]


@dataclass(frozen=True)
class LayerSpec:
    """What a backend is asked to run: a layer's code width, shape, group size and device type."""

    bits: int
    out_features: int
    in_features: int
    group_size: int
    device: str = "cpu"

    @classmethod
    def of(cls, module: GPTQLinear) -> LayerSpec:
        """The spec of a GPTQ layer where its tensors are now."""
        return cls(int(module.bits), int(module.out_features), int(module.in_features), int(module.group_size),
                   module.qweight.device.type)


class Backend:
    """A forward representation of GPTQ codes: built once by ``prepare``, kept in step by ``arena``.

    ``input_dtype``: the dtype the product rounds its input to (a member's sparse correction sees the same).
    """

    name = ""
    input_dtype: torch.dtype | None = None

    @classmethod
    def can_implement(cls, layer: LayerSpec) -> tuple[bool, str]:  # pragma: no cover - interface
        """``(True, "")`` if this backend runs ``layer`` exactly, else ``(False, why not)``."""
        raise NotImplementedError

    def prepare(self, module: GPTQLinear) -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def rebuild(self, module: GPTQLinear) -> None:  # pragma: no cover - interface
        """Recompute the existing cache tensors in place (they may be views into an arena)."""
        raise NotImplementedError

    def forward(self, module: GPTQLinear, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def arena(self, modules: list[GPTQLinear]) -> CacheArena:  # pragma: no cover - interface
        raise NotImplementedError


class CacheArena:
    """The caches of several layers of one backend in one flat tensor, updated at given code positions.

    ``layer``, ``o``, ``i`` and ``k`` (= ``o * in + i``) locate each changed code, ``delta`` is what was added
    to it and ``codes`` its value afterwards (all int64 tensors of equal length, positions distinct).
    """

    def update(self, layer: torch.Tensor, o: torch.Tensor, i: torch.Tensor, k: torch.Tensor,
               delta: torch.Tensor, codes: torch.Tensor) -> None:  # pragma: no cover - interface
        raise NotImplementedError


def offsets(sizes: list[int], device: torch.device) -> torch.Tensor:
    """Start of each of consecutive blocks of ``sizes``, as int64 on ``device``."""
    return torch.tensor([0, *sizes[:-1]], dtype=torch.int64, device=device).cumsum(0)


def concatenate_into_views(modules: list[GPTQLinear], attr: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate each module's ``attr`` tensor into one flat tensor and re-point the modules to views of it."""
    tensors = [getattr(m, attr) for m in modules]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    start = 0
    for module, t in zip(modules, tensors):
        setattr(module, attr, flat[start : start + t.numel()].view(t.shape))
        start += t.numel()
    return flat, offsets([t.numel() for t in tensors], flat.device)
