"""Devices on SLURM: the exact sbatch flags of finetune and evaluate, recorded by stub SLURM commands.

No cluster is needed: `sbatch`, `squeue`, `sinfo`, `scontrol`, `sacct` and `scancel` on PATH are stubs, and
`nvidia-smi` is either a stub that lists a GPU or absent (on a machine that has one, a stub that fails like
a machine without a driver hides it). The workflow runs with the SLURM executor and the project's cluster
profile; the stub `sbatch` records its arguments and the resolved device its environment carries, then
refuses the job, so the run ends at once. Every target's inputs are placeholder files, and finetune (run
`a`) and evaluate (run `b`) are independent, so both are submitted in the same run.

A second test runs the two rules locally with stand-in scripts that record what the jobs receive.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from _workflow import GPU_JOB_TARGETS, copy_workflow, placeholder_inputs

# sbatch options that say where a job runs and with what: partition, tasks, GPUs, CPUs, nodes.
PLACEMENT = ("-p", "--ntasks", "--ntasks-per-gpu", "--ntasks-per-node", "--gpus", "--gpus-per-task", "--gres",
             "--cpus-per-task", "--cpus-per-gpu", "--nodes")

SBATCH = """#!{python}
import json, os, sys
with open({log!r}, "a") as log:
    log.write(json.dumps({{"argv": sys.argv[1:], "device": os.environ.get("QES_RESOLVED_DEVICE")}}) + "\\n")
sys.stderr.write("stub sbatch: recorded, not submitted\\n")
sys.exit(1)
"""
STUBS = {
    "squeue": "#!/bin/sh\nexit 0\n",
    "sacct": "#!/bin/sh\nexit 0\n",
    "scancel": "#!/bin/sh\nexit 0\n",
    "sinfo": "#!/bin/sh\necho PARTITION\necho 'cpu*'\necho gpu\n",
    "scontrol": "#!/bin/sh\necho 'MaxArraySize            = 1001'\necho 'MinJobAge               = 300 sec'\n",
}
NVIDIA_SMI = {
    "gpu": "#!/bin/sh\n[ \"$1\" = -L ] && echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0a1b2c3d-0000-0000-0000)'\n",
    "failing": "#!/bin/sh\necho 'NVIDIA-SMI has failed: it could not communicate with the NVIDIA driver.'\nexit 9\n",
}

CPU_JOB = {"-p": "cpu", "--ntasks": "1", "--cpus-per-task": "8"}
# never --ntasks-per-gpu: beside --cpus-per-task it makes the jobstep's srun fail on Slurm 23.11+
GPU_JOB = {"-p": "gpu", "--gpus": "1", "--cpus-per-task": "8"}
SRUN_2_GPUS = {"-p": "gpu", "--ntasks": "2", "--gpus": "2", "--cpus-per-task": "8"}
TORCHRUN_2_GPUS = {"-p": "gpu", "--nodes": "1", "--gpus": "2", "--cpus-per-task": "8"}
# case: (finetune config, nvidia-smi stub or None, resolved device, finetune flags, evaluate flags)
CASES = {
    "cpu": ("{device: cpu}", "gpu", "cpu", CPU_JOB, CPU_JOB),
    "cuda": ("{device: cuda}", None, "cuda", GPU_JOB, GPU_JOB),
    "auto-with-gpu": ("{device: auto}", "gpu", "cuda", GPU_JOB, GPU_JOB),
    "auto-without-gpu": ("{device: auto}", None, "cpu", CPU_JOB, CPU_JOB),
    "cuda-srun-2-ranks": ("{device: cuda, ranks: 2, launcher: srun}", None, "cuda", SRUN_2_GPUS, GPU_JOB),
    "cuda-torchrun-2-ranks": ("{device: cuda, ranks: 2, launcher: torchrun}", None, "cuda", TORCHRUN_2_GPUS, GPU_JOB),
}


def _stub_bin(directory: Path, nvidia_smi: str | None, log: Path) -> dict[str, str]:
    directory.mkdir(parents=True)
    scripts = {**STUBS, "sbatch": SBATCH.format(python=sys.executable, log=str(log))}
    if nvidia_smi:
        scripts["nvidia-smi"] = NVIDIA_SMI[nvidia_smi]
    elif shutil.which("nvidia-smi"):
        scripts["nvidia-smi"] = NVIDIA_SMI["failing"]  # this machine has one: hide it
    for name, text in scripts.items():
        (directory / name).write_text(text)
        (directory / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
    env.pop("QES_RESOLVED_DEVICE", None)
    return {**env, "PATH": f"{directory}{os.pathsep}{env['PATH']}", "PYTHONWARNINGS": "ignore"}


def _snakemake(workdir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "snakemake", *args], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)


def _submit(root: Path, case: str) -> tuple[dict, subprocess.CompletedProcess]:
    finetune, nvidia_smi, _, _, _ = CASES[case]
    workdir = copy_workflow(root / case / "workflow")
    placeholder_inputs(workdir)
    log = root / case / "sbatch.jsonl"
    env = _stub_bin(root / case / "bin", nvidia_smi, log)
    result = _snakemake(
        workdir, env,
        "--workflow-profile", "profiles/slurm",
        "--default-resources", "slurm_partition=cpu", "runtime=10", "mem_mb=1000",
        "--slurm-no-account", "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
        "--config", f"finetune={finetune}", "slurm={gpu_partition: gpu}",
        "--allowed-rules", "finetune", "evaluate", "--rerun-triggers", "mtime",
        "--keep-going", "--jobs", "2", "--latency-wait", "1", *GPU_JOB_TARGETS,
    )
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return {_rule(call["argv"]): call for call in calls}, result


def _rule(argv: list[str]) -> str:
    comment = argv[argv.index("--comment") + 1]  # rule_<name>_wildcards_<run>
    return comment.removeprefix("rule_").split("_wildcards_")[0]


def _placement(argv: list[str]) -> dict[str, str]:
    """The placement options of an sbatch call, as {option: value} (an option given twice fails the test)."""
    flags: dict[str, str] = {}
    words = iter(argv)
    for word in words:
        if word.startswith("--wrap"):
            break
        name, sep, value = word.partition("=")
        if name not in PLACEMENT:
            continue
        if not sep:
            value = next(words)
        assert name not in flags, f"{name} given twice: {shlex.join(argv)}"
        flags[name] = value
    return flags


@pytest.fixture(scope="module")
def submissions(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every case submitted once, all at the same time: each run mostly waits (the executor pauses 5 s before
    it calls sbatch)."""
    root = tmp_path_factory.mktemp("slurm-devices")
    with ThreadPoolExecutor(max_workers=len(CASES)) as pool:
        return dict(zip(CASES, pool.map(lambda case: _submit(root, case), CASES)))


@pytest.mark.parametrize("case", list(CASES))
def test_sbatch_flags_follow_the_resolved_device(submissions: dict, case: str) -> None:
    calls, result = submissions[case]
    output = result.stdout[-3000:] + result.stderr[-4000:]
    assert set(calls) == {"finetune", "evaluate"}, f"sbatch calls: {calls}\n{output}"
    assert "stub sbatch: recorded, not submitted" in output
    _, _, device, finetune, evaluate = CASES[case]
    for rule, expected in (("finetune", finetune), ("evaluate", evaluate)):
        argv = calls[rule]["argv"]
        shown = shlex.join(word for word in argv if not word.startswith("--wrap"))
        assert _placement(argv) == expected, f"{rule}: sbatch {shown}"
        assert calls[rule]["device"] == (device if "auto" in case else None), rule


STAND_IN = """import json
from pathlib import Path

record = {"params": dict(snakemake.params.items()), "resources": dict(snakemake.resources.items())}
Path(f"{snakemake.rule}-{snakemake.wildcards.run}.json").write_text(json.dumps(record, default=str))
for out in snakemake.output:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir() if not path.suffix else path.touch()
"""


@pytest.mark.parametrize(
    ("nvidia_smi", "inherited", "mode", "device"),
    [("gpu", None, "default", "cuda"), ("failing", "cuda", "default", "cpu"), (None, "cuda", "subprocess", "cuda")],
    ids=["auto-with-gpu", "auto-driver-fails-stale-value-ignored", "job-takes-the-submitter-value"],
)
def test_jobs_receive_the_resolved_device_backend_and_dtype(
    tmp_path: Path, nvidia_smi: str | None, inherited: str | None, mode: str, device: str
) -> None:
    workdir = copy_workflow(tmp_path / "workflow")
    placeholder_inputs(workdir)
    for script in ("finetune.py", "evaluate.py"):
        (workdir / "scripts" / script).write_text(STAND_IN)
    env = _stub_bin(tmp_path / "bin", nvidia_smi, tmp_path / "sbatch.jsonl")
    if inherited:
        env["QES_RESOLVED_DEVICE"] = inherited
    result = _snakemake(
        workdir, env, *GPU_JOB_TARGETS, "--cores", "1", "--mode", mode, "--allowed-rules", "finetune", "evaluate",
        "--rerun-triggers", "mtime", "--config", "finetune={device: auto, backend: dense, dtype: float32}",
        "evaluate={backend: dense, dtype: bfloat16}",  # int4pack would be refused where the device is cuda
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    finetune = json.loads((workdir / "finetune-a.json").read_text())
    evaluate = json.loads((workdir / "evaluate-b.json").read_text())
    assert finetune["params"]["finetune"]["device"] == device
    assert (finetune["params"]["finetune"]["backend"], finetune["params"]["finetune"]["dtype"]) == ("dense", "float32")
    assert finetune["params"]["finetune"]["run"] == "a"
    assert evaluate["params"]["device"] == device
    assert evaluate["params"]["evaluate"] == {"max_new_tokens": 64, "batch_size": 32, "limit": None,
                                              "backend": "dense", "dtype": "bfloat16"}
    gpus = 1 if device == "cuda" else None
    assert finetune["resources"].get("gpu") == gpus and evaluate["resources"].get("gpu") == gpus
