"""Perturb, restore and update the integer codes of a quantized model in place.

`Engine` owns the arenas (`qes.arena`) of every quantized linear and applies three operations to them:

- `perturb(seed, sign)` adds sign * delta(seed) to the codes, skipping (gating) each code that would
  leave [0, max_code], and returns a small `Perturbation` holding just the gated positions;
- `restore(p)` takes the same noise and subtracts it everywhere it was applied, so the codes
  come back bit for bit without a copy of them ever being made;
- `apply(step)` performs the fixed-point error-feedback update of qes.update.

Layers are processed in chunks of about `chunk_codes` codes (whole layers, sorted by name), so the
extra memory at any moment is a chunk's worth of noise and either the int16 residual (`stored` mode)
or, during a `replay` update, about 10 bytes of scratch per code of one chunk. The noise of the seeds
used last is kept (`NoiseMemo`, at most 64 MiB beyond the newest seed), so that a mirrored pair's perturb,
restore and member corrections generate it once. On a GPU the chunks are at
least `CUDA_CHUNK_CODES` codes: there each chunk costs a fixed number of kernel launches, so fewer, larger
chunks are faster. No result depends on the chunking (the noise is a function of each layer alone).
Training and replay call the very same `apply`, which is what makes replay exact.
"""

from __future__ import annotations

import os
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from qes.arena import Arena
from qes.codes import LayerCodes
from qes.identity import codes_sha256
from qes.members import LayerDelta
from qes.noise import BlockTable, NoiseSpec, table_noise
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

#: the smallest chunk on a GPU (2^27 codes: about 1.2 GB of scratch during a replay update)
CUDA_CHUNK_CODES = 1 << 27


@dataclass
class _Chunk:
    arena: Arena
    table: BlockTable
    residual: torch.Tensor | None = None

    @property
    def size(self) -> int:
        return self.arena.size


@contextmanager
def _integer_threads():
    """Run the engine's integer work on QES_INTEGER_THREADS CPU threads if set, else on torch's setting.

    The results never depend on it (integer adds are exact in any order). On a machine shared with
    other busy processes, set QES_INTEGER_THREADS=1: there an OpenMP barrier per op can cost
    milliseconds (seen: a 35x slower update with 2 threads on 2 busy cores); on a quiet machine all
    threads are faster (seen: replay update 10.4 s with 1 thread, 6.2 s with 2).
    """
    wanted = os.environ.get("QES_INTEGER_THREADS")
    threads = torch.get_num_threads()
    if wanted:
        torch.set_num_threads(max(1, int(wanted)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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


class NoiseMemo:
    """The noise of the seeds used last, so that a member's perturb, restore and sparse correction (and the
    mirrored member's) generate it once. Entries are what :func:`table_noise` returns, the deltas held as
    int8 where they fit (9 bytes per non-zero); the oldest seeds go once ``budget`` bytes are passed, the
    newest always stays.
    """

    def __init__(self, spec: NoiseSpec, budget: int = 64 << 20):
        self.spec, self.budget = spec, budget
        self.entries: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, table: BlockTable, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (id(table), seed)
        entry = self.entries.pop(key, None)
        if entry is None:
            index, delta = table_noise(self.spec, seed, table)
            entry = (index, delta.to(torch.int8) if self.spec.max_magnitude <= 127 else delta)
        self.entries[key] = entry  # insertion order: newest last
        while len(self.entries) > 1 and self._bytes() > self.budget:
            del self.entries[next(iter(self.entries))]
        return entry[0], entry[1].long()

    def _bytes(self) -> int:
        return sum(i.numel() * i.element_size() + d.numel() * d.element_size() for i, d in self.entries.values())


@dataclass
class Engine:
    layers: list[LayerCodes]
    noise: NoiseSpec
    update: UpdateConfig
    chunks: list[_Chunk] = field(init=False)
    history: deque = field(init=False)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("the model has no quantized linear layers to train")
        self.layers = sorted(self.layers, key=lambda layer: layer.name)
        limit = self.update.chunk_codes
        if self.layers[0].qweight.device.type == "cuda":
            limit = max(limit, CUDA_CHUNK_CODES)
        self.chunks = []
        group: list[LayerCodes] = []
        kind = None
        for layer in self.layers:
            backend = layer.module.backend
            layer_kind = (backend.name if backend is not None else None, layer.bits)
            size = sum(x.num_codes for x in group)
            if group and (layer_kind != kind or size + layer.num_codes > limit):
                self.chunks.append(self._chunk(group))
                group = []
            group.append(layer)
            kind = layer_kind
        self.chunks.append(self._chunk(group))
        self.history = deque(maxlen=self.update.window)
        self._memo = NoiseMemo(self.noise)

    def _chunk(self, layers: list[LayerCodes]) -> _Chunk:
        arena = Arena(layers)
        device = arena.flat.device
        chunk = _Chunk(arena, BlockTable.build([x.key for x in layers], [x.num_codes for x in layers], device))
        if self.update.mode == "stored":
            chunk.residual = torch.zeros(chunk.size, dtype=torch.int16, device=device)
        return chunk

    @property
    def num_codes(self) -> int:
        return sum(chunk.size for chunk in self.chunks)

    def clock(self) -> float:
        """``time.perf_counter()`` once the codes' device has finished its queued work: CUDA kernels run
        asynchronously, so a timer that does not wait bills one phase's kernels to the next phase."""
        device = self.layers[0].qweight.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter()

    def codes_sha256(self) -> str:
        """The qes.identity.codes_sha256 of the current codes."""
        return codes_sha256(self.layers)

    # --- perturb / restore -------------------------------------------------------------------------

    def _gated_noise(self, chunk: _Chunk, seed: int, sign: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """sign * delta(seed) on a chunk: (indices, deltas, inside) where inside marks the entries that keep
        their code in [0, max_code]; the others are gated (not perturbed)."""
        index, delta = self._memo.get(chunk.table, seed)
        delta = delta * sign
        target = chunk.arena.gather(index) + delta
        return index, delta, (target >= 0) & (target <= chunk.arena.max_code)

    @torch.no_grad()
    @_integer_threads()
    def perturb(self, seed: int, sign: int) -> Perturbation:
        gated = []
        for chunk in self.chunks:
            index, delta, inside = self._gated_noise(chunk, seed, sign)
            chunk.arena.add(index[inside], delta[inside])
            gated.append(torch.nonzero(~inside).squeeze(1))
        return Perturbation(seed, sign, tuple(gated))

    @torch.no_grad()
    @_integer_threads()
    def member_deltas(self, seed: int, sign: int) -> dict[str, LayerDelta]:
        """What :meth:`perturb` would add, per layer name, without touching the codes (for qes.members)."""
        out: dict[str, LayerDelta] = {}
        for chunk in self.chunks:
            index, delta, inside = self._gated_noise(chunk, seed, sign)
            layer, o, i, _ = chunk.arena.locate(index[inside])
            delta = delta[inside]
            order = torch.argsort(layer, stable=True)
            counts = torch.bincount(layer, minlength=len(chunk.arena.layers)).tolist()
            parts = zip(o[order].split(counts), i[order].split(counts), delta[order].split(counts))
            for quant, (lo, li, ld) in zip(chunk.arena.layers, parts):
                out[quant.name] = LayerDelta(lo, li, ld)
        return out

    @torch.no_grad()
    @_integer_threads()
    def restore(self, perturbation: Perturbation) -> None:
        for chunk, gated in zip(self.chunks, perturbation.gated):
            index, delta = self._memo.get(chunk.table, perturbation.seed)
            if gated.numel():  # the same noise in the same order as in perturb: skip the gated entries
                keep = torch.ones(index.numel(), dtype=torch.bool, device=index.device)
                keep[gated] = False
                index, delta = index[keep], delta[keep]
            chunk.arena.add(index, -perturbation.sign * delta)

    # --- update ------------------------------------------------------------------------------------

    def _gradient(self, chunk: _Chunk, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """Sparse u = rsr(g * A_t) of one step on a chunk: (sorted distinct indices, values)."""
        parts = [table_noise(self.noise, seed, chunk.table) for seed, _ in step.seed_coefficients()]
        device = chunk.table.offsets.device
        if not parts:
            empty = torch.empty(0, dtype=torch.int64, device=device)
            return empty, empty
        coefs = [c for _, c in step.seed_coefficients()]
        check_range(sum(abs(c) for c in coefs), self.noise.max_magnitude, step.alpha_fp)
        index = torch.cat([i for i, _ in parts])
        contrib = torch.cat([v * c for (_, v), c in zip(parts, coefs)])
        unique, inverse = torch.unique(index, return_inverse=True)
        g = torch.zeros(unique.numel(), dtype=torch.int64, device=device).index_add_(0, inverse, contrib)
        return unique, gradient_part(g, step.alpha_fp)

    @torch.no_grad()
    @_integer_threads()
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
            # The decay touches every non-zero residual. Their union with the step's support is read off
            # a dense mask, already in index order: the residual's support grows to millions of codes
            # over a run, and sorting it again every step is avoidable work.
            support = chunk.residual != 0
            support[index] = True
            s_index = torch.nonzero(support).squeeze(1)
            del support
            s_u = torch.zeros(s_index.numel(), dtype=torch.int64, device=index.device)
            s_u[torch.searchsorted(s_index, index)] = u
            e_at = chunk.residual[s_index].long()
        else:
            s_index, s_u, e_at = index, u, torch.zeros_like(u)
        codes = chunk.arena.gather(s_index)
        applied, residual = feedback_step(s_u, e_at, codes, chunk.arena.max_code, self.update)
        moved = applied != 0
        chunk.arena.add(s_index[moved], applied[moved])
        if chunk.residual is not None:
            chunk.residual.zero_()
            chunk.residual[s_index] = residual.to(torch.int16)
        return int(moved.sum()), self._dropped(s_u, e_at, applied)

    def _dropped(self, u: torch.Tensor, e: torch.Tensor, applied: torch.Tensor) -> int:
        s = u + rsr(e * self.update.gamma_fp, GAMMA_BITS) if self.update.gamma_fp else u
        return int(((rsr(s, RESIDUAL_BITS) != 0) & (applied == 0)).sum())

    def _decay_table(self, steps: int, device) -> torch.Tensor:
        """D[n, e + H] = the residual e after n pure decays e <- rsr(G * e), for every reachable e.

        Rounding to the nearest code keeps every residual in [-H, H) with H = 2^(RESIDUAL_BITS - 1)
        (s - d * 2^RESIDUAL_BITS for an applied step, s itself when d = 0, zero when dropped), and a
        decayed residual alone never reaches half a code, so between two touches a code's residual only
        decays. Tabulating n-fold decay lets the window be replayed touching each step's support only.
        """
        key = (steps, str(device))
        if getattr(self, "_decay_key", None) != key:
            half = 1 << (RESIDUAL_BITS - 1)
            rows = [torch.arange(-half, half, dtype=torch.int64, device=device)]
            for _ in range(steps):
                rows.append(rsr(rows[-1] * self.update.gamma_fp, GAMMA_BITS))
            self._decay, self._decay_key = torch.stack(rows), key
        return self._decay

    def _apply_replay(self, chunk: _Chunk, step: Step) -> tuple[int, int]:
        """Rebuild the residual from the window's logged steps (zero before it), then apply `step`.

        Works on dense scratch arrays of the chunk's size that live only during this call (about
        10 bytes per code: g, residual, last touch, support mask, the unpacked codes), so no step needs
        a sort: a step's support is read off the mask in index order, and each step touches its own
        support only, its g summed there before its own rounding, exactly as `_gradient`. The codes do
        not change until the last step is applied, so they are unpacked once and read K + 1 times.
        """
        window = [*self.history, step]
        n, device = chunk.size, chunk.table.offsets.device
        half = 1 << (RESIDUAL_BITS - 1)
        decay = self._decay_table(len(window), device)
        residual = torch.zeros(n, dtype=torch.int16, device=device)  # |e| <= 2^13: int16 holds it
        touched = torch.zeros(n, dtype=torch.int16 if len(window) < 1 << 15 else torch.int32, device=device)
        mask = torch.zeros(n, dtype=torch.bool, device=device)
        codes_now = chunk.arena.codes()
        g = None
        support = torch.empty(0, dtype=torch.int64, device=device)
        applied = d = inside = support
        for j, s in enumerate(window, start=1):
            pairs = s.seed_coefficients()
            noise = [table_noise(self.noise, seed, chunk.table) for seed, _ in pairs]
            coef_sum = sum(abs(c) for _, c in pairs)
            check_range(coef_sum, self.noise.max_magnitude, s.alpha_fp)
            bound = coef_sum * self.noise.max_magnitude
            # g = sum C_i delta_i is exact in int32 whenever sum |C_i| * max |delta| fits, as it does at
            # any sane setting; int64 otherwise. Either way the products below are taken in int64.
            dtype = torch.int32 if bound < 1 << 31 else torch.int64
            if g is None or (g.dtype == torch.int32 and dtype == torch.int64):
                g = torch.zeros(n, dtype=dtype, device=device)
            for (index, values), (_, coef) in zip(noise, pairs):
                g.index_add_(0, index, (values * coef).to(g.dtype))
                mask[index] = True
            support = torch.nonzero(mask).squeeze(1)
            if not support.numel():
                continue
            mask[support] = False
            u = gradient_part(g[support].long(), s.alpha_fp)
            g[support] = 0
            # decay[j - touched] applied to the stored residual gives the residual before this step,
            # already decayed once for this step: the rsr(G * e) term of the update.
            decayed = decay[(j - touched[support]).long(), residual[support].long() + half]
            codes = codes_now[support].long()
            d = rsr(u + decayed, RESIDUAL_BITS)
            inside = (codes + d >= 0) & (codes + d <= chunk.arena.max_code)
            applied = torch.where(inside, d, torch.zeros_like(d))
            residual[support] = torch.where(inside, u + decayed - (applied << RESIDUAL_BITS), 0).to(torch.int16)
            touched[support] = j
        if not support.numel():
            return 0, 0
        moved = applied != 0
        chunk.arena.add(support[moved], applied[moved])
        return int(moved.sum()), int(((d != 0) & ~inside).sum())
