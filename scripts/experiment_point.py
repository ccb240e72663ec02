"""Rule experiment_point: one point of a run's curve (its seed log replayed to that iteration), scored."""

import torch

from qes.evaluate import EvaluateConfig
from qes.experiments import score_point
from qes.logutil import log_to
from qes.replaystate import run_state_dir

# Replay snapshots are derived data beside the runs, not a rule parameter: a new parameter would make
# Snakemake re-score every point already made under --rerun-triggers params.
# Points kept beside the report (qes.pointstore) are found the same way, from the report folder.
states = run_state_dir(snakemake.wildcards.name) if snakemake.params.seed_log else None
committed = f"{snakemake.config['experiments']['report_dir']}/curve_points/{snakemake.wildcards.name}"

with log_to(snakemake.log[0]) as log:
    torch.set_num_threads(snakemake.threads)
    evaluate = EvaluateConfig.from_block(
        {**snakemake.params.evaluate, "limit": snakemake.params.limit}, device=snakemake.params.device
    )
    point = score_point(
        snakemake.input.base,
        snakemake.params.seed_log or None,
        int(snakemake.wildcards.iteration),
        snakemake.input.data,
        evaluate,
        snakemake.output.point,
        snakemake.output.examples,
        states,
        committed,
    )
    log.info(
        "%s at iteration %s: accuracy %.3f, format rate %.3f, mean reward %.3f (n = %d)",
        snakemake.wildcards.name,
        snakemake.wildcards.iteration,
        point["accuracy"],
        point["format_rate"],
        point["mean_reward"],
        point["n"],
    )
