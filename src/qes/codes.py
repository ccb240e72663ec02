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

Loading
-------
:func:`load_quantized` builds the model's architecture with transformers, swaps every GPTQ linear for the
project's own :class:`qes.qlinear.GPTQLinear` and fills it from the checkpoint's safetensors. No GPTQModel
kernel is involved: the GPTQ tensors stay in checkpoint layout on the device, and the forward pass runs on a
backend the project chooses (``int4pack`` or ``dense``, see :mod:`qes.qlinear`). Checkpoints it cannot run
exactly (act-order, another packing or bit width) are refused at load, naming the layer.

Zero points
-----------
On disk GPTQ (``checkpoint_format: gptq``) stores each zero point minus one (symmetric 4-bit: word
``0x77777777`` for the true zero 8). :func:`load_quantized` keeps the exact zero in memory (``0x88888888``).
:func:`save_quantized` never re-serialises a live model: it copies the source checkpoint and replaces only
the ``qweight`` tensors, so zero points, scales and every other tensor are written back byte for byte.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import shutil
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qes import _env  # noqa: F401  (sets GPTQModel's environment before gptqmodel is imported)
from qes.qlinear import (
    INT4PACK_GROUPS,
    GPTQLinear,
    choose_backend,
    compute_dtype,
    faster_cpu_int4_backend,
    int4pack_kernel_dtype,
    make_backend,
    measure_cpu_int4_backends,
    require_cuda,
    unpack_along_rows,
)

log = logging.getLogger(__name__)

__all__ = [
    "base_identity",
    "checkpoint_parts",
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

_SUPPORTED_BITS = (2, 4, 8)
# Attribute under which load_quantized records the checkpoint folder a model came from (save_quantized copies it).
_SOURCE_ATTR = "_qes_source"


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
    _check_bits(bits)
    if words.dtype != torch.int32 or words.dim() != 2:
        raise ValueError(f"expected a 2-d int32 tensor of packed codes, got {words.dtype} {tuple(words.shape)}")
    return unpack_along_rows(words, bits)


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
                f"layer {self.name}: qweight is not in GPTQ layout (expected int32 {expected}, got {got}); "
                f"load the model with qes.codes.load_quantized"
            )
        return qweight

    @property
    def num_codes(self) -> int:
        """Number of codes in the layer, ``out * in``."""
        return self.out_features * self.in_features

    def codes(self) -> torch.Tensor:
        """A copy of the layer's codes as ``Q[out, in]`` uint8."""
        return unpack_codes(self.qweight, self.bits)


def quantized_linears(model: torch.nn.Module) -> list[QuantLinear]:
    """Every GPTQ linear layer of ``model`` (a :class:`qes.qlinear.GPTQLinear`), sorted by module name."""
    layers = [
        QuantLinear(
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


def _as_layers(model_or_layers: torch.nn.Module | Iterable[QuantLinear]) -> list[QuantLinear]:
    if isinstance(model_or_layers, torch.nn.Module):
        return quantized_linears(model_or_layers)
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
        codes = unpack_codes(layer.qweight.detach(), layer.bits)  # unpacked where the codes live
        digest.update(codes.contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


#: The parts of a base checkpoint that shape a run's output, each hashed on its own so a mismatch can be named.
IDENTITY_PARTS = ("codes", "scales", "zeros", "g_idx", "tensors", "quantization_config", "model_config", "tokenizer")
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
# Keys of config.json that say who wrote the file, not what the model computes.
_PROVENANCE_KEYS = ("transformers_version", "_name_or_path")


def _tensor_part(name: str) -> str:
    suffix = name.rsplit(".", 1)[-1]
    return {"qweight": "codes", "scales": "scales", "qzeros": "zeros", "g_idx": "g_idx"}.get(suffix, "tensors")


def checkpoint_parts(path: str | Path) -> dict[str, str]:
    """sha256 of every part of a GPTQ checkpoint folder except the codes (see :func:`base_identity`).

    Tensors are hashed as stored (name, dtype, shape, bytes; shards in order, tensors by name), so the result
    does not depend on the dtype a model is later loaded in; config parts are hashed as canonical JSON.
    """
    from safetensors import safe_open

    path = Path(path)
    digests = {part: hashlib.sha256() for part in IDENTITY_PARTS[1:5]}
    for shard in _shard_files(path):
        with safe_open(str(shard), framework="pt") as handle:
            for key in sorted(handle.keys()):
                part = _tensor_part(key)
                if part == "codes":
                    continue  # hashed canonically by codes_sha256
                tensor = handle.get_tensor(key).contiguous()
                digest = digests[part]
                digest.update(f"{key}\0{tensor.dtype}\0{list(tensor.shape)}\0".encode())
                digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    config = json.loads((path / "config.json").read_text())
    quant = config.pop("quantization_config", None)
    for key in _PROVENANCE_KEYS:
        config.pop(key, None)
    tokenizer = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        if (path / name).is_file():
            tokenizer.update(name.encode() + b"\0" + hashlib.sha256((path / name).read_bytes()).digest())
    return {
        **{part: digest.hexdigest() for part, digest in digests.items()},
        "quantization_config": hashlib.sha256(json.dumps(quant, sort_keys=True).encode()).hexdigest(),
        "model_config": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
        "tokenizer": tokenizer.hexdigest(),
    }


def base_identity(model: torch.nn.Module, codes_hash: str | None = None) -> dict[str, Any]:
    """The complete identity of a model as a run's base: its current codes plus every other checkpoint part.

    ``{"sha256": ..., "parts": {part: sha256}}`` with the parts of :data:`IDENTITY_PARTS`. A model that
    was not loaded from a folder (assembled in memory) is identified by its codes alone.
    """
    parts = {"codes": codes_hash or codes_sha256(model)}
    source = getattr(model, _SOURCE_ATTR, None)
    if source is not None:
        parts.update(checkpoint_parts(source))
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return {"sha256": digest, "parts": parts}


def read_quantization_config(path: str | Path) -> dict[str, Any]:
    """The ``quantization_config`` block of a checkpoint's config.json (raises if it is not a GPTQ checkpoint)."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} holds no config.json; not a Hugging Face model folder")
    quant = json.loads(config_file.read_text()).get("quantization_config")
    if not quant or quant.get("quant_method", "gptq") != "gptq":
        raise ValueError(f"{path} is not a GPTQ checkpoint (config.json has no GPTQ quantization_config)")
    return quant


@dataclass(frozen=True)
class Scheme:
    """What the checkpoint's quantization_config promises about every GPTQ layer."""

    bits: int
    group_size: int
    zeros_stored_minus_one: bool

    @classmethod
    def from_config(cls, path: str | Path, quant: dict[str, Any]) -> Scheme:
        def refuse(what: str) -> ValueError:
            return ValueError(f"{path}: {what}; qes runs GPTQ checkpoints with int32 packing, 2/4/8 bits, "
                              f"no act-order, format gptq or gptq_v2")

        bits = int(quant.get("bits", 0))
        if bits not in _SUPPORTED_BITS:
            raise refuse(f"quantization_config.bits is {quant.get('bits')!r}")
        if quant.get("desc_act"):
            raise refuse("quantization_config.desc_act is true (act-order reorders the inputs)")
        fmt = quant.get("checkpoint_format", quant.get("format", "gptq"))
        if fmt not in ("gptq", "gptq_v2"):
            raise refuse(f"checkpoint_format is {fmt!r} (a kernel-specific packing)")
        if quant.get("pack_dtype", "int32") not in ("int32", "torch.int32"):
            raise refuse(f"pack_dtype is {quant.get('pack_dtype')!r}")
        group = int(quant.get("group_size", -1))
        return cls(bits=bits, group_size=group, zeros_stored_minus_one=fmt == "gptq")


_GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")


def _shard_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    single = path / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{path} holds no model.safetensors (nor an index of shards)")
    return [single]


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in _shard_files(path):
        tensors.update(load_file(shard))
    return tensors


def _gptq_module(name: str, linear: torch.nn.Module, tensors: dict[str, torch.Tensor], scheme: Scheme) -> GPTQLinear:
    """A GPTQLinear filled from the checkpoint's tensors of layer ``name``, after checking every shape."""
    if not isinstance(linear, torch.nn.Linear):
        raise ValueError(f"layer {name}: the checkpoint quantizes it, but the architecture has a "
                         f"{type(linear).__name__} there, not a Linear")
    in_f, out_f, bits = linear.in_features, linear.out_features, scheme.bits
    group = in_f if scheme.group_size in (-1, 0) else scheme.group_size
    if in_f % group or in_f % (32 // bits) or out_f % (32 // bits):
        raise ValueError(f"layer {name}: {out_f}x{in_f} does not fit group size {group} and {bits}-bit packing")
    module = GPTQLinear(in_f, out_f, bits, group, bias=f"{name}.bias" in tensors)
    for attr in _GPTQ_TENSORS:
        found = tensors.get(f"{name}.{attr}")
        want: torch.Tensor = getattr(module, attr)
        if found is None:
            raise ValueError(f"layer {name}: the checkpoint has no {attr}")
        dtype_ok = found.dtype == want.dtype or (attr == "scales" and found.is_floating_point())
        if tuple(found.shape) != tuple(want.shape) or not dtype_ok:
            raise ValueError(f"layer {name}: {attr} is {found.dtype} {tuple(found.shape)}, expected {want.dtype} "
                             f"{tuple(want.shape)} (GPTQ layout, {bits}-bit codes, group size {group}); "
                             f"a repacked kernel layout cannot be trained exactly")
        want.copy_(found)
    if not torch.equal(module.g_idx.long(), torch.arange(in_f) // group):
        raise ValueError(f"layer {name}: g_idx is not i // {group} (act-order or a permuted group order), "
                         f"which qes does not run")
    if scheme.zeros_stored_minus_one:
        zeros = unpack_along_rows(module.qzeros.t().contiguous(), bits)
        module.qzeros.copy_(_pack_words(torch.bitwise_and(zeros + 1, (1 << bits) - 1), bits).t())
    if module.bias is not None:
        module.bias.data = tensors[f"{name}.bias"].to(torch.float32)
    return module


def _choose_backends(model: torch.nn.Module, requested: str, device: torch.device, dtype: torch.dtype,
                     kernel_dtype: torch.dtype) -> dict:
    """Give every GPTQ layer its backend; returns {backend name: layer count}."""
    from qes.qlinear import int4pack_layout

    counts: dict[str, int] = {}
    cpu_int4 = "int4pack"
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, GPTQLinear)]
    int4 = sorted({(m.out_features, m.in_features, m.group_size) for _, m in modules if m.bits == 4})
    runnable = [shape for shape in int4 if shape[2] in INT4PACK_GROUPS and shape[1] % shape[2] == 0]
    if requested == "auto" and device.type == "cpu" and runnable:
        timings = measure_cpu_int4_backends(runnable, dtype, kernel_dtype)
        cpu_int4 = faster_cpu_int4_backend(timings)
        model.qes_backend_timings = {k: round(v, 2) for k, v in timings.items()}
        log.info("INT4 on this CPU: %s ms per pass over the layer shapes; auto chooses %s",
                 model.qes_backend_timings, cpu_int4)
    for name, module in modules:
        chosen = choose_backend(requested, module.bits, device, cpu_int4)
        if chosen == "int4pack":
            try:
                int4pack_layout(module.out_features, module.in_features)
                if module.group_size not in INT4PACK_GROUPS:
                    raise ValueError(f"group size {module.group_size} is not one of {INT4PACK_GROUPS}")
            except ValueError as error:
                if requested == "int4pack":
                    raise ValueError(f"layer {name}: backend int4pack cannot run it: {error}") from None
                log.info("layer %s: %s; using the dense backend", name, error)
                chosen = "dense"
        module.use_backend(make_backend(chosen, kernel_dtype if chosen == "int4pack" else dtype))
        counts[chosen] = counts.get(chosen, 0) + 1
    return counts


def load_quantized(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = "auto",
    *,
    backend: str = "auto",
) -> tuple[torch.nn.Module, Any]:
    """Load a GPTQ checkpoint with the project's quantized linear; returns ``(model, tokenizer)``.

    The architecture comes from transformers (built without weights), every GPTQ linear becomes a
    :class:`qes.qlinear.GPTQLinear` filled from the checkpoint, and every other tensor is loaded in
    ``dtype``: ``auto`` is bfloat16 on CUDA and float32 on the CPU
    (:func:`qes.qlinear.compute_dtype`). ``backend`` picks the forward path (``auto``, ``int4pack``,
    ``dense``; see :mod:`qes.qlinear`); under ``auto`` a layer whose shape torch's int4 packing cannot hold
    exactly runs dense; ``backend="none"`` loads the codes only, with no forward path (replay, hashing).
    The model is in eval mode; :func:`describe_compute` tells its device, dtype and backends.
    """
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    path = Path(path)
    scheme = Scheme.from_config(path, read_quantization_config(path))
    config = AutoConfig.from_pretrained(str(path))
    model = assemble_quantized(config, _read_tensors(path), scheme, device, dtype, backend, source=path)
    setattr(model, _SOURCE_ATTR, str(path))
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    log.info("loaded %s: %s", path, json.dumps(model.qes_compute))
    return model, tokenizer


def assemble_quantized(
    config: Any,
    tensors: dict[str, torch.Tensor],
    scheme: Scheme,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = "auto",
    backend: str = "auto",
    source: str | Path = "<memory>",
) -> torch.nn.Module:
    """A model of ``config``'s architecture from GPTQ checkpoint tensors (``*.qweight`` etc. and the rest).

    What :func:`load_quantized` does after reading the files; also builds synthetic models in memory.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    device = torch.device(device)
    if device.type == "cuda":
        require_cuda()
    torch_dtype = compute_dtype(dtype, device)
    config = copy.deepcopy(config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    names = sorted(key[: -len(".qweight")] for key in tensors if key.endswith(".qweight"))
    if not names:
        raise ValueError(f"{source}: no GPTQ layers (no *.qweight tensors) in the checkpoint")
    owned = set()
    for name in names:
        model.set_submodule(name, _gptq_module(name, model.get_submodule(name), tensors, scheme))
        owned.update(f"{name}.{attr}" for attr in (*_GPTQ_TENSORS, "bias"))
    rest = {k: (v.to(torch_dtype) if v.is_floating_point() else v) for k, v in tensors.items() if k not in owned}
    _, unexpected = model.load_state_dict(rest, strict=False, assign=True)
    model.tie_weights()
    unloaded = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.device.type == "meta"]
    if unexpected or unloaded:
        raise ValueError(f"{source}: checkpoint and architecture disagree: not in the architecture "
                         f"{sorted(unexpected)[:3]}, missing from the checkpoint {sorted(unloaded)[:3]}")
    model.to(device)
    model.eval()
    for module in model.modules():  # biases in the compute dtype: no cast per call
        if isinstance(module, GPTQLinear) and module.bias is not None:
            module.bias.data = module.bias.data.to(torch_dtype)
    kernel_dtype = int4pack_kernel_dtype(dtype, torch_dtype)
    backends = _choose_backends(model, backend, device, torch_dtype, kernel_dtype)
    model.qes_compute = _compute_record(device, torch_dtype, backends)
    if hasattr(model, "qes_backend_timings"):
        model.qes_compute["backend_ms"] = model.qes_backend_timings
    if "int4pack" in backends:
        model.qes_compute["int4pack_dtype"] = str(kernel_dtype).removeprefix("torch.")
    return model


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), so every run says which CPU it ran on."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compute_record(device: torch.device, dtype: torch.dtype, backends: dict[str, int]) -> dict[str, Any]:
    from qes.qlinear import cpu_runs_bf16_natively

    record: dict[str, Any] = {
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "backends": backends,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_runs_bf16_natively(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
    }
    if device.type == "cuda":
        record["gpu"] = torch.cuda.get_device_name(device)
    return record


def zero_points(layer: QuantLinear) -> torch.Tensor:
    """Exact zero points of a loaded layer as ``[I/g, O]`` int32."""
    return layer.module.zero_points().to("cpu").contiguous()


def refresh(model: torch.nn.Module) -> None:
    """Rebuild every forward cache from the GPTQ tensors.

    Not needed after in-place torch writes (the layers notice them through the tensors' version counters)
    nor after the engine's updates; only after writes that bypass torch, e.g. through a numpy view.
    """
    for module in model.modules():
        if isinstance(module, GPTQLinear):
            module.refresh()


def describe_compute(model: torch.nn.Module) -> dict[str, Any]:
    """Where and how a model from :func:`load_quantized` computes: device, dtype, backends, CPU capability."""
    return dict(getattr(model, "qes_compute", {}))


def save_quantized(
    model: torch.nn.Module, tokenizer: Any, out_dir: str | Path, extra_files: dict[str, str] | None = None
) -> Path:
    """Write the model's current codes as a GPTQ checkpoint: the source checkpoint with new ``qweight`` tensors.

    Everything else (zero points in the on-disk convention, scales, embeddings, config, their dtypes) is
    copied from the folder the model was loaded from, so ``save_quantized`` then :func:`load_quantized`
    gives identical :func:`codes_sha256` and identical logits. The folder is written next to ``out_dir``
    and renamed into place, together with ``extra_files`` ({name: text}), so a failure leaves no partial
    output; an existing ``out_dir`` is replaced.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qes.fsutil import atomic_dir

    source = getattr(model, _SOURCE_ATTR, None)
    if source is None:
        raise ValueError("the model was not loaded with qes.codes.load_quantized; nothing to save it from")
    source = Path(source)
    layers = {layer.name: layer for layer in quantized_linears(model)}
    written = set()
    with atomic_dir(out_dir) as tmp:
        for item in source.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and not item.name.endswith("_report.json"):
                shutil.copy2(item, tmp / item.name)
        for shard in _shard_files(source):
            with safe_open(str(shard), framework="pt") as handle:
                metadata = handle.metadata()
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            for key in tensors:
                name = key[: -len(".qweight")]
                if key.endswith(".qweight") and name in layers:
                    tensors[key] = layers[name].qweight.detach().to("cpu").contiguous()
                    written.add(name)
            save_file(tensors, str(tmp / shard.name), metadata=metadata)
        if written != set(layers):
            raise ValueError(f"{source} lacks the qweight of {sorted(set(layers) - written)[:3]}")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out_dir)
