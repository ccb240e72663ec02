"""The benchmark suite: speed, memory and replay of the QES engine on the default model, side by side in one run.

    python benchmarks/suite.py --model results/quantized/smollm2-135m-instruct-w4g64 \
        --train results/data/countdown/train.parquet --run-dir results/runs/default --out docs/BENCHMARKS.md

P1  ES overhead: (P x (perturb + restore) + update) / (P x fitness) per iteration, seed-replay and stored modes.
P2  fitness throughput (qes.generation.score) vs one plain `model.generate` of the same batch and length.
P3  peak memory (RSS; CUDA max allocated on GPU) of a short finetune vs plain quantized inference of the same
    batch, each in a fresh process.
P4  replay of a whole finished run (--run-dir) vs its training wall time.
P5  iteration time with 1 vs 2 ranks (benchmarks/bench_ranks.py).
S   update and perturb/restore time vs number of codes, on synthetic GPTQ layers, at a fixed noise scale
    (non-zeros grow with codes) and at a fixed number of non-zeros (sigma shrinks as codes grow).

Prints each table as it is measured and writes them all, with the machine and the command, to --out.
Timings are medians; compare the ratios, which are measured in the same run, not absolute seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from bench_engine import make_step, median_seconds  # noqa: E402  (the same synthetic step and timer)

median_time = median_seconds

P = 8
WINDOW = 10
SIGMA = 0.01  # the default config's step sizes
ALPHA = 0.003


def update_seconds(layers, mode: str, sigma: float, repeats: int) -> float:
    """Median time of one update in `mode` with the replay window already full."""
    from qes.engine import Engine
    from qes.noise import NoiseSpec
    from qes.update import UpdateConfig

    engine = Engine(layers, NoiseSpec.from_sigma(sigma), UpdateConfig(mode=mode, window=WINDOW))
    for t in range(WINDOW if mode == "replay" else 1):
        engine.apply(make_step(t, P, sigma, ALPHA))
    steps = iter(range(100, 10**6))
    return median_time(lambda: engine.apply(make_step(next(steps), P, sigma, ALPHA)), repeats)


def perturb_restore_seconds(layers, sigma: float, repeats: int) -> float:
    from qes.engine import Engine
    from qes.noise import NoiseSpec
    from qes.update import UpdateConfig

    engine = Engine(layers, NoiseSpec.from_sigma(sigma), UpdateConfig(mode="none"))
    seeds = iter(range(1, 10**6))
    return median_time(lambda: engine.restore(engine.perturb(next(seeds), 1)), repeats)


# --- P1 / P2 ---------------------------------------------------------------------------------------


def overhead_and_throughput(model_dir: Path, train: Path, batch: int, new_tokens: int, repeats: int) -> tuple[str, str]:
    from qes.checkpoint import load_quantized
    from qes.codes import quantized_linears
    from qes.generation import GenerationConfig, hf_generation_config, load_batch, score

    model, tokenizer = load_quantized(model_dir, backend="auto")
    prompts = load_batch(tokenizer, train, batch)
    generation = GenerationConfig(max_new_tokens=new_tokens, batch_size=batch)
    layers = quantized_linears(model)

    pert = perturb_restore_seconds(layers, SIGMA, max(repeats, 5))
    updates = {mode: update_seconds(layers, mode, SIGMA, repeats) for mode in ("replay", "stored")}

    [plain_chunk] = prompts.chunks(batch)  # plain left-padded prompts, as a user would call generate
    gen_cfg = hf_generation_config(generation, prompts)

    def plain() -> None:
        with torch.inference_mode():
            model.generate(input_ids=plain_chunk.input_ids, attention_mask=plain_chunk.attention_mask,
                           generation_config=gen_cfg)

    def fitness() -> None:
        score(model, prompts, generation)

    fitness(), plain()  # warm-up
    fit_times, plain_times = [], []
    for _ in range(repeats):  # alternate, so load from other processes hits both alike
        fit_times.append(median_time(fitness, 1))
        plain_times.append(median_time(plain, 1))
    fit, gen = statistics.median(fit_times), statistics.median(plain_times)
    ratios = [p / f for p, f in zip(plain_times, fit_times)]

    p1 = [f"Default model, P = {P}, sigma = {SIGMA}, alpha = {ALPHA}, K = {WINDOW}; fitness = one member's "
          f"score() of {batch} prompts x {new_tokens} new tokens ({fit:.2f} s); perturb + restore {pert:.3f} s.",
          "", "| mode | P x (perturb + restore) | update | P x fitness | overhead | target |",
          "|---|---|---|---|---|---|"]
    for mode, upd in updates.items():
        ratio = (P * pert + upd) / (P * fit)
        p1.append(f"| {mode} | {P * pert:.2f} s | {upd:.2f} s | {P * fit:.1f} s | {100 * ratio:.1f}% | <= 5% |")
    p2 = ["| side | seconds (median) | throughput vs plain generate | target |", "|---|---|---|---|",
          f"| plain model.generate | {gen:.2f} | 100% | |",
          f"| fitness (score: generate + decode + reward, shared-prefix cache) | {fit:.2f} | "
          f"{100 * statistics.median(ratios):.0f}% | >= 90% |"]
    return "\n".join(p1), "\n".join(p2)


# --- P3 --------------------------------------------------------------------------------------------

_MEMORY_CHILD = r"""
import json, sys, tempfile
from pathlib import Path
import torch
from qes.checkpoint import load_quantized
from qes.generation import GenerationConfig, load_batch, score
from qes.finetune import finetune, finetune_config

def reset_peak():  # Linux: "5" resets the high-water mark VmHWM to the current RSS
    Path("/proc/self/clear_refs").write_text("5")

def peak_mb():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

kind, model_dir, train, batch, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
generation = GenerationConfig(max_new_tokens=tokens, batch_size=batch)
if kind == "inference":
    model, tokenizer = load_quantized(model_dir, backend="auto")
    prompts = load_batch(tokenizer, train, batch)
    score(model, prompts, generation)  # warm-up, then measure a steady-state batch
    reset_peak()
    score(model, prompts, generation)
else:
    block = {"iterations": 3, "population": 4, "sigma": 0.01, "alpha": 0.003, "batch_prompts": batch,
             "max_new_tokens": tokens, "residual": {"mode": kind, "window": 10}}
    with tempfile.TemporaryDirectory() as tmp:  # measure iterations 2 and 3 (updates with a window)
        finetune(model_dir, train, tmp + "/run", finetune_config(block),
                 on_iteration=lambda row: reset_peak() if row["iteration"] == 0 else None)
cuda = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
print(json.dumps({"rss_mb": peak_mb(), "cuda_mb": cuda}))
"""


def memory(model_dir: Path, train: Path, batch: int, new_tokens: int) -> str:
    peaks = {}
    for kind in ("inference", "replay", "stored"):
        out = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, kind, str(model_dir), str(train), str(batch),
                              str(new_tokens)], capture_output=True, text=True, check=True)
        peaks[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    base = peaks["inference"]["rss_mb"]
    lines = ["| process | peak RSS | vs inference | target |", "|---|---|---|---|",
             f"| plain quantized inference (score() of the same batch) | {base:.0f} MB | 1.00x | |"]
    for kind, label, target in (("replay", "finetune, seed replay (iterations 2-3 of 3, P = 4)", "<= 1.15x"),
                                ("stored", "finetune, stored residual (iterations 2-3 of 3, P = 4)", "")):
        rss = peaks[kind]["rss_mb"]
        lines.append(f"| {label} | {rss:.0f} MB | {rss / base:.2f}x | {target} |")
    if peaks["inference"]["cuda_mb"] is not None:
        lines.append("")
        lines.append("CUDA max allocated: " + ", ".join(f"{k} {v['cuda_mb']:.0f} MB" for k, v in peaks.items()))
    lines += ["", "Peak RSS is the high-water mark after the model is loaded and warmed up (reset through "
              "/proc/self/clear_refs), so loading, which peaks alike for all three, does not hide the difference."]
    return "\n".join(lines)


# --- P4 --------------------------------------------------------------------------------------------


def replay_vs_training(model_dir: Path, run_dir: Path) -> str:
    import pyarrow.parquet as pq

    from qes.checkpoint import load_quantized
    from qes.replay import engine_for_log, replay_steps
    from qes.seedlog import SeedLog

    seedlog = SeedLog.open(run_dir)
    model, _ = load_quantized(model_dir, backend="auto")
    start = time.perf_counter()
    engine = engine_for_log(model, seedlog)
    replay_steps(engine, seedlog)
    replay = time.perf_counter() - start
    final = seedlog.finished["codes_sha256"] if seedlog.finished else None
    same = final is not None and engine.codes_sha256() == final
    training = sum(r["seconds_total"] for r in pq.read_table(run_dir / "metrics.parquet").to_pylist())
    return "\n".join([
        "| run | iterations | training wall time | replay (load + all steps + hash checks) | ratio | target |",
        "|---|---|---|---|---|---|",
        f"| {run_dir} | {seedlog.iterations} | {training:.0f} s | {replay:.1f} s | {100 * replay / training:.1f}% "
        f"| <= 2% |",
        "",
        f"Replayed codes_sha256 {'equals' if same else 'DIFFERS FROM'} the run's final hash.",
    ])


# --- S: scaling ------------------------------------------------------------------------------------


def synthetic_layers(total_codes: int, width: int = 2048):
    """GPTQ-layout INT4 layers adding up to about `total_codes`, their words drawn from the counter hash."""
    from qes.codes import LayerCodes
    from qes.noise import hash32

    layers = []
    words = (width // 8) * width
    for i in range(max(1, total_codes // (width * width))):
        module = torch.nn.Module()
        draws = hash32(torch.arange(i * words, (i + 1) * words, dtype=torch.int64))  # in [0, 2^32)
        module.qweight = (draws - (1 << 31)).to(torch.int32).view(width // 8, width)
        layers.append(LayerCodes(f"layer.{i:03d}", module, 4, width, width))
    return layers


def sigma_for_density(density: float) -> float:
    from qes.noise import NoiseSpec

    lo, hi = 1e-4, 1.0
    for _ in range(50):
        mid = (lo * hi) ** 0.5
        lo, hi = (mid, hi) if NoiseSpec.from_sigma(mid).density < density else (lo, mid)
    return hi


def scaling(repeats: int, sizes: list[int]) -> str:
    from qes.noise import NoiseSpec

    fixed_nnz = NoiseSpec.from_sigma(SIGMA).density * sizes[0]
    lines = ["| series | codes | sigma | non-zeros per seed | perturb + restore | update, replay (K = 10) "
             "| update, stored |", "|---|---|---|---|---|---|---|"]
    for label, codes_list in (("fixed sigma", sizes), ("fixed non-zeros", sizes)):
        for codes in codes_list:
            sigma = SIGMA if label == "fixed sigma" else sigma_for_density(fixed_nnz / codes)
            layers = synthetic_layers(codes)
            n = sum(x.num_codes for x in layers)
            nnz = NoiseSpec.from_sigma(sigma).density * n
            pert = perturb_restore_seconds(layers, sigma, repeats)
            replay = update_seconds(layers, "replay", sigma, repeats)
            stored = update_seconds(layers, "stored", sigma, repeats)
            lines.append(f"| {label} | {n / 1e6:.0f} M | {sigma:.4f} | {nnz / 1e6:.2f} M | {pert:.3f} s "
                         f"| {replay:.2f} s | {stored:.2f} s |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------


def machine() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU only"
    return (f"{platform.processor() or platform.machine()}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), {device}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="GPTQ checkpoint (the quantize stage's output)")
    parser.add_argument("--train", type=Path, required=True, help="train.parquet of the task stage")
    parser.add_argument("--run-dir", type=Path, default=None, help="a finished run's seed log, for P4")
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write (e.g. docs/BENCHMARKS.md)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rank-iterations", type=int, default=2)
    parser.add_argument("--scaling-sizes", default="16,64,256", help="millions of codes, comma-separated")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip (P1,P3,P4,P5,S)")
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    sections: list[tuple[str, str]] = []

    def section(title: str, body: str) -> None:
        print(f"\n## {title}\n\n{body}\n", flush=True)
        sections.append((title, body))

    started = time.perf_counter()
    if "P1" not in skip:
        p1, p2 = overhead_and_throughput(args.model, args.train, args.batch, args.new_tokens, args.repeats)
        section("P1 ES overhead per iteration", p1)
        section("P2 fitness throughput vs plain generate", p2)
    if "P3" not in skip:
        section("P3 peak memory", memory(args.model, args.train, args.batch, args.new_tokens))
    if "P4" not in skip and args.run_dir is not None:
        section("P4 replay of a whole run vs its training", replay_vs_training(args.model, args.run_dir))
    if "P5" not in skip:
        from bench_ranks import measure, table

        with tempfile.TemporaryDirectory():
            results = measure(args.model, args.train, args.rank_iterations, torch.get_num_threads(),
                              HERE.parent / "config" / "config.yaml")
        section("P5 one rank vs two ranks", table(results))
    if "S" not in skip:
        sizes = [int(x) * 2**20 for x in args.scaling_sizes.split(",")]
        section("S update cost vs number of codes (synthetic INT4 layers)", scaling(args.repeats, sizes))

    command = "python benchmarks/suite.py " + " ".join(sys.argv[1:])
    if args.out is not None:
        marker = "<!-- generated by benchmarks/suite.py -->"
        old = args.out.read_text() if args.out.exists() else "# Benchmarks\n\n"
        head, _, generated = old.partition(marker)
        # Sections measured in this run replace those of an earlier run; the others are kept, with their command.
        preamble, *blocks = generated.split("\n## ")
        kept = {}
        for block in blocks:
            title, _, body = block.partition("\n")
            kept[title.strip()] = body.strip()
        for title, body in sections:
            kept[title] = f"{body}\n\nMachine: {machine()}. Command: `{command}`"
        text = [f"## {title}\n\n{kept[title]}\n" for title in sorted(kept)]  # P1..P5, then S
        args.out.parent.mkdir(parents=True, exist_ok=True)
        preamble = preamble.strip() or f"Machine: {machine()}."
        args.out.write_text(head + marker + "\n\n" + preamble + "\n\n" + "\n".join(text))
        print(f"wrote {args.out}")
    print(f"suite: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
