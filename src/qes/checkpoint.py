"""A GPTQ checkpoint on disk and in memory: the scheme it promises, load / assemble / save, how a model computes.

GPTQ tensors of one linear layer (format ``gptq``, ``pack_dtype`` int32, ``sym=True``, no ``desc_act``),
with ``I`` inputs, ``O`` outputs, group size ``g``, ``b`` bits and ``p = 32 // b`` codes per int32 word,
least significant bits first (:mod:`qes.packing`):

=========  ===============  =================================================
tensor     shape / dtype    content
=========  ===============  =================================================
qweight    [I/p, O] int32   codes, packed along the *input* dimension
qzeros     [I/g, O/p] int32 zero points, packed along the *output* dimension
scales     [I/g, O] fp16    per-group scales
g_idx      [I] int32        group of each input, ``i // g``
=========  ===============  =================================================

Loading
-------
:func:`load_quantized` builds the model's architecture with transformers, swaps every GPTQ linear for the
project's own :class:`qes.qlinear.GPTQLinear` and fills it from the checkpoint's safetensors. No GPTQModel
kernel is involved: the GPTQ tensors stay in checkpoint layout on the device, and the forward pass runs on a
backend the project chooses (``int4pack`` or ``dense``, see :mod:`qes.backends`). Checkpoints it cannot run
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
import json
import logging
import os
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qes import _env  # noqa: F401  (sets GPTQModel's environment before gptqmodel is imported)
from qes.backends.choice import assign_backends
from qes.backends.int4pack import int4pack_kernel_dtype
from qes.codes import quantized_linears
from qes.packing import SUPPORTED_BITS, pack_along_cols, unpack_along_cols
from qes.qlinear import GPTQLinear, compute_dtype, cpu_runs_bf16_natively, require_cuda

log = logging.getLogger(__name__)

__all__ = [
    "Scheme",
    "assemble_quantized",
    "cpu_model",
    "describe_compute",
    "load_quantized",
    "read_quantization_config",
    "save_quantized",
    "shard_files",
    "source_of",
]

# Attribute under which load_quantized records the checkpoint folder a model came from (save_quantized copies it).
_SOURCE_ATTR = "_qes_source"


def source_of(model: torch.nn.Module) -> str | None:
    """The checkpoint folder :func:`load_quantized` read ``model`` from (None for a model assembled in memory)."""
    return getattr(model, _SOURCE_ATTR, None)


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
            widths = "/".join(map(str, SUPPORTED_BITS))
            return ValueError(f"{path}: {what}; qes runs GPTQ checkpoints with int32 packing, {widths} bits, "
                              f"no act-order, format gptq or gptq_v2")

        bits = int(quant.get("bits", 0))
        if bits not in SUPPORTED_BITS:
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


def shard_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder, in order (one file, or the shards its index names)."""
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
    for shard in shard_files(path):
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
        zeros = unpack_along_cols(module.qzeros, bits)
        module.qzeros.copy_(pack_along_cols(torch.bitwise_and(zeros + 1, (1 << bits) - 1), bits))
    if module.bias is not None:
        module.bias.data = tensors[f"{name}.bias"].to(torch.float32)
    return module


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
    ``dense``; see :mod:`qes.backends`); under ``auto`` a layer whose shape torch's int4 packing cannot hold
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
    backends, timings = assign_backends(model, backend, torch_dtype, kernel_dtype)
    model.qes_compute = _compute_record(device, torch_dtype, backends)
    if timings is not None:
        model.qes_compute["backend_ms"] = timings
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



def describe_compute(model: torch.nn.Module) -> dict[str, Any]:
    """Where and how a model from :func:`load_quantized` computes: device, dtype, backends, CPU capability."""
    return dict(getattr(model, "qes_compute", {}))


def save_quantized(
    model: torch.nn.Module, tokenizer: Any, out_dir: str | Path, extra_files: dict[str, str] | None = None
) -> Path:
    """Write the model's current codes as a GPTQ checkpoint: the source checkpoint with new ``qweight`` tensors.

    Everything else (zero points in the on-disk convention, scales, embeddings, config, their dtypes) is
    copied from the folder the model was loaded from, so ``save_quantized`` then :func:`load_quantized`
    gives identical :func:`qes.identity.codes_sha256` and identical logits. The folder is written next to
    ``out_dir`` and renamed into place, together with ``extra_files`` ({name: text}), so a failure leaves no
    partial output; an existing ``out_dir`` is replaced.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qes.fsutil import atomic_dir

    source = source_of(model)
    if source is None:
        raise ValueError("the model was not loaded with qes.checkpoint.load_quantized; nothing to save it from")
    source = Path(source)
    layers = {layer.name: layer for layer in quantized_linears(model)}
    written = set()
    with atomic_dir(out_dir) as tmp:
        for item in source.iterdir():
            if item.is_file() and item.suffix != ".safetensors" and not item.name.endswith("_report.json"):
                shutil.copy2(item, tmp / item.name)
        for shard in shard_files(source):
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
