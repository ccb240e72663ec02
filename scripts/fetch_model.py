"""Rule fetch_model: bring the configured float model into results/models/<name>/."""

from qes.fetch import FetchConfig, fetch_model
from qes.logutil import log_to

with log_to(snakemake.log[0]) as log:
    cfg = FetchConfig.from_dict(snakemake.params.model)
    log.info("fetch settings: %s", cfg)
    manifest = fetch_model(cfg, snakemake.output.model)
    log.info("parameters: %s, files: %s", manifest["parameters"], len(manifest["files"]))
