"""Iteration time with the population on 1 rank vs 2 ranks (torch.distributed, gloo), in one run.

    python benchmarks/bench_ranks.py --model results/quantized/smollm2-135m-instruct-w4g64 \
        --train results/data/countdown/train.parquet --iterations 3

Runs the finetune stage (`qes finetune`, the default config's finetune block) from scratch with ranks
= 1 (all --threads threads in one process) and ranks = 2 (threads shared out: --threads/2 each), in
temporary run folders, and reads the seconds per iteration from each run's metrics. Prints a markdown
table and whether both runs ended with the same codes_sha256: the split itself never changes the
result, but the float rewards of the two runs come from different thread counts per process, which
can flip a greedy token (the rank tests pin one thread per process to compare bit for bit).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def run(model: Path, train: Path, block: dict, ranks: int, threads: int, workdir: Path) -> dict:
    config = workdir / f"ranks-{ranks}.yaml"
    config.write_text(yaml.safe_dump({"finetune": {**block, "ranks": ranks}}))
    run_dir = workdir / f"run-{ranks}"
    command = [sys.executable, "-m", "qes.cli", "finetune", "--model", str(model), "--train", str(train),
               "--run-dir", str(run_dir), "--config", str(config), "--threads", str(threads)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"ranks={ranks} failed:\n{result.stderr[-4000:]}")
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    return {
        "ranks": ranks,
        "codes_sha256": summary["codes_sha256"],
        "seconds_per_iteration": statistics.mean(r["seconds_total"] for r in rows),
        "seconds_fitness": statistics.mean(r["seconds_fitness"] for r in rows),
        "seconds_update": statistics.mean(r["seconds_update"] for r in rows),
        "seconds_rank_wait": statistics.mean(r.get("seconds_rank_wait", 0.0) for r in rows),
    }


def measure(model: Path, train: Path, iterations: int, threads: int, config: Path) -> list[dict]:
    block = dict(yaml.safe_load(config.read_text())["finetune"])
    block.update(iterations=iterations, run="bench-ranks", device="cpu")
    block.pop("run")
    with tempfile.TemporaryDirectory(prefix="bench-ranks-") as tmp:
        results = [run(model, train, block, ranks, threads, Path(tmp)) for ranks in (1, 2)]
    return results


def table(results: list[dict]) -> str:
    one = results[0]["seconds_per_iteration"]
    lines = ["| ranks | s / iteration | fitness (rank 0) | update | waiting for ranks | speed-up | target |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['ranks']} | {r['seconds_per_iteration']:.1f} | {r['seconds_fitness']:.1f} | "
            f"{r['seconds_update']:.2f} | {r['seconds_rank_wait']:.2f} | {one / r['seconds_per_iteration']:.2f}x | "
            + ("" if r["ranks"] == 1 else ">= 1.7x") + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="GPTQ checkpoint (the quantize stage's output)")
    parser.add_argument("--train", type=Path, required=True, help="train.parquet of the task stage")
    parser.add_argument("--config", type=Path, default=ROOT / "config" / "config.yaml")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads in all, for either run")
    args = parser.parse_args()
    results = measure(args.model, args.train, args.iterations, args.threads, args.config)
    same = results[0]["codes_sha256"] == results[1]["codes_sha256"]
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"final codes_sha256: 1 rank {results[0]['codes_sha256'][:16]}, 2 ranks {results[1]['codes_sha256'][:16]}"
          f" ({'identical' if same else 'different'})\n")
    print(table(results))


if __name__ == "__main__":
    main()
