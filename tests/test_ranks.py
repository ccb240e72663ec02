"""The population split across real torch.distributed processes (gloo on CPU) gives exactly the one-rank run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from _synthetic_run import log_files

from qes.dist import launch_command

HERE = Path(__file__).parent
SYNTHETIC = HERE / "_synthetic_run.py"


def _env(fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("QES_FAULT", "RANK", "WORLD_SIZE")}
    env["OMP_NUM_THREADS"] = "1"
    if fault:
        env["QES_FAULT"] = fault
    return env


def _synthetic(base: Path, run_dir: Path, ranks: int, fault: str | None = None) -> subprocess.CompletedProcess:
    head = [sys.executable]
    if ranks > 1:
        head += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    command = [*head, str(SYNTHETIC), str(base), str(run_dir)]
    return subprocess.run(command, capture_output=True, text=True, env=_env(fault), timeout=600)


@pytest.fixture(scope="module")
def one_rank(tiny_gptq, tmp_path_factory) -> tuple[str, dict[str, bytes]]:
    run_dir = tmp_path_factory.mktemp("one-rank") / "run"
    result = _synthetic(tiny_gptq(4), run_dir, 1)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip().splitlines()[-1], log_files(run_dir)


def test_two_ranks_equal_one_rank(tiny_gptq, tmp_path, one_rank) -> None:
    final, files = one_rank
    run_dir = tmp_path / "run"
    result = _synthetic(tiny_gptq(4), run_dir, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == final
    assert log_files(run_dir) == files
    import pyarrow.parquet as pq

    metrics = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    assert {row["ranks"] for row in metrics} == {2}
    assert any(row["changed"] > 0 for row in metrics), "the run must move codes for the comparison to mean anything"


def test_dead_rank_fails_cleanly_and_resume_is_exact(tiny_gptq, tmp_path, one_rank) -> None:
    final, files = one_rank
    run_dir = tmp_path / "run"
    started = time.monotonic()
    killed = _synthetic(tiny_gptq(4), run_dir, 2, fault="fitness:3@1")
    assert killed.returncode != 0
    assert time.monotonic() - started < 300, "a dead rank must not leave the others waiting for the timeout"
    steps = sorted(p.name for p in (run_dir / "steps").glob("it-*.parquet"))
    assert steps[-1] == "it-00000002.parquet", steps
    assert not (run_dir / "final.json").exists()
    resumed = _synthetic(tiny_gptq(4), run_dir, 2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.strip().splitlines()[-1] == final
    assert log_files(run_dir) == files


def test_finetune_command_starts_ranks(tiny_gptq, tmp_path) -> None:
    """`qes finetune` with ranks: 2 starts torchrun itself and writes the same log as ranks: 1."""
    from transformers import AutoTokenizer

    from qes.tasks.countdown import TaskSettings, make_task_data

    base = tiny_gptq(4)
    data = tmp_path / "data"
    settings = TaskSettings.from_dict({"train_size": 16, "eval_size": 4})
    make_task_data(settings, AutoTokenizer.from_pretrained(str(base)), data / "train.parquet", data / "eval.parquet")
    block = {
        "iterations": 2, "population": 4, "sigma": 0.3, "alpha": 0.2, "checkpoint_every": 1,
        "batch_prompts": 4, "max_new_tokens": 8, "device": "cpu",
        "residual": {"mode": "replay", "window": 2},
    }
    finals = {}
    for ranks in (1, 2):
        config = tmp_path / f"config-{ranks}.yaml"
        config.write_text(yaml.safe_dump({"finetune": {**block, "ranks": ranks}}))
        run_dir = tmp_path / f"run-{ranks}"
        command = [sys.executable, "-m", "qes.cli", "finetune", "--model", str(base), "--train",
                   str(data / "train.parquet"), "--run-dir", str(run_dir), "--config", str(config), "--threads", "2"]
        result = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        assert summary["ranks"] == ranks
        finals[ranks] = (summary["codes_sha256"], log_files(run_dir))
    assert finals[1] == finals[2]


def test_launch_commands() -> None:
    command, env = launch_command(2, "torchrun", ["finetune", "--run-dir", "x"], threads=4)
    assert command[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert command[-5:] == ["qes.cli", "-v", "finetune", "--run-dir", "x"] and env["OMP_NUM_THREADS"] == "2"
    command, env = launch_command(3, "srun", ["finetune"], threads=6)  # srun: threads per task
    assert command[:4] == ["srun", "--ntasks=3", "--cpus-per-task=6", "--kill-on-bad-exit=1"]
    assert env["QES_LAUNCHER"] == "srun" and int(env["MASTER_PORT"]) > 0
    with pytest.raises(ValueError, match="launcher must be one of"):
        launch_command(2, "mpirun", [], threads=2)
