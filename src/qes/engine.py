"""Perturb, restore and update the integer codes of a quantized model in place.

`Engine` owns the code stores of every quantized linear and applies three operations to them:

- `perturb(seed, sign)` adds sign * delta(seed) to the codes, skipping (gating) each code that would
  leave [0, max_code], and returns a small `Perturbation` holding just the gated positions;
- `restore(p)` regenerates the same noise and subtracts it everywhere it was applied, so the codes
  come back bit for bit without a copy of them ever being made;
- `apply(step)` performs the fixed-point error-feedback update of qes.update.

Layers are processed in chunks of about `chunk_codes` codes (whole layers, sorted by name), so the
extra memory at any moment is a chunk's worth of noise and, in `stored` mode, the int16 residual.
Training and replay call the very same `apply`, which is what makes replay exact.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from qes.codes import QuantLinear
from qes.noise import BlockTable, NoiseSpec, table_noise
from qes.store import make_store, stores_sha256
from qes.update import (
    GAMMA_BITS,
    RESIDUAL_BITS,
    Step,
    UpdateConfig,
    check_range,
    feedback_step,
    gradient_part,
    rsr,
)


@dataclass
class _Chunk:
    stores: list
    table: BlockTable
    offsets: list[int]
    size: int
    residual: torch.Tensor | None = None

    def segments(self, index: torch.Tensor) -> list[tuple[object, int, int, int]]:
        """(store, layer offset, start, stop) of each layer's run in `index`, whose layers ascend."""
        layer = torch.bucketize(index, self.table.offsets[1:], right=True)
        marks = torch.arange(len(self.stores) + 1, device=index.device)
        bounds = torch.searchsorted(layer, marks).tolist()
        return [
            (store, self.offsets[j], bounds[j], bounds[j + 1])
            for j, store in enumerate(self.stores)
            if bounds[j + 1] > bounds[j]
        ]

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(index)
        for store, offset, a, b in self.segments(index):
            out[a:b] = store.gather(index[a:b] - offset)
        return out

    def max_codes(self, index: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(index)
        for store, _, a, b in self.segments(index):
            out[a:b] = store.max_code
        return out

    def add(self, index: torch.Tensor, delta: torch.Tensor) -> None:
        for store, offset, a, b in self.segments(index):
            store.add(index[a:b] - offset, delta[a:b])


@dataclass(frozen=True)
class Perturbation:
    seed: int
    sign: int
    gated: tuple[torch.Tensor, ...]

    @property
    def boundary_hits(self) -> int:
        return sum(int(g.numel()) for g in self.gated)


@dataclass(frozen=True)
class StepStats:
    changed: int
    boundary_hits: int
    num_codes: int

    @property
    def changed_fraction(self) -> float:
        return self.changed / self.num_codes


@dataclass
class Engine:
    layers: list[QuantLinear]
    noise: NoiseSpec
    update: UpdateConfig
    chunks: list[_Chunk] = field(init=False)
    history: deque = field(init=False)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("the model has no quantized linear layers to train")
        self.layers = sorted(self.layers, key=lambda layer: layer.name)
        self.chunks = []
        group: list[QuantLinear] = []
        for layer in self.layers:
            if group and sum(x.num_codes for x in group) + layer.num_codes > self.update.chunk_codes:
                self.chunks.append(self._chunk(group))
                group = []
            group.append(layer)
        self.chunks.append(self._chunk(group))
        self.history = deque(maxlen=self.update.window)

    def _chunk(self, layers: list[QuantLinear]) -> _Chunk:
        device = layers[0].qweight.device
        sizes = [layer.num_codes for layer in layers]
        offsets = [sum(sizes[:j]) for j in range(len(sizes))]
        chunk = _Chunk(
            stores=[make_store(layer) for layer in layers],
            table=BlockTable.build([layer.key for layer in layers], sizes, device),
            offsets=offsets,
            size=sum(sizes),
        )
        if self.update.mode == "stored":
            chunk.residual = torch.zeros(chunk.size, dtype=torch.int16, device=device)
        return chunk

    @property
    def num_codes(self) -> int:
        return sum(chunk.size for chunk in self.chunks)

    def codes_sha256(self) -> str:
        return stores_sha256([store for chunk in self.chunks for store in chunk.stores])

    # --- perturb / restore -------------------------------------------------------------------------

    @torch.no_grad()
    def perturb(self, seed: int, sign: int) -> Perturbation:
        gated = []
        for chunk in self.chunks:
            index, delta = table_noise(self.noise, seed, chunk.table)
            delta = delta * sign
            target = chunk.gather(index) + delta
            inside = (target >= 0) & (target <= chunk.max_codes(index))
            chunk.add(index[inside], delta[inside])
            gated.append(index[~inside])
        return Perturbation(seed, sign, tuple(gated))

    @torch.no_grad()
    def restore(self, perturbation: Perturbation) -> None:
        for chunk, gated in zip(self.chunks, perturbation.gated):
            index, delta = table_noise(self.noise, perturbation.seed, chunk.table)
            if gated.numel():
                keep = ~torch.isin(index, gated)
                index, delta = index[keep], delta[keep]
            chunk.add(index, -perturbation.sign * delta)

    # --- update ------------------------------------------------------------------------------------

    def _gradient(self, chunk: _Chunk, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse u = rsr(g * A_t) of one step on a chunk: (sorted distinct indices, values)."""
        parts = [table_noise(self.noise, seed, chunk.table) for seed, _ in step.seed_coefficients()]
        device = chunk.table.offsets.device
        if not parts:
            empty = torch.empty(0, dtype=torch.int64, device=device)
            return empty, empty
        coefs = [c for _, c in step.seed_coefficients()]
        largest = max((int(v.abs().max()) for _, v in parts if v.numel()), default=1)
        check_range(sum(abs(c) for c in coefs), largest, step.alpha_fp)
        index = torch.cat([i for i, _ in parts])
        contrib = torch.cat([v * c for (_, v), c in zip(parts, coefs)])
        unique, inverse = torch.unique(index, return_inverse=True)
        g = torch.zeros(unique.numel(), dtype=torch.int64, device=device).index_add_(0, inverse, contrib)
        return unique, gradient_part(g, step.alpha_fp)

    @torch.no_grad()
    def apply(self, step: Step) -> StepStats:
        changed = hits = 0
        for chunk in self.chunks:
            if self.update.mode == "replay":
                c, h = self._apply_replay(chunk, step)
            else:
                c, h = self._apply_stored(chunk, step)
            changed += c
            hits += h
        if self.update.mode == "replay":
            self.history.append(step)
        return StepStats(changed, hits, self.num_codes)

    def _apply_stored(self, chunk: _Chunk, step: Step) -> tuple[int, int]:
        index, u = self._gradient(chunk, step)
        if chunk.residual is not None:
            # Dense over the chunk: the decay touches every non-zero residual.
            e = chunk.residual.long()
            s_index = torch.nonzero(e).squeeze(1)
            s_index = torch.unique(torch.cat([s_index, index]))
            s_u = torch.zeros(s_index.numel(), dtype=torch.int64, device=index.device)
            s_u[torch.searchsorted(s_index, index)] = u
            e_at = e[s_index]
        else:
            s_index, s_u, e_at = index, u, torch.zeros_like(u)
        codes = chunk.gather(s_index)
        max_codes = chunk.max_codes(s_index)
        applied, residual = feedback_step(s_u, e_at, codes, max_codes, self.update)
        moved = applied != 0
        chunk.add(s_index[moved], applied[moved])
        if chunk.residual is not None:
            chunk.residual.zero_()
            chunk.residual[s_index] = residual.to(torch.int16)
        return int(moved.sum()), self._dropped(s_u, e_at, applied)

    def _dropped(self, u: torch.Tensor, e: torch.Tensor, applied: torch.Tensor) -> int:
        s = u + rsr(e * self.update.gamma_fp, GAMMA_BITS) if self.update.gamma_fp else u
        return int(((rsr(s, RESIDUAL_BITS) != 0) & (applied == 0)).sum())

    def _apply_replay(self, chunk: _Chunk, step: Step) -> tuple[int, int]:
        window = [*self.history, step]
        grads = [self._gradient(chunk, s) for s in window]
        all_index = torch.cat([i for i, _ in grads])
        support, inverse = torch.unique(all_index, return_inverse=True)
        codes = chunk.gather(support)
        max_codes = chunk.max_codes(support)
        e = torch.zeros(support.numel(), dtype=torch.int64, device=support.device)
        start = 0
        for index, u in grads:
            u_full = torch.zeros_like(e)
            u_full[inverse[start : start + index.numel()]] = u
            start += index.numel()
            e_prev = e
            applied, e = feedback_step(u_full, e, codes, max_codes, self.update)
        moved = applied != 0
        chunk.add(support[moved], applied[moved])
        return int(moved.sum()), self._dropped(u_full, e_prev, applied)
