# Stage quantize: GPTQ INT4/INT8 through GPTQModel, with a quality report against the float model.


rule quantize:
    input:
        model="results/models/{model}",
    output:
        model=report(
            directory("results/quantized/{model}-w{bits}g{group}"),
            patterns=["quant_{kind}.json"],
            caption="../workflow/report/quant_report.rst",
            category="Quantization",
        ),
    log:
        "logs/quantize/{model}-w{bits}g{group}.log",
    benchmark:
        "benchmarks/quantize/{model}-w{bits}g{group}.tsv"
    conda:
        conda_env()
    threads: max(1, workflow.cores)
    resources:
        mem_mb=8000,
        runtime=60,
    params:
        quantize=quantize_settings,
    script:
        "../scripts/quantize.py"
