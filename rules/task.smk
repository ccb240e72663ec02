# Stage make_task_data: the task's train and held-out rows (generated Countdown problems, or your own data
# for a dataset task), prompted with the model's chat template.


rule make_task_data:
    input:
        model=lambda wildcards: model_dir(),
        data=lambda wildcards: task_inputs(),
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
