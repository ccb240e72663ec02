# Stages finetune, replay, evaluate and export: QES on the integer codes, exact re-derivation from the
# seed log, held-out evaluation of base vs tuned, and a loadable export with its model card.
#
# The seed log lives in results/runs/{run}/ and is deliberately not a declared output: Snakemake deletes
# the outputs of failed jobs, and the log is what an interrupted finetune resumes from.


rule finetune:
    input:
        model=lambda wildcards: run_model(wildcards.run),
        train=lambda wildcards: task_data("train"),
        resumable=lambda wildcards: resumable_run(wildcards.run),
    output:
        summary="results/finetune/{run}/summary.json",
        metrics="results/finetune/{run}/metrics.parquet",
    log:
        "logs/finetune/{run}.log",
    benchmark:
        "benchmarks/finetune/{run}.tsv"
    conda:
        conda_env()
    threads: max(1, workflow.cores)
    resources:
        **finetune_resources(),
        mem_mb=8000,
        runtime=240,
    params:
        finetune=lambda wildcards: finetune_settings(wildcards.run),
        seed_log=lambda wildcards: seed_log_dir(wildcards.run),
    script:
        "../scripts/finetune.py"


rule replay:
    input:
        model=lambda wildcards: run_model(wildcards.run),
        summary="results/finetune/{run}/summary.json",
    output:
        model=directory("results/replay/{run}"),
    log:
        "logs/replay/{run}.log",
    benchmark:
        "benchmarks/replay/{run}.tsv"
    conda:
        conda_env()
    threads: max(1, workflow.cores)
    resources:
        mem_mb=4000,
    params:
        seed_log=lambda wildcards: seed_log_dir(wildcards.run),
    script:
        "../scripts/replay.py"


rule evaluate:
    input:
        base=lambda wildcards: run_model(wildcards.run),
        tuned="results/replay/{run}",
        eval=lambda wildcards: task_data("eval"),
        train_metrics="results/finetune/{run}/metrics.parquet",
    output:
        metrics=report(
            "results/eval/{run}/metrics.json",
            caption="../workflow/report/eval_metrics.rst",
            category="Evaluation",
        ),
        base_examples="results/eval/{run}/base_examples.parquet",
        tuned_examples="results/eval/{run}/tuned_examples.parquet",
        reward_plot=report(
            "results/eval/{run}/training_reward.png",
            caption="../workflow/report/training_reward.rst",
            category="Training",
        ),
        bars_plot=report(
            "results/eval/{run}/base_vs_tuned.png",
            caption="../workflow/report/base_vs_tuned.rst",
            category="Evaluation",
        ),
    log:
        "logs/evaluate/{run}.log",
    benchmark:
        "benchmarks/evaluate/{run}.tsv"
    conda:
        conda_env()
    threads: max(1, workflow.cores)
    resources:
        **evaluate_resources(),
        mem_mb=6000,
    params:
        evaluate=lambda wildcards: config["evaluate"],
        device=lambda wildcards: resolved_device(),
    script:
        "../scripts/evaluate.py"


rule export:
    input:
        base=lambda wildcards: run_model(wildcards.run),
        tuned="results/replay/{run}",
        metrics="results/eval/{run}/metrics.json",
    output:
        model=report(
            directory("results/export/{run}"),
            patterns=["{card}.md"],
            caption="../workflow/report/model_card.rst",
            category="Export",
        ),
    log:
        "logs/export/{run}.log",
    benchmark:
        "benchmarks/export/{run}.tsv"
    conda:
        conda_env()
    resources:
        mem_mb=2000,
    params:
        seed_log=lambda wildcards: seed_log_dir(wildcards.run),
    script:
        "../scripts/export.py"
