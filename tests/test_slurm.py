"""The workflow under a real single-node SLURM cluster (slurmctld + slurmd + munge from Debian's packages).

The module installs the daemons where they are missing (root and apt-get needed), writes
/etc/slurm/slurm.conf (the in-job Snakemake drops SLURM_CONF, so it must be that path), starts them,
runs a tiny configuration with the SLURM executor and the project's cluster profile, checks the
results against a local run of the same configuration, and stops what it started. The finetune job
uses 2 ranks started by srun inside its allocation. Without root or apt-get it skips and says why.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from _workflow import copy_workflow, failure_report, snakemake

pytestmark = pytest.mark.slow

SLURM_CONF = Path("/etc/slurm/slurm.conf")
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
MinJobAge=600
ReturnToService=2
StateSaveLocation={state}/ctld
SlurmdSpoolDir={state}/spool
SlurmctldPidFile={state}/slurmctld.pid
SlurmdPidFile={state}/slurmd.pid
SlurmctldLogFile={state}/slurmctld.log
SlurmdLogFile={state}/slurmd.log
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={_memory_mb()} State=UNKNOWN
PartitionName=main Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _kill_pidfile(path: Path) -> None:
    with contextlib.suppress(OSError, ValueError, IndexError):
        os.kill(int(path.read_text().split()[0]), signal.SIGTERM)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    reason = _install()
    if reason:
        pytest.skip(reason)
    if SLURM_CONF.exists() and MARKER not in SLURM_CONF.read_text():
        pytest.skip(f"{SLURM_CONF} belongs to another cluster; not overwriting it")
    if subprocess.run(["pgrep", "-x", "slurmctld"], capture_output=True).returncode == 0:
        pytest.skip("a slurmctld is already running on this machine")
    state = tmp_path_factory.mktemp("slurm-state")
    for sub in ("ctld", "spool"):
        (state / sub).mkdir()
    SLURM_CONF.parent.mkdir(parents=True, exist_ok=True)
    SLURM_CONF.write_text(_config(state))
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
