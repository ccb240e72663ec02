"""Forward backends and compute dtypes side by side on the CPU at hand: fitness speed and ES overhead.

    python benchmarks/bench_backends.py --model results/quantized/smollm2-135m-instruct-w4g64 \
        --batch 16 --max-new-tokens 48 --repeats 2

Each row loads the checkpoint with one (backend, dtype) pair and scores the same Countdown prompts as one
training member does (``qes.generation.score``: greedy, shared-prefix KV cache). After a warm-up round the rows run
in rotating order, so load from other processes hits all alike; the table gives the median seconds per member,
the median over rounds of each row's time relative to the ``auto`` row of the same round, the greedy
completions that match the float32 dense row, and the time of one perturb + restore at the default sigma
against one member's fitness (the ES overhead the engine adds per member). The first line names the CPU's
capability and whether it runs bf16 natively: compare ratios, not seconds, on shared machines.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from qes.checkpoint import describe_compute, load_quantized
from qes.codes import quantized_linears
from qes.engine import Engine
from qes.generation import GenerationConfig, make_batch, score
from qes.noise import NoiseSpec
from qes.qlinear import cpu_runs_bf16_natively
from qes.tasks.countdown import CountdownConfig, TaskSettings, build_prompt, generate_split
from qes.update import UpdateConfig

ROWS = {
    "auto (default)": ("auto", "auto"),
    "int4pack, bfloat16": ("int4pack", "bfloat16"),
    "dense, float32": ("dense", "float32"),
}
MORE_ROWS = {
    "dense, bfloat16": ("dense", "bfloat16"),
    "int4pack, float32 (float32 int4 kernel)": ("int4pack", "float32"),
}


def perturb_restore_seconds(model: torch.nn.Module, sigma: float, members: int = 4) -> float:
    engine = Engine(quantized_linears(model), NoiseSpec.from_sigma(sigma), UpdateConfig())
    start = time.perf_counter()
    for seed in range(1, members + 1):
        engine.restore(engine.perturb(seed, 1))
    return (time.perf_counter() - start) / members


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="GPTQ INT4 checkpoint folder")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--sigma", type=float, default=0.01)
    parser.add_argument("--all", action="store_true", help="also dense in bf16 and int4pack with a float32 kernel")
    args = parser.parse_args()

    rows = {**ROWS, **(MORE_ROWS if args.all else {})}
    models = {name: load_quantized(args.model, backend=b, dtype=d) for name, (b, d) in rows.items()}
    tokenizer = next(iter(models.values()))[1]
    settings = TaskSettings()
    gen = CountdownConfig(**{**settings.generator.__dict__, "train_size": 0, "eval_size": args.batch})
    problems = generate_split(gen, "eval")
    prompts = [build_prompt(tokenizer, p, settings.prompt) for p in problems]
    batch = make_batch(tokenizer, problems, prompts, settings.prompt.assistant_prefix)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch)

    names = list(rows)
    seconds: dict[str, list[float]] = {n: [] for n in names}
    relative: dict[str, list[float]] = {n: [] for n in names}
    responses: dict[str, list[str]] = {}
    for r in range(args.repeats + 1):
        order = names[r % len(names) :] + names[: r % len(names)]
        took = {}
        for name in order:
            start = time.perf_counter()
            result = score(models[name][0], batch, cfg)
            took[name] = time.perf_counter() - start
            responses[name] = result.responses
        if r == 0:
            continue  # warm-up
        for name in names:
            seconds[name].append(took[name])
            relative[name].append(took[name] / took[names[0]])
    overhead = {n: perturb_restore_seconds(models[n][0], args.sigma) for n in names}

    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {cpu_runs_bf16_natively()}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"model {args.model}, {args.batch} prompts x {args.max_new_tokens} new tokens per member, "
          f"{args.repeats} rotating rounds after a warm-up\n")
    print("| backend, dtype | model dtype / int4 kernel | s per member (median) | vs auto | "
          "same completions as dense float32 | perturb + restore | vs member fitness |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    reference = responses["dense, float32"]
    for name in names:
        compute = describe_compute(models[name][0])
        kinds = f"{compute['dtype']} / {compute.get('int4pack_dtype', '-')}"
        same = sum(a == b for a, b in zip(responses[name], reference))
        fit = statistics.median(seconds[name])
        print(f"| {name} | {kinds} | {fit:.1f} | {statistics.median(relative[name]):.2f}x | {same}/{len(reference)} "
              f"| {1000 * overhead[name]:.0f} ms | {100 * overhead[name] / fit:.2f}% |")


if __name__ == "__main__":
    main()
