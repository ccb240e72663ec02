"""The canonical integer view of a GPTQ-quantized model.

Everything QES trains is the set of integer codes of the model's GPTQ linear layers. This module is the
one place that knows how those codes are stored, so the rest of the project can work with plain integer
matrices ``Q[out, in]``.

GPTQ tensors of one linear layer (format ``gptq``, ``pack_dtype`` int32, ``sym=True``, no ``desc_act``),
with ``I`` inputs, ``O`` outputs, group size ``g``, ``b`` bits and ``p = 32 // b`` codes per int32 word,
least significant bits first:

=========  ===============  =================================================
tensor     shape / dtype    content
=========  ===============  =================================================
qweight    [I/p, O] int32   codes, packed along the *input* dimension
qzeros     [I/g, O/p] int32 zero points, packed along the *output* dimension
scales     [I/g, O] fp16    per-group scales
g_idx      [I] int32        group of each input, ``i // g``
=========  ===============  =================================================

The dequantized weight is ``W[o, i] = (Q[o, i] - zero[g_idx[i], o]) * scale[g_idx[i], o]``.

Element ``k`` of a layer's code vector is ``Q[o, i]`` with ``k = o * I + i`` (row-major over ``[out, in]``).

Kernels
-------
GPTQModel picks an inference kernel when a checkpoint is loaded. Not all of them read ``qweight`` at each
forward pass; on CPU the automatic choice is:

* 4 bits -> ``TorchAtenLinear``. At its first forward pass in eval mode it **replaces** ``qweight`` by a
  uint8 tensor in ATen's int4-pack layout (shape ``[O, I/4]``) and ``qzeros`` by bf16 offsets. Writes into
  the GPTQ ``qweight`` made after that are either lost or land in a different layout.
* 8 bits -> ``TorchLinear``, which dequantizes from ``qweight`` at every forward pass.

:func:`load_quantized` therefore always asks for GPTQModel's ``torch`` backend, which gives ``TorchLinear``
for both widths (and on CUDA too) and keeps the GPTQ tensors in GPTQ layout. ``TorchLinear`` dequantizes the
whole weight at every call, which makes generation ~20x slower than a float model on CPU, and it has two opt-in
caches (``GPTQ_TORCH_CACHE_WEIGHTS``, ``GPTQ_TORCH_LOOKAHEAD``) that would ignore writes; qes keeps both off.
Instead :func:`load_quantized` gives each layer a forward pass that dequantizes once (:func:`dequantize`) and
reuses the float weight until one of the layer's GPTQ tensors changes, detected through torch's per-tensor
version counters. Any in-place torch write to :attr:`QuantLinear.qweight` bumps that counter, so the next
forward pass uses the new codes, with no refresh call. :func:`refresh` drops the caches explicitly (needed
only after writes that bypass torch, e.g. through a numpy view, or to free memory).

Zero points
-----------
On disk GPTQ stores each zero point minus one (symmetric 4-bit: word ``0x77777777`` for the true zero 8).
After loading, GPTQModel converts them to the exact zero (``0x88888888``) in memory. transformers'
``save_pretrained`` writes the in-memory tensors under the on-disk format label, which shifts every zero by
one after a reload. :func:`save_quantized` converts the zeros back to the on-disk convention before writing.
"""

from __future__ import annotations

import hashlib
import json
import struct
import types
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qes import _env  # noqa: F401  (sets GPTQModel's environment before gptqmodel is imported)

__all__ = [
    "LIVE_KERNELS",
    "QuantLinear",
    "codes_sha256",
    "layer_key",
    "load_quantized",
    "pack_codes",
    "quantized_linears",
    "refresh",
    "save_quantized",
    "unpack_codes",
]

#: Kernel classes whose forward pass reads ``qweight`` directly (no repacking, no cache).
LIVE_KERNELS: tuple[str, ...] = ("TorchLinear",)

_SUPPORTED_BITS = (2, 4, 8)
# Attribute under which load_quantized keeps the checkpoint's own quantization_config for save_quantized.
_SOURCE_QUANT_ATTR = "_qes_quantization_config"


def layer_key(name: str) -> int:
    """Stable 63-bit integer identifying a layer by its module name (first 8 bytes of sha256, little endian)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") & (2**63 - 1)


def _check_bits(bits: int) -> int:
    if bits not in _SUPPORTED_BITS:
        raise ValueError(f"unsupported code width {bits} bits; GPTQ int32 packing here supports {_SUPPORTED_BITS}")
    return 32 // bits


def _shifts(bits: int, device: torch.device) -> torch.Tensor:
    per_word = 32 // bits
    return torch.arange(0, 32, bits, dtype=torch.int32, device=device)[:per_word]


def _unpack_words(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack int32 words ``[R, C]`` along dim 0 into codes ``[R * p, C]`` (int32 values in ``[0, 2^bits)``)."""
    per_word = _check_bits(bits)
    if words.dtype != torch.int32 or words.dim() != 2:
        raise ValueError(f"expected a 2-d int32 tensor of packed codes, got {words.dtype} {tuple(words.shape)}")
    mask = (1 << bits) - 1
    shifted = torch.bitwise_right_shift(words.unsqueeze(1), _shifts(bits, words.device).view(1, per_word, 1))
    return torch.bitwise_and(shifted, mask).reshape(words.shape[0] * per_word, words.shape[1])


def _pack_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes ``[R, C]`` along dim 0 into int32 words ``[R / p, C]``, least significant bits first."""
    per_word = _check_bits(bits)
    if codes.dim() != 2:
        raise ValueError(f"expected a 2-d tensor of codes, got shape {tuple(codes.shape)}")
    rows, cols = codes.shape
    if rows % per_word:
        raise ValueError(f"{rows} codes per column is not a multiple of {per_word} ({bits}-bit codes per int32)")
    wide = codes.to(torch.int64)
    if wide.numel() and (int(wide.min()) < 0 or int(wide.max()) > (1 << bits) - 1):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits} bits")
    shifts = _shifts(bits, codes.device).to(torch.int64).view(1, per_word, 1)
    words = torch.bitwise_left_shift(wide.view(rows // per_word, per_word, cols), shifts).sum(dim=1)
    # Reinterpret the unsigned 32-bit value as int32 (two's complement).
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed GPTQ ``qweight`` int32 ``[in/p, out]`` -> codes ``Q[out, in]`` as uint8 (values ``0..2^bits-1``)."""
    return _unpack_words(qweight, bits).t().contiguous().to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``Q[out, in]`` -> packed GPTQ ``qweight`` int32 ``[in/p, out]``; the exact inverse of unpack_codes."""
    if codes.dim() != 2:
        raise ValueError(f"expected codes Q[out, in], got shape {tuple(codes.shape)}")
    return _pack_words(codes.t(), bits).contiguous()


def _gptq_linear_base() -> type:
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return BaseQuantLinear


@dataclass(frozen=True, eq=False)
class QuantLinear:
    """One GPTQ-quantized linear layer of a live model."""

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
                f"layer {self.name}: qweight is no longer in GPTQ layout (expected int32 {expected}, got {got}); "
                f"kernel {type(self.module).__name__} repacked it. Load the model with qes.codes.load_quantized."
            )
        return qweight

    @property
    def num_codes(self) -> int:
        """Number of codes in the layer, ``out * in``."""
        return self.out_features * self.in_features

    def codes(self) -> torch.Tensor:
        """A copy of the layer's codes as ``Q[out, in]`` uint8."""
        return unpack_codes(self.qweight, self.bits)


def quantized_linears(model: torch.nn.Module, *, strict: bool = True) -> list[QuantLinear]:
    """Every GPTQ linear layer of ``model``, sorted by module name.

    With ``strict`` (the default) every layer must use a kernel from :data:`LIVE_KERNELS`, so that writes into
    ``qweight`` reach the forward pass. ``strict=False`` allows other kernels and skips the layout check:
    ``qes.store`` reads ``TorchAtenLinear``'s repacked int4 layout, while ``QuantLinear.qweight`` (and so
    :func:`codes_sha256`) still refuses a layer that is no longer in GPTQ layout.
    """
    base = _gptq_linear_base()
    layers = []
    for name, module in model.named_modules():
        if not isinstance(module, base):
            continue
        kernel = type(module).__name__
        if strict and kernel not in LIVE_KERNELS:
            raise RuntimeError(
                f"layer {name} uses kernel {kernel}, which does not read qweight at every forward pass "
                f"(live kernels: {', '.join(LIVE_KERNELS)}); load the model with qes.codes.load_quantized"
            )
        layer = QuantLinear(
            name=name,
            module=module,
            bits=int(module.bits),
            in_features=int(module.in_features),
            out_features=int(module.out_features),
        )
        if strict:
            layer.qweight  # noqa: B018 - validates the layout now rather than at first use
        layers.append(layer)
    layers.sort(key=lambda layer: layer.name)
    return layers


def _as_layers(model_or_layers: torch.nn.Module | Iterable[QuantLinear]) -> list[QuantLinear]:
    if isinstance(model_or_layers, torch.nn.Module):
        return quantized_linears(model_or_layers, strict=False)
    return sorted(model_or_layers, key=lambda layer: layer.name)


def codes_sha256(model_or_layers: torch.nn.Module | Iterable[QuantLinear]) -> str:
    """Identity of a model state: sha256 over all layers' codes in sorted-name order.

    For each layer, in order of name: the UTF-8 name, a NUL byte, ``struct.pack("<III", out, in, bits)``,
    then ``Q[out, in]`` as uint8 bytes in row-major order.
    """
    layers = _as_layers(model_or_layers)
    if not layers:
        raise ValueError("no GPTQ-quantized linear layers found")
    digest = hashlib.sha256()
    for layer in layers:
        digest.update(layer.name.encode() + b"\0")
        digest.update(struct.pack("<III", layer.out_features, layer.in_features, layer.bits))
        codes = unpack_codes(layer.qweight.detach().to("cpu"), layer.bits)
        digest.update(codes.numpy().tobytes())
    return digest.hexdigest()


def dequantize(module: torch.nn.Module, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantized weight ``W[in, out] = (q - zero[g_idx]) * scale[g_idx]`` of a GPTQ layer (live tensors).

    Computed in float32 (exact for the integer difference, one rounding for the product) and cast to ``dtype``.
    The module's ``qzeros`` must hold exact zero points (GPTQModel's in-memory format after loading).
    """
    bits = int(module.bits)
    in_features = int(module.in_features)
    codes = _unpack_words(module.qweight, bits)[:in_features]  # [I, O]
    zeros = _unpack_words(module.qzeros.t().contiguous(), bits).t()  # [I/g, O]
    g_idx = module.g_idx.to(torch.long)
    weight = (codes - zeros[g_idx]).to(torch.float32) * module.scales.to(torch.float32)[g_idx]
    return weight.to(dtype)


def _weight_state(module: torch.nn.Module, x: torch.Tensor) -> tuple | None:
    """What the cached dequantized weight depends on; ``None`` when it cannot be tracked (inference tensors)."""
    try:
        tensors = (module.qweight, module.qzeros, module.scales, module.g_idx)
        return (*((t.data_ptr(), t._version) for t in tensors), x.dtype, x.device)
    except RuntimeError:  # tensors created under torch.inference_mode() carry no version counter
        return None


def _cached_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward pass of a GPTQ layer that dequantizes once and reuses the weight until a GPTQ tensor changes.

    Every in-place write through torch (``copy_``, indexing assignment, ``xor_``...) bumps the tensor's version
    counter, so the next call sees the new codes without any explicit refresh.
    """
    state = _weight_state(self, x)
    weight = self.__dict__.get("_qes_weight")
    if weight is None or state is None or self.__dict__.get("_qes_weight_state") != state:
        weight = dequantize(self, x.dtype).to(x.device)
        if state is not None:
            self.__dict__["_qes_weight"] = weight
            self.__dict__["_qes_weight_state"] = state
    out_shape = (*x.shape[:-1], int(self.out_features))
    out = torch.matmul(x.reshape(-1, x.shape[-1]), weight)
    if self.bias is not None:
        out = out + self.bias.to(out.dtype)
    return out.reshape(out_shape)


def _install_cached_forward(model: torch.nn.Module) -> None:
    base = _gptq_linear_base()
    for module in model.modules():
        if not isinstance(module, base):
            continue
        if getattr(module, "adapter", None) is not None or getattr(module, "rotation", None):
            continue  # adapters and input rotations need the kernel's own forward
        if type(module).__name__ not in LIVE_KERNELS:
            continue  # e.g. TorchAtenLinear under kernel="fast" keeps its own int4 matmul
        module.forward = types.MethodType(_cached_forward, module)


def refresh(model: torch.nn.Module) -> None:
    """Drop every cached dequantized weight, so the next forward pass reads ``qweight`` again.

    Not needed after in-place torch writes to a model from :func:`load_quantized` (its cache follows the
    tensors' version counters); call it after writing through another path (e.g. a numpy view of ``qweight``)
    or to free the cache's memory.
    """
    base = _gptq_linear_base()
    for module in model.modules():
        if not isinstance(module, base):
            continue
        module.__dict__.pop("_qes_weight", None)
        module.__dict__.pop("_qes_weight_state", None)
        for hook in ("clear_weight_cache", "_reset_prefetch_state"):
            fn = getattr(module, hook, None)
            if callable(fn):
                fn()


def _disable_kernel_caches(model: torch.nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "_cache_enabled"):
            module._cache_enabled = False
        if callable(getattr(module, "enable_lookahead", None)):
            module.enable_lookahead(False)
    refresh(model)


def _resolve_dtype(dtype: torch.dtype | str, device: str | torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return resolved


def read_quantization_config(path: str | Path) -> dict[str, Any]:
    """The ``quantization_config`` block of a checkpoint's config.json (raises if it is not a GPTQ checkpoint)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} holds no config.json; not a Hugging Face model folder")
    quant = json.loads(config_file.read_text()).get("quantization_config")
    if not quant or quant.get("quant_method", "gptq") != "gptq":
        raise ValueError(f"{path} is not a GPTQ checkpoint (config.json has no GPTQ quantization_config)")
    return quant


def load_quantized(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = "auto",
    *,
    cache_weights: bool = True,
    kernel: str = "live",
) -> tuple[torch.nn.Module, Any]:
    """Load a GPTQ checkpoint through transformers with live-code kernels; returns ``(model, tokenizer)``.

    ``kernel="fast"`` instead keeps GPTQModel's automatic kernel choice (on CPU, INT4 layers become
    ``TorchAtenLinear``, about 1.5x faster at generation and without a float weight copy). Its codes are
    then only reachable through :class:`qes.engine.Engine`, whose stores know that kernel's layout; use
    it for training and evaluation, and the default ``"live"`` kernels for anything that reads
    ``QuantLinear.qweight`` or saves the model.

    ``dtype="auto"`` means float32 on CPU and bfloat16 on CUDA. The model is in eval mode and every GPTQ layer
    is a GPTQModel ``TorchLinear`` (backend ``torch``), whose GPTQ tensors stay in GPTQ layout.

    With ``cache_weights`` (the default) each layer's forward pass dequantizes its codes once and reuses the
    float weight until ``qweight``, ``qzeros``, ``scales`` or ``g_idx`` changes -- detected through the tensors'
    version counters, so in-place writes take effect at the next forward pass with no explicit refresh.
    ``cache_weights=False`` keeps GPTQModel's own forward, which dequantizes at every call (much slower).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig

    if kernel not in ("live", "fast"):
        raise ValueError(f"kernel must be 'live' or 'fast', got {kernel!r}")
    quant = read_quantization_config(path)
    torch_dtype = _resolve_dtype(dtype, device)
    backend = {"backend": "torch"} if kernel == "live" else {}
    with warnings.catch_warnings():
        # transformers warns that only the load-time attributes (the backend) of the passed config are used.
        warnings.filterwarnings("ignore", message=".*already has a `quantization_config` attribute.*")
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            dtype=torch_dtype,
            device_map=str(device),
            quantization_config=GPTQConfig(bits=int(quant["bits"]), **backend),
        )
    model.eval()
    setattr(model, _SOURCE_QUANT_ATTR, quant)
    _disable_kernel_caches(model)
    quantized_linears(model, strict=kernel == "live")  # raises if a layer did not get a live kernel
    if cache_weights:
        _install_cached_forward(model)
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def _zeros_to_disk(qzeros: torch.Tensor, bits: int) -> torch.Tensor:
    """In-memory (exact) packed zero points -> on-disk convention (zero - 1, modulo 2^bits)."""
    zeros = _unpack_words(qzeros.t().contiguous(), bits)  # [O, I/g]
    on_disk = torch.bitwise_and(zeros - 1, (1 << bits) - 1)
    return _pack_words(on_disk, bits).t().contiguous()


def zero_points(layer: QuantLinear) -> torch.Tensor:
    """Exact zero points of a loaded layer as ``[I/g, O]`` int32."""
    return _unpack_words(layer.module.qzeros.detach().to("cpu").t().contiguous(), layer.bits).t().contiguous()


def save_quantized(
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    *,
    max_shard_size: str = "2GB",
) -> Path:
    """Write a loaded GPTQ model in the on-disk GPTQ format (zero points stored minus one).

    ``save_quantized`` then :func:`load_quantized` gives identical :func:`codes_sha256` and identical logits.
    The folder is written next to ``out_dir`` first and renamed into place, so a failure leaves no partial
    output. An existing ``out_dir`` is replaced.
    """
    from qes.fsutil import atomic_dir

    layers = quantized_linears(model, strict=False)
    if not layers:
        raise ValueError("model has no GPTQ-quantized layers to save")
    # Swap the on-disk zero points in for the duration of the write (transformers serialises the live
    # buffers; a state_dict argument is not honoured for quantized models), then put the originals back.
    swapped = []
    for layer in layers:
        module = layer.module
        fmt = module.qzero_format() if callable(getattr(module, "qzero_format", None)) else 2
        if fmt == 2:
            swapped.append((module, module.qzeros))
            module.qzeros = _zeros_to_disk(module.qzeros.detach(), layer.bits)
    out_dir = Path(out_dir)
    try:
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp, max_shard_size=max_shard_size)
            _write_quantization_config(tmp / "config.json", getattr(model, _SOURCE_QUANT_ATTR, None))
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    finally:
        for module, qzeros in swapped:
            module.qzeros = qzeros
    return out_dir


def _write_quantization_config(config_file: Path, source: dict[str, Any] | None) -> None:
    """Write the checkpoint's own quantization settings (not the load-time ones) into a saved config.json."""
    config = json.loads(config_file.read_text())
    if source is not None:
        quant = dict(source)
    else:
        quant = {k: v for k, v in (config.get("quantization_config") or {}).items() if v is not None}
    for key in ("backend", "use_exllama", "exllama_config", "max_input_length"):
        quant.pop(key, None)
    quant["checkpoint_format"] = "gptq"
    config["quantization_config"] = quant
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
