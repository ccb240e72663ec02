"""Sparse read / add access to the integer codes of quantized linears, whatever the kernel's layout.

The canonical code matrix of a layer is Q[out, in] with flat index k = o * in + i (see qes.codes).
Kernels keep codes in different layouts; an `Arena` maps flat indices onto the live storage the kernel
reads, so a perturbation touches only the changed codes and the next forward pass sees them:

- ``gptq``: the checkpoint layout, int32 words [in / p, out] with p = 32 / bits codes per word, least
  significant bits first (gptqmodel's `TorchLinear` dequantizes from it at every forward);
- ``int4pack``: the layout of torch's CPU int4 matmul (`aten._weight_int4pack_mm_for_cpu`) that
  gptqmodel's `TorchAtenLinear` converts to before its first inference forward. Bytes come in blocks of
  64 output rows: byte = (o // 64) * in * 32 + i * 32 + o % 32, nibble (o % 64) // 32. The layout is
  checked against torch's own converter before it is used, and a layer whose layout does not match is
  pinned to the dequantizing path instead.

An arena holds several layers of one layout in a single flat tensor: each module's packed tensor is
re-pointed to a view of it, so reading or adding codes anywhere in the group is one gather or one
`index_add_`, however many layers the group spans. Adds never carry across neighbouring codes because
callers only add deltas that keep each code in [0, 2^bits - 1]; the word-level wrap-around of
`index_add_` on int32/uint8 is two's complement on CPU and CUDA alike, so words holding several changed
codes come out exact.
"""

from __future__ import annotations

import hashlib
import struct

import torch

from qes.codes import QuantLinear, unpack_codes


def _int4pack_layout_holds(out_features: int, in_features: int) -> bool:
    """Check the documented int4pack byte layout against torch's converter on a probe matrix."""
    if out_features % 64 or in_features % 2:
        return False
    probe = (torch.arange(out_features * in_features, dtype=torch.int64) * 2654435761 >> 7) % 16
    probe = probe.view(out_features, in_features).to(torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(probe, 1).view(-1).view(torch.uint8)
    o = torch.arange(out_features).repeat_interleave(in_features)
    i = torch.arange(in_features).repeat(out_features)
    byte = (o // 64) * in_features * 32 + i * 32 + o % 32
    codes = (packed[byte].long() >> (((o % 64) // 32) * 4)) & 15
    return torch.equal(codes.view(out_features, in_features).to(torch.int32), probe)


_layout_cache: dict[tuple[int, int], bool] = {}


def prepare_layout(layer: QuantLinear) -> str:
    """Fix the layer's kernel layout now, so it cannot change under us later; returns its name.

    `TorchAtenLinear` repacks its codes into the int4pack layout lazily at its first CPU inference
    forward; doing it here, up front, makes the layout known. Where that layout cannot be verified
    the module is pinned to its dequantizing path, which reads the GPTQ words at every forward.
    """
    module = layer.module
    if type(module).__name__ == "TorchAtenLinear" and layer.bits == 4:
        if getattr(module, "linear_mode", None) == "inference":
            return "int4pack"
        shape = (layer.out_features, layer.in_features)
        if shape not in _layout_cache:
            _layout_cache[shape] = _int4pack_layout_holds(*shape)
        if module.qweight.device.type == "cpu" and _layout_cache[shape]:
            module.transform("cpu")
            module.linear_mode = "inference"
            return "int4pack"
        module.linear_mode = "train"
    return "gptq"


class Arena:
    """Layers of one layout and width whose packed codes live in one flat tensor."""

    def __init__(self, layers: list[QuantLinear], layout: str):
        self.layers = layers
        self.layout = layout
        self.bits = layers[0].bits
        self.mask = (1 << self.bits) - 1
        self.max_code = self.mask
        self.per_word = 32 // self.bits
        tensors = [layer.module.qweight for layer in layers]
        device = tensors[0].device
        self.flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        if layout == "int4pack":
            self.flat = self.flat.view(torch.uint8)
        start = 0
        storage_offsets = []
        for layer, t in zip(layers, tensors):
            n = t.numel() * t.element_size() // self.flat.element_size()
            view = self.flat[start : start + n].view(t.dtype).view(t.shape)
            layer.module.qweight = view
            storage_offsets.append(start)
            start += n
        sizes = [layer.num_codes for layer in layers]
        self.code_offsets = torch.tensor([0, *sizes[:-1]], dtype=torch.int64, device=device).cumsum(0)
        self.storage_offsets = torch.tensor(storage_offsets, dtype=torch.int64, device=device)
        self.in_features = torch.tensor([x.in_features for x in layers], dtype=torch.int64, device=device)
        self.out_features = torch.tensor([x.out_features for x in layers], dtype=torch.int64, device=device)
        self.size = sum(sizes)

    def _address(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer = torch.bucketize(index, self.code_offsets[1:], right=True)
        local = index - self.code_offsets[layer]
        in_f = self.in_features[layer]
        o = local // in_f
        i = local - o * in_f
        if self.layout == "int4pack":
            pos = self.storage_offsets[layer] + (o // 64) * in_f * 32 + i * 32 + o % 32
            return pos, ((o % 64) // 32) * 4
        pos = self.storage_offsets[layer] + (i // self.per_word) * self.out_features[layer] + o
        return pos, (i % self.per_word) * self.bits

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Codes at arena-flat indices, as int64."""
        pos, shift = self._address(index)
        return (self.flat[pos].long() >> shift) & self.mask

    def add(self, index: torch.Tensor, delta: torch.Tensor) -> None:
        """Add in-range deltas to the codes at distinct arena-flat indices."""
        if index.numel():
            pos, shift = self._address(index)
            self.flat.index_add_(0, pos, (delta << shift).to(self.flat.dtype))

    def layer_codes(self, j: int) -> torch.Tensor:
        """Q[out, in] of the arena's j-th layer as uint8."""
        layer = self.layers[j]
        if self.layout == "gptq":
            return unpack_codes(layer.module.qweight, self.bits)
        first = int(self.code_offsets[j])
        index = torch.arange(first, first + layer.num_codes, device=self.flat.device)
        return self.gather(index).to(torch.uint8).view(layer.out_features, layer.in_features)


def digest_codes(named_codes) -> str:
    """sha256 over (name, Q) pairs in name order; the same digest as qes.codes.codes_sha256."""
    digest = hashlib.sha256()
    for name, bits, codes in sorted(named_codes, key=lambda x: x[0]):
        out_f, in_f = codes.shape
        digest.update(name.encode() + b"\0")
        digest.update(struct.pack("<III", out_f, in_f, bits))
        digest.update(codes.to(torch.uint8).contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()
