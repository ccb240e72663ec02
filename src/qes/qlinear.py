"""The project's own GPTQ linear layer and the forward backends it can run on.

A :class:`GPTQLinear` keeps a layer's GPTQ tensors in checkpoint layout on its device -- ``qweight`` (int32
``[in/p, out]``), ``qzeros`` (int32 ``[in/g, out/p]``, holding the exact zero points), ``scales`` (fp16
``[in/g, out]``) and ``g_idx`` -- and these tensors are the only truth about the layer's state. Its forward
pass runs on a *backend*, a cache derived from them once after loading:

``int4pack``
    CPU, INT4: torch's int4 matmul (``aten._weight_int4pack_mm_for_cpu``) on the codes in torch's packed
    layout. That layout differs between CPU instruction sets (AVX-512, AVX2, the scalar fallback), so it is
    never assumed: :func:`int4pack_layout` reads it off torch's own converter on the machine at hand.
``dense``
    Any device, INT4 and INT8: a dequantized weight ``W[out, in]`` in the compute dtype.

Neither cache is ever written back. The engine changes codes only through :class:`qes.store.Arena`, which
adds integer deltas to ``qweight`` and then hands the same positions to each layer's backend
(:meth:`Backend.arena`): int4pack adds the deltas to its nibbles, dense recomputes ``(q - z) * s`` from the
integers at exactly those positions, so its cost follows the number of changed codes, not the layer size.
Recomputing (never ``W += delta * s``) keeps the cache equal to a full dequantization, bit for bit.

This replaces GPTQModel's inference kernels for everything that trains or scores codes: their automatic
choice repacks ``qweight`` into kernel-specific layouts (Machete, Marlin, TorchAten), compiles CUDA code at
first use, and would leave the codes in a layout the project does not control. GPTQModel stays the quantizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from qes.members import MemberCorrection

__all__ = [
    "BACKENDS",
    "GPTQLinear",
    "choose_backend",
    "compute_dtype",
    "faster_cpu_int4_backend",
    "measure_cpu_int4_backends",
    "dequantize_weight",
    "int4pack_layout",
    "unpack_along_rows",
]

BACKENDS = ("auto", "int4pack", "dense")
#: group sizes torch's int4 CPU kernel runs
INT4PACK_GROUPS = (32, 64, 128, 256)
#: For loading without any forward path (replay, hashing, saving): codes only, no cache memory.
CODES_ONLY = "none"


def unpack_along_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack int32 words ``[R, C]`` along dim 0 into int32 codes ``[R * 32 / bits, C]``, low bits first."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)[:per_word].view(1, per_word, 1)
    codes = torch.bitwise_and(torch.bitwise_right_shift(words.unsqueeze(1), shifts), (1 << bits) - 1)
    return codes.reshape(words.shape[0] * per_word, words.shape[1])


def cpu_runs_bf16_natively() -> bool:
    """Whether torch runs bf16 natively here: bf16 instructions (AVX512-BF16 or AMX) that torch's kernels may
    use (not under ``ATEN_CPU_CAPABILITY=avx2``); elsewhere bf16 arithmetic is emulated, slowly."""
    hardware = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return bool(hardware) and torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def require_cuda() -> None:
    """Refuse a CUDA run where torch sees no CUDA device, naming the likely cause: torch's CPU build, or an
    NVIDIA driver older than the build needs (the CUDA 13 build needs >= 580, the CUDA 12.6 one >= 525)."""
    if torch.cuda.is_available():
        return
    build = torch.version.cuda
    if build is None:
        why = (f"torch {torch.__version__} is the CPU build: set up with `make setup QES_TORCH=cuda` (NVIDIA "
               "driver >= 580) or `make setup QES_TORCH=cu126` (driver >= 525)")
    else:
        why = (f"torch {torch.__version__} is built for CUDA {build}: check that a GPU is visible here and that "
               "the NVIDIA driver `nvidia-smi` reports is new enough for it (CUDA 13 needs >= 580, CUDA 12.6 "
               ">= 525; for a 525-575 driver set up with `make setup QES_TORCH=cu126`)")
    raise RuntimeError(f"device 'cuda' was asked for but torch sees no CUDA device: {why}")


def cuda_runs_bf16_natively(device: str | torch.device = "cuda") -> bool:
    """Whether the GPU has bf16 arithmetic (Ampere and later); a T4 or V100 only emulates it. True where torch
    sees no GPU (nothing runs there; the answer only names the dtype a CUDA run would use)."""
    if not torch.cuda.is_available():
        return True
    major, _ = torch.cuda.get_device_capability(torch.device(device))
    return major >= 8


def compute_dtype(requested: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """The activation dtype: ``auto`` is bfloat16 on CUDA (float16 on GPUs before Ampere, which emulate bf16)
    and float32 on the CPU.

    On the CPU, greedy generation in bf16 changes with the batch layout (measured on the default model with
    native bf16: member-batched and member-by-member scoring agreed on 46-72% of rows against 100% in float32),
    and the fitness signal is noisy enough without that; float32 costs about 15% there. ``bfloat16`` asks for it.
    """
    if isinstance(requested, torch.dtype):
        return requested
    if requested == "auto":
        if torch.device(device).type != "cuda":
            return torch.float32
        return torch.bfloat16 if cuda_runs_bf16_natively(device) else torch.float16
    if requested not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {requested!r}")
    return getattr(torch, requested)


def int4pack_kernel_dtype(requested: str | torch.dtype, model_dtype: torch.dtype) -> torch.dtype:
    """The int4 kernel's dtype: the model's, except bf16 under ``auto`` where the model runs in float32.

    torch's int4 CPU kernel is vectorised in bf16 on every instruction set, while its float32 path is a slow
    fallback (measured on AVX2: 13x slower at 16 rows x a 1536x576 layer). So ``auto`` keeps float32 for the
    rest of the model and rounds only the int4 matmuls' inputs to bf16; an explicit ``float32`` means float32
    everywhere.
    """
    return torch.bfloat16 if requested == "auto" and model_dtype == torch.float32 else model_dtype


def choose_backend(requested: str, bits: int, device: str | torch.device, cpu_int4: str = "int4pack") -> str:
    """``auto``: ``cpu_int4`` (see :func:`faster_cpu_int4_backend`) for INT4 on CPU, dense otherwise; an
    explicit choice is checked, not changed."""
    if requested == CODES_ONLY:
        return CODES_ONLY
    if requested not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    device_type = torch.device(device).type
    if requested == "auto":
        return cpu_int4 if bits == 4 and device_type == "cpu" else "dense"
    if requested == "int4pack" and (bits != 4 or device_type != "cpu"):
        raise ValueError(f"backend int4pack runs INT4 codes on the CPU only (asked for {bits}-bit on {device_type})")
    return requested


#: rows of the timed products: a decode step of a member-batched group and a prompt's prefill
MEASURE_ROWS = (64, 512)
_measured: dict[tuple, dict[str, float]] = {}


def measure_cpu_int4_backends(shapes: list[tuple[int, int, int]], dtype: torch.dtype, kernel_dtype: torch.dtype
                              ) -> dict[str, float]:
    """Milliseconds of one product through each of the layer ``shapes`` ``(out, in, group)`` at each of
    :data:`MEASURE_ROWS` rows, per CPU backend (int4pack in ``kernel_dtype``, dense in ``dtype``), best of
    five rounds after a warm-up. Synthetic codes from a counter (the values do not change the speed).
    Measured once per process and setting."""
    import time

    key = (tuple(shapes), dtype, kernel_dtype, torch.get_num_threads(), torch.backends.cpu.get_cpu_capability())
    if key in _measured:
        return _measured[key]
    calls = []
    for out_f, in_f, group in shapes:
        codes = (torch.arange(out_f * in_f, dtype=torch.int64).view(out_f, in_f) * 2654435761 >> 7) % 16
        scales_zeros = torch.stack([torch.full((in_f // group, out_f), 0.01), torch.zeros(in_f // group, out_f)],
                                   dim=2).to(kernel_dtype)
        packed = _pack_int4(codes)
        weight = ((codes - 8).to(torch.float32) * 0.01).to(dtype)
        for rows in MEASURE_ROWS:
            x = torch.linspace(-1, 1, rows * in_f).view(rows, in_f)
            calls.append((
                partial(torch.ops.aten._weight_int4pack_mm_for_cpu, x.to(kernel_dtype), packed, group, scales_zeros),
                partial(torch.nn.functional.linear, x.to(dtype), weight),
            ))
    best = {"int4pack": float("inf"), "dense": float("inf")}
    for round_ in range(6):
        spent = {"int4pack": 0.0, "dense": 0.0}
        for int4, dense in calls:
            for name, fn in (("int4pack", int4), ("dense", dense)):
                start = time.perf_counter()
                fn()
                spent[name] += time.perf_counter() - start
        if round_:  # the first round warms up
            best = {k: min(best[k], 1000 * v) for k, v in spent.items()}
    _measured[key] = best
    return best


def faster_cpu_int4_backend(timings: dict[str, float]) -> str:
    """int4pack (8x less memory) unless dense measured at least 10% faster."""
    return "dense" if timings["dense"] < 0.9 * timings["int4pack"] else "int4pack"


def dequantize_weight(module: GPTQLinear, dtype: torch.dtype) -> torch.Tensor:
    """Full dequantization ``W[out, in] = (q - z[g_idx]) * s[g_idx]``, in float32 and then cast to ``dtype``.

    :class:`DenseBackend` computes every refreshed position with exactly these operations.
    """
    codes = unpack_along_rows(module.qweight, module.bits)[: module.in_features]  # [I, O]
    zeros = module.zero_points()  # [G, O]
    g_idx = module.g_idx.long()
    weight = (codes - zeros[g_idx]).to(torch.float32) * module.scales.to(torch.float32)[g_idx]
    return weight.t().contiguous().to(dtype)


class GPTQLinear(torch.nn.Module):
    """A GPTQ-quantized linear layer whose forward pass runs on a backend chosen by the project."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 device: torch.device | str | None = None):
        super().__init__()
        if bits not in (2, 4, 8):
            raise ValueError(f"unsupported code width {bits}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        per_word = 32 // bits
        groups = in_features // group_size
        self.register_buffer("qweight", torch.zeros(in_features // per_word, out_features, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // per_word, dtype=torch.int32,
                                                   device=device))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32, device=device))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        self.backend: Backend | None = None
        #: set while a group of perturbed members is scored at once (qes.members.members_installed)
        self.members: MemberCorrection | None = None

    def extra_repr(self) -> str:
        name = self.backend.name if self.backend is not None else "none"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, backend={name}")

    def zero_points(self) -> torch.Tensor:
        """Exact zero points ``[in/g, out]`` as int32."""
        return unpack_along_rows(self.qzeros.t().contiguous(), self.bits).t()[:, : self.out_features]

    def use_backend(self, backend: Backend) -> None:
        """Build the backend's cache from the GPTQ tensors (once, after loading)."""
        backend.prepare(self)
        self.backend = backend
        self.mark_cache_current()

    def tensor_versions(self) -> tuple[int, ...]:
        return self.qweight._version, self.qzeros._version, self.scales._version

    def mark_cache_current(self) -> None:
        """Record that the cache matches the GPTQ tensors as they are now (qes.store.Arena calls it)."""
        self._cache_versions = self.tensor_versions()

    def refresh(self) -> None:
        """Rebuild the whole cache from the GPTQ tensors (after writes that bypassed torch's version counter)."""
        if self.backend is not None:
            self.backend.rebuild(self)
            self.mark_cache_current()

    def sync_cache(self) -> None:
        """Rebuild the cache if the GPTQ tensors were written since it was last known to match.

        The engine keeps caches in step position by position; any other in-place write to the GPTQ tensors
        bumps their version counters and costs one full rebuild here instead of a stale forward pass.
        """
        if self.tensor_versions() != self._cache_versions:
            self.refresh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backend is None:
            raise RuntimeError("GPTQLinear has no backend; load the model with qes.codes.load_quantized")
        self.sync_cache()
        rows = x.reshape(-1, self.in_features)
        out = self.backend.forward(self, rows)
        if self.members is not None:  # the correction sees the input as rounded for the base product
            out = self.members.add_to(out, rows.to(self.backend.input_dtype or rows.dtype))
        if self.bias is not None:
            out = out + self.bias  # held in the compute dtype (qes.codes.assemble_quantized)
        return out.reshape(*x.shape[:-1], self.out_features)


# --- backends ------------------------------------------------------------------------------------


class Backend:
    """A forward representation of GPTQ codes: built once by ``prepare``, kept in step by ``arena``.

    ``input_dtype``: the dtype the product rounds its input to (a member's sparse correction sees the same).
    """

    name = ""
    input_dtype: torch.dtype | None = None

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


def _offsets(sizes: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *sizes[:-1]], dtype=torch.int64, device=device).cumsum(0)


def _concatenate_into_views(modules: list[GPTQLinear], attr: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate each module's ``attr`` tensor into one flat tensor and re-point the modules to views of it."""
    tensors = [getattr(m, attr) for m in modules]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    start = 0
    for module, t in zip(modules, tensors):
        setattr(module, attr, flat[start : start + t.numel()].view(t.shape))
        start += t.numel()
    return flat, _offsets([t.numel() for t in tensors], flat.device)


class DenseBackend(Backend):
    """``W[out, in]`` in the compute dtype; refreshed from the integers wherever codes change."""

    name = "dense"

    def __init__(self, dtype: torch.dtype):
        self.dtype = self.input_dtype = dtype

    def prepare(self, module: GPTQLinear) -> None:
        module.register_buffer("dense_weight", dequantize_weight(module, self.dtype), persistent=False)

    def rebuild(self, module: GPTQLinear) -> None:
        module.dense_weight.copy_(dequantize_weight(module, self.dtype))

    def forward(self, module: GPTQLinear, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.dtype), module.dense_weight)

    def arena(self, modules: list[GPTQLinear]) -> CacheArena:
        return _DenseArena(modules, self.dtype)


class _DenseArena(CacheArena):
    def __init__(self, modules: list[GPTQLinear], dtype: torch.dtype):
        self.dtype = dtype
        self.weight, self.weight_offsets = _concatenate_into_views(modules, "dense_weight")
        device = self.weight.device
        self.zeros = torch.cat([m.zero_points().reshape(-1) for m in modules])
        self.scales = torch.cat([m.scales.to(torch.float32).reshape(-1) for m in modules])
        self.group_offsets = _offsets([m.scales.numel() for m in modules], device)
        self.g_idx = torch.cat([m.g_idx.long() for m in modules])
        self.g_idx_offsets = _offsets([m.in_features for m in modules], device)
        self.out_features = torch.tensor([m.out_features for m in modules], dtype=torch.int64, device=device)

    def update(self, layer, o, i, k, delta, codes) -> None:
        group = self.g_idx[self.g_idx_offsets[layer] + i]
        at = self.group_offsets[layer] + group * self.out_features[layer] + o
        value = (codes - self.zeros[at]).to(torch.float32) * self.scales[at]
        self.weight[self.weight_offsets[layer] + k] = value.to(self.dtype)


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


def _pack_int4(codes: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    data = packed.reshape(-1).view(torch.uint8).long()
    return torch.stack([data & 15, data >> 4], dim=1).reshape(-1)


def _probe_int4pack_layout(out_features: int, in_features: int) -> Int4PackLayout:
    count = out_features * in_features
    index = torch.arange(count, dtype=torch.int64)
    slots = _nibbles(_pack_int4(torch.zeros(out_features, in_features))).numel()
    slot_holds = torch.zeros(slots, dtype=torch.int64)
    digits = max(1, ((count - 1).bit_length() + 3) // 4)
    for d in range(digits):
        probe = ((index >> (4 * d)) & 15).view(out_features, in_features)
        slot_holds += _nibbles(_pack_int4(probe)) << (4 * d)
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
    if not torch.equal(_nibbles(_pack_int4(values.view(out_features, in_features)))[where.reshape(-1)], values):
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

    def prepare(self, module: GPTQLinear) -> None:
        if module.bits != 4 or module.qweight.device.type != "cpu":
            raise ValueError("int4pack runs INT4 layers on the CPU only")
        if module.group_size not in INT4PACK_GROUPS or module.in_features % module.group_size:
            raise ValueError(f"int4pack needs a group size of 32, 64, 128 or 256 dividing in_features, "
                             f"got {module.group_size} for in_features {module.in_features}")
        int4pack_layout(module.out_features, module.in_features)  # raises where the layout is not exact
        packed, scales_zeros = self._pack(module)
        module.register_buffer("int4_packed", packed, persistent=False)
        module.register_buffer("int4_scales_zeros", scales_zeros, persistent=False)

    def rebuild(self, module: GPTQLinear) -> None:
        packed, scales_zeros = self._pack(module)
        module.int4_packed.copy_(packed)
        module.int4_scales_zeros.copy_(scales_zeros)

    def _pack(self, module: GPTQLinear) -> tuple[torch.Tensor, torch.Tensor]:
        packed = _pack_int4(unpack_along_rows(module.qweight, 4).t())  # from Q[out, in]
        scales = module.scales.to(torch.float32)
        offsets = (8 - module.zero_points()).to(torch.float32) * scales
        return packed, torch.stack([scales, offsets], dim=2).to(self.kernel_dtype).contiguous()

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
        self.nibble_offsets = 2 * _offsets([p.numel() * p.element_size() for p in packed], device)
        self.row = torch.cat([x.row for x in layouts]).to(device)
        self.row_offsets = _offsets([m.out_features for m in modules], device)
        self.col = torch.cat([x.col for x in layouts]).to(device)
        self.col_offsets = _offsets([m.in_features for m in modules], device)

    def update(self, layer, o, i, k, delta, codes) -> None:
        row = self.row[self.row_offsets[layer] + o]
        nibble = self.nibble_offsets[layer] + row + self.col[self.col_offsets[layer] + i]
        # Adds never carry into the neighbouring nibble (codes stay in [0, 15]); uint8 wraps mod 256.
        self.bytes.index_add_(0, nibble >> 1, (delta << ((nibble & 1) * 4)).to(torch.uint8))


class CodesOnlyBackend(Backend):
    """No forward path at all: for work on the integers alone (replay, hashing, saving)."""

    name = CODES_ONLY

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


def make_backend(name: str, dtype: torch.dtype) -> Backend:
    """A backend instance by its resolved name (``int4pack``, ``dense`` or ``none``)."""
    if name == CODES_ONLY:
        return CodesOnlyBackend()
    if name == "int4pack":
        return Int4PackBackend(dtype)
    if name == "dense":
        return DenseBackend(dtype)
    raise ValueError(f"unknown backend {name!r}")
