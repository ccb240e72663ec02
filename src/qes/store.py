"""Sparse read / add access to the integer codes of one quantized linear, whatever its memory layout.

The canonical code matrix is Q[out, in] with flat index k = o * in + i (see qes.codes). Kernels keep the
codes in different layouts; a store maps flat indices onto the live tensor the kernel reads, so that a
perturbation touches only the changed codes and the next forward pass sees them:

- `GPTQStore`: the GPTQ checkpoint layout, int32 words [in / p, out] with p = 32 / bits codes per word,
  least significant bits first. Kernels that dequantize from `qweight` at every forward read it live.
- `Int4PackStore`: the layout of torch's CPU int4 matmul (`aten._weight_int4pack_mm_for_cpu`), which
  gptqmodel's `TorchAtenLinear` converts to before its first inference forward. Bytes are grouped in
  blocks of 64 output rows: byte = (o // 64) * in * 32 + i * 32 + o % 32, nibble (o % 64) // 32. The
  layout is checked against torch's own converter before it is used (`_int4pack_layout_holds`), and a
  layer whose layout does not match is kept on the dequantizing path instead.

Adds never carry across neighbouring codes because callers only add deltas that keep each code in
[0, 2^bits - 1]. Word-level adds go through `index_add_`, whose two's-complement wrap-around on int32 is
the same on CPU and CUDA, so packed words sharing several changed codes come out exact.
"""

from __future__ import annotations

import hashlib
import struct

import torch

from qes.codes import QuantLinear, unpack_codes


class GPTQStore:
    """Codes stored as GPTQ-packed int32 words [in / p, out]."""

    def __init__(self, layer: QuantLinear, words: torch.Tensor):
        self.layer = layer
        self.words = words
        self.bits = layer.bits
        self.per_word = 32 // layer.bits
        self.mask = (1 << layer.bits) - 1
        self.max_code = self.mask

    def _address(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out_f, in_f = self.layer.out_features, self.layer.in_features
        o, i = index // in_f, index % in_f
        return (i // self.per_word) * out_f + o, (i % self.per_word) * self.bits

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        word, shift = self._address(index)
        return (self.words.view(-1)[word].long() >> shift) & self.mask

    def add(self, index: torch.Tensor, delta: torch.Tensor) -> None:
        word, shift = self._address(index)
        self.words.view(-1).index_add_(0, word, (delta << shift).to(torch.int32))

    def codes(self) -> torch.Tensor:
        return unpack_codes(self.words, self.bits)


class Int4PackStore:
    """Codes stored in torch's CPU int4pack layout (uint8, two codes a byte)."""

    bits = 4
    max_code = 15

    def __init__(self, layer: QuantLinear, packed: torch.Tensor):
        self.layer = layer
        self.packed = packed

    def _address(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        in_f = self.layer.in_features
        o, i = index // in_f, index % in_f
        return (o // 64) * (in_f * 32) + i * 32 + o % 32, ((o % 64) // 32) * 4

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        byte, shift = self._address(index)
        return (self.packed.view(-1).view(torch.uint8)[byte].long() >> shift) & 15

    def add(self, index: torch.Tensor, delta: torch.Tensor) -> None:
        byte, shift = self._address(index)
        flat = self.packed.view(-1).view(torch.uint8)
        flat.index_add_(0, byte, (delta << shift).to(torch.uint8))

    def codes(self) -> torch.Tensor:
        out_f, in_f = self.layer.out_features, self.layer.in_features
        index = torch.arange(out_f * in_f, device=self.packed.device)
        return self.gather(index).to(torch.uint8).view(out_f, in_f)


def _int4pack_layout_holds(out_features: int, in_features: int) -> bool:
    """Check the documented int4pack byte layout against torch's converter on a probe matrix."""
    if out_features % 64 or in_features % 2:
        return False
    probe = (torch.arange(out_features * in_features, dtype=torch.int64) * 2654435761 >> 7) % 16
    probe = probe.view(out_features, in_features).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1)
    store = Int4PackStore.__new__(Int4PackStore)
    store.packed = packed
    store.layer = type("Shape", (), {"in_features": in_features, "out_features": out_features})
    return torch.equal(store.codes().to(torch.int32), probe)


def _is_aten_int4(module: torch.nn.Module) -> bool:
    return type(module).__name__ == "TorchAtenLinear"


def make_store(layer: QuantLinear) -> GPTQStore | Int4PackStore:
    """The store of a layer, fixing the kernel's layout first so that it cannot change under us.

    `TorchAtenLinear` repacks its codes into the int4pack layout lazily at its first CPU inference
    forward; doing it here, up front, makes the layout known. Where the layout cannot be verified the
    module is pinned to its dequantizing path, which reads the GPTQ words at every forward.
    """
    module = layer.module
    if _is_aten_int4(module) and layer.qweight.device.type == "cpu" and layer.bits == 4:
        if getattr(module, "linear_mode", None) == "inference":
            return Int4PackStore(layer, module.qweight)
        if _layout_cache.setdefault(
            (layer.out_features, layer.in_features),
            _int4pack_layout_holds(layer.out_features, layer.in_features),
        ):
            module.transform("cpu")
            module.linear_mode = "inference"
            return Int4PackStore(layer, module.qweight)
        module.linear_mode = "train"
    return GPTQStore(layer, layer.qweight)


_layout_cache: dict[tuple[int, int], bool] = {}


def stores_sha256(stores: list) -> str:
    """codes_sha256 over stores: the same digest as qes.codes.codes_sha256 of the GPTQ layout."""
    digest = hashlib.sha256()
    for store in sorted(stores, key=lambda s: s.layer.name):
        layer = store.layer
        digest.update(layer.name.encode() + b"\0")
        digest.update(struct.pack("<III", layer.out_features, layer.in_features, layer.bits))
        digest.update(store.codes().to(torch.uint8).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()
