"""Fitness generation paths on the default model, side by side in one run: seconds per member, agreement, memory.

    python benchmarks/bench_member_batch.py --model results/quantized/smollm2-135m-instruct-w4g64 \
        --train results/data/countdown/train.parquet --rounds 2 [--iterations]

Each path scores the members of training iteration 0 (population 8: 4 mirrored pairs) on that iteration's
16 prompts x 48 new tokens, in a process of its own (so that peak memory is its own):

- ``before``: the path of earlier versions: transformers' ``generate`` with the shared prefix's cache repeated
  per row, one member at a time on codes perturbed in place, backend int4pack, and the earlier ``auto`` dtype
  (bf16 where the CPU runs it natively, else float32 with bf16 int4 matmuls);
- ``row, dense float32``: the same decoder on the dense float32 backend;
- ``member, P = 1``: the member decoder (prefix once per member) one member at a time, today's ``auto``
  (float32; the backend measured faster on this CPU);
- ``member, P = 4`` and ``P = 8``: members scored together (``finetune.member_batch``);
- ``member, P = 4, compiled``: the same with ``finetune.decode: compiled`` (fixed-shape decode steps through
  torch.compile; its warm-up is one whole group, so that the step is compiled before the timing starts; the
  warm-up's seconds are the "warm-up" column).

Member-by-member paths score members 0-3, groups all 8; "agree" counts responses identical to those of
``member, P = 1`` (or of the first path given, without it) for members 0-3. Seconds are per member (a
group's time divided by its size), after a warm-up; paths run in rotating order in every round, and the
table gives the median over rounds and the median, over rounds, of each path's time divided by
``before``'s in the same round (compare these ratios, not seconds, on a shared machine). Peak RSS is the
high-water mark after the warm-up (reset through /proc/self/clear_refs). ``--iterations`` also times whole
finetune iterations (population 8, default settings, seed replay) of ``before`` and the default path: the
median of iterations 2-3.

To see an AVX2-only CPU's behaviour on an AVX-512 machine, run with ``ATEN_CPU_CAPABILITY=avx2
MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2`` (torch's, MKL's and oneDNN's kernels then use AVX2 only).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PATHS = {
    "before": {"prefix_cache": "row", "backend": "int4pack", "dtype": "before", "members": 1},
    "row, dense float32": {"prefix_cache": "row", "backend": "dense", "dtype": "float32", "members": 1},
    "member, P = 1": {"prefix_cache": "member", "backend": "auto", "dtype": "auto", "members": 1},
    "member, P = 4": {"prefix_cache": "member", "backend": "auto", "dtype": "auto", "members": 4},
    "member, P = 8": {"prefix_cache": "member", "backend": "auto", "dtype": "auto", "members": 8},
    "member, P = 4, compiled": {"prefix_cache": "member", "backend": "auto", "dtype": "auto", "members": 4,
                                "decode": "compiled"},
}

_CHILD = r"""
import json, sys, time
from dataclasses import replace
from pathlib import Path
import torch
from qes.checkpoint import describe_compute, load_quantized
from qes.codes import quantized_linears
from qes.engine import Engine
from qes.generation import GenerationConfig, load_batch, score, score_group
from qes.members import MemberGroup
from qes.noise import NoiseSpec, member_seeds
from qes.qlinear import cpu_runs_bf16_natively
from qes.finetune import prompt_indices
from qes.update import UpdateConfig

def peak_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

spec, model_dir, train = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
dtype = spec["dtype"]
if dtype == "before":
    dtype = "bfloat16" if cpu_runs_bf16_natively() else "auto"
model, tokenizer = load_quantized(model_dir, backend=spec["backend"], dtype=dtype)
full = load_batch(tokenizer, train)
batch = full.subset(prompt_indices(0, 0, len(full), 16))
cfg = GenerationConfig(max_new_tokens=48, batch_size=16, prefix_cache=spec["prefix_cache"],
                       decode=spec.get("decode", "eager"))
engine = Engine(quantized_linears(model), NoiseSpec.from_sigma(0.01), UpdateConfig())
members = [(s, sign) for s in member_seeds(0, 0, 4) for sign in (1, -1)]
start = time.perf_counter()
if cfg.decode == "compiled":  # compile the group's step before timing
    score_group(model, batch, cfg, MemberGroup(engine, members[: spec["members"]], model.dtype))
else:
    score(model, batch.subset(range(4)), replace(cfg, max_new_tokens=4))
warmup = time.perf_counter() - start
Path("/proc/self/clear_refs").write_text("5")
responses, start = [], time.perf_counter()
if spec["members"] == 1:
    members = members[:4]
    for seed, sign in members:
        p = engine.perturb(seed, sign)
        responses.append(score(model, batch, cfg).responses)
        engine.restore(p)
else:
    for at in range(0, len(members), spec["members"]):
        group = MemberGroup(engine, members[at : at + spec["members"]], model.dtype)
        responses += [r.responses for r in score_group(model, batch, cfg, group)]
seconds = (time.perf_counter() - start) / len(members)
print(json.dumps({"seconds": seconds, "rss_mb": peak_mb(), "responses": responses, "warmup_s": warmup,
                  "compute": describe_compute(model)}))
"""

_ITERATION_CHILD = r"""
import json, statistics, sys, tempfile
import pyarrow.parquet as pq
from qes.qlinear import cpu_runs_bf16_natively
from qes.finetune import finetune, finetune_config
block, model_dir, train = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
if block.get("dtype") == "before":
    block["dtype"] = "bfloat16" if cpu_runs_bf16_natively() else "auto"
with tempfile.TemporaryDirectory() as tmp:
    finetune(model_dir, train, tmp + "/run", finetune_config({**block, "iterations": 3}))
    rows = pq.read_table(tmp + "/run/metrics.parquet").to_pylist()[1:]  # iteration 1 warms up
print(json.dumps({"seconds": statistics.median(r["seconds_total"] for r in rows),
                  "fitness": statistics.median(r["seconds_fitness"] for r in rows)}))
"""


def child(code: str, spec: dict, model: Path, train: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", code, json.dumps(spec), str(model), str(train)],
                         capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{spec}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--train", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--paths", default=";".join(PATHS), help="a ;-separated subset of: " + "; ".join(PATHS))
    parser.add_argument("--iterations", action="store_true", help="also time whole finetune iterations")
    args = parser.parse_args()
    names = [n.strip() for n in args.paths.split(";")]
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            results[name].append(child(_CHILD, PATHS[name], args.model, args.train))
            print(f"round {r + 1}: {name}: {results[name][-1]['seconds']:.2f} s per member", file=sys.stderr)
    reference = results.get("member, P = 1", results[names[0]])[0]
    first = results[names[0]][0]["compute"]
    import torch

    print(f"CPU {first['cpu_model']}, capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
          f"{first['cpu_native_bf16']}, {os.cpu_count()} cores, torch {torch.__version__}; "
          f"env ATEN_CPU_CAPABILITY={os.environ.get('ATEN_CPU_CAPABILITY', '-')}\n")
    print("| path | backend, dtype | s per member (median) | vs before (median of rounds) | agree with P = 1 "
          "| peak RSS | warm-up |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        runs = results[name]
        compute = runs[0]["compute"]
        kind = f"{'/'.join(compute['backends'])}, {compute['dtype']}"
        if "int4pack" in compute["backends"]:
            kind += f" (int4 matmuls {compute.get('int4pack_dtype')})"
        ratio = ""
        if "before" in results:
            ratio = f"{statistics.median(a['seconds'] / b['seconds'] for a, b in zip(runs, results['before'])):.2f}x"
        agree = ""
        if reference is not None:
            pairs = [(a, b) for ra, rb in zip(runs[0]["responses"][:4], reference["responses"]) for a, b in zip(ra, rb)]
            agree = f"{sum(a == b for a, b in pairs)}/{len(pairs)}"
        seconds = statistics.median(x["seconds"] for x in runs)
        rss = statistics.median(x["rss_mb"] for x in runs)
        warmup = statistics.median(x["warmup_s"] for x in runs)
        print(f"| {name} | {kind} | {seconds:.2f} | {ratio} | {agree} | {rss:.0f} MB | {warmup:.0f} s |")
    if first.get("backend_ms"):
        print(f"\nauto's measurement on this CPU (ms per pass over the layer shapes): {first.get('backend_ms')}")
    if args.iterations:
        blocks = {"before": {"prefix_cache": "row", "member_batch": 1, "backend": "int4pack", "dtype": "before"},
                  "default (member decoder, member_batch auto)": {}}
        print("\n| finetune iteration (population 8, seed replay K = 10) | s per iteration | fitness | vs before |")
        print("| --- | ---: | ---: | ---: |")
        timed = {name: child(_ITERATION_CHILD, block, args.model, args.train) for name, block in blocks.items()}
        for name, t in timed.items():
            print(f"| {name} | {t['seconds']:.1f} | {t['fitness']:.1f} | "
                  f"{t['seconds'] / timed['before']['seconds']:.2f}x |")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory():
        main()
