"""Rule make_task_data: write the task's train and held-out rows with their prompts as Parquet."""

import json

from transformers import AutoTokenizer

from qes.logutil import log_to
from qes.tasks import make_task_data

with log_to(snakemake.log[0]) as log:
    log.info("task settings: %s", snakemake.params.task)
    tokenizer = AutoTokenizer.from_pretrained(snakemake.input.model)
    summary = make_task_data(
        snakemake.params.task, tokenizer, snakemake.output.train, snakemake.output.eval
    )
    log.info("wrote %s", json.dumps(summary))
