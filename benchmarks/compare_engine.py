"""The ES engine's CPU time in two source trees, alternated in one run: perturb + restore of one member and
one member of a mirrored pair (both signs of one seed, per member), and one seed-replay update (window K = 10
filled), on a real GPTQ checkpoint.

    git worktree add /tmp/qes-before <commit>
    python benchmarks/compare_engine.py --model results/quantized/smollm2-135m-instruct-w4g64 \
        --before /tmp/qes-before/src --after src

Each tree runs in its own process (PYTHONPATH=<tree>), rounds alternate so both see the same load, and the
table gives medians and the after/before ratio. Both trees must also end on the same codes hash: the engine's
results may not depend on its version.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r"""
import json, statistics, sys, time
import torch
try:
    from qes.checkpoint import load_quantized
except ImportError:  # trees from before the checkpoint module
    from qes.codes import load_quantized
from qes.codes import quantized_linears
from qes.engine import Engine
from qes.noise import NoiseSpec, member_seeds
from qes.update import Step, UpdateConfig, alpha_fixed_point, quantize_coefficients

model_dir, repeats = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
model, _ = load_quantized(model_dir, dtype="float32")
engine = Engine(quantized_linears(model), NoiseSpec.from_sigma(0.01), UpdateConfig(mode="replay", window=10))

def step(t):
    seeds = member_seeds(1234, t, 4)
    values = [((i * 7 + t) % 11 - 5) / 3 for i in range(8)]
    return Step(t, alpha_fixed_point(0.003, 0.01), tuple(s for s in seeds for _ in (1, -1)),
                tuple(g for _ in seeds for g in (1, -1)), quantize_coefficients(values))

for t in range(10):
    engine.apply(step(t))
member, pair, update = [], [], []
for r in range(repeats):
    a = time.perf_counter(); p = engine.perturb(member_seeds(99, r, 1)[0], 1); engine.restore(p)
    member.append(time.perf_counter() - a)
    a = time.perf_counter()
    for sign in (1, -1):
        p = engine.perturb(member_seeds(77, r, 1)[0], sign); engine.restore(p)
    pair.append((time.perf_counter() - a) / 2)
    a = time.perf_counter(); engine.apply(step(10 + r)); update.append(time.perf_counter() - a)
print(json.dumps({"member": statistics.median(member), "pair": statistics.median(pair),
                  "update": statistics.median(update),
                  "codes": engine.codes_sha256()}))
"""


def run(src: Path, model: str, repeats: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src.resolve())}
    out = subprocess.run([sys.executable, "-c", WORKER, model, str(repeats)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="GPTQ checkpoint folder")
    parser.add_argument("--before", type=Path, required=True, help="src/ folder of the earlier version")
    parser.add_argument("--after", type=Path, default=Path("src"), help="src/ folder of this version")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per tree")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per round")
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for name in ("before", "after"):
            results[name].append(run(getattr(args, name), args.model, args.repeats))
    codes = {r["codes"] for rows in results.values() for r in rows}
    print("| phase | before (s) | after (s) | after / before |")
    print("| --- | --- | --- | --- |")
    labels = {"member": "perturb + restore, one member", "pair": "perturb + restore, per member of a mirrored pair",
              "update": "seed-replay update (K = 10)"}
    for phase, label in labels.items():
        before = statistics.median(r[phase] for r in results["before"])
        after = statistics.median(r[phase] for r in results["after"])
        print(f"| {label} | {before:.3f} | {after:.3f} | {after / before:.2f}x |")
    print(f"\nsame codes hash in both trees: {'yes' if len(codes) == 1 else 'NO'} ({sorted(codes)[0][:12]}…)")


if __name__ == "__main__":
    main()
