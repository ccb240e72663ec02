# qes: fine-tune GPTQ-quantized language models in their integer code space with
# Quantized Evolution Strategies.
#
#   snakemake --cores all                      # the embedded default (config/config.yaml)
#   snakemake --cores all --configfile config/examples/<example>.yaml

import re

from snakemake.utils import min_version, validate

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "rules/common.smk"


coerce_cli_values(config, "workflow/schemas/config.schema.yaml")
validate(config, "workflow/schemas/config.schema.yaml")
check_config_rules()


wildcard_constraints:
    model=re.escape(config["model"]["name"]),
    bits=r"\d+",
    group=r"\d+",
    iteration=r"\d+",


include: "rules/fetch.smk"
include: "rules/quantize.smk"
include: "rules/task.smk"
include: "rules/finetune.smk"
include: "rules/experiments.smk"


rule all:
    input:
        f"results/export/{run_name()}",
        f"results/eval/{run_name()}/training_reward.png",
        f"results/eval/{run_name()}/base_vs_tuned.png",
