"""Several perturbed members of one model in one batch: per member where the work is per member, together where
batching pays.

Rows of a member-batched forward are member-major: with P members and R rows each, rows ``[m * R, (m + 1) * R)``
belong to member ``m``. Under :meth:`MemberGroup.together` every quantized linear computes the base product
``x W^T`` once for all rows on its backend and then adds, on member ``m``'s rows only, ``x_m (delta_m * s)^T``:
the member's gated integer perturbation times the layer's scales. In real arithmetic that is exactly
``x_m W_m^T`` for the member's perturbed codes ``W_m = (q + delta_m - z) * s``; in floating point it differs by
rounding only. The perturbations stay sparse (about 1% of codes per member at sigma 0.01): per layer, one CSR
matrix holding the members' corrections as diagonal blocks ``[P * out, P * in]``, so the correction of all
members is one sparse-dense product per layer call, whatever P is, and the codes are not touched.

That pays where rows are few per member (a decode step: 16 rows, well below what keeps a matrix unit busy).
A prompt's prefill has hundreds of rows per member and costs the same however it is batched, while the sparse
product's cost grows with the rows (measured at 1,312 rows: as much as the dense product itself), so
:meth:`MemberGroup.alone` runs it on the member's exact codes, perturbed in place and restored bit for bit.
The deltas are the ones :meth:`qes.engine.Engine.perturb` adds (the same counter-based noise, gated at the
code range) either way.

A compiled or CUDA-graph-captured decode step (``finetune.decode: compiled``) needs the same shapes and tensor
addresses from group to group, which a CSR matrix of the group's size cannot give. There
(:meth:`MemberGroup.together` with ``fixed_shapes``) each layer's correction is a :class:`FixedCorrection`:
the same ``(row, column, delta * scale)`` triplets as an index-select and an ``index_add`` over buffers of a
capacity that only grows, padded with zeros, written in place for every group.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from qes.qlinear import GPTQLinear

if TYPE_CHECKING:
    from qes.engine import Engine


@dataclass(frozen=True)
class LayerDelta:
    """One member's gated perturbation of one layer: code positions ``(o, i)`` and integer deltas."""

    o: torch.Tensor
    i: torch.Tensor
    delta: torch.Tensor


class MemberCorrection:
    """The correction of one layer for a group of P members: a block-diagonal CSR of ``delta * scale``."""

    def __init__(self, module: GPTQLinear, deltas: Sequence[LayerDelta | None], dtype: torch.dtype):
        self.members = len(deltas)
        out_f, in_f = module.out_features, module.in_features
        device = module.qweight.device
        rows, cols, values = _triplets(module, deltas)
        self.dtype = dtype
        self.shape = (self.members * out_f, self.members * in_f)
        if not rows:
            self.matrix = None
            return
        row, col, value = _sorted(torch.cat(rows), torch.cat(cols), torch.cat(values), self.shape[1])
        counts = torch.bincount(row, minlength=self.shape[0])
        crow = torch.zeros(self.shape[0] + 1, dtype=torch.int64, device=device)
        crow[1:] = torch.cumsum(counts, 0)
        index_dtype = torch.int32 if max(self.shape[0], row.numel()) < 2**31 else torch.int64
        with warnings.catch_warnings():  # "sparse CSR support is in beta": the product used here is long stable
            warnings.simplefilter("ignore", UserWarning)
            self.matrix = torch.sparse_csr_tensor(
                crow.to(index_dtype), col.to(index_dtype), value.to(dtype), self.shape, check_invariants=False
            )

    @property
    def nnz(self) -> int:
        return 0 if self.matrix is None else int(self.matrix.values().numel())

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out + correction(x)`` for member-major rows ``x [P * R, in]``, ``out [P * R, out]``."""
        if self.matrix is None:
            return out
        p = self.members
        rows, in_f = x.shape
        if rows % p:
            raise ValueError(f"{rows} rows do not split evenly into {p} members")
        r = rows // p
        stacked = x.reshape(p, r, in_f).transpose(1, 2).reshape(p * in_f, r).to(self.dtype)
        y = torch.sparse.mm(self.matrix, stacked)  # [P * out, R]
        out_f = self.shape[0] // p
        return out + y.reshape(p, out_f, r).transpose(1, 2).reshape(rows, out_f).to(out.dtype)


def _triplets(module: GPTQLinear, deltas: Sequence[LayerDelta | None]
              ) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Rows, columns and values ``delta * scale`` of the members' corrections as blocks of ``[P * out, P * in]``."""
    out_f, in_f = module.out_features, module.in_features
    scales = module.scales.to(torch.float32)
    g_idx = module.g_idx.long()
    rows, cols, values = [], [], []
    for m, d in enumerate(deltas):
        if d is None or not d.o.numel():
            continue
        rows.append(d.o + m * out_f)
        cols.append(d.i + m * in_f)
        values.append(d.delta.to(torch.float32) * scales[g_idx[d.i], d.o])
    return rows, cols, values


def _sorted(row: torch.Tensor, col: torch.Tensor, value: torch.Tensor, width: int
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    order = torch.argsort(row * width + col)
    return row[order], col[order], value[order]


#: a fixed correction's capacity grows to this many times what it must hold (rounded up to CAPACITY_STEP), so that
#: the few groups that need more than the first one meet a capacity that already fits
CAPACITY_HEADROOM = 1.25
CAPACITY_STEP = 4096


class FixedCorrection:
    """:class:`MemberCorrection` in tensors of fixed size and place: the triplets of a group, zero-padded to the
    layer's capacity, in buffers kept on the layer (``module.fixed_correction``) and rewritten for every group.

    The product is ``index_add(rows, x[columns] * values)``: a padded entry adds ``0 * x`` to row 0. Shapes and
    addresses change only when a group needs more than the capacity (a new, larger buffer) or a different
    number of members or rows.
    """

    def __init__(self, module: GPTQLinear, deltas: Sequence[LayerDelta | None], dtype: torch.dtype):
        self.members = len(deltas)
        self.out_features, self.in_features = module.out_features, module.in_features
        rows, cols, values = _triplets(module, deltas)
        count = sum(int(r.numel()) for r in rows)
        self.rows, self.cols, self.values = _buffers(module, count, dtype)
        self.nnz = count
        self.values.zero_()
        self.rows.zero_()
        self.cols.zero_()
        if count:
            row, col, value = _sorted(torch.cat(rows), torch.cat(cols), torch.cat(values),
                                      self.members * self.in_features)
            self.rows[:count] = row.to(self.rows.dtype)
            self.cols[:count] = col.to(self.cols.dtype)
            self.values[:count] = value.to(dtype)

    def add_to(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``out + correction(x)`` for member-major rows ``x [P * R, in]``, ``out [P * R, out]``."""
        p, out_f, in_f = self.members, self.out_features, self.in_features
        rows = x.shape[0]
        r = rows // p
        stacked = x.reshape(p, r, in_f).transpose(1, 2).reshape(p * in_f, r).to(self.values.dtype)
        picked = stacked.index_select(0, self.cols) * self.values[:, None]
        y = torch.zeros(p * out_f, r, dtype=self.values.dtype, device=x.device).index_add_(0, self.rows, picked)
        return out + y.reshape(p, out_f, r).transpose(1, 2).reshape(rows, out_f).to(out.dtype)


def _buffers(module: GPTQLinear, count: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's correction buffers, replaced by larger ones only when ``count`` entries do not fit."""
    held = getattr(module, "fixed_correction", None)
    if held is not None and held[0].numel() >= count and held[2].dtype == dtype:
        return held
    wanted = max(count, held[0].numel() if held is not None else 0)
    capacity = -(-max(1, int(wanted * CAPACITY_HEADROOM)) // CAPACITY_STEP) * CAPACITY_STEP
    device = module.qweight.device
    index = torch.int32  # index_select and index_add take int32 indices: half the memory of int64
    held = (torch.zeros(capacity, dtype=index, device=device), torch.zeros(capacity, dtype=index, device=device),
            torch.zeros(capacity, dtype=dtype, device=device))
    for tensor in held:  # a captured graph reads them where they are (see qes.decoding.StaticBuffers)
        torch._dynamo.mark_static_address(tensor)
    module.fixed_correction = held
    return held


def correction_dtype(compute: torch.dtype, device: torch.device) -> torch.dtype:
    """float32 on the CPU (torch's sparse CSR product there has no bf16 kernel), the compute dtype on CUDA."""
    return compute if device.type == "cuda" else torch.float32


class MemberGroup:
    """P perturbed members ``(seed, sign)`` of the engine's model, computed one at a time or all at once.

    :meth:`alone` perturbs the codes in place (:meth:`qes.engine.Engine.perturb`) and restores them on exit:
    the member's exact model, for work that is per member anyway (a prompt's prefill). :meth:`together`
    makes every quantized linear compute all P members on member-major rows (base product plus sparse
    corrections) and leaves the codes untouched. ``boundary_hits`` counts the gated codes of :meth:`alone`.
    """

    def __init__(self, engine: Engine, members: Sequence[tuple[int, int]], dtype: torch.dtype):
        self.engine, self.members, self.dtype = engine, list(members), dtype
        self.size = len(self.members)
        self.boundary_hits = 0
        self.seconds = 0.0  # spent perturbing, restoring and building corrections

    @contextmanager
    def alone(self, member: int) -> Iterator[None]:
        start = self.engine.clock()
        perturbation = self.engine.perturb(*self.members[member])
        self.boundary_hits += perturbation.boundary_hits
        self.seconds += self.engine.clock() - start
        try:
            yield
        finally:
            start = self.engine.clock()
            self.engine.restore(perturbation)
            self.seconds += self.engine.clock() - start

    @contextmanager
    def together(self, fixed_shapes: bool = False) -> Iterator[None]:
        """All members on member-major rows; with ``fixed_shapes`` the corrections are :class:`FixedCorrection`
        (what a compiled decode step needs), else CSR matrices."""
        if self.size == 1:  # one member runs on its exact perturbed codes
            with self.alone(0):
                yield
            return
        start = self.engine.clock()
        deltas = [self.engine.member_deltas(seed, sign) for seed, sign in self.members]
        modules = {layer.name: layer.module for layer in self.engine.layers}
        form = FixedCorrection if fixed_shapes else MemberCorrection
        try:
            for name, module in modules.items():
                dtype = correction_dtype(self.dtype, module.qweight.device)
                module.members = form(module, [d.get(name) for d in deltas], dtype)
            del deltas
            self.seconds += self.engine.clock() - start
            yield
        finally:
            for module in modules.values():
                module.members = None
