# The comparison of the paper on the configured model: `snakemake experiments` trains every method of
# `experiments.methods` for every seed (runs exp-<method>-s<seed>, through the finetune rule), scores the
# base and each run at its curve points (the seed log replayed to that iteration) on the same prompts, and
# writes the tables and figures to experiments.report_dir. Every scored point is kept there too
# (curve_points/): a later run, on any machine, reuses a kept point whose inputs are unchanged
# (qes.pointstore).
# `snakemake sweep` scores the step-size candidates of `experiments.sweep` on the training reward only.


rule experiments:
    input:
        report_file("summary.json"),
        report_file("score_curves.png"),
        report_file("reward_curves.png"),


rule sweep:
    input:
        "results/experiments/sweep.json",


rule experiment_point:
    input:
        base=lambda wildcards: run_model(wildcards.name),
        summary=lambda wildcards: point_summary(wildcards.name),
        data=lambda wildcards: task_data(config["experiments"]["score_split"]),
    output:
        point="results/experiments/points/{name}/it-{iteration}.json",
        examples="results/experiments/points/{name}/it-{iteration}_examples.parquet",
    log:
        "logs/experiments/points/{name}/it-{iteration}.log",
    benchmark:
        "benchmarks/experiments/points/{name}/it-{iteration}.tsv"
    conda:
        conda_env()
    threads: max(1, workflow.cores)
    resources:
        **evaluate_resources(),
        mem_mb=6000,
    params:
        seed_log=lambda wildcards: point_seed_log(wildcards.name),
        evaluate=lambda wildcards: config["evaluate"],
        limit=lambda wildcards: config["experiments"]["eval_limit"],
        device=lambda wildcards: resolved_device(),
    script:
        "../scripts/experiment_point.py"


rule experiment_summary:
    input:
        points=lambda wildcards: experiment_point_files(),
        examples=lambda wildcards: experiment_point_files("_examples.parquet"),
        metrics=lambda wildcards: expand(
            "results/finetune/{run}/metrics.parquet", run=experiment_runs()
        ),
        data=lambda wildcards: task_data(config["experiments"]["score_split"]),
    output:
        summary=report(
            report_file("summary.json"),
            caption="../workflow/report/experiments.rst",
            category="Experiments",
        ),
        table=report_file("table.md"),
        # updated in place: Snakemake would otherwise delete the kept points before the job runs, and a
        # failing summary would lose the ones not yet committed; `update` restores the folder on failure
        kept=update(directory(report_file("curve_points"))),
        scores=report(
            report_file("score_curves.png"),
            caption="../workflow/report/score_curves.rst",
            category="Experiments",
        ),
        curves=report(
            report_file("reward_curves.png"),
            caption="../workflow/report/experiments.rst",
            category="Experiments",
        ),
    log:
        "logs/experiments/summary.log",
    conda:
        conda_env()
    params:
        experiments=lambda wildcards: config["experiments"],
        bits=lambda wildcards: config["quantize"]["bits"],
        seed_logs=lambda wildcards: [seed_log_dir(run) for run in experiment_runs()],
    script:
        "../scripts/experiment_summary.py"


rule sweep_summary:
    input:
        metrics=lambda wildcards: expand(
            "results/finetune/{run}/metrics.parquet", run=experiment_runs("sweep_runs")
        ),
    output:
        "results/experiments/sweep.json",
    log:
        "logs/experiments/sweep.log",
    conda:
        conda_env()
    params:
        experiments=lambda wildcards: config["experiments"],
    script:
        "../scripts/sweep_summary.py"
