"""The identity of a model state: the codes hash, and the hash of every other part of its base checkpoint.

:func:`codes_sha256` is the one digest of a model's integer codes; manifests, seed-log checkpoints, the
engine and replay all use it. :func:`base_identity` adds the parts training never changes (scales, zero
points, ``g_idx``, other tensors, configs, tokenizer), each hashed on its own so a mismatch can be named.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from qes.checkpoint import shard_files, source_of
from qes.codes import LayerCodes, quantized_linears
from qes.packing import unpack_codes

__all__ = ["IDENTITY_PARTS", "base_identity", "checkpoint_parts", "codes_sha256"]

#: The parts of a base checkpoint that shape a run's output, each hashed on its own so a mismatch can be named.
IDENTITY_PARTS = ("codes", "scales", "zeros", "g_idx", "tensors", "quantization_config", "model_config", "tokenizer")
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
)
# Keys of config.json that say who wrote the file, not what the model computes.
_PROVENANCE_KEYS = ("transformers_version", "_name_or_path")


def _as_layers(model_or_layers: torch.nn.Module | Iterable[LayerCodes]) -> list[LayerCodes]:
    if isinstance(model_or_layers, torch.nn.Module):
        return quantized_linears(model_or_layers)
    return sorted(model_or_layers, key=lambda layer: layer.name)


def codes_sha256(model_or_layers: torch.nn.Module | Iterable[LayerCodes]) -> str:
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
    for shard in shard_files(path):
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
    source = source_of(model)
    if source is not None:
        parts.update(checkpoint_parts(source))
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return {"sha256": digest, "parts": parts}
