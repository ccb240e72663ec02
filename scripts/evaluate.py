"""Rule evaluate: held-out evaluation of the base and the tuned model on the same prompts, plus plots."""

import json

import torch

from qes.evaluate import EvaluateConfig, compare
from qes.logutil import log_to
from qes.plots import plot_base_vs_tuned, plot_training_reward

with log_to(snakemake.log[0]) as log:
    torch.set_num_threads(snakemake.threads)
    cfg = EvaluateConfig.from_block(snakemake.params.evaluate, device=snakemake.params.device)
    metrics = compare(
        snakemake.input.base,
        snakemake.input.tuned,
        snakemake.input.eval,
        cfg,
        snakemake.output.metrics,
        snakemake.output.base_examples,
        snakemake.output.tuned_examples,
    )
    plot_training_reward(snakemake.input.train_metrics, snakemake.output.reward_plot)
    plot_base_vs_tuned(metrics, snakemake.output.bars_plot)
    log.info("metrics: %s", json.dumps(metrics, indent=2))
