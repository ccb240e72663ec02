"""Cost of the tamper-evident seed log: appends, full verification and `qes verify-log`, and its size.

    .venv/bin/python benchmarks/bench_seedlog.py --iterations 1000 --population 50

Builds a synthetic finished log (the member seeds and step sizes a real run of these settings would log,
made-up coefficients and rewards), then times writing it, `SeedLog.open` (which walks the whole hash chain,
checks every record's members and step size, and final.json) and the `qes verify-log` command end to end
(its Python start-up and imports included). Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qes.hparams import TrainConfig
from qes.logchain import LoggedStep
from qes.noise import NoiseSpec, member_seeds
from qes.seedlog import SeedLog
from qes.update import Step, alpha_fixed_point, quantize_coefficients


def synthetic_log(path: Path, iterations: int, population: int, checkpoint_every: int = 5) -> SeedLog:
    """A finished log whose members and step sizes are those a run of these settings logs."""
    cfg = TrainConfig(iterations=iterations, population=population, checkpoint_every=checkpoint_every)
    meta = {
        "base_codes_sha256": "0" * 64,
        "base": {"sha256": "1" * 64, "parts": {"codes": "0" * 64}},
        "layers": [],
        "noise": NoiseSpec.from_sigma(cfg.sigma).to_json(),
        "update": cfg.update.to_json(),
        "population": population,
        "global_seed": cfg.global_seed,
        "train": cfg.to_json(),
    }
    log = SeedLog.create(path, meta)
    for t in range(iterations):
        seeds = member_seeds(cfg.global_seed, t, population // 2)
        step = Step(
            iteration=t,
            alpha_fp=alpha_fixed_point(cfg.alpha_at(t), cfg.sigma),
            seeds=tuple(s for s in seeds for _ in (1, -1)),
            signs=(1, -1) * len(seeds),
            coefs=quantize_coefficients([((i * 7 + t) % 11 - 5) / 3 for i in range(population)]),
        )
        rewards = tuple(0.1 * ((i + t) % 3) for i in range(population))
        log.append(LoggedStep(step, rewards, "f" * 64 if (t + 1) % checkpoint_every == 0 else None))
    log.finish(iterations, "f" * 64)
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--population", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run"
        started = time.perf_counter()
        log = synthetic_log(path, args.iterations, args.population)
        t_write = time.perf_counter() - started
        started = time.perf_counter()
        SeedLog.open(path)
        t_open = time.perf_counter() - started
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "qes.cli", "verify-log", str(path)], capture_output=True,
                                text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        t_cli = time.perf_counter() - started
        size = log.bytes_per_iteration()
    reported = result.stdout.strip().splitlines()[-1]
    print(f"Machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}. "
          f"Log: {args.iterations} iterations, population {args.population}.\n")
    print("| measurement | value |")
    print("|---|---|")
    print(f"| append (write, fsync, rename), per iteration | {1000 * t_write / args.iterations:.2f} ms |")
    print(f"| SeedLog.open: whole chain verified | {t_open:.3f} s ({1000 * t_open / args.iterations:.3f} ms/it) |")
    print(f"| `qes verify-log`, end to end (start-up and imports included) | {t_cli:.2f} s |")
    print(f"| step file size | {size:.0f} bytes / iteration |")
    print(f"\nverify-log: {reported[:160]}")


if __name__ == "__main__":
    main()
