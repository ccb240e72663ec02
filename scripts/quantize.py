"""Rule quantize: GPTQ-quantize the fetched model and write quant_report.json beside the checkpoint."""

import json

import torch

from qes.logutil import log_to
from qes.quantize import QuantizeConfig, quantize_model

with log_to(snakemake.log[0]) as log:
    torch.set_num_threads(snakemake.threads)
    cfg = QuantizeConfig.from_dict(snakemake.params.quantize)
    log.info("quantize settings: %s", cfg)
    report = quantize_model(snakemake.input.model, snakemake.output.model, cfg)
    log.info("report: %s", json.dumps(report, indent=2))
