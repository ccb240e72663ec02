"""The ``none`` backend: no forward path and no cache memory, for work on the integers alone (replay, hashing,
saving)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from qes.backends.base import Backend, CacheArena, LayerSpec

if TYPE_CHECKING:
    from qes.qlinear import GPTQLinear

__all__ = ["CODES_ONLY", "CodesOnlyBackend"]

#: For loading without any forward path (replay, hashing, saving): codes only, no cache memory.
CODES_ONLY = "none"


class CodesOnlyBackend(Backend):
    """No forward path at all: for work on the integers alone (replay, hashing, saving)."""

    name = CODES_ONLY

    def __init__(self, dtype: torch.dtype | None = None):
        """``dtype`` is accepted (and ignored) so every backend is built the same way."""

    @classmethod
    def can_implement(cls, layer: LayerSpec) -> tuple[bool, str]:
        """Every layer: nothing is computed."""
        return True, ""

    def prepare(self, module: GPTQLinear) -> None:
        pass

    def rebuild(self, module: GPTQLinear) -> None:
        pass

    def forward(self, module: GPTQLinear, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("this model was loaded with backend 'none' (codes only); load it with 'auto', "
                           "'int4pack' or 'dense' to run it")

    def arena(self, modules: list[GPTQLinear]) -> CacheArena:
        return _NoCache()


class _NoCache(CacheArena):
    def update(self, layer, o, i, k, delta, codes) -> None:
        pass
