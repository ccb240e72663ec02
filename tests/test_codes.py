"""The canonical code view: packing, hashing, live writes and the save/load round trip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from _backends import assert_auto_int4_choice

from qes.backends.dense import dequantize_weight
from qes.checkpoint import describe_compute, load_quantized, save_quantized
from qes.codes import LayerCodes, layer_key, quantized_linears, zero_points
from qes.identity import codes_sha256
from qes.packing import (
    SUPPORTED_BITS,
    pack_along_cols,
    pack_along_rows,
    pack_codes,
    unpack_along_cols,
    unpack_along_rows,
    unpack_codes,
)
from qes.qlinear import refresh


@pytest.mark.parametrize("bits", [4, 8])
def test_pack_unpack_round_trip(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    out_features, in_features = 48, 64
    maxq = (1 << bits) - 1
    codes = torch.randint(0, maxq + 1, (out_features, in_features), generator=gen, dtype=torch.int64).to(torch.uint8)
    codes[0, 0] = 0
    codes[0, 1] = maxq
    codes[-1, -1] = maxq
    codes[5, :] = maxq  # a full word of maximal codes packs to -1 as int32
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32
    assert tuple(packed.shape) == (in_features * bits // 32, out_features)
    assert torch.equal(unpack_codes(packed, bits), codes)
    assert int(packed[:, 5].eq(-1).sum()) == packed.shape[0]


@pytest.mark.parametrize("bits", [4, 8])
def test_unpack_layout_lsb_first(bits: int) -> None:
    per_word = 32 // bits
    in_features, out_features = 2 * per_word, 3
    codes = torch.zeros(out_features, in_features, dtype=torch.uint8)
    codes[1, 0] = 1  # lowest bits of word 0, column 1
    codes[2, per_word + 1] = (1 << bits) - 1  # second code of word 1, column 2
    packed = pack_codes(codes, bits)
    assert int(packed[0, 1]) == 1
    assert int(packed[1, 2]) == ((1 << bits) - 1) << bits
    assert int(packed.abs().sum()) == 1 + (((1 << bits) - 1) << bits)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
def test_pack_along_cols_round_trip(bits: int) -> None:
    """qzeros are packed along the output dimension: [G, O] codes <-> [G, O/p] words."""
    per_word = 32 // bits
    codes = (torch.arange(3 * 2 * per_word, dtype=torch.int32).view(3, 2 * per_word) * 7) % (1 << bits)
    words = pack_along_cols(codes, bits)
    assert tuple(words.shape) == (3, 2)
    assert torch.equal(words, pack_along_rows(codes.t(), bits).t())
    assert torch.equal(unpack_along_cols(words, bits), codes)


def test_pack_rejects_out_of_range_and_bad_shapes() -> None:
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        pack_codes(torch.full((2, 8), 16, dtype=torch.int32), 4)
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_codes(torch.zeros(2, 12, dtype=torch.uint8), 4)
    with pytest.raises(ValueError, match="unsupported code width 3"):
        unpack_codes(torch.zeros(3, 2, dtype=torch.int32), 3)


def test_layer_key_is_pinned() -> None:
    assert layer_key("model.layers.3.mlp.up_proj") == 1891923951634361160
    assert layer_key("model.layers.0.self_attn.q_proj") == 7239434321950610796
    assert 0 <= layer_key("") < 2**63


def test_tiny_gptq_layers_are_project_modules(tiny_gptq_dir: Path) -> None:
    model, _ = load_quantized(tiny_gptq_dir)
    layers = quantized_linears(model)
    assert [layer.name for layer in layers] == sorted(layer.name for layer in layers)
    assert len(layers) == 2 * 7
    assert {type(layer.module).__name__ for layer in layers} == {"GPTQLinear"}
    # auto: for INT4 on the CPU the backend measured faster on this CPU (int4pack unless dense is >= 10%
    # faster, as it can be on AVX2), dense otherwise; nothing of GPTQModel's kernels is left.
    compute = describe_compute(model)
    if layers[0].bits == 8:
        assert compute["backends"] == {"dense": 14}
        return
    assert_auto_int4_choice(compute, 14)
    assert not [m for m in model.modules() if type(m).__module__.startswith("gptqmodel")]
    up = next(layer for layer in layers if layer.name == "model.layers.0.mlp.up_proj")
    assert (up.in_features, up.out_features) == (64, 128)
    assert up.num_codes == 64 * 128
    assert up.qweight.data_ptr() == up.module.qweight.data_ptr()
    assert up.key == layer_key(up.name)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.clone()


def test_in_place_code_write_changes_forward(tiny_gptq_dir: Path) -> None:
    model, _ = load_quantized(tiny_gptq_dir)
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    before = _logits(model, ids)  # a first forward pass must not repack qweight
    layer = next(layer for layer in quantized_linears(model) if layer.name == "model.layers.0.mlp.up_proj")
    sha_before = codes_sha256(model)
    q = unpack_codes(layer.qweight, layer.bits)
    original = int(q[7, 3])
    q[7, 3] = 0 if original > (1 << (layer.bits - 1)) else (1 << layer.bits) - 1
    layer.qweight.copy_(pack_codes(q, layer.bits))
    after = _logits(model, ids)
    assert (after - before).abs().max().item() > 1e-4
    assert codes_sha256(model) != sha_before
    q[7, 3] = original
    layer.qweight.copy_(pack_codes(q, layer.bits))
    assert torch.equal(_logits(model, ids), before)
    assert codes_sha256(model) == sha_before


def test_codes_sha256_changes_with_one_code(tiny_gptq_dir: Path) -> None:
    model, _ = load_quantized(tiny_gptq_dir)
    layers = quantized_linears(model)
    sha = codes_sha256(layers)
    assert sha == codes_sha256(model)
    assert sha == json.loads((tiny_gptq_dir / "quant_report.json").read_text())["codes_sha256"]
    layer = layers[-1]
    layer.qweight.view(-1)[0] ^= 1
    assert codes_sha256(layers) != sha
    layer.qweight.view(-1)[0] ^= 1
    assert codes_sha256(layers) == sha


def test_codes_sha256_covers_names_and_order(tiny_gptq_dir: Path) -> None:
    model, _ = load_quantized(tiny_gptq_dir)
    layers = quantized_linears(model)
    assert codes_sha256(list(reversed(layers))) == codes_sha256(layers)
    renamed = [LayerCodes("x" + layers[0].name, *_rest(layers[0])), *layers[1:]]
    assert codes_sha256(renamed) != codes_sha256(layers)


def _rest(layer: LayerCodes) -> tuple:
    return layer.module, layer.bits, layer.in_features, layer.out_features


def test_zero_points_in_memory_are_exact(tiny_gptq_dir: Path) -> None:
    model, _ = load_quantized(tiny_gptq_dir)
    layer = quantized_linears(model)[0]
    zeros = zero_points(layer)
    assert torch.all(zeros == 1 << (layer.bits - 1)), "symmetric GPTQ: exact zero is 2^(bits-1) in memory"
    from safetensors import safe_open

    with safe_open(str(next(tiny_gptq_dir.glob("*.safetensors"))), "pt") as handle:
        on_disk = handle.get_tensor(f"{layer.name}.qzeros")
    disk_zeros = unpack_along_rows(on_disk.t().contiguous(), layer.bits)
    assert torch.all(disk_zeros == (1 << (layer.bits - 1)) - 1), "on disk GPTQ stores zero - 1"


def test_save_load_round_trip_identical(tiny_gptq_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = load_quantized(tiny_gptq_dir)
    ids = tokenizer("Using the numbers [3, 5, 7] make 22", return_tensors="pt").input_ids
    _logits(model, ids)  # after a forward pass, to catch kernels that repack on first use
    layer = quantized_linears(model)[3]
    q = unpack_codes(layer.qweight, layer.bits)
    q[0, :5] = (q[0, :5].to(torch.int32) + 1).clamp(max=(1 << layer.bits) - 1).to(torch.uint8)
    layer.qweight.copy_(pack_codes(q, layer.bits))
    sha = codes_sha256(model)
    reference = _logits(model, ids)

    out = save_quantized(model, tokenizer, tmp_path / "saved")
    assert not list(tmp_path.glob(".saved.tmp-*"))
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["bits"] == layer.bits and config["checkpoint_format"] == "gptq"
    assert "backend" not in config
    reloaded, _ = load_quantized(out)
    assert codes_sha256(reloaded) == sha
    assert torch.equal(_logits(reloaded, ids), reference)


def test_save_copies_everything_but_the_codes(tiny_gptq_dir: Path, tmp_path: Path) -> None:
    """save_quantized rewrites qweight only: zero points (on-disk convention), scales, embeddings and their
    dtypes come back byte for byte, so the export is the standard checkpoint GPTQModel wrote."""
    from safetensors.torch import load_file

    model, tokenizer = load_quantized(tiny_gptq_dir)
    layer = quantized_linears(model)[1]
    layer.qweight.view(-1)[0] ^= 1
    out = save_quantized(model, tokenizer, tmp_path / "saved")
    before = load_file(next(tiny_gptq_dir.glob("*.safetensors")))
    after = load_file(next(out.glob("*.safetensors")))
    assert before.keys() == after.keys()
    changed = [k for k in before if not (before[k].dtype == after[k].dtype and torch.equal(before[k], after[k]))]
    assert changed == [f"{layer.name}.qweight"]
    assert (out / "config.json").read_bytes() == (tiny_gptq_dir / "config.json").read_bytes()
    assert not (out / "quant_report.json").exists()


def test_load_quantized_rejects_float_folder(tiny_float_dir: Path) -> None:
    with pytest.raises(ValueError, match="not a GPTQ checkpoint"):
        load_quantized(tiny_float_dir)


def test_save_failure_leaves_no_folder(tiny_gptq_dir: Path, tmp_path: Path) -> None:
    model, _ = load_quantized(tiny_gptq_dir)

    class BrokenTokenizer:
        def save_pretrained(self, path: object) -> None:
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_quantized(model, BrokenTokenizer(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_copy_of_checkpoint_loads(tiny_gptq_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_gptq_dir, tmp_path / "copy"))
    model, _ = load_quantized(copy)
    assert codes_sha256(model) == json.loads((copy / "quant_report.json").read_text())["codes_sha256"]


def test_dense_backend_matches_gptqmodel_kernel(tiny_gptq_dir: Path) -> None:
    """The project's dense forward computes the same function as GPTQModel's own TorchLinear kernel."""
    from transformers import AutoModelForCausalLM, GPTQConfig

    cached, tokenizer = load_quantized(tiny_gptq_dir, dtype="float32", backend="dense")
    bits = quantized_linears(cached)[0].bits
    kernel = AutoModelForCausalLM.from_pretrained(
        str(tiny_gptq_dir), dtype=torch.float32, quantization_config=GPTQConfig(bits=bits, backend="torch")
    ).eval()
    assert {type(m).__name__ for m in kernel.modules() if hasattr(m, "qweight")} == {"TorchLinear"}
    ids = tokenizer("Using the numbers [3, 5, 7] make 22", return_tensors="pt").input_ids
    a, b = _logits(cached, ids), _logits(kernel, ids)
    # GPTQModel multiplies in fp16, qes in fp32: equal up to fp16 rounding of the weights.
    assert torch.allclose(a, b, atol=2e-3, rtol=1e-3), (a - b).abs().max()
    assert a.argmax(-1).equal(b.argmax(-1))


def test_dequantize_formula(tiny_gptq_dir: Path) -> None:
    model, _ = load_quantized(tiny_gptq_dir)
    layer = quantized_linears(model)[2]
    module = layer.module
    q = layer.codes().to(torch.float32)  # [out, in]
    zeros = zero_points(layer).to(torch.float32)  # [in/g, out]
    scales = module.scales.to(torch.float32)
    group = (torch.arange(layer.in_features) // 32).long()
    expected = ((q.t() - zeros[group]) * scales[group]).to(torch.float32)
    assert torch.equal(dequantize_weight(module, torch.float32), expected.t())
    assert torch.equal(module.g_idx.long(), group)


def test_cache_follows_every_write_path(tiny_gptq_dir: Path) -> None:
    model, _ = load_quantized(tiny_gptq_dir)
    ids = torch.tensor([[1, 20, 30, 40]])
    base = _logits(model, ids)
    layer = next(layer for layer in quantized_linears(model) if layer.name.endswith("0.self_attn.v_proj"))
    saved = layer.qweight.clone()
    writes = [
        lambda w: w.__setitem__((0, 0), w[0, 0] ^ 0x11),
        lambda w: w.bitwise_xor_(0x1),
        lambda w: w.index_put_((torch.tensor([1]), torch.tensor([2])), torch.tensor([0], dtype=torch.int32)),
    ]
    for write in writes:
        write(layer.qweight)
        assert not torch.equal(_logits(model, ids), base)
        layer.qweight.copy_(saved)
        assert torch.equal(_logits(model, ids), base)
    # A write that bypasses torch's version counter needs refresh().
    layer.qweight.numpy()[0, 0] ^= 0x11
    stale = _logits(model, ids)
    refresh(model)
    assert not torch.equal(_logits(model, ids), stale)
