"""Rule finetune: run (or resume) QES on the quantized model; the seed log is the run's only state."""

import json
from pathlib import Path

import torch

from qes.finetune import run_finetune
from qes.fsutil import write_file_atomic
from qes.logutil import log_to
from qes.replaystate import run_state_dir

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
        state_dir=run_state_dir(snakemake.wildcards.run),
    )
    metrics = Path(snakemake.params.seed_log) / "metrics.parquet"
    write_file_atomic(snakemake.output.metrics, metrics.read_bytes())
    write_file_atomic(snakemake.output.summary, json.dumps(summary, indent=2))
    log.info("finished: %s", json.dumps(summary))
