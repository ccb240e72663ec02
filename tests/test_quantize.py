"""Stage quantize on the tiny model: settings, early failures, calibration prompts and the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qes.checkpoint import cpu_model, load_quantized
from qes.codes import quantized_linears
from qes.identity import codes_sha256
from qes.quantize import QuantizeConfig, quantize_model
from qes.quantize.calibration import builtin_calibration_prompts, builtin_heldout_prompts
from qes.quantize.preflight import check_group_size, linear_in_features


def _smollm2_like_config(folder: Path) -> Path:
    """config.json with SmolLM2-135M's shapes (no weights): hidden 576, intermediate 1536, 30 layers."""
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        tie_word_embeddings=True,
    ).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"bits": 3}, r"quantize.bits must be one of \(4, 8\), got 3"),
        ({"bits": 2}, r"quantize.bits must be one of \(4, 8\), got 2"),
        ({"group_size": 0}, "group_size must be a positive integer"),
        ({"damp_percent": 1.0}, "damp_percent must lie in"),
        ({"calibration_samples": 0}, "calibration_samples must be >= 1"),
    ],
)
def test_quantize_config_rejects_bad_values(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        QuantizeConfig(**values)


def test_quantize_config_from_dict() -> None:
    cfg = QuantizeConfig.from_dict({"bits": 8, "group_size": 32})
    assert (cfg.bits, cfg.group_size, cfg.tag) == (8, 32, "w8g32")
    with pytest.raises(ValueError, match=r"quantize: Additional properties are not allowed \('group' was unexpected\)"):
        QuantizeConfig.from_dict({"group": 32})


def test_smollm2_widths_and_group_sizes(tmp_path: Path) -> None:
    widths = linear_in_features(_smollm2_like_config(tmp_path))
    assert len(widths) == 30 * 7
    assert {w for w, _ in widths.values()} == {576, 1536}
    assert widths["model.layers.0.mlp.down_proj"] == (1536, 576)
    check_group_size(widths, QuantizeConfig(group_size=64))
    check_group_size(widths, QuantizeConfig(bits=8, group_size=32))
    with pytest.raises(ValueError) as info:
        check_group_size(widths, QuantizeConfig(group_size=128))
    message = str(info.value)
    assert "quantize.group_size=128 does not divide the input width of layer model.layers.0.mlp.gate_proj" in message
    assert "(576 in_features)" in message
    assert "(576, 1536)" in message
    assert "group sizes that fit every layer: 16, 32, 64" in message


def test_bad_group_size_fails_before_quantizing(tiny_float_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    expected = r"group_size=48 does not divide .* layer model\.layers\.0\.mlp\.down_proj \(128 in_features\)"
    with pytest.raises(ValueError, match=expected):
        quantize_model(tiny_float_dir, out, QuantizeConfig(group_size=48))
    assert list(tmp_path.iterdir()) == []


def test_missing_model_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="run fetch_model first"):
        quantize_model(tmp_path / "nope", tmp_path / "q", QuantizeConfig())


def test_calibration_prompts_are_deterministic_and_disjoint_from_heldout() -> None:
    first = builtin_calibration_prompts(128)
    assert first == builtin_calibration_prompts(128)
    assert len({m[0]["content"] for m in first}) == 128
    assert first[0][0]["content"].startswith("Using the numbers [")
    assert "<answer>" in first[0][0]["content"]
    heldout = builtin_heldout_prompts(64)
    assert not {m[0]["content"] for m in heldout} & {m[0]["content"] for m in builtin_calibration_prompts(2048)}
    assert any("lighthouse" in m[0]["content"] for m in heldout)


def test_default_calibration_prompts_are_pinned() -> None:
    """The calibration prompts fix the codes of every quantized base, and with them every seed log on one."""
    import hashlib

    first = builtin_calibration_prompts(128)
    assert first[0][0]["content"].startswith("Using the numbers [25, 46, 16], create an equation that equals 336.")
    digest = hashlib.sha256(json.dumps(first).encode()).hexdigest()
    assert digest == "3b0ee0555cb033e5913ad14579895cea259edeaaa310228b1a4448ebd6a893de"


def test_report_of_tiny_quantization(tiny_gptq_dir: Path) -> None:
    report = json.loads((tiny_gptq_dir / "quant_report.json").read_text())
    assert report["bits"] in (4, 8) and report["group_size"] == 32
    assert report["compute_dtype"] == "float32" and report["float_model_dtype"] == "float32"
    assert report["gptq_dtypes"] == {key: ["float32"] for key in ("activations", "hessians", "solve", "weights")}
    assert report["format"] == "gptq" and report["sym"] is True and report["desc_act"] is False
    assert report["quantized_layers"] == 14
    # per layer: q, o 64x64; k, v 32x64; gate, up 128x64; down 64x128
    assert report["num_codes"] == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 128 * 64)
    assert report["size_bytes"] > 0
    quality = report["quality"]
    assert quality["prompts"] == 4 and quality["positions"] > 4
    assert 0.0 <= quality["next_token_agreement"] <= 1.0
    assert 0.0 < quality["relative_logit_error"] < 1.0
    assert set(report["timings"]) >= {"load_s", "quantize_s", "save_s", "evaluate_s", "total_s"}
    model, _ = load_quantized(tiny_gptq_dir)
    assert codes_sha256(model) == report["codes_sha256"]
    assert {layer.bits for layer in quantized_linears(model)} == {report["bits"]}


def test_int8_is_closer_to_float_than_int4(tiny_gptq) -> None:
    errors = {}
    for bits in (4, 8):
        report = json.loads((tiny_gptq(bits) / "quant_report.json").read_text())
        errors[bits] = report["quality"]["relative_logit_error"]
    assert errors[8] < errors[4] / 4, errors


def test_checkpoint_loads_with_plain_transformers(tiny_gptq_dir: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tiny_gptq_dir), dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_gptq_dir))
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Using the numbers [3, 5, 7] make 22"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert out.shape[1] == ids.shape[1] + 8


def _wide_bf16_llama(folder: Path) -> Path:
    """A random 2-layer llama, hidden 512 and intermediate 1024, stored in bf16 (the fetch stage's default).

    Wide enough that GPTQ's result reacts to last-bit differences of the calibration computations (about
    4.7 million codes; Hessians up to 1024 x 1024, where LAPACK splits its work across threads).
    """
    import torch
    from _tiny_llama import build_float_model

    return build_float_model(folder, seed=1, hidden=512, intermediate=1024, heads=(8, 4), scale=0.05,
                             dtype=torch.bfloat16)


_QUANTIZE_SCRIPT = """
import json, sys
import torch
from qes.quantize import QuantizeConfig, quantize_model
cfg = QuantizeConfig(group_size=64, calibration_samples=16, batch_size=8, eval_prompts=0)
report = quantize_model(sys.argv[1], sys.argv[2], cfg)
report["caller"] = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}
print(json.dumps(report))
"""


def _quantize_in_fresh_process(model_dir: Path, out: Path, env: dict[str, str]) -> dict:
    environment = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "OMP_NUM_THREADS")}
    environment.update(env)
    done = subprocess.run(
        [sys.executable, "-c", _QUANTIZE_SCRIPT, str(model_dir), str(out)],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_codes_do_not_depend_on_cpu_kernels_or_threads(tmp_path: Path) -> None:
    """Two callers, one on torch's baseline kernels with 1 thread, one on the CPU's best with
    ``OMP_NUM_THREADS=4`` and more GPTQModel workers: the same codes, computed in float32 from the bf16
    checkpoint, which stays bf16. (Under MKL's COMPATIBLE branch a GPTQ child with 4 threads gives other codes
    on this model than one with 1 or 2, so the child's thread count is pinned to one.)"""
    model_dir = _wide_bf16_llama(tmp_path / "model")
    first = _quantize_in_fresh_process(
        model_dir, tmp_path / "q1", {"ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}
    )
    second = _quantize_in_fresh_process(
        model_dir, tmp_path / "q2", {"OMP_NUM_THREADS": "4", "GPTQMODEL_CPU_WORKERS": "3"}
    )
    assert first["caller"] == {"cpu_capability": "DEFAULT", "threads": 1}
    assert first["numerics"]["cpu_model"] == cpu_model()
    for report in (first, second):  # GPTQ runs on one thread of MKL's vendor-neutral branch, never on a GPU
        numerics = report["numerics"]
        assert (numerics["threads"], numerics["MKL_NUM_THREADS"], numerics["MKL_CBWR"]) == (1, "1", "COMPATIBLE,STRICT")
        assert numerics["CUDA_VISIBLE_DEVICES"] == "" and numerics["cuda_devices_visible"] == 0
    for report, out in ((first, "q1"), (second, "q2")):
        assert report["compute_dtype"] == "float32" and report["float_model_dtype"] == "bfloat16"
        assert set(report["gptq_dtypes"]) == {"activations", "hessians", "solve", "weights"}
        assert all(dtypes == ["float32"] for dtypes in report["gptq_dtypes"].values()), report["gptq_dtypes"]
        assert json.loads((tmp_path / out / "config.json").read_text())["dtype"] == "bfloat16"
    assert first["num_codes"] == second["num_codes"] == 2 * (2 * 512 * 512 + 2 * 256 * 512 + 3 * 1024 * 512)
    assert first["codes_sha256"] == second["codes_sha256"]


def test_gptq_child_sees_no_gpu_even_when_the_caller_does() -> None:
    """The child's environment hides every GPU whatever the caller's says; a process started with it sees none."""
    from qes.quantize.gptq import gptq_environment

    env = gptq_environment({"CUDA_VISIBLE_DEVICES": "0,1", "PATH": os.environ.get("PATH", "")})
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    seen = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.device_count())"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert seen.returncode == 0 and seen.stdout.strip() == "0", seen.stderr[-2000:]
