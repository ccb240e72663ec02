"""Rule finetune: run (or resume) QES on the quantized model; the seed log is the run's only state."""

import json

import torch

from qes.finetune import run_finetune
from qes.logutil import log_to

with log_to(snakemake.log[0]) as log:
    torch.set_num_threads(snakemake.threads)
    block = snakemake.params.finetune
    log.info("finetune settings: %s", block)
    summary = run_finetune(
        snakemake.input.model,
        snakemake.input.train,
        snakemake.params.seed_log,
        block,
        threads=snakemake.threads,
    )
    metrics = f"{snakemake.params.seed_log}/metrics.parquet"
    with open(metrics, "rb") as src, open(snakemake.output.metrics, "wb") as dst:
        dst.write(src.read())
    with open(snakemake.output.summary, "w") as handle:
        json.dump(summary, handle, indent=2)
    log.info("finished: %s", json.dumps(summary))
