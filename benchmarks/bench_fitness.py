"""Fitness throughput next to a plain ``model.generate`` of the same model, batch and length, in one run.

    python benchmarks/bench_fitness.py --model results/quantized/smollm2-135m-instruct-w4g64 \
        --batch 16 --max-new-tokens 48 --repeats 5

All sides generate greedily from the same prompts (Countdown prompts of the default task settings, rendered with
the checkpoint's chat template). The fitness sides are :func:`qes.generation.score` -- padding, generation,
decoding and the reward -- with the shared-prompt-prefix KV cache (the default) and without it. The plain side
is one ``model.generate`` call on the left-padded prompts and nothing else. After one warm-up round the sides
run in rotating order, so load from other processes hits all alike; the table gives medians of generated
tokens per second (tokens up to and including EOS) and the median, over rounds, of each side's rate divided by
the plain rate of the same round. Compare ratios, not absolute numbers, on shared machines.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import torch

from qes.checkpoint import describe_compute, load_quantized
from qes.generation import GenerationConfig, generated_lengths, hf_generation_config, make_batch, score
from qes.tasks.countdown import CountdownConfig, TaskSettings, build_prompt, generate_split


def plain_generate(model, ids: torch.Tensor, mask: torch.Tensor, gen_cfg, eos: int) -> int:
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_cfg)
    return sum(generated_lengths(out[:, ids.shape[1] :], eos))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="GPTQ checkpoint folder")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--backend", choices=["auto", "int4pack", "dense"], default="auto", help="forward backend")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto", help="compute dtype")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_quantized(args.model, dtype=args.dtype, backend=args.backend)
    settings = TaskSettings()
    gen = CountdownConfig(**{**settings.generator.__dict__, "train_size": 0, "eval_size": args.batch})
    problems = generate_split(gen, "eval")
    prompts = [build_prompt(tokenizer, p, settings.prompt) for p in problems]
    batch = make_batch(tokenizer, problems, prompts, settings.prompt.assistant_prefix)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch)
    [plain_chunk] = batch.chunks(args.batch)  # plain left-padded prompts, as a user would call generate
    ids, mask = plain_chunk.input_ids, plain_chunk.attention_mask
    gen_cfg = hf_generation_config(replace(cfg, stop_strings=()), batch)  # a plain call knows no stop strings

    def timed(fn: Callable[[], int]) -> tuple[int, float]:
        start = time.perf_counter()
        n = fn()
        return n, time.perf_counter() - start

    plain = "plain generate"
    sides: dict[str, Callable[[], int]] = {
        "fitness score (shared prefix)": lambda: score(model, batch, cfg).generated_tokens,
        "fitness score (no sharing)": lambda: score(model, batch, replace(cfg, share_prefix=False)).generated_tokens,
        "fitness score (no stop strings)": lambda: score(model, batch, replace(cfg, stop_strings=())).generated_tokens,
        plain: lambda: plain_generate(model, ids, mask, gen_cfg, batch.eos_token_id),
    }
    names = list(sides)
    rates: dict[str, list[float]] = {k: [] for k in names}
    ratios: dict[str, list[float]] = {k: [] for k in names}
    tokens: dict[str, int] = {}
    for i in range(args.repeats + 1):
        order = names[i % len(names) :] + names[: i % len(names)]  # rotate who goes first
        seconds = {}
        for name in order:
            tokens[name], seconds[name] = timed(sides[name])
        if i == 0:
            continue  # warm-up
        for name in names:
            rates[name].append(tokens[name] / seconds[name])
            ratios[name].append(rates[name][-1] / (tokens[plain] / seconds[plain]))

    print(
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}\n"
        f"model {args.model} ({describe_compute(model)}), batch {args.batch}, max_new_tokens {args.max_new_tokens}, "
        f"{args.repeats} rotating repeats after a warm-up, torch threads {torch.get_num_threads()}\n"
    )
    print("| path | generated tokens | tokens/s (median) | min | max | vs plain (median of repeats) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for k in names:
        v = rates[k]
        print(
            f"| {k} | {tokens[k]} | {statistics.median(v):.1f} | {min(v):.1f} | {max(v):.1f} "
            f"| {100 * statistics.median(ratios[k]):.0f}% |"
        )


if __name__ == "__main__":
    main()
