# The comparison of the paper on the configured model: `snakemake experiments` trains every method of
# `experiments.methods` for every seed (runs exp-<method>-s<seed>, through the finetune and replay rules),
# scores the base and each tuned model on the same held-out prompts and writes results/experiments/.
# `snakemake sweep` scores the step-size candidates of `experiments.sweep` on the training reward only.


rule experiments:
    input:
        "results/experiments/summary.json",
        "results/experiments/reward_curves.png",


rule sweep:
    input:
        "results/experiments/sweep.json",


rule experiment_summary:
    input:
        base=lambda wildcards: quantized_model(),
        eval=lambda wildcards: task_data("eval"),
        tuned=lambda wildcards: expand("results/replay/{run}", run=experiment_runs()),
        metrics=lambda wildcards: expand(
            "results/finetune/{run}/metrics.parquet", run=experiment_runs()
        ),
    output:
        summary=report(
            "results/experiments/summary.json",
            caption="../workflow/report/experiments.rst",
            category="Experiments",
        ),
        table="results/experiments/table.md",
        curves=report(
            "results/experiments/reward_curves.png",
            caption="../workflow/report/experiments.rst",
            category="Experiments",
        ),
        heldout=directory("results/experiments/heldout"),
    log:
        "logs/experiments/summary.log",
    benchmark:
        "benchmarks/experiments/summary.tsv"
    conda:
        conda_env()
    threads: max(1, workflow.cores)
    resources:
        **evaluate_resources(),
        mem_mb=6000,
    params:
        experiments=lambda wildcards: config["experiments"],
        evaluate=lambda wildcards: config["evaluate"],
        device=lambda wildcards: resolved_device(),
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
