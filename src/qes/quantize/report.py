"""What quantization cost, and the stage's report (``quant_report.json``, see :mod:`qes.quantize`)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from qes import __version__
from qes.checkpoint import load_quantized
from qes.codes import LayerCodes, quantized_linears
from qes.fsutil import directory_size
from qes.identity import codes_sha256
from qes.quantize.gptq import dtype_name
from qes.quantize.settings import QuantizeConfig

REPORT_NAME = "quant_report.json"


@torch.no_grad()
def compare_logits(float_model: Any, quant_model: Any, tokenizer: Any, prompts: Sequence[str]) -> dict[str, float]:
    """Relative logit error and next-token agreement of ``quant_model`` against ``float_model``.

    Every position of every prompt counts; prompts are run one at a time (no padding effects).
    """
    diff_sq = 0.0
    ref_sq = 0.0
    agree = 0
    positions = 0
    last_agree = 0
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        ref = float_model(ids.to(float_model.device)).logits[0].float().cpu()
        got = quant_model(ids.to(quant_model.device)).logits[0].float().cpu()
        diff_sq += float(((got - ref) ** 2).sum())
        ref_sq += float((ref**2).sum())
        same = ref.argmax(-1) == got.argmax(-1)
        agree += int(same.sum())
        positions += int(same.numel())
        last_agree += int(same[-1])
    if not positions:
        return {"prompts": 0, "positions": 0}
    return {
        "prompts": len(prompts),
        "positions": positions,
        "relative_logit_error": math.sqrt(diff_sq / ref_sq),
        "next_token_agreement": agree / positions,
        "last_position_agreement": last_agree / len(prompts),
    }


def measure(
    quant_dir: Path, model_dir: Path, widths: Mapping[str, Any], tokenizer: Any, heldout_texts: Sequence[str]
) -> tuple[list[LayerCodes], dict[str, Any]]:
    """The quantized layers of the checkpoint in ``quant_dir`` (every layer of ``widths``, or an error) and the
    quality of the quantized model against the float model on ``heldout_texts``."""
    from transformers import AutoModelForCausalLM

    quant_model, _ = load_quantized(quant_dir, device="cpu", dtype=torch.float32, backend="dense")
    layers = quantized_linears(quant_model)
    missing = sorted(set(widths) - {layer.name for layer in layers})
    if missing:
        raise RuntimeError(f"GPTQ left {len(missing)} layer(s) unquantized, e.g. {missing[0]}")
    quality: dict[str, Any] = {"prompts": 0}
    if heldout_texts:
        float_model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        quality = compare_logits(float_model, quant_model, tokenizer, heldout_texts)
        del float_model
    return layers, quality


def library_versions() -> dict[str, str]:
    """The versions of the libraries the checkpoint was made with."""
    import gptqmodel
    import transformers

    return {
        "qes": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gptqmodel": gptqmodel.__version__,
    }


def float_model_origin(model_dir: Path) -> dict[str, Any]:
    """Where the float model came from, as its fetch manifest says (source, revision, source file hash)."""
    manifest = model_dir / "manifest.json"
    if not manifest.is_file():
        return {"source": f"local:{model_dir}", "revision": None}
    fetched = json.loads(manifest.read_text())
    keys = ("name", "source", "revision", "source_file", "dtype", "parameters")
    return {key: fetched[key] for key in keys if key in fetched}


def build_report(
    model_dir: Path,
    quant_dir: Path,
    cfg: QuantizeConfig,
    dtypes: tuple[torch.dtype, torch.dtype],
    gptq: Mapping[str, Any],
    calibration_prompts: int,
    layers: Sequence[LayerCodes],
    quality: dict[str, Any],
    timings: Mapping[str, float],
) -> dict[str, Any]:
    """The report of the checkpoint in ``quant_dir``; ``dtypes`` are GPTQ's compute dtype and the float model's."""
    compute_dtype, stored_dtype = dtypes
    return {
        "model": str(model_dir),
        "float_model": float_model_origin(model_dir),
        "format": "gptq",
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "sym": True,
        "desc_act": False,
        "config": asdict(cfg),
        "compute_dtype": dtype_name(compute_dtype),
        "float_model_dtype": dtype_name(stored_dtype),
        "gptq_dtypes": gptq["gptq_dtypes"],
        "numerics": gptq["numerics"],
        "calibration_prompts": calibration_prompts,
        "codes_sha256": codes_sha256(layers),
        "quantized_layers": len(layers),
        "num_codes": sum(layer.num_codes for layer in layers),
        "size_bytes": directory_size(quant_dir),
        "quality": quality,
        "timings": {key: round(value, 3) for key, value in timings.items()},
        "versions": library_versions(),
    }


def write_report(quant_dir: Path, report: Mapping[str, Any]) -> None:
    """Write ``report`` into the checkpoint folder."""
    (quant_dir / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")


def read_report(quant_dir: str | Path) -> dict[str, Any]:
    """The ``quant_report.json`` of a quantized model folder."""
    return json.loads((Path(quant_dir) / REPORT_NAME).read_text())
