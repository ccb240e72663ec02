"""Helpers for tests that run Snakemake on a temporary copy of the workflow (the checkout's results/ stay untouched)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW_FILES = ("Snakefile", "rules", "scripts", "envs", "config", "workflow", "profiles")
QUANTIZED = "results/quantized/smollm2-135m-instruct-w4g64"
# finetune of run `a` and evaluate of run `b`: independent jobs over placeholder_inputs, so one run submits both
GPU_JOB_TARGETS = ["results/finetune/a/summary.json", "results/eval/b/metrics.json"]


def copy_workflow(workdir: Path) -> Path:
    """Copy the workflow's files (not its results) into `workdir`."""
    workdir.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, workdir / name)
        else:
            shutil.copy2(source, workdir / name)
    return workdir


def snakemake(workdir: Path, *args: str, env: dict[str, str] | None = None, timeout: int = 1500):
    """Run `snakemake <args>` in `workdir` with this interpreter; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "snakemake", *args],
        cwd=workdir, capture_output=True, text=True, env=full_env, timeout=timeout,
    )


def failure_report(workdir: Path, result: subprocess.CompletedProcess) -> str:
    """Snakemake's output and the tail of every rule log, for an assertion message."""
    logs = "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in sorted((workdir / "logs").rglob("*.log")))
    return f"snakemake failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}\n{logs}"


def placeholder_inputs(workdir: Path) -> None:
    """Inputs of finetune (run a) and evaluate (run b), older than run b's finetune and replay outputs.

    Run with `--allowed-rules finetune evaluate --rerun-triggers mtime` so only those two jobs are planned.
    """
    for path in (QUANTIZED, "results/replay/b"):
        (workdir / path).mkdir(parents=True)
    for path in ("results/data/countdown/train.parquet", "results/data/countdown/eval.parquet",
                 "results/finetune/b/summary.json", "results/finetune/b/metrics.parquet"):
        (workdir / path).parent.mkdir(parents=True, exist_ok=True)
        (workdir / path).touch()
    now = time.time()
    for age, path in ((30, QUANTIZED), (30, "results/data/countdown/train.parquet"),
                      (30, "results/data/countdown/eval.parquet"), (20, "results/finetune/b/summary.json"),
                      (20, "results/finetune/b/metrics.parquet"), (10, "results/replay/b")):
        os.utime(workdir / path, (now - age, now - age))
