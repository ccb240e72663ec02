# Helpers shared by the Snakefile and the rules. Nothing here reads the config at include time:
# the config is validated (and completed with the schema's defaults) after this file is included.

import yaml


def coerce_cli_values(values, schema_file):
    """Turn strings that --config left unparsed (nested entries arrive as text) into the schema's type.

    `--config quantize='{bits: 8}'` gives {'bits': '8'}; this makes it 8, so the schema judges the value
    rather than its spelling. Strings whose parsed value does not fit the schema are left as they are.
    """
    with open(schema_file) as handle:
        schema = yaml.safe_load(handle)
    _coerce(values, schema)


def _coerce(values, schema):
    kinds = {
        "integer": int,
        "number": (int, float),
        "boolean": bool,
        "null": type(None),
    }
    for key, sub in schema.get("properties", {}).items():
        if key not in values:
            continue
        value = values[key]
        if isinstance(value, dict):
            _coerce(value, sub)
            continue
        types = sub.get("type", [])
        types = [types] if isinstance(types, str) else types
        if not isinstance(value, str) or "string" in types:
            continue
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError:
            continue
        if any(isinstance(parsed, kinds[t]) for t in types if t in kinds):
            if not (isinstance(parsed, bool) and "boolean" not in types):
                values[key] = parsed


def model_dir():
    """Folder of the fetched float model."""
    return f"results/models/{config['model']['name']}"


def quantized_model(bits=None, group=None):
    """Folder of the GPTQ model for the configured (or given) bits and group size."""
    bits = config["quantize"]["bits"] if bits is None else bits
    group = config["quantize"]["group_size"] if group is None else group
    return f"results/quantized/{config['model']['name']}-w{bits}g{group}"


def quantize_settings(wildcards):
    """The quantize block of the config, with bits and group size taken from the target's name."""
    return {
        **config["quantize"],
        "bits": int(wildcards.bits),
        "group_size": int(wildcards.group),
    }


def task_data(split):
    """Train or held-out Parquet file of the configured task."""
    return f"results/data/{config['task']['name']}/{split}.parquet"


def run_name():
    """Name of the fine-tuning run (folder under results/runs, finetune, replay, eval, export)."""
    return config["finetune"]["run"]


def seed_log_dir(run):
    """Folder of a run's seed log: the run's only state, never a declared output."""
    return f"results/runs/{run}"


def finetune_gpus():
    """GPUs the finetune job asks for: one per rank when the config asks for CUDA, else none."""
    return config["finetune"]["ranks"] if config["finetune"]["device"] == "cuda" else 0


def finetune_mpi():
    """The launcher as the SLURM executor's `mpi` resource when ranks are started by srun, else unset.

    With it, the executor gives the job one task per rank and leaves starting them to the job itself.
    """
    ranks, launcher = config["finetune"]["ranks"], config["finetune"]["launcher"]
    return "srun" if ranks > 1 and launcher == "srun" else None


def experiment_settings():
    """The config's experiments block as a qes.experiments.ExperimentConfig."""
    from qes.experiments import ExperimentConfig

    return ExperimentConfig.from_dict(config["experiments"])


def finetune_settings(run):
    """Finetune settings of a run: experiment (exp-*) and sweep (sweep-*) runs derive theirs from the config."""
    from qes.experiments import finetune_block

    return finetune_block(run, config["finetune"], experiment_settings())


def experiment_runs(kind="runs"):
    """Run names of the comparison (kind='runs') or of the step-size sweep (kind='sweep_runs')."""
    return getattr(experiment_settings(), kind)()
