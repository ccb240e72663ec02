"""Rule make_task_data: write the task's train and held-out problems with their prompts as Parquet."""

import json

from transformers import AutoTokenizer

from qes.logutil import log_to
from qes.tasks.countdown import TaskSettings, make_task_data

with log_to(snakemake.log[0]) as log:
    settings = TaskSettings.from_dict(snakemake.params.task)
    log.info("task settings: %s", settings)
    tokenizer = AutoTokenizer.from_pretrained(snakemake.input.model)
    summary = make_task_data(settings, tokenizer, snakemake.output.train, snakemake.output.eval)
    log.info("wrote %s", json.dumps(summary))
