"""Stage quantize per GPTQ compute dtype: wall time, CPU time and quality, each dtype in a fresh process.

    python benchmarks/bench_quantize.py --model results/models/smollm2-135m-instruct \
        --dtypes float32 bfloat16 --calibration-samples 128

The first line is the CPU and torch's CPU capability (``AVX2``, ``AVX512``, ...); then one row per dtype and
MKL code path (``--mkl-paths``, the ``MKL_CBWR`` the GPTQ child runs under; default: the stage's own). Each row is one
:func:`qes.quantize.quantize_model` call (default settings unless given: INT4, group 64, 128 calibration
prompts, 16 evaluation prompts) in a new Python process, with :data:`qes.quantize.COMPUTE_DTYPE` set to the
dtype -- the stage itself always uses float32; the other dtypes are there to compare against. Columns:

* ``wall s`` / ``cpu s`` -- the whole call (its GPTQ child process included), wall clock and user+system CPU
  seconds; on a shared machine compare CPU seconds, since wall time also counts waiting for the cores;
* ``gptq s`` -- model load, GPTQ and save inside the GPTQ child process (``load_s + quantize_s + save_s``);
* ``eval s`` -- loading the result and comparing logits with the float model;
* ``rel. logit err`` / ``next-token agree`` -- ``quality`` of ``quant_report.json``;
* ``codes`` -- the first 12 hex digits of ``codes_sha256``.

GPTQ's codes follow MKL's code path. MKL keeps to a pinned path on both CPU vendors only for ``COMPATIBLE``
(the stage's); ``AVX2`` and the others are Intel-only, so their codes can differ between vendors. To compare
vendors, run on each

    python benchmarks/bench_quantize.py --model results/models/smollm2-135m-instruct --dtypes float32 \
        --mkl-paths COMPATIBLE,STRICT AVX2,STRICT

and compare the ``codes`` column.

bf16 runs under the same pinned kernel settings as float32 (:data:`qes.quantize.gptq.GPTQ_NUMERICS_ENV`), so on a
CPU with native bf16 its time here is not what an unpinned bf16 run would take.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from qes.checkpoint import cpu_model
from qes.quantize.gptq import GPTQ_NUMERICS_ENV

_ONE_RUN = """
import json, sys
import torch
import qes.quantize as q
import qes.quantize.gptq as gptq
dtype, model_dir, out, cfg = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
q.COMPUTE_DTYPE = getattr(torch, dtype)
gptq.GPTQ_NUMERICS_ENV["MKL_CBWR"] = sys.argv[5]
report = q.quantize_model(model_dir, out, q.QuantizeConfig(**cfg))
print("REPORT " + json.dumps(report))
"""


def run_one(dtype: str, model_dir: Path, out: Path, cfg: dict, mkl_path: str) -> dict:
    """One quantize_model call in a fresh process (GPTQ under ``MKL_CBWR=mkl_path``); its report plus wall and
    CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", _ONE_RUN, dtype, str(model_dir), str(out), json.dumps(cfg), mkl_path],
        stdout=subprocess.PIPE,
        text=True,
        check=False,
    )
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"quantize in {dtype} under MKL_CBWR={mkl_path} failed (exit status {done.returncode})")
    line = next(line for line in reversed(done.stdout.splitlines()) if line.startswith("REPORT "))
    report = json.loads(line.removeprefix("REPORT "))
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"report": report, "wall_s": wall, "cpu_s": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path, help="float model folder (output of `qes fetch`)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    parser.add_argument("--mkl-paths", nargs="+", default=[GPTQ_NUMERICS_ENV["MKL_CBWR"]],
                        help="MKL_CBWR values to run GPTQ under (default: the stage's own)")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--eval-prompts", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None, help="keep the checkpoints here (default: a temp folder)")
    args = parser.parse_args()
    cfg = {
        "bits": args.bits,
        "group_size": args.group_size,
        "calibration_samples": args.calibration_samples,
        "eval_prompts": args.eval_prompts,
    }

    print(f"cpu: {cpu_model()}, capability {torch.backends.cpu.get_cpu_capability()}")
    print(
        f"model {args.model}, w{args.bits}g{args.group_size}, {args.calibration_samples} calibration prompts, "
        f"{args.eval_prompts} evaluation prompts, {len(os.sched_getaffinity(0))} usable cores",
        flush=True,
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="qes-bench-quantize-") as scratch:
        root = args.out or Path(scratch)
        for dtype, mkl_path in itertools.product(args.dtypes, args.mkl_paths):
            result = run_one(dtype, args.model, root / f"{dtype}-{mkl_path.replace(',', '-')}", cfg, mkl_path)
            report = result["report"]
            timings, quality = report["timings"], report["quality"]
            rows.append(
                (
                    report["compute_dtype"],
                    report["numerics"]["MKL_CBWR"],
                    f"{result['wall_s']:.1f}",
                    f"{result['cpu_s']:.1f}",
                    f"{timings['load_s'] + timings['quantize_s'] + timings['save_s']:.1f}",
                    f"{timings['evaluate_s']:.1f}",
                    f"{quality.get('relative_logit_error', float('nan')):.4f}",
                    f"{quality.get('next_token_agreement', float('nan')):.4f}",
                    report["codes_sha256"][:12],
                )
            )
    header = ("dtype", "MKL path", "wall s", "cpu s", "gptq s", "eval s", "rel. logit err", "next-token agree", "codes")
    widths = [max(len(header[i]), *(len(row[i]) for row in rows)) for i in range(len(header))]
    for row in (header, tuple("-" * w for w in widths), *rows):
        print(" | ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
