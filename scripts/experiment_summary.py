"""Rule experiment_summary: mean ± std over seeds per method at every curve point; tables and figures."""

import json
from pathlib import Path

from qes.diagnostics import experiment_signal
from qes.experiments import ExperimentConfig, plot_curves, plot_scores, summarize, table, write_report
from qes.logutil import log_to
from qes.pointstore import check_provenance, publish_points

with log_to(snakemake.log[0]) as log:
    cfg = ExperimentConfig.from_dict(snakemake.params.experiments)
    points = cfg.points(snakemake.params.bits)
    check_provenance(
        dict(zip(points, snakemake.input.points)),
        dict(zip(cfg.runs(), snakemake.params.seed_logs)),
        snakemake.input.data,
    )
    scores = {
        point: json.loads(Path(path).read_text())
        for point, path in zip(points, snakemake.input.points)
    }
    metrics = dict(zip(cfg.runs(), snakemake.input.metrics))
    signal = experiment_signal(
        cfg.methods,
        cfg.seeds,
        dict(zip(cfg.runs(), snakemake.params.seed_logs)),
        metrics,
        cfg.iterations,
    )
    summary = summarize(scores, cfg, snakemake.params.bits, signal)
    write_report(summary, snakemake.output.summary, snakemake.output.table)
    plot_scores(summary, snakemake.output.scores)
    plot_curves(
        metrics,
        cfg,
        snakemake.output.curves,
        snakemake.params.bits,
    )
    publish_points(dict(zip(points, snakemake.input.points)), snakemake.output.kept)
    log.info("mean ± std over seeds:\n%s", table(summary))
