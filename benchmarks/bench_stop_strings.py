"""What stopping at the task's stop strings saves per population member, and what it changes in the reward.

    .venv/bin/python benchmarks/bench_stop_strings.py --model results/quantized/smollm2-135m-instruct-w4g64 \
        --train results/data/countdown/train.parquet --batch 16 --max-new-tokens 48 --repeats 3

Scores one member's fitness (the training batch of iteration 0, greedy, the default finetune budget) with the
task's stop strings (Countdown: ``</answer>``) and without them, in rotating order, and prints generated
tokens, seconds, mean reward and format rate of each side, the median ratio of seconds per round, and what a
default iteration (population 8) would take. Compare ratios: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from qes.checkpoint import describe_compute, load_quantized
from qes.finetune import prompt_indices
from qes.generation import GenerationConfig, load_batch, score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="GPTQ checkpoint folder")
    parser.add_argument("--train", required=True, help="train.parquet of the task stage")
    parser.add_argument("--batch", type=int, default=16, help="prompts per member (finetune.batch_prompts)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--population", type=int, default=8, help="members per iteration, for the estimate")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model, tokenizer = load_quantized(args.model)
    full = load_batch(tokenizer, args.train)
    batch = full.subset(prompt_indices(0, 0, len(full), args.batch))
    stop = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch,
                            stop_strings=full.task.stop_strings)
    sides = {"stop at EOS only": replace(stop, stop_strings=()), f"stop at EOS or {list(stop.stop_strings)}": stop}
    names = list(sides)
    results, seconds = {}, {name: [] for name in names}
    ratios = []
    for i in range(args.repeats + 1):
        order = names[i % 2 :] + names[: i % 2]
        round_seconds = {}
        for name in order:
            start = time.perf_counter()
            results[name] = score(model, batch, sides[name])
            round_seconds[name] = time.perf_counter() - start
        if i:  # the first round warms up
            for name in names:
                seconds[name].append(round_seconds[name])
            ratios.append(round_seconds[names[1]] / round_seconds[names[0]])

    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}, "
          f"compute {describe_compute(model)}")
    print(f"{args.batch} training prompts of iteration 0, greedy, max_new_tokens {args.max_new_tokens}, "
          f"median of {args.repeats} rounds\n")
    print("| member fitness | generated tokens | seconds | mean reward | format rate | accuracy |")
    print("|---|---|---|---|---|---|")
    for name in names:
        r = results[name]
        n = len(r.records)
        print(f"| {name} | {r.generated_tokens} | {statistics.median(seconds[name]):.2f} | {r.mean_reward:.4f} | "
              f"{sum(x.format_ok for x in r.records) / n:.3f} | {sum(x.correct for x in r.records) / n:.3f} |")
    ratio = statistics.median(ratios)
    print(f"\nseconds with stop strings / without: {ratio:.3f} (median of per-round ratios)")
    per_iteration = {name: args.population * statistics.median(seconds[name]) for name in names}
    print("fitness per iteration at population {}: {}".format(
        args.population, ", ".join(f"{name} {s:.0f} s" for name, s in per_iteration.items())))
    changed = sum(a != b for a, b in zip(results[names[0]].rewards, results[names[1]].rewards, strict=True))
    print(f"rows whose reward differs: {changed} of {args.batch}")


if __name__ == "__main__":
    main()
