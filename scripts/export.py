"""Rule export: tuned GPTQ checkpoint + tokenizer + seed log + model card, in one folder."""

import json
from pathlib import Path

from qes.export import export_run
from qes.logutil import log_to

with log_to(snakemake.log[0]) as log:
    metrics = json.loads(Path(snakemake.input.metrics).read_text())
    out = export_run(
        snakemake.input.tuned, snakemake.params.seed_log, snakemake.input.base, metrics, snakemake.output.model
    )
    log.info("exported %s", out)
