"""benchmarks/gpu_check.py end to end: the tiny size on the CPU, and on CUDA where there is a GPU.

The script runs as a subprocess, exactly as a user runs it; the assertions read its real output (the
markdown table on stdout and the ``--json`` file).
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qes.decoding import cpu_compiler

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.py"
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def run_check(device: str, out: Path, timeout: float, *extra: str) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", device, "--size", "tiny", "--json", str(out), *extra],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result, json.loads(out.read_text())


def table_rows(stdout: str, size: str) -> dict[str, tuple[str, str, str]]:
    """Rows of the report's table for one size: measurement -> (value, target, result)."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 5 and cells[0] == size:
            rows[cells[1]] = (cells[2], cells[3], cells[4])
    return rows


def row(rows: dict[str, tuple[str, str, str]], starts: str) -> tuple[str, str, str]:
    found = [v for k, v in rows.items() if k.startswith(starts)]
    assert len(found) == 1, f"no single row starting with {starts!r} in {list(rows)}"
    return found[0]


def test_tiny_on_cpu(tmp_path):
    compiler = cpu_compiler() is not None  # inductor builds C++ kernels on the CPU
    result, data = run_check("cpu", tmp_path / "check.json", 480, "--decode", "both" if compiler else "eager")
    lines = result.stdout.splitlines()
    assert lines[0].startswith("device: CPU, capability ")
    assert lines[1].startswith(f"torch {torch.__version__}")
    assert lines[2].startswith("command: `python benchmarks/gpu_check.py --device cpu --size tiny")
    assert sum(1 for line in lines if line.startswith("|---")) == 1, "one table"

    rows = table_rows(result.stdout, "tiny")
    assert "lm_head tied to the embeddings" in row(rows, "model")[0]
    cpu_hash = row(rows, "codes hash after 2 fixed steps")[0]
    run_value, _, run_ok = row(rows, "codes hash, device run")
    replay_value, _, replay_ok = row(rows, "codes hash, device replay")
    assert HEX64.match(cpu_hash)
    assert cpu_hash == run_value == replay_value
    assert run_ok == replay_ok == "ok"
    base_cpu, base_device = row(rows, "base codes hash")[0].split(" / ")
    assert HEX64.match(base_cpu) and base_cpu == base_device
    assert cpu_hash != base_cpu, "the fixed steps changed the codes"

    # past the residual window: 13 steps with K = 10, every layer in the reference at this size
    window_cpu = row(rows, "codes hash after 13 fixed steps (window 10 full, 2 steps left it), CPU, 14/14 layers")[0]
    window_run, _, window_ok = row(rows, "full-window codes hash, device run")
    replayed, run_all = row(rows, "full-window codes hash, device replay / device run")[0].split(" / ")
    assert HEX64.match(window_cpu) and window_cpu == window_run == replayed == run_all and window_ok == "ok"
    assert window_cpu not in (cpu_hash, base_cpu), "the steps after the scored iterations changed the codes"

    dense_value, _, dense_ok = row(rows, "dense cache = full dequantization")
    layers = int(dense_value.split("/")[1].split()[0])
    assert layers == 14 and dense_value.startswith(f"{layers}/{layers} layers") and dense_ok == "ok"
    assert row(rows, "activations finite")[2] == "ok"
    assert row(rows, "codes changed")[2] == "ok"
    assert row(rows, "fitness throughput")[2] in ("met", "missed")

    # the same numbers in the JSON file: positive and finite
    assert data["passed"] is True and data["gptqmodel_imported"] is False
    [res] = data["sizes"]
    assert all(res["checks"].values()), res["checks"]
    assert res["hash_cpu"] == res["run_hash_device"] == res["replay_hash_device"] == cpu_hash
    assert res["window_hash_cpu"] == res["window_ref_hash_device"] == res["window_hash_device"] == window_cpu
    assert res["steps"] >= 2 and res["changed_codes"] > 0
    assert res["shapes"]["tied"] and res["tied_plain"] is res["tied_qes"] is True, "one tensor, in both builds"
    assert res["window_steps"] == 13 and res["update_window"] == 10 and res["reference_layers"] == 14
    for key in ("qes_tokens_per_s", "plain_tokens_per_s", "throughput_ratio", "perturb_restore_s", "fitness_s",
                "update_s", "perturb_restore_vs_fitness", "update_vs_iteration", "iteration_overhead",
                "peak_rss_bytes", "replay_s_per_step_cpu", "logits_std"):
        assert math.isfinite(res[key]) and res[key] > 0, (key, res[key])
    assert res["qes_tokens"] == res["plain_tokens"] == 4 * 16, "every row generates all its tokens"
    # member batching: 4 members scored together; the first one's responses as when it is scored alone
    assert row(rows, "first member's responses, together = alone")[0] == "4/4 rows"
    assert res["member_group"] == 4 and res["plain_group_rows"] == 16
    for key in ("member_alone_s", "member_group_s", "member_group_vs_alone", "member_group_throughput_ratio"):
        assert math.isfinite(res[key]) and res[key] > 0, (key, res[key])
    assert row(rows, "4 members scored together")[2] == "n/a", "the group targets are for GPUs"
    if compiler:  # the same group with compiled decode steps: the eager group's responses, in float32
        assert row(rows, "responses, compiled decode = eager")[0] == "16/16 rows"
        value, target, verdict = row(rows, "4 members together, compiled decode")
        assert target == "<= 3x on a GPU" and verdict == "n/a" and "compiling:" in value
        assert res["compiled_compile_s"] > res["compiled_group_s"] > 0
        assert res["compiled_group_vs_alone"] == pytest.approx(res["compiled_group_s"] / res["member_alone_s"])
    # the ES overhead: perturb + restore against one member, the update against the group's iteration
    value, target, _ = row(rows, "perturb + restore per member / one member's fitness")
    assert target == "<= 2%" and value.startswith(f"{res['perturb_restore_s']:.3f} s / {res['fitness_s']:.3f} s")
    value, target, _ = row(rows, "update per iteration (window 10) / an iteration's fitness (4 members together)")
    assert target == "<= 5%" and value.startswith(f"{res['update_s']:.3f} s / {res['member_group_s']:.3f} s")
    assert res["update_vs_iteration"] == pytest.approx(res["update_s"] / res["member_group_s"])

    # training fitness: the same rewards and responses alone and batched, in float32
    value, target, verdict = row(rows, "training fitness rewards, batched = alone")
    assert value.startswith("4/4 members (16/16 responses;") and verdict == "ok"
    assert res["train_fitness_members"] == 4 and res["train_fitness_rows"] == 16
    assert res["train_fitness_prefix"] == 16, "the prompts' shared prefix is run once"
    assert len(set(res["train_fitness_rewards"])) > 1, "the perturbations reach the rewards"
    assert 0 < res["train_fitness_stopped_rows"] < 16, "some rows end at the stop string, some run to the end"
    assert res["train_fitness_tokens"] < 16 * 16
    assert res["train_fitness_alone_s"] > 0 and res["train_fitness_group_s"] > 0

    # memory: no device memory on a CPU; the GPTQ tensors beside the dense cache hold under a byte per code
    assert "memory_ratio" not in res and row(rows, "peak memory")[2] == "n/a"
    assert res["codes"] // 2 <= res["codes_bytes"] < res["codes"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_on_cuda_matches_cpu(tmp_path):
    _, data = run_check("cuda", tmp_path / "check.json", 600)
    [res] = data["sizes"]
    assert res["base_hash_cpu"] == res["base_hash_device"]
    assert HEX64.match(res["hash_cpu"])
    assert res["hash_cpu"] == res["run_hash_device"] == res["replay_hash_device"]
    assert res["window_hash_cpu"] == res["window_ref_hash_device"] == res["window_hash_device"]
    assert res["replay_window_hash_device"] == res["window_hash_device"]
    assert res["dense_cache_exact_layers"] == res["dense_cache_layers"]
    assert res["finite"] and res["memory_ratio"] > 0 and res["update_scratch_bytes"] > 0
    assert not res["train_fitness_skipped"] and res["train_fitness_rows"] == 16
