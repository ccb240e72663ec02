"""Fitness throughput next to a plain ``model.generate`` of the same model, batch and length, in one run.

    python benchmarks/bench_fitness.py --model results/quantized/smollm2-135m-instruct-w4g64 \
        --batch 16 --max-new-tokens 48 --repeats 5

Both sides generate greedily from the same left-padded prompt tensors (Countdown prompts of the default task
settings, rendered with the checkpoint's chat template). The fitness side is :func:`qes.fitness.score`:
padding, generation, decoding and the reward. The plain side is one ``model.generate`` call and nothing else.
Runs alternate (fitness, plain, fitness, ...) after one warm-up of each, so load from other processes hits
both alike (which side goes first alternates too); the table gives medians of generated tokens per second
(tokens up to and including EOS), and the ratio is the median over back-to-back pairs. Compare ratios, not
absolute numbers, on shared machines.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qes.codes import load_quantized
from qes.fitness import GenerationConfig, generated_lengths, hf_generation_config, make_batch, score
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
    parser.add_argument("--kernel", choices=["live", "fast"], default="fast", help="qes.codes.load_quantized kernel")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_quantized(args.model, kernel=args.kernel)
    settings = TaskSettings()
    gen = CountdownConfig(**{**settings.generator.__dict__, "train_size": 0, "eval_size": args.batch})
    problems = generate_split(gen, "eval")
    prompts = [build_prompt(tokenizer, p, settings.prompt) for p in problems]
    batch = make_batch(tokenizer, problems, prompts, settings.prompt.assistant_prefix)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch)
    [(_, ids, mask)] = batch.chunks(args.batch)
    gen_cfg = hf_generation_config(cfg, batch)

    def run_fitness() -> tuple[int, float]:
        start = time.perf_counter()
        result = score(model, batch, cfg)
        return result.generated_tokens, time.perf_counter() - start

    def run_plain() -> tuple[int, float]:
        start = time.perf_counter()
        n = plain_generate(model, ids, mask, gen_cfg, batch.eos_token_id)
        return n, time.perf_counter() - start

    rates: dict[str, list[float]] = {"fitness (score)": [], "plain generate": []}
    ratios: list[float] = []
    tokens: dict[str, int] = {}
    for i in range(args.repeats + 1):
        # Alternate which side goes first, so a slow phase of a shared machine does not favour one side.
        if i % 2:
            (plain_n, plain_s), (fit_n, fit_s) = run_plain(), run_fitness()
        else:
            (fit_n, fit_s), (plain_n, plain_s) = run_fitness(), run_plain()
        if plain_n != fit_n:
            raise RuntimeError(f"generated token counts differ: fitness {fit_n}, plain {plain_n}")
        tokens = {"fitness (score)": fit_n, "plain generate": plain_n}
        if i == 0:
            continue  # warm-up
        rates["fitness (score)"].append(fit_n / fit_s)
        rates["plain generate"].append(plain_n / plain_s)
        ratios.append(plain_s / fit_s)

    print(
        f"model {args.model} ({args.kernel} kernel), batch {args.batch}, max_new_tokens {args.max_new_tokens}, "
        f"{args.repeats} alternating repeats after a warm-up, torch threads {torch.get_num_threads()}\n"
    )
    print("| path | generated tokens | tokens/s (median) | min | max |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for k, v in rates.items():
        print(f"| {k} | {tokens[k]} | {statistics.median(v):.1f} | {min(v):.1f} | {max(v):.1f} |")
    print(
        f"\nfitness / plain throughput, median of back-to-back pairs: {100 * statistics.median(ratios):.1f}% "
        f"(pairs: {', '.join(f'{100 * r:.0f}%' for r in ratios)})"
    )


if __name__ == "__main__":
    main()
