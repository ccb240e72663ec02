"""Rule experiment_summary: held-out scores of the base and every tuned model, mean ± std per method, curves."""

import torch

from qes.evaluate import EvaluateConfig
from qes.experiments import ExperimentConfig, evaluate_all, plot_curves, summarize, table, write_report
from qes.logutil import log_to

with log_to(snakemake.log[0]) as log:
    torch.set_num_threads(snakemake.threads)
    cfg = ExperimentConfig.from_dict(snakemake.params.experiments)
    runs = cfg.runs()
    evaluate = EvaluateConfig(
        **{**snakemake.params.evaluate, "limit": cfg.eval_limit}, device=snakemake.params.device
    )
    heldout = evaluate_all(
        snakemake.input.base,
        dict(zip(runs, snakemake.input.tuned)),
        snakemake.input.eval,
        evaluate,
        out_dir=snakemake.output.heldout,
    )
    summary = summarize(heldout, cfg)
    write_report(summary, snakemake.output.summary, snakemake.output.table)
    plot_curves(dict(zip(runs, snakemake.input.metrics)), cfg, snakemake.output.curves)
    log.info("held-out, mean ± std over seeds:\n%s", table(summary))
