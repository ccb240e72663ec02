"""ES overhead of the QES engine next to the fitness evaluation it serves, in one run.

    python benchmarks/bench_engine.py --model results/quantized/smollm2-135m-instruct-w4g64

Measures, on the given GPTQ checkpoint: perturb + restore of one member, one update in each residual
mode (population 8, seed-replay window K = 10 already filled), one fitness evaluation (greedy
generation, batch 16 x 48 new tokens), the ratio (P * perturb/restore + update) / (P * fitness), and
the seed log's bytes per iteration at population 50. Prints a markdown table. Timings are medians of
--repeats runs; compare ratios, not absolute seconds, on shared machines.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_seedlog import synthetic_log

from qes.checkpoint import load_quantized
from qes.codes import quantized_linears
from qes.engine import Engine
from qes.noise import NoiseSpec, member_seeds
from qes.update import Step, UpdateConfig, alpha_fixed_point, quantize_coefficients

PROMPT = (
    "Using the numbers [{a}, {b}, {c}], create an equation that equals {t}. You can use + - * / and "
    "each number once. Think in <think> </think> tags, then answer in <answer> </answer> tags."
)


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def make_step(t: int, population: int, sigma: float, alpha: float) -> Step:
    seeds = member_seeds(1234, t, population // 2)
    values = [((i * 7 + t) % 11 - 5) / 3 for i in range(population)]
    return Step(
        iteration=t,
        alpha_fp=alpha_fixed_point(alpha, sigma),
        seeds=tuple(s for s in seeds for _ in (1, -1)),
        signs=tuple(sign for _ in seeds for sign in (1, -1)),
        coefs=quantize_coefficients(values),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="GPTQ checkpoint folder (the quantize stage's output)")
    parser.add_argument("--sigma", type=float, default=0.01)
    parser.add_argument("--alpha", type=float, default=5e-4)
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model, tokenizer = load_quantized(args.model, backend="auto")
    tokenizer.padding_side = "left"
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": PROMPT.format(a=i + 2, b=i + 5, c=7, t=3 * i + 11)}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for i in range(args.batch)
    ]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)

    noise = NoiseSpec.from_sigma(args.sigma)
    rows = []
    layers = quantized_linears(model)

    def make_engine(mode: str) -> Engine:
        # One engine at a time: an engine re-points the modules' packed codes into its own arenas.
        return Engine(layers, noise, UpdateConfig(mode=mode, window=args.window))

    def fitness() -> None:
        with torch.no_grad():
            model.generate(
                **batch, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                do_sample=False, pad_token_id=tokenizer.pad_token_id,
            )

    engine = make_engine("replay")
    seeds = iter(range(1, 10**6))

    def perturb_restore() -> None:
        engine.restore(engine.perturb(next(seeds), 1))

    t_pert = median_seconds(perturb_restore, max(args.repeats, 5))
    def perturbed_fitness() -> None:
        p = engine.perturb(7, 1)
        fitness()
        engine.restore(p)

    t_fit = median_seconds(perturbed_fitness, args.repeats) - t_pert
    num_codes = engine.num_codes
    rows.append(("perturb + restore, one member", t_pert))
    rows.append((f"fitness, one member ({args.batch} x {args.new_tokens} tokens)", t_fit))
    population = args.population
    for mode in ("replay", "stored", "none"):
        eng = make_engine(mode)
        warm = args.window if mode == "replay" else 1
        for t in range(warm):
            eng.apply(make_step(t, population, args.sigma, args.alpha))
        t_upd = median_seconds(
            lambda eng=eng: eng.apply(make_step(len(eng.history) + 100, population, args.sigma, args.alpha)),
            args.repeats,
        )
        rows.append((f"update, {mode} (P={population}" + (f", K={args.window})" if mode == "replay" else ")"), t_upd))

    with tempfile.TemporaryDirectory() as tmp:
        log_bytes = synthetic_log(Path(tmp) / "run", 20, 50).bytes_per_iteration()

    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"model {args.model}: {num_codes:,} codes, sigma {args.sigma}, density {noise.density:.5f}, "
          f"threads {torch.get_num_threads()}\n")
    print("| measurement | seconds |")
    print("|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.4f} |")
    fit_iter = population * t_fit
    print("\n| mode | (P x perturb/restore + update) / (P x fitness) | target |")
    print("|---|---|---|")
    for name, seconds in rows[2:]:
        ratio = (population * t_pert + seconds) / fit_iter
        print(f"| {name} | {100 * ratio:.2f}% | <= 5% |")
    print(f"\nseed log: {log_bytes:.0f} bytes per iteration at population 50 (target <= 1024)")


if __name__ == "__main__":
    main()
