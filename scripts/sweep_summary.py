"""Rule sweep_summary: the step-size candidates ranked by training reward alone (the held-out set is unused)."""

import json

from qes.experiments import ExperimentConfig, summarize_sweep
from qes.logutil import log_to

with log_to(snakemake.log[0]) as log:
    cfg = ExperimentConfig.from_dict(snakemake.params.experiments)
    result = summarize_sweep(dict(zip(cfg.sweep_runs(), snakemake.input.metrics)), cfg)
    with open(snakemake.output[0], "w") as handle:
        json.dump(result, handle, indent=2)
    log.info("sweep: %s", json.dumps(result["best"]))
