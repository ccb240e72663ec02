"""kill -9 a training process at five different moments; each resumed run ends exactly like an uninterrupted one.

The run's reward is positive and its codes change in every iteration, so a resume that lost or repeated an
update could not reach the same final codes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from _synthetic_run import log_files

HERE = Path(__file__).parent


def _run(base: Path, run_dir: Path, fault: str | None = None, backend: str = "dense") -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "QES_FAULT"}
    env["QES_TEST_BACKEND"] = backend
    if fault:
        env["QES_FAULT"] = fault
    return subprocess.run(
        [sys.executable, str(HERE / "_synthetic_run.py"), str(base), str(run_dir)],
        capture_output=True, text=True, env=env, timeout=600,
    )


@pytest.fixture(scope="module")
def reference(tiny_gptq, tmp_path_factory) -> tuple[str, dict[str, bytes]]:
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = _run(tiny_gptq(4), run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    import pyarrow.parquet as pq

    metrics = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    assert all(row["changed"] > 0 for row in metrics), [row["changed"] for row in metrics]
    assert all(row["reward_min"] > 0 for row in metrics)
    return result.stdout.strip().splitlines()[-1], log_files(run_dir)


@pytest.mark.parametrize("fault", ["fitness:2", "update:3", "append:4", "finish:6"])
def test_kill_and_resume_is_exact(tiny_gptq, tmp_path, reference, fault: str) -> None:
    final, files = reference
    run_dir = tmp_path / "run"
    killed = _run(tiny_gptq(4), run_dir, fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    iteration = int(fault.split(":")[1])
    steps = sorted(p.name for p in (run_dir / "steps").iterdir())
    # The killed iteration never became part of the log; an append killed mid-way left only a temp file.
    assert [s for s in steps if s.startswith("it-")][-1] == f"it-{iteration - 1:08d}.parquet", steps
    assert (f".tmp-it-{iteration:08d}.parquet" in steps) == fault.startswith("append"), steps
    assert not (run_dir / "final.json").exists()
    resumed = _run(tiny_gptq(4), run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.strip().splitlines()[-1] == final
    assert log_files(run_dir) == files


def test_kill_while_resuming_is_exact(tiny_gptq, tmp_path, reference) -> None:
    """A resume killed while it replays the log (the fifth point) leaves the log as it was."""
    final, files = reference
    run_dir = tmp_path / "run"
    assert _run(tiny_gptq(4), run_dir, "update:4").returncode == -signal.SIGKILL
    before = log_files(run_dir)
    killed = _run(tiny_gptq(4), run_dir, "replay:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert log_files(run_dir) == before
    resumed = _run(tiny_gptq(4), run_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.strip().splitlines()[-1] == final
    assert log_files(run_dir) == files


def test_resume_with_the_int4pack_backend(tiny_gptq, tmp_path: Path) -> None:
    """Training on CPU runs INT4 through int4pack; a resumed run replays into that cache to the same result.

    (Its float logits differ from the dense backend's, so the reference is an uninterrupted int4pack run.)
    """
    uninterrupted = _run(tiny_gptq(4), tmp_path / "reference", backend="int4pack")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    final, files = uninterrupted.stdout.strip().splitlines()[-1], log_files(tmp_path / "reference")
    run_dir = tmp_path / "run"
    killed = _run(tiny_gptq(4), run_dir, "update:3", backend="int4pack")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = _run(tiny_gptq(4), run_dir, backend="int4pack")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.strip().splitlines()[-1] == final
    assert log_files(run_dir) == files
