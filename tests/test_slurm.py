"""The workflow under a real single-node SLURM cluster (slurmctld + slurmd + munge from Debian's packages).

The module installs the daemons where they are missing (root and apt-get needed), writes
/etc/slurm/slurm.conf (the in-job Snakemake drops SLURM_CONF, so it must be that path), starts them,
runs a tiny configuration with the SLURM executor and the project's cluster profile, checks the
results against a local run of the same configuration, and stops what it started. The finetune job
uses 2 ranks started by srun inside its allocation. Without root or apt-get it skips and says why.

The node also declares fake GPUs (GPUS of them, in /etc/slurm/gres.conf over links to /dev/null: Slurm wants
character devices, and binds them to jobs and steps through CUDA_VISIBLE_DEVICES like real ones) and a
second partition `gpu`, so the workflow's GPU jobs run through the executor plugin with the sbatch options
they get on a real cluster, the plugin's inner `srun --cpus-per-task=... --gpus=...` included.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from _workflow import GPU_JOB_TARGETS, copy_workflow, failure_report, placeholder_inputs, snakemake

pytestmark = pytest.mark.slow

SLURM_CONF = Path("/etc/slurm/slurm.conf")
GRES_CONF = SLURM_CONF.with_name("gres.conf")
GPUS = 2
MARKER = "# single-node test cluster written by the qes test suite"
PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
RUN = "slurm"


def _missing() -> list[str]:
    return [tool for tool in ("slurmctld", "slurmd", "sbatch", "squeue", "munged") if not _which(tool)]


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


def _install() -> str | None:
    """Install the SLURM packages if needed; returns a reason to skip, or None."""
    if not _missing():
        return None
    if os.geteuid() != 0:
        return f"SLURM is not installed ({', '.join(_missing())} missing) and installing it needs root"
    if not shutil.which("apt-get"):
        return "SLURM is not installed and there is no apt-get to install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]
    for command in (["apt-get", "update", "-qq"], install):
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        if result.returncode != 0:
            return f"`{' '.join(command)}` failed: {result.stderr.strip()[-500:]}"
    return None if not _missing() else f"still missing after apt-get: {', '.join(_missing())}"


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 * 3 // 4
    return 4000


def _config(state: Path) -> str:
    host = socket.gethostname().split(".")[0]
    return f"""{MARKER}
ClusterName=qestest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
GresTypes=gpu
MinJobAge=600
ReturnToService=2
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/spool
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={_memory_mb()} Gres=gpu:{GPUS} State=UNKNOWN
PartitionName=main Nodes={host} Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes={host} MaxTime=INFINITE State=UP
"""


def _gres_config(state: Path) -> str:
    devices = state / "dev"
    devices.mkdir()
    for index in range(GPUS):
        (devices / f"nvidia{index}").symlink_to("/dev/null")
    return f"{MARKER}\nName=gpu File={devices}/nvidia[0-{GPUS - 1}]\n"


def _kill_pidfile(path: Path) -> None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        os.kill(int(path.read_text().split()[0]), signal.SIGTERM)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    reason = _install()
    if reason:
        pytest.skip(reason)
    for conf in (SLURM_CONF, GRES_CONF):
        if conf.exists() and MARKER not in conf.read_text():
            pytest.skip(f"{conf} belongs to another cluster; not overwriting it")
    if subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode == 0:
        pytest.skip("a slurmctld is already running on this machine")
    state = tmp_path_factory.mktemp("slurm-state")
    for sub in ("ctld", "spool"):
        (state / sub).mkdir()
    SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SLURM_CONF.write_text(_config(state))
    GRES_CONF.write_text(_gres_config(state))
    started_munge = None
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        Path("/run/munge").mkdir(parents=True, exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        if not Path("/etc/munge/munge.key").exists():
            subprocess.run(["runuser", "-u", "munge", "--", "mungekey", "--create"], check=True)
        subprocess.run(["runuser", "-u", "munge", "--", _which("munged")], check=True)
        started_munge = subprocess.run(["pgrep", "-x", "munged"], capture_output=True, text=True).stdout.split()
    try:
        subprocess.run([_which("slurmctld")], check=True)
        subprocess.run([_which("slurmd")], check=True)
        deadline = time.monotonic() + 60
        while True:
            info = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True)
            if info.returncode == 0 and info.stdout.strip() in ("idle", "mix", "alloc"):
                break
            if time.monotonic() > deadline:
                logs = "\n".join(
                    (state / f).read_text()[-2000:] for f in ("slurmctld.log", "slurmd.log") if (state / f).exists()
                )
                pytest.fail(f"the test cluster did not come up: sinfo said {info.stdout!r} {info.stderr!r}\n{logs}")
            time.sleep(1)
        yield state
    finally:
        SLURM_CONF.unlink(missing_ok=True)
        GRES_CONF.unlink(missing_ok=True)
        _kill_pidfile(state / "slurmd.pid")
        _kill_pidfile(state / "slurmctld.pid")
        for pid in started_munge or []:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGTERM)


def _tiny_config(tiny_float_dir: Path, ranks: int, launcher: str) -> list[str]:
    return [
        "--config",
        f"model={{name: tiny, source: 'local:{tiny_float_dir}', dtype: float32}}",
        "quantize={bits: 4, group_size: 32, calibration_samples: 8, eval_prompts: 2, batch_size: 4}",
        "task={train_size: 16, eval_size: 8}",
        f"finetune={{run: {RUN}, iterations: 3, population: 4, sigma: 0.3, alpha: 0.2, batch_prompts: 4, "
        f"max_new_tokens: 8, checkpoint_every: 1, device: cpu, ranks: {ranks}, launcher: {launcher}}}",
        "evaluate={limit: 4, max_new_tokens: 8, batch_size: 4}",
    ]


def _results(workdir: Path) -> dict:
    summary = json.loads((workdir / f"results/finetune/{RUN}/summary.json").read_text())
    replay = json.loads((workdir / f"results/replay/{RUN}/replay_report.json").read_text())
    quantized = json.loads((workdir / "results/quantized/tiny-w4g32/quant_report.json").read_text())
    steps = sorted((workdir / f"results/runs/{RUN}/steps").glob("it-*.parquet"))
    return {
        "quantized": quantized["codes_sha256"],
        "tuned": summary["codes_sha256"],
        "replayed": replay["codes_sha256"],
        "log": [p.read_bytes() for p in steps],
    }


def test_workflow_on_slurm_equals_local_run(cluster: Path, tiny_float_dir: Path, tmp_path: Path) -> None:
    local = copy_workflow(tmp_path / "local")
    result = snakemake(local, "--cores", "2", *_tiny_config(tiny_float_dir, 1, "torchrun"))
    assert result.returncode == 0, failure_report(local, result)

    remote = copy_workflow(tmp_path / "remote")
    args = [
        "--workflow-profile", "profiles/slurm",
        "--default-resources", "slurm_partition=main", "runtime=10", "mem_mb=1000",
        "--set-resources", "finetune:slurm_partition=main", "finetune:mem_mb=2000",
        "--set-threads", "quantize=1", "finetune=1", "replay=1", "evaluate=1",
        "--slurm-no-account", "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
        "--latency-wait", "5", "--jobs", "2",
    ]
    result = snakemake(remote, *args, *_tiny_config(tiny_float_dir, 2, "srun"), timeout=1500)
    assert result.returncode == 0, failure_report(remote, result)
    out = result.stdout + result.stderr
    assert "Job " in out and "has been submitted with SLURM jobid" in out, out[-2000:]

    expected, got = _results(local), _results(remote)
    assert got["quantized"] == expected["quantized"]
    assert got["tuned"] == got["replayed"] == expected["tuned"]
    assert got["log"] == expected["log"]
    summary = json.loads((remote / f"results/finetune/{RUN}/summary.json").read_text())
    assert summary["ranks"] == 2
    assert "srun" in (remote / f"logs/finetune/{RUN}.log").read_text()


# Stand-in for the scripts of finetune and evaluate: it runs inside the plugin's srun step and records what
# that step sees, and the job as slurmctld has it while it runs (a finished job no longer lists its GPU).
STEP_RECORDER = """import json, os, subprocess
from pathlib import Path

names = ("SLURM_STEP_ID", "SLURM_JOB_PARTITION", "CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS")
job = subprocess.run(["scontrol", "-o", "-d", "show", "job", os.environ["SLURM_JOB_ID"]], capture_output=True,
                     text=True).stdout
record = {"resources": dict(snakemake.resources.items()), "env": {name: os.environ.get(name) for name in names},
          "job": job}
Path(f"step-{snakemake.rule}.json").write_text(json.dumps(record, default=str))
for out in snakemake.output:
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir() if not path.suffix else path.touch()
"""


def test_gpu_jobs_run_their_srun_step_on_a_bound_gpu(cluster: Path, tmp_path: Path) -> None:
    """finetune (1 rank) and evaluate on `device: cuda`, with the resources rules/common.smk gives them.

    The failure that `tasks_per_gpu: 0` avoids (--ntasks-per-gpu beside --cpus-per-task) needs Slurm 23.11 or
    later; older ones (Debian 12 ships 22.05) run that step too, so here the test checks that the job asked
    for no tasks per GPU rather than that asking for them fails.
    """
    workdir = copy_workflow(tmp_path / "workflow")
    placeholder_inputs(workdir)
    for script in ("finetune.py", "evaluate.py"):
        (workdir / "scripts" / script).write_text(STEP_RECORDER)
    args = [
        "--workflow-profile", "profiles/slurm",
        "--default-resources", "slurm_partition=main", "runtime=10", "mem_mb=1000",
        # fit the node's CPUs and memory; GPUs, tasks and partition stay the rules' own
        "--set-threads", "finetune=1", "evaluate=1", "--set-resources", "finetune:mem_mb=1000", "evaluate:mem_mb=1000",
        "--slurm-no-account", "--slurm-status-command", "squeue", "--slurm-init-seconds-before-status-checks", "1",
        "--config", "finetune={device: cuda}", "slurm={gpu_partition: gpu}",
        "--allowed-rules", "finetune", "evaluate", "--rerun-triggers", "mtime",
        "--latency-wait", "5", "--jobs", "2", *GPU_JOB_TARGETS,
    ]
    result = snakemake(workdir, *args, timeout=600)
    assert result.returncode == 0, failure_report(workdir, result)
    assert all((workdir / target).exists() for target in GPU_JOB_TARGETS)
    for rule in ("finetune", "evaluate"):
        record = json.loads((workdir / f"step-{rule}.json").read_text())
        assert record["resources"]["gpu"] == 1 and record["resources"]["tasks_per_gpu"] == 0, record
        env = record["env"]
        assert env["SLURM_STEP_ID"] == "0", env  # the plugin's srun, not the batch script
        assert env["SLURM_JOB_PARTITION"] == "gpu", env
        job = record["job"]
        assert re.search(r"TresPerJob=gres[:/]gpu:1\b", job), job
        allocated = re.search(r"GRES=gpu(?::\w+)?:1\(IDX:(\d+)\)", job)
        assert allocated, job
        assert env["CUDA_VISIBLE_DEVICES"] == env["SLURM_STEP_GPUS"] == allocated.group(1), (env, job)
        assert "CPUs/Task=1 " in job and not re.search(r"NtasksPerTRES=[1-9]", job), job
