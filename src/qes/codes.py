"""The canonical integer view of a live quantized model: one :class:`LayerCodes` handle per GPTQ layer.

Everything QES trains is the set of integer codes of the model's GPTQ linear layers
(:class:`qes.qlinear.GPTQLinear`). Each layer's codes are viewed as a matrix ``Q[out, in]`` with values in
``[0, 2^bits - 1]``; element ``k`` of the layer's code vector is ``Q[o, i]`` with ``k = o * in + i``. The
codes themselves stay packed in the module's ``qweight`` (GPTQ layout, :mod:`qes.packing`), so a handle
reads and writes the live model. A layer is identified by its module name; :func:`layer_key` turns the name
into the stable integer that keys its noise stream.

The dequantized weight is ``W[o, i] = (Q[o, i] - zero[g_idx[i], o]) * scale[g_idx[i], o]``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from qes.packing import unpack_codes
from qes.qlinear import GPTQLinear

__all__ = ["LayerCodes", "layer_key", "quantized_linears", "zero_points"]


def layer_key(name: str) -> int:
    """Stable 63-bit integer identifying a layer by its module name (first 8 bytes of sha256, little endian)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") & (2**63 - 1)


@dataclass(frozen=True, eq=False)
class LayerCodes:
    """The codes of one GPTQ-quantized linear layer of a live model (a handle on its module, not a module)."""

    name: str
    module: torch.nn.Module
    bits: int
    in_features: int
    out_features: int

    @property
    def key(self) -> int:
        """Stable integer key of this layer (see :func:`layer_key`)."""
        return layer_key(self.name)

    @property
    def qweight(self) -> torch.Tensor:
        """The module's live packed int32 codes ``[in/p, out]``; writing into it changes the forward output."""
        qweight = self.module.qweight
        expected = (self.in_features * self.bits // 32, self.out_features)
        if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.int32 or tuple(qweight.shape) != expected:
            got = None if qweight is None else (qweight.dtype, tuple(qweight.shape))
            raise RuntimeError(
                f"layer {self.name}: qweight is not in GPTQ layout (expected int32 {expected}, got {got}); "
                f"load the model with qes.checkpoint.load_quantized"
            )
        return qweight

    @property
    def num_codes(self) -> int:
        """Number of codes in the layer, ``out * in``."""
        return self.out_features * self.in_features

    def codes(self) -> torch.Tensor:
        """A copy of the layer's codes as ``Q[out, in]`` uint8."""
        return unpack_codes(self.qweight, self.bits)


def quantized_linears(model: torch.nn.Module) -> list[LayerCodes]:
    """Every GPTQ linear layer of ``model`` (a :class:`qes.qlinear.GPTQLinear`), sorted by module name."""
    layers = [
        LayerCodes(
            name=name,
            module=module,
            bits=int(module.bits),
            in_features=int(module.in_features),
            out_features=int(module.out_features),
        )
        for name, module in model.named_modules()
        if isinstance(module, GPTQLinear)
    ]
    layers.sort(key=lambda layer: layer.name)
    return layers


def zero_points(layer: LayerCodes) -> torch.Tensor:
    """Exact zero points of a loaded layer as ``[I/g, O]`` int32."""
    return layer.module.zero_points().to("cpu").contiguous()
