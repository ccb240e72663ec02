"""The project's quantized linear: backends exact against the integers, on every CPU instruction set."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qes.backends.base import LayerSpec
from qes.backends.choice import auto_priority, choose_backend, faster_cpu_int4_backend
from qes.backends.dense import DenseBackend, dequantize_weight
from qes.backends.int4pack import Int4PackBackend, int4pack_layout, pack_int4
from qes.checkpoint import describe_compute, load_quantized
from qes.codes import quantized_linears
from qes.engine import Engine
from qes.identity import codes_sha256
from qes.noise import NoiseSpec
from qes.packing import unpack_along_rows
from qes.qlinear import GPTQLinear, compute_dtype
from qes.update import ALPHA_BITS, Step, UpdateConfig, quantize_coefficients

PROMPT = torch.tensor([[1, 5, 9, 12, 40, 77, 100, 3]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits.clone()


def _caches_match_codes(model: torch.nn.Module) -> list[str]:
    """Names of the layers whose forward cache differs from a fresh build out of the current integers."""
    stale = []
    for layer in quantized_linears(model):
        module = layer.module
        if module.backend.name == "dense":
            fresh = dequantize_weight(module, module.dense_weight.dtype)
            same = torch.equal(module.dense_weight, fresh)
        else:
            same = torch.equal(module.int4_packed, pack_int4(unpack_along_rows(module.qweight, 4).t()))
        if not same:
            stale.append(layer.name)
    return stale


def _random_cycles(engine: Engine, model: torch.nn.Module, cycles: int, seed: int) -> list[str]:
    """perturb -> (restore | update) cycles whose kinds, seeds and coefficients come from a fixed schedule."""
    hashes = []
    for c in range(cycles):
        s = seed + 7919 * c
        p = engine.perturb(s, 1 if s % 2 else -1)
        if c % 4 == 3:
            coefs = quantize_coefficients([((c % 7) - 3) * 0.6, -((c % 5) - 2) * 0.8])
            engine.restore(p)
            engine.apply(Step(c, 3 << ALPHA_BITS, (s, s + 1), (1, -1), tuple(coefs)))
        else:
            engine.restore(p)
        hashes.append(engine.codes_sha256() if c % 25 == 0 else "")
    return hashes


@pytest.mark.parametrize(("bits", "backend"), [(4, "dense"), (4, "int4pack"), (8, "dense")])
def test_caches_equal_full_rebuild_after_many_cycles(tiny_gptq, bits: int, backend: str) -> None:
    """>= 200 perturb / restore / update cycles: the cache equals a full rebuild from the codes bit for bit,
    perturb + restore leaves codes and outputs unchanged, and the backends reach the same codes."""
    model, _ = load_quantized(tiny_gptq(bits), backend=backend)
    engine = Engine(quantized_linears(model), NoiseSpec.from_sigma(0.8), UpdateConfig(mode="stored"))
    start_hash, start_logits = engine.codes_sha256(), _logits(model)
    p = engine.perturb(12345, 1)
    assert not torch.equal(_logits(model), start_logits)
    engine.restore(p)
    assert engine.codes_sha256() == start_hash
    assert torch.equal(_logits(model), start_logits)
    hashes = _random_cycles(engine, model, 200, seed=bits)
    assert engine.codes_sha256() != start_hash
    assert _caches_match_codes(model) == []
    # The same cycles on a model of the other backend reach the same codes at every checkpoint.
    other = "dense" if backend == "int4pack" else ("int4pack" if bits == 4 else "none")
    twin, _ = load_quantized(tiny_gptq(bits), backend=other)
    twin_engine = Engine(quantized_linears(twin), NoiseSpec.from_sigma(0.8), UpdateConfig(mode="stored"))
    twin_engine.restore(twin_engine.perturb(12345, 1))
    assert _random_cycles(twin_engine, twin, 200, seed=bits) == hashes


def test_writes_outside_the_engine_rebuild_the_cache(tiny_gptq) -> None:
    model, _ = load_quantized(tiny_gptq(4), backend="int4pack")
    before = _logits(model)
    layer = quantized_linears(model)[3]
    layer.qweight.bitwise_xor_(0x3)
    assert not torch.equal(_logits(model), before)
    assert _caches_match_codes(model) == []
    layer.qweight.bitwise_xor_(0x3)
    assert torch.equal(_logits(model), before)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_backends_compute_the_same_function(tiny_gptq) -> None:
    """int4pack computes (q - z) * s as dense does: equal up to float rounding in float32, and up to bf16
    rounding where its kernel runs in bf16 (dtype auto on a CPU without native bf16)."""
    dense, _ = load_quantized(tiny_gptq(4), dtype="float32", backend="dense")
    packed, _ = load_quantized(tiny_gptq(4), dtype="float32", backend="int4pack")
    reference = _logits(dense)
    assert _relative_error(_logits(packed), reference) < 1e-5
    auto, _ = load_quantized(tiny_gptq(4), backend="int4pack")
    assert describe_compute(auto)["int4pack_dtype"] == "bfloat16"
    assert 0 < _relative_error(_logits(auto).float(), reference) < 0.02


def _spec(bits: int, device: str, out_features: int = 64, in_features: int = 64, group: int = 32) -> LayerSpec:
    return LayerSpec(bits, out_features, in_features, group, device)


def test_auto_choices() -> None:
    assert choose_backend("auto", _spec(4, "cpu")) == "int4pack"
    assert choose_backend("auto", _spec(8, "cpu")) == "dense"
    assert choose_backend("auto", _spec(4, "cuda")) == "dense"
    assert choose_backend("auto", _spec(4, "cpu", group=48, in_features=96)) == "dense"  # a group int4pack lacks
    assert choose_backend("none", _spec(4, "cuda")) == "none"
    with pytest.raises(ValueError, match="backend int4pack cannot run this layer: .*INT4 codes on the CPU only"):
        choose_backend("int4pack", _spec(8, "cpu"))
    with pytest.raises(ValueError, match="INT4 codes on the CPU only .the layer is 4-bit on cuda"):
        choose_backend("int4pack", _spec(4, "cuda"))
    with pytest.raises(ValueError, match="group size of 32, 64, 128 or 256 dividing in_features, got 48"):
        choose_backend("int4pack", _spec(4, "cpu", group=48, in_features=96))
    with pytest.raises(ValueError, match="backend must be one of"):
        choose_backend("marlin", _spec(4, "cpu"))
    assert auto_priority() == ("int4pack", "dense")
    assert auto_priority("dense") == ("dense", "int4pack")
    assert compute_dtype("auto", "cuda") == torch.bfloat16
    assert compute_dtype("auto", "cpu") == torch.float32
    assert choose_backend("auto", _spec(4, "cpu"), cpu_int4="dense") == "dense"
    assert faster_cpu_int4_backend({"int4pack": 10.0, "dense": 9.5}) == "int4pack"  # within 10%: less memory
    assert faster_cpu_int4_backend({"int4pack": 10.0, "dense": 8.9}) == "dense"
    assert compute_dtype("float16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="dtype must be"):
        compute_dtype("fp8", "cpu")


def test_a_layer_refuses_a_backend_that_cannot_run_it() -> None:
    layer = GPTQLinear(64, 64, 8, 32, bias=False)
    with pytest.raises(ValueError, match="backend int4pack cannot run this layer: .*8-bit on cpu"):
        layer.use_backend(Int4PackBackend(torch.bfloat16))
    assert layer.backend is None
    layer.use_backend(DenseBackend(torch.float32))
    assert layer.backend.name == "dense"


def test_int4pack_layout_is_read_off_torch() -> None:
    layout = int4pack_layout(64, 64)
    codes = torch.arange(64 * 64).view(64, 64) * 7 % 16
    nibbles = pack_int4(codes).reshape(-1).view(torch.uint8).long()
    where = layout.row[:, None] + layout.col[None, :]
    found = (nibbles[where >> 1] >> ((where & 1) * 4)) & 15
    assert torch.equal(found, codes)


def _edit_checkpoint(src: Path, dst: Path, quant: dict | None = None, tensor: tuple | None = None) -> Path:
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if quant:
        config = json.loads((dst / "config.json").read_text())
        config["quantization_config"].update(quant)
        (dst / "config.json").write_text(json.dumps(config))
    if tensor:
        shard = next(dst.glob("*.safetensors"))
        tensors = load_file(shard)
        name, value = tensor
        tensors[name] = value(tensors[name])
        save_file(tensors, shard, metadata={"format": "pt"})
    return dst


def test_refuses_checkpoints_it_cannot_run_exactly(tiny_gptq, tmp_path: Path) -> None:
    src = tiny_gptq(4)
    layer = "model.layers.1.mlp.down_proj"
    cases = [
        ({"desc_act": True}, None, "desc_act is true"),
        ({"checkpoint_format": "marlin"}, None, "checkpoint_format is 'marlin'"),
        ({"bits": 3}, None, "bits is 3"),
        (None, (f"{layer}.qweight", lambda t: t.t().contiguous()), f"layer {layer}: qweight is torch.int32"),
        (None, (f"{layer}.g_idx", lambda t: t.flip(0).contiguous()), f"layer {layer}: g_idx is not i // 32"),
    ]
    for n, (quant, tensor, message) in enumerate(cases):
        path = _edit_checkpoint(src, tmp_path / f"case{n}", quant, tensor)
        with pytest.raises(ValueError, match=message):
            load_quantized(path)
    with pytest.raises(ValueError, match="backend int4pack"):
        load_quantized(tiny_gptq(8), backend="int4pack")


def _capabilities() -> list[str]:
    """The instruction sets torch can be told to use on this CPU (ATEN_CPU_CAPABILITY)."""
    found = ["default"]
    if torch.cpu._is_avx2_supported():
        found.append("avx2")
    if torch.cpu._is_avx512_supported():
        found.append("avx512")
    return found


_UNDER_CAPABILITY = """
import json, sys, torch
from qes.checkpoint import load_quantized
from qes.codes import quantized_linears
from qes.engine import Engine
from qes.noise import NoiseSpec
from qes.update import UpdateConfig, Step
ids = torch.tensor([[1, 5, 9, 12, 40, 77, 100, 3]])
out = {"capability": torch.backends.cpu.get_cpu_capability()}
models = {b: load_quantized(sys.argv[1], dtype="float32", backend=b)[0] for b in ("int4pack", "dense")}
for name, model in models.items():
    engine = Engine(quantized_linears(model), NoiseSpec.from_sigma(0.5), UpdateConfig())
    engine.restore(engine.perturb(5, 1))
    engine.apply(Step(0, 3 << 16, (5, 5), (1, -1), (40000, -40000)))
    engine.perturb(9, -1)
    with torch.no_grad():
        out[name] = model(ids).logits.tolist()
    out[name + "_hash"] = engine.codes_sha256()
print(json.dumps(out))
"""


@pytest.mark.parametrize("capability", _capabilities())
def test_int4pack_under_each_instruction_set(tiny_gptq, capability: str) -> None:
    """torch packs int4 differently per instruction set; the backend reads the layout off torch, so under
    each one the perturbed, updated int4pack model computes what the dense one does."""
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    result = subprocess.run([sys.executable, "-c", _UNDER_CAPABILITY, str(tiny_gptq(4))],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["capability"].lower() == capability
    assert out["int4pack_hash"] == out["dense_hash"]
    a, b = torch.tensor(out["int4pack"]), torch.tensor(out["dense"])
    assert _relative_error(a, b) < 0.02


def test_a_seed_log_replays_to_one_hash_under_every_backend(tiny_gptq, tmp_path: Path) -> None:
    """Train with int4pack, replay the log onto models loaded with each backend: replay touches integers only."""
    from qes.hparams import TrainConfig
    from qes.replay import engine_for_log, replay_steps
    from qes.seedlog import SeedLog
    from qes.train import train

    model, _ = load_quantized(tiny_gptq(4), backend="int4pack")

    def fitness(t: int) -> float:
        with torch.no_grad():
            logp = torch.log_softmax(model(PROMPT).logits[0, :-1].float(), -1)
        return float(logp.gather(1, PROMPT[0, 1:, None]).mean())

    cfg = TrainConfig(iterations=4, population=4, sigma=0.3, alpha=0.2, checkpoint_every=2,
                      update=UpdateConfig(mode="replay", window=2))
    final = train(model, quantized_linears(model), fitness, cfg, tmp_path / "run")
    seedlog = SeedLog.open(tmp_path / "run")
    for backend in ("dense", "int4pack", "none"):
        replayed, _ = load_quantized(tiny_gptq(4), backend=backend)
        engine = engine_for_log(replayed, seedlog)
        replay_steps(engine, seedlog)  # verifies the checkpoint hashes on the way
        assert engine.codes_sha256() == final == codes_sha256(replayed)


@pytest.mark.parametrize("backend", ["dense", "int4pack"])
def test_forward_caches_are_buffers_that_move_with_the_model_but_are_never_saved(tiny_gptq, backend) -> None:
    model, _ = load_quantized(tiny_gptq(4), backend=backend)
    caches = {"dense": ("dense_weight",), "int4pack": ("int4_packed", "int4_scales_zeros")}[backend]
    buffers = dict(model.named_buffers())
    names = [name for name in buffers if name.rsplit(".", 1)[-1] in caches]
    assert len(names) == 14 * len(caches)
    state = model.state_dict()
    assert not any(name in state for name in names)  # derived from the codes: never written to a checkpoint
    assert all(buffers[name].device.type == "cpu" for name in names)


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch sees a CUDA device here")
@pytest.mark.parametrize(("build", "expected"), [(None, "is the CPU build"), ("12.6", "is built for CUDA 12.6")])
def test_cuda_refused_naming_the_torch_build_and_driver(monkeypatch: pytest.MonkeyPatch, build: str | None,
                                                         expected: str) -> None:
    from qes.finetune import resolve_device

    monkeypatch.setattr(torch.version, "cuda", build)
    with pytest.raises(RuntimeError, match="device 'cuda' was asked for but torch sees no CUDA device") as error:
        resolve_device("cuda")
    assert expected in str(error.value)
    assert "QES_TORCH=cu126" in str(error.value)
    assert resolve_device("auto") == "cpu"
