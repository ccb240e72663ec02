"""Rule replay: re-derive the tuned checkpoint from the base and the seed log alone; fail on any mismatch."""

import json
from pathlib import Path

import torch

from qes.logutil import log_to
from qes.replay import replay_checkpoint

with log_to(snakemake.log[0]) as log:
    torch.set_num_threads(snakemake.threads)
    expected = json.loads(Path(snakemake.input.summary).read_text())["codes_sha256"]
    report = replay_checkpoint(snakemake.input.model, snakemake.params.seed_log, snakemake.output.model)
    if report["codes_sha256"] != expected:
        raise RuntimeError(
            f"replay gave codes_sha256 {report['codes_sha256']}, finetune reported {expected}"
        )
    log.info("replay verified: %s", json.dumps(report))
