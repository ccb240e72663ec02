"""Stage ``quantize``: GPTQ-quantize a float model with GPTQModel and measure what quantization cost.

The output folder is a standard GPTQ checkpoint (format ``gptq``, int32 packing, symmetric, no act-order)
that plain ``transformers.AutoModelForCausalLM.from_pretrained`` loads when GPTQModel is installed, plus
``quant_report.json``:

* ``codes_sha256`` -- identity of the integer codes (see :func:`qes.identity.codes_sha256`);
* ``size_bytes`` -- size of the folder on disk;
* ``quality`` -- relative logit error ``||L_q - L_f||_F / ||L_f||_F`` and next-token (argmax) agreement of the
  quantized model against the float model, over every position of held-out prompts that differ from the
  calibration prompts (both models in float32);
* ``compute_dtype`` -- the dtype GPTQ computed in (:data:`COMPUTE_DTYPE`, float32 whatever the float model's
  ``float_model_dtype``), ``gptq_dtypes`` -- the dtypes GPTQModel was seen computing in, ``numerics`` -- the
  kernel settings of the GPTQ process (:data:`~qes.quantize.gptq.GPTQ_NUMERICS_ENV`);
* ``bits``, ``group_size``, calibration size, library versions and timings per step.

Split by idea: :mod:`~qes.quantize.settings` (the ``quantize`` block), :mod:`~qes.quantize.preflight`
(layers that cannot be quantized, refused before GPTQ runs), :mod:`~qes.quantize.calibration` (the
calibration and held-out prompts), :mod:`~qes.quantize.gptq` (GPTQ in a child process whose kernels are
pinned, so the codes do not depend on the caller's thread count or on torch's instruction-set choice) and
:mod:`~qes.quantize.report` (quality and the report). This module holds the stage.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from qes.fsutil import atomic_dir, refuse_overlap
from qes.quantize.calibration import prompt_texts
from qes.quantize.gptq import run_gptq, stored_float_dtype
from qes.quantize.preflight import check_group_size, linear_in_features
from qes.quantize.report import REPORT_NAME, build_report, measure, read_report, write_report
from qes.quantize.settings import QUANTIZE_BITS, QuantizeConfig

__all__ = ["COMPUTE_DTYPE", "QUANTIZE_BITS", "REPORT_NAME", "QuantizeConfig", "quantize_model", "read_report"]

log = logging.getLogger(__name__)

#: The one dtype GPTQ computes in -- calibration model load, forward passes, Hessian accumulation and the
#: solve -- whatever dtype the float model is stored in. bf16 is emulated (slowly) on CPUs without AVX-512
#: BF16 support, and one fixed dtype keeps the codes the same on every machine.
COMPUTE_DTYPE = torch.float32


def keep_generation_settings(model_dir: Path, out_dir: Path) -> None:
    """Give the checkpoint the float model's generation settings.

    GPTQModel writes a generation_config.json with ``do_sample: true`` of its own, so a plain ``generate()``
    on the quantized model would sample where the float model decodes greedily.
    """
    source, target = model_dir / "generation_config.json", out_dir / "generation_config.json"
    if source.is_file():
        shutil.copyfile(source, target)
    elif target.is_file():
        settings = json.loads(target.read_text())
        settings.pop("do_sample", None)
        target.write_text(json.dumps(settings, indent=2) + "\n")


def quantize_model(
    model_dir: str | Path,
    out_dir: str | Path,
    cfg: QuantizeConfig,
    calibration: Sequence[Sequence[Mapping[str, str]]] | None = None,
) -> dict[str, Any]:
    """GPTQ-quantize the float model in ``model_dir`` into ``out_dir``; returns the quantization report.

    ``calibration`` defaults to :func:`~qes.quantize.calibration.builtin_calibration_prompts`
    (``cfg.calibration_samples`` of them). The output folder appears only when everything succeeded (it is
    built in a temporary sibling folder).
    """
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} holds no config.json; run fetch_model first")
    start = time.perf_counter()
    widths = linear_in_features(model_dir)
    check_group_size(widths, cfg)
    refuse_overlap(out_dir, {"float model": model_dir}, "output folder")
    dtypes = (COMPUTE_DTYPE, stored_float_dtype(model_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    calibration_texts, heldout_texts = prompt_texts(tokenizer, cfg, calibration)

    with atomic_dir(out_dir) as tmp:
        t0 = time.perf_counter()
        gptq = run_gptq(model_dir, tmp, cfg, calibration_texts, dtypes[0])
        timings = {**gptq["timings"], "gptq_process_s": time.perf_counter() - t0}
        tokenizer.save_pretrained(str(tmp))
        keep_generation_settings(model_dir, tmp)

        t0 = time.perf_counter()
        layers, quality = measure(tmp, model_dir, widths, tokenizer, heldout_texts)
        timings["evaluate_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - start
        report = build_report(model_dir, tmp, cfg, dtypes, gptq, len(calibration_texts), layers, quality, timings)
        write_report(tmp, report)
        log.info("quantized %s -> %s: %s", model_dir, out_dir, json.dumps(quality))
    return report
