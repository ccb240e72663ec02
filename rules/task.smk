# Stage make_task_data: train and held-out Countdown problems (generated, or from JSON files), prompted with
# the model's chat template.


rule make_task_data:
    input:
        model=lambda wildcards: model_dir(),
    output:
        train="results/data/{task}/train.parquet",
        eval="results/data/{task}/eval.parquet",
    log:
        "logs/make_task_data/{task}.log",
    benchmark:
        "benchmarks/make_task_data/{task}.tsv"
    conda:
        conda_env()
    resources:
        mem_mb=2000,
    params:
        task=lambda wildcards: {**config["task"], "name": wildcards.task},
    script:
        "../scripts/make_task_data.py"
