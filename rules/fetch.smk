# Stage fetch_model: the float model (bundled GGUF, Hugging Face Hub or a local folder) as safetensors.


localrules:
    fetch_model,


rule fetch_model:
    output:
        model=directory("results/models/{model}"),
    log:
        "logs/fetch_model/{model}.log",
    benchmark:
        "benchmarks/fetch_model/{model}.tsv"
    conda:
        conda_env()
    resources:
        mem_mb=4000,
    params:
        model=config["model"],
    script:
        "../scripts/fetch_model.py"
