"""Sparse read / add access to the integer codes of quantized linears, with their forward caches kept in step.

The canonical code matrix of a layer is Q[out, in] with flat index k = o * in + i (see qes.codes). The codes
live in the GPTQ checkpoint layout (qes.packing), int32 words [in / p, out] with p = 32 / bits codes per word,
least significant bits first: that tensor is the only truth about a layer's state, on every device.

An `Arena` holds several layers of one width and one forward backend in a single flat tensor: each module's
``qweight`` is re-pointed to a view of it, so reading or adding codes anywhere in the group is one gather or
one `index_add_`, however many layers the group spans. After every add the arena hands the same positions to
the backend's cache arena (`qes.backends.base.CacheArena`), which brings the forward representation (torch's
int4 pack, a dequantized weight) up to date at exactly those positions. Adds never carry across neighbouring codes
because callers only add deltas that keep each code in [0, 2^bits - 1]; the word-level wrap-around of
`index_add_` on int32 is two's complement on CPU and CUDA alike, so words holding several changed codes come
out exact.
"""

from __future__ import annotations

import torch

from qes.codes import LayerCodes
from qes.packing import check_bits, unpack_codes

#: a gather of more than 1 / DENSE_GATHER of an arena's codes unpacks them all instead (see `Arena.gather`)
DENSE_GATHER = 16


class Arena:
    """Layers of one width and one backend whose packed GPTQ codes live in one flat int32 tensor."""

    def __init__(self, layers: list[LayerCodes]):
        self.layers = layers
        self.bits = layers[0].bits
        self.mask = (1 << self.bits) - 1
        self.max_code = self.mask
        self.per_word = check_bits(self.bits)
        modules = self.modules = [layer.module for layer in layers]
        backends = {type(m.backend) for m in modules}
        if len(backends) != 1 or {x.bits for x in layers} != {self.bits}:
            raise ValueError("an arena holds layers of one width and one backend")
        self.backend = modules[0].backend.name
        for module in modules:
            module.sync_cache()
        tensors = [layer.qweight for layer in layers]
        device = tensors[0].device
        self.flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        start = 0
        storage_offsets = []
        for module, t in zip(modules, tensors):
            module.qweight = self.flat[start : start + t.numel()].view(t.shape)
            storage_offsets.append(start)
            start += t.numel()
        sizes = [layer.num_codes for layer in layers]
        self.code_offsets = torch.tensor([0, *sizes[:-1]], dtype=torch.int64, device=device).cumsum(0)
        self.storage_offsets = torch.tensor(storage_offsets, dtype=torch.int64, device=device)
        self.in_features = torch.tensor([x.in_features for x in layers], dtype=torch.int64, device=device)
        self.out_features = torch.tensor([x.out_features for x in layers], dtype=torch.int64, device=device)
        self.size = sum(sizes)
        self.cache = modules[0].backend.arena(modules)
        for module in modules:
            module.mark_cache_current()

    def locate(self, index: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(layer, o, i, local k) of arena-flat indices."""
        layer = torch.bucketize(index, self.code_offsets[1:], right=True)
        local = index - self.code_offsets[layer]
        in_f = self.in_features[layer]
        o = local // in_f
        return layer, o, local - o * in_f, local

    def _words(self, layer: torch.Tensor, o: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pos = self.storage_offsets[layer] + (i // self.per_word) * self.out_features[layer] + o
        return pos, (i % self.per_word) * self.bits

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """Codes at arena-flat indices, as int64.

        Locating each index in the packed layout costs about ten int64 ops per index and reads the words
        out of order; unpacking the whole arena costs a few narrow ops per code in storage order. The
        second wins once an index covers more than about 5% of the codes, as a stored residual's support
        soon does (CPU, one thread, a 16M-code arena: unpacking takes 0.05 s, locating 0.03 s for 3% of
        the codes, 0.26 s for 10% and 2.5 s for 60%).
        """
        if index.numel() * DENSE_GATHER > self.size:
            return self.codes()[index].long()
        layer, o, i, _ = self.locate(index)
        pos, shift = self._words(layer, o, i)
        return (self.flat[pos].long() >> shift) & self.mask

    def codes(self) -> torch.Tensor:
        """Every code of the arena in arena-flat order, as uint8."""
        return torch.cat([unpack_codes(module.qweight, self.bits).reshape(-1) for module in self.modules])

    def add(self, index: torch.Tensor, delta: torch.Tensor) -> None:
        """Add in-range deltas to the codes at distinct arena-flat indices, and to the forward cache there."""
        if not index.numel():
            return
        layer, o, i, local = self.locate(index)
        pos, shift = self._words(layer, o, i)
        self.flat.index_add_(0, pos, (delta << shift).to(self.flat.dtype))
        codes = (self.flat[pos].long() >> shift) & self.mask
        self.cache.update(layer, o, i, local, delta, codes)
        for module in self.modules:  # views of one flat tensor share its version counter
            module.mark_cache_current()
