"""The project's own GPTQ linear layer, and the compute dtypes a model runs in.

A :class:`GPTQLinear` keeps a layer's GPTQ tensors in checkpoint layout on its device -- ``qweight`` (int32
``[in/p, out]``), ``qzeros`` (int32 ``[in/g, out/p]``, holding the exact zero points), ``scales`` (fp16
``[in/g, out]``) and ``g_idx`` -- and these tensors are the only truth about the layer's state. Its forward
pass runs on a *backend* (:mod:`qes.backends`: ``int4pack`` on the CPU for INT4, ``dense`` anywhere), a cache
derived from them once after loading and never written back. The engine changes codes only through
:class:`qes.arena.Arena`, which hands the changed positions to each backend's cache arena; any other in-place
write to the GPTQ tensors is noticed through torch's version counters and rebuilds the cache before the next
forward pass.

This replaces GPTQModel's inference kernels for everything that trains or scores codes: their automatic
choice repacks ``qweight`` into kernel-specific layouts (Machete, Marlin, TorchAten), compiles CUDA code at
first use, and would leave the codes in a layout the project does not control. GPTQModel stays the quantizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from qes.backends.base import LayerSpec
from qes.packing import check_bits, unpack_along_cols

if TYPE_CHECKING:
    from qes.backends.base import Backend
    from qes.members import FixedCorrection, MemberCorrection

__all__ = [
    "GPTQLinear",
    "compute_dtype",
    "cpu_runs_bf16_natively",
    "cuda_runs_bf16_natively",
    "refresh",
    "require_cuda",
]


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


class GPTQLinear(torch.nn.Module):
    """A GPTQ-quantized linear layer whose forward pass runs on a backend chosen by the project."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool,
                 device: torch.device | str | None = None):
        super().__init__()
        per_word = check_bits(bits)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
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
        self.members: MemberCorrection | FixedCorrection | None = None
        #: (rows, columns, values) buffers that FixedCorrection reuses from group to group
        self.fixed_correction: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        name = self.backend.name if self.backend is not None else "none"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, backend={name}")

    def zero_points(self) -> torch.Tensor:
        """Exact zero points ``[in/g, out]`` as int32."""
        return unpack_along_cols(self.qzeros, self.bits)[:, : self.out_features]

    def use_backend(self, backend: Backend) -> None:
        """Build the backend's cache from the GPTQ tensors (once, after loading); refused, with the backend's
        reason, where it cannot run this layer exactly."""
        able, why = backend.can_implement(LayerSpec.of(self))
        if not able:
            raise ValueError(f"backend {backend.name} cannot run this layer: {why}")
        backend.prepare(self)
        self.backend = backend
        self.mark_cache_current()

    def tensor_versions(self) -> tuple[int, ...]:
        return self.qweight._version, self.qzeros._version, self.scales._version

    def mark_cache_current(self) -> None:
        """Record that the cache matches the GPTQ tensors as they are now (qes.arena.Arena calls it)."""
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
            raise RuntimeError("GPTQLinear has no backend; load the model with qes.checkpoint.load_quantized")
        if not torch.compiler.is_compiling():  # a compiled decode step syncs its layers before it runs
            self.sync_cache()
        rows = x.reshape(-1, self.in_features)
        out = self.backend.forward(self, rows)
        if self.members is not None:  # the correction sees the input as rounded for the base product
            out = self.members.add_to(out, rows.to(self.backend.input_dtype or rows.dtype))
        if self.bias is not None:
            out = out + self.bias  # held in the compute dtype (qes.checkpoint.assemble_quantized)
        return out.reshape(*x.shape[:-1], self.out_features)


def refresh(model: torch.nn.Module) -> None:
    """Rebuild every forward cache of ``model`` from the GPTQ tensors.

    Not needed after in-place torch writes (the layers notice them through the tensors' version counters)
    nor after the engine's updates; only after writes that bypass torch, e.g. through a numpy view.
    """
    for module in model.modules():
        if isinstance(module, GPTQLinear):
            module.refresh()
