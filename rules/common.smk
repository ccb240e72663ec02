# Helpers shared by the Snakefile and the rules. Nothing here reads the config at include time:
# the config is validated (and completed with the schema's defaults) after this file is included.

import os
import re
import subprocess

import yaml


def coerce_cli_values(values, schema_file):
    """Turn strings that --config left unparsed (nested entries arrive as text) into the schema's type.

    `--config quantize='{bits: 8}'` gives {'bits': '8'}; this makes it 8, so the schema judges the value
    rather than its spelling. Strings whose parsed value does not fit the schema are left as they are.
    """
    with open(schema_file) as handle:
        schema = yaml.safe_load(handle)
    _coerce(values, schema)


_KINDS = {"integer": int, "number": (int, float), "boolean": bool, "null": type(None)}


def _coerce(values, schema):
    for key, sub in schema.get("properties", {}).items():
        if key in values:
            values[key] = _coerced(values[key], sub)


def _coerced(value, schema):
    """`value` in the schema's type where it is a string that parses to it (lists item by item)."""
    if isinstance(value, dict):
        _coerce(value, schema)
        return value
    if isinstance(value, list):
        return [_coerced(item, schema.get("items", {})) for item in value]
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    if not isinstance(value, str) or "string" in types:
        return value
    try:
        parsed = yaml.safe_load(value)
    except yaml.YAMLError:
        return value
    if isinstance(parsed, bool) and "boolean" not in types:
        return value
    if any(isinstance(parsed, _KINDS[t]) for t in types if t in _KINDS):
        return parsed
    return value


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


def run_model(run):
    """Base GPTQ model of a run or curve point: experiment methods ending in -w<bits> use that width."""
    from qes.experiments import run_bits

    return quantized_model(bits=run_bits(run))


def experiment_point_files(suffix=".json"):
    """Scores of every curve point of the comparison: each base at iteration 0, each run at its points."""
    default_bits = config["quantize"]["bits"]
    return [
        f"results/experiments/points/{name}/it-{iteration}{suffix}"
        for name, iteration in experiment_settings().points(default_bits)
    ]


def point_seed_log(name):
    """The seed log a curve point replays (none for a base model)."""
    return [] if name.startswith("base-") else seed_log_dir(name)


def point_summary(name):
    """A run's curve points need the finished run; `ancient` keeps them when the run later grows."""
    if name.startswith("base-"):
        return []
    return ancient(f"results/finetune/{name}/summary.json")


def report_file(name):
    """A file of the comparison's report folder (experiments.report_dir)."""
    return f"{config['experiments']['report_dir']}/{name}"


def task_inputs():
    """Local files the task stage reads (problem files, dataset files, a user reward's file): an edit reruns it."""
    import qes.tasks

    return qes.tasks.task_inputs(config["task"])


def task_data(split):
    """Train or held-out Parquet file of the configured task."""
    return f"results/data/{config['task']['name']}/{split}.parquet"


def run_name():
    """Name of the fine-tuning run (folder under results/runs, finetune, replay, eval, export)."""
    return config["finetune"]["run"]


def seed_log_dir(run):
    """Folder of a run's seed log: the run's only state, never a declared output.

    Experiment and sweep runs live under experiments.log_dir when it is set (logs committed with the
    experiment and continued from there).
    """
    log_dir = config["experiments"]["log_dir"]
    if log_dir is not None and re.match(r"^(exp|sweep)-", run):
        return f"{log_dir}/{run}"
    return f"results/runs/{run}"


# Environment variable through which the device resolved by the main Snakemake process reaches the
# Snakemake of each cluster job (the SLURM executor submits with --export=ALL), so a job never resolves
# `auto` again on a node that may see other hardware than the machine that planned it.
RESOLVED_DEVICE_VARIABLE = "QES_RESOLVED_DEVICE"
RESOLVED_CUDA_BUILD_VARIABLE = "QES_RESOLVED_CUDA_BUILD"
_resolved = {}


def nvidia_gpu_listed():
    """True when `nvidia-smi -L` runs and lists at least one GPU (torch is not imported to find out)."""
    try:
        listing = subprocess.run(
            ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return listing.returncode == 0 and bool(
        re.search(r"^GPU \d+:", listing.stdout, flags=re.M)
    )


def resolved_device():
    """`finetune.device` with `auto` resolved once: cuda when this machine sees an NVIDIA GPU, else cpu.

    finetune, evaluate and experiment_point get this value (never `auto`), and it decides whether they
    ask for GPUs. A job's own Snakemake (cluster execution) takes the value its submitter resolved.
    """
    device = config["finetune"]["device"]
    if device != "auto":
        return device
    if "auto" not in _resolved:
        inherited = os.environ.get(RESOLVED_DEVICE_VARIABLE)
        spawned = workflow.remote_exec or workflow.subprocess_exec
        if spawned and inherited in ("cpu", "cuda"):
            _resolved["auto"] = inherited
        else:
            _resolved["auto"] = "cuda" if nvidia_gpu_listed() else "cpu"
        os.environ[RESOLVED_DEVICE_VARIABLE] = _resolved["auto"]
    return _resolved["auto"]


def uses_gpu():
    """Whether finetune, evaluate and experiment_point run on a GPU."""
    return resolved_device() == "cuda"


def cuda_build():
    """`conda.cuda_build` with `auto` resolved once, by envs/torch-build.sh: cu126 when nvidia-smi here reports
    a driver older than 580, else cu13 (also where no GPU is listed, e.g. on a login node). Cluster jobs take
    the value their submitter resolved, as they do for the device.
    """
    build = config["conda"]["cuda_build"]
    if build != "auto":
        return build
    if "cuda_build" not in _resolved:
        inherited = os.environ.get(RESOLVED_CUDA_BUILD_VARIABLE)
        spawned = workflow.remote_exec or workflow.subprocess_exec
        if spawned and inherited in ("cu13", "cu126"):
            # a job uses the environment its submitter planned
            build = inherited
        else:
            script = os.path.join(workflow.basedir, "envs", "torch-build.sh")
            found = subprocess.run(["sh", script], capture_output=True, text=True)
            build = "cu126" if found.stdout.strip() == "cu126" else "cu13"
        _resolved["cuda_build"] = build
        os.environ[RESOLVED_CUDA_BUILD_VARIABLE] = _resolved["cuda_build"]
    return _resolved["cuda_build"]


def conda_env():
    """Conda environment of every job under --use-conda: a CUDA build of torch when the jobs use a GPU."""
    if not uses_gpu():
        return "../envs/qes-cpu.yaml"
    return (
        "../envs/qes-cu126.yaml" if cuda_build() == "cu126" else "../envs/qes-cuda.yaml"
    )


def _gpu_partition():
    """The partition of GPU jobs, when `slurm.gpu_partition` names one; else the jobs keep the default one."""
    partition = config["slurm"]["gpu_partition"]
    return {"slurm_partition": partition} if partition else {}


def finetune_resources():
    """Task, GPU and partition resources of the finetune job for the SLURM executor.

    srun ranks (ranks > 1, launcher srun) are one task each (`tasks` and `mpi`); torchrun ranks are
    processes of a single task. On a GPU the job asks for one GPU per rank (`gpu`: --gpus=N) and never for
    --ntasks-per-gpu (`tasks_per_gpu` 0): next to the --cpus-per-task that every job gets, Slurm 23.11+ makes
    the plugin's inner srun fail with "SLURM_TRES_PER_TASK is mutually exclusive with --ntasks-per-gpu".
    Each rank takes the GPU local rank modulo the GPUs it sees (qes.dist), so it works whether or not the
    cluster binds GPUs to tasks. A CPU job asks for no GPU and stays on the default partition.
    """
    ranks, launcher = config["finetune"]["ranks"], config["finetune"]["launcher"]
    srun = ranks > 1 and launcher == "srun"
    resources = {"tasks": ranks if srun else 1}
    if srun:
        resources["mpi"] = "srun"
    if uses_gpu():
        resources.update(gpu=ranks, tasks_per_gpu=0)
        if not srun and ranks > 1:
            resources["nodes"] = 1
        resources.update(_gpu_partition())
    return resources


def evaluate_resources():
    """Resources of evaluate and experiment_point (one process): one GPU when finetune uses GPUs."""
    if not uses_gpu():
        return {"tasks": 1}
    return {"tasks": 1, "gpu": 1, "tasks_per_gpu": 0, **_gpu_partition()}


def experiment_settings():
    """The config's experiments block as a qes.experiments.ExperimentConfig."""
    from qes.experiments import ExperimentConfig

    return ExperimentConfig.from_dict(config["experiments"])


def finetune_settings(run):
    """Finetune settings of a run: experiment (exp-*) and sweep (sweep-*) runs derive theirs from the config."""
    from qes.experiments import finetune_block

    base = {**config["finetune"], "device": resolved_device()}
    return finetune_block(run, base, experiment_settings())


def experiment_runs(kind="runs"):
    """Run names of the comparison (kind='runs') or of the step-size sweep (kind='sweep_runs')."""
    return getattr(experiment_settings(), kind)()


def check_config_rules():
    """Rules across keys (ranges, files, population vs shaping, backend vs device), checked before any
    job runs; the device is the resolved one (`auto` decided here)."""
    from qes.config import check_rules

    check_rules(config, device=resolved_device())


def resumable_run(run):
    """Refuse, while jobs are planned, a run whose existing seed log has other settings (returns no files).

    Snakemake removes a job's old outputs before it runs; checking here keeps a finished run's summary and
    metrics when the new settings would be refused anyway.
    """
    from qes.runrecord import check_resumable

    check_resumable(
        seed_log_dir(run), finetune_settings(run), run_model(run), task_data("train")
    )
    return []
