"""Check a device end to end on synthetic GPTQ models of real architectures: exactness, speed, memory.

    python benchmarks/gpu_check.py --device cuda                   # smollm2 and qwen1.5b shapes, < 8 min on one GPU
    python benchmarks/gpu_check.py --device cpu --size tiny        # a 2-layer llama, seconds on a CPU
    python benchmarks/gpu_check.py --device cuda --json gpu.json   # also write the numbers

Nothing is downloaded or read from disk. Each size is a transformers model of a real architecture (``tiny``: a
2-layer llama; ``smollm2``: SmolLM2-135M's shapes, group 64 because 576 inputs do not split into groups of
128; ``qwen1.5b``: Qwen2.5-1.5B's shapes, group 128, biased q/k/v; all three tie the lm_head to the input
embeddings, as SmolLM2 and Qwen2.5-1.5B do, and both builds are checked to share that one tensor) assembled by
:func:`qes.codes.assemble_quantized` from GPTQ INT4 tensors made in memory (``_gpu_models.py``: every value a
function of a counter hash, exact on any device). Scales keep the random model's activations finite, which is
checked.

Per size, in this order:

1. **plain**: a vanilla transformers model whose linears are ordinary ``torch.nn.Linear`` layers holding the
   dequantized weights, alone on the device; greedy batched generation (:func:`qes.generation.generate`) of
   synthetic prompts that every row answers in full; tokens/s and peak memory.
2. **QES run**: the GPTQ model (backend ``dense``: bf16 on CUDA) alone on the device, and the engine
   (seed-replay residual, K = 10). ``steps`` iterations of a fixed schedule: each member is perturbed, scored
   by the same generation and restored, then the update is applied. Seeds come from ``member_seeds`` and the
   integer coefficients from fixed rewards (``shape_rewards`` + ``quantize_coefficients``), never from the
   fitness, so the codes after the schedule are the same on every device. Then further fixed steps (updates
   only) up to K + 3: the residual window fills and the first steps fall out of it; the update is timed at
   the full window.
3. **member batching**: one member scored alone and ``members`` members together (:mod:`qes.members`), and the
   plain model generating the same number of rows in one call: on a GPU the group should cost at most 3x one
   member and reach 70% of the plain rows' tokens/s. With ``--decode both`` (the default on cuda) the group is
   scored again with ``finetune.decode: compiled`` (fixed-shape decode steps through ``torch.compile``, CUDA
   graphs on CUDA): compile time once, the same two ratios, and its responses against the eager group's.
4. **training fitness**: the population scored as finetune scores it, through training's own member loop with
   ``fitness`` / ``group_fitness`` built as :mod:`qes.finetune` builds them (:func:`qes.generation.score` /
   :func:`~qes.generation.score_group`, prefix cache per member), on prompts that share a long prefix under a task
   with a stop string: every member alone, then all of them in one group. Rewards and responses must agree
   (in float32; bf16 rounds the batched correction differently, so there they are only reported).
5. After all of it, every layer's dense cache is compared with a full dequantization of its current codes, bit
   for bit, and the codes are hashed (scoring members leaves no trace, so this is the state after K + 3 steps).
6. **replay** on the device: fresh codes (no float weights), the same steps through ``Engine.apply``.
7. **CPU reference**: fresh codes on the CPU (backend ``none``), the same steps. Through the full window it
   replays every layer of models up to 2^24 codes, else the last decoder layer's linears, smallest first, up to
   2^24 codes (smollm2: all seven; qwen1.5b: q, k, v, o). Each layer's noise and update are its own, so a subset
   comes out as in the whole model, and the whole of qwen1.5b would take many minutes on a CPU. On a CPU device
   the replay of 6 is this reference when it covers every layer.

The codes hash must be one and the same in 2, 6 and 7 after the scored iterations, and in 5, 6 and 7 after the
full window: perturb/restore pairs leave no trace and the update is integer-exact. The table reports them
with the throughput ratio (target >= 70%) and the ES overhead: perturb + restore per member against one member's
fitness (target <= 2%), and the update per iteration against an iteration's fitness, taken as the member phase's
group scored together (target <= 5%). Timings wait for the device's queued work.

Memory (CUDA ``max_memory_allocated``; on a CPU only the process's peak RSS is given). The dense backend
computes with a dequantized weight cache as large as the plain model's weights and keeps the GPTQ tensors
(packed codes, zero points, scales, g_idx: about a quarter of the linears' bf16 bytes) beside it, so plain
inference plus those tensors is its floor, never plain inference alone. The target compares the peak while
members are scored (perturb, generate, restore) with plain inference's peak plus the GPTQ tensors' exact
bytes: <= 1.15x bounds what the engine and the perturbations add. The replay update at the full window needs
scratch of its own while nothing generates: about 10 bytes per code of the engine's largest chunk (residual,
last touch, support mask, g, unpacked codes; on CUDA chunks hold at least 2^27 codes, so about 1.3 GB on
large models) plus the window's sparse noise. It is measured and reported, with the whole run's peak
against plain inference, without a target.

The exit status is 1 when an exactness check fails (hashes, dense caches, finite activations, training
fitness in float32), whatever the timings. Progress goes to stderr, the table to stdout.

Time boxes: plain repeats stop past ``--budget-s``; scored iterations stop (never below 2) when the next one
would pass the size's ``seconds`` or the budget; training fitness is skipped when it would pass the budget.
The fixed steps, the replay and the CPU reference always run, the replays applying exactly the run's steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

try:  # run from a checkout without `pip install -e .`
    import qes  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch
from _gpu_models import ALPHA, SIGMA, SIZES, STOP_TEXT, WINDOW, Size, hf_config, reference_layers, synthetic_prompts
from _gpu_phases import Clock, note, plain_phase, qes_phase, replay_codes

from qes import _env  # noqa: F401  (environment defaults only; GPTQModel is never imported here)
from qes.generation import GenerationConfig
from qes.qlinear import compute_dtype

TARGET_THROUGHPUT = 0.70
TARGET_PERTURB = 0.02
TARGET_UPDATE = 0.05
TARGET_MEMORY = 1.15
TARGET_GROUP = 3.0


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_size(name: str, size: Size, device: torch.device, dtype: torch.dtype, deadline: float,
             compiled: bool = False) -> dict[str, Any]:
    started = time.perf_counter()
    config = hf_config(size)
    batch = synthetic_prompts(size)
    gen_cfg = GenerationConfig(max_new_tokens=size.new_tokens, batch_size=size.batch, share_prefix=False,
                               stop_strings=())
    res: dict[str, Any] = {"size": name, "shapes": asdict(size), "dtype": str(dtype).removeprefix("torch."),
                           "sigma": SIGMA, "alpha": ALPHA, "window": WINDOW, "population": size.population}

    note(f"{name}: plain model")
    plain, plain_logits = plain_phase(size, config, batch, gen_cfg, device, dtype, deadline)
    res.update(plain)
    Clock(device).reset_peak()
    note(f"{name}: QES model and engine")
    run, qes_logits = qes_phase(name, size, config, batch, gen_cfg, device, dtype, deadline, compiled)
    res.update(run)
    Clock(device).reset_peak()
    res["finite"] = bool(torch.isfinite(plain_logits).all() and torch.isfinite(qes_logits).all())
    res["logits_std"] = float(plain_logits.std())
    res["max_abs_logit_diff_qes_vs_plain"] = float((plain_logits - qes_logits).abs().max())
    res.update(replays(name, size, config, device, res["steps"], res["window_steps"]))
    res["peak_rss_bytes"] = peak_rss_bytes()
    res["seconds"] = time.perf_counter() - started
    res["checks"] = checks(res)
    res.update(ratios(res, size))
    return res


def replays(name: str, size: Size, config: Any, device: torch.device, steps: int, total: int) -> dict[str, Any]:
    note(f"{name}: replay on {device.type}")
    mine = replay_codes(size, config, device, steps, total)
    gc.collect()
    names = reference_layers(config)
    if device.type == "cpu" and len(names) == mine["layers"]:
        cpu = mine  # the same computation on the same device: nothing to gain from running it twice
    else:
        note(f"{name}: CPU reference")
        cpu = replay_codes(size, config, torch.device("cpu"), steps, total, names)
        gc.collect()
    return {"replay_hash_device": mine["after_steps"], "replay_window_hash_device": mine["after_window"],
            "replay_s_per_step_device": mine["s_per_step"], "base_hash_cpu": cpu["base"],
            "hash_cpu": cpu["after_steps"], "window_hash_cpu": cpu["after_window"],
            "replay_s_per_step_cpu": cpu["s_per_step"]}


def checks(res: dict[str, Any]) -> dict[str, bool]:
    out = {
        "base_hash_equal": res["base_hash_cpu"] == res["base_hash_device"],
        "run_hash_equal": res["hash_cpu"] == res["run_hash_device"],
        "replay_hash_equal": res["hash_cpu"] == res["replay_hash_device"],
        "window_hash_equal": res["window_hash_cpu"] == res["window_ref_hash_device"],
        "window_replay_hash_equal": res["replay_window_hash_device"] == res["window_hash_device"],
        "dense_caches_exact": res["dense_cache_exact_layers"] == res["dense_cache_layers"],
        "finite": res["finite"],
        "codes_changed": res["changed_codes"] > 0,
    }
    if res["dtype"] == "float32" and not res["train_fitness_skipped"]:
        out["train_fitness_rewards_equal"] = res["train_fitness_same_rewards"] == res["train_fitness_members"]
    return out


def ratios(res: dict[str, Any], size: Size) -> dict[str, float]:
    out = {
        "throughput_ratio": res["qes_tokens_per_s"] / res["plain_tokens_per_s"],
        "perturb_restore_vs_fitness": res["perturb_restore_s"] / res["fitness_s"],
        "update_vs_iteration": res["update_s"] / res["member_group_s"],
        "member_group_vs_alone": res["member_group_s"] / res["member_alone_s"],
        "member_group_throughput_ratio": res["member_group_tokens_per_s"] / res["plain_group_tokens_per_s"],
        "iteration_overhead": (size.population * res["perturb_restore_s"] + res["update_s"])
        / (size.population * res["fitness_s"]),
    }
    if "compiled_group_s" in res:
        out["compiled_group_vs_alone"] = res["compiled_group_s"] / res["member_alone_s"]
        out["compiled_throughput_ratio"] = res["compiled_group_tokens_per_s"] / res["plain_group_tokens_per_s"]
    if res["plain_peak_bytes"]:
        out["memory_ratio"] = res["qes_fitness_peak_bytes"] / (res["plain_peak_bytes"] + res["codes_bytes"])
        out["run_memory_ratio"] = res["qes_peak_bytes"] / res["plain_peak_bytes"]
    return out


# --- report ----------------------------------------------------------------------------------------


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MB"


def _target(value: float, limit: float, at_least: bool) -> str:
    return "met" if (value >= limit if at_least else value <= limit) else "missed"


def _ok(flag: bool) -> str:
    return "ok" if flag else "FAILED"


Row = tuple[str, str, str, str]


def rows_for(res: dict[str, Any]) -> list[Row]:
    if "error" in res:
        return [("error", res["error"], "", "FAILED")]
    return [*exactness_rows(res), *speed_rows(res), *training_fitness_rows(res), *memory_rows(res),
            ("wall time of this size", f"{res['seconds']:.1f} s", "", "")]


def exactness_rows(res: dict[str, Any]) -> list[Row]:
    s, c = res["shapes"], res["checks"]
    tie = "lm_head tied to the embeddings" if res["tied_qes"] else "untied lm_head"  # the builds agree or raise
    w, k = res["window_steps"], res["window"]
    return [
        ("model", f"{s['arch']}, {s['layers']} layers, hidden {s['hidden']}, {tie}, {res['layers']} GPTQ layers, "
                  f"{res['codes']:,} INT4 codes, group {s['group']}, dense {res['dtype']}", "", ""),
        ("base codes hash, CPU / device", f"{res['base_hash_cpu']} / {res['base_hash_device']}", "equal",
         _ok(c["base_hash_equal"])),
        (f"codes hash after {res['steps']} fixed steps (P={res['population']}), CPU (codes only)",
         res["hash_cpu"], "", ""),
        ("codes hash, device run (perturb, fitness, restore, update)", res["run_hash_device"], "= CPU",
         _ok(c["run_hash_equal"])),
        ("codes hash, device replay (fresh codes, Engine.apply)", res["replay_hash_device"], "= CPU",
         _ok(c["replay_hash_equal"])),
        (f"codes hash after {w} fixed steps (window {k} full, {w - k - 1} steps left it), CPU, "
         f"{res['reference_layers']}/{res['layers']} layers", res["window_hash_cpu"], "", ""),
        ("full-window codes hash, device run, same layers (after scoring members)", res["window_ref_hash_device"],
         "= CPU", _ok(c["window_hash_equal"])),
        ("full-window codes hash, device replay / device run, all layers",
         f"{res['replay_window_hash_device']} / {res['window_hash_device']}", "equal",
         _ok(c["window_replay_hash_equal"])),
        ("codes changed by the fixed steps", f"{res['changed_codes']:,}", "> 0", _ok(c["codes_changed"])),
        (f"dense cache = full dequantization of the codes (after {w} steps)",
         f"{res['dense_cache_exact_layers']}/{res['dense_cache_layers']} layers bit for bit", "all",
         _ok(c["dense_caches_exact"])),
        ("activations finite (last-position logits, QES and plain)",
         f"{'yes' if res['finite'] else 'NO'} (logit std {res['logits_std']:.3f}, "
         f"max abs diff {res['max_abs_logit_diff_qes_vs_plain']:.2g})", "yes", _ok(c["finite"])),
    ]


def speed_rows(res: dict[str, Any]) -> list[Row]:
    s = res["shapes"]
    gpu = res["compute"]["device"] == "cuda"
    p = res["member_group"]
    return [
        (f"fitness tokens/s, perturbed QES model ({s['batch']} x {s['new_tokens']} new tokens)",
         f"{res['qes_tokens_per_s']:,.1f}", "", ""),
        ("plain generate tokens/s, float nn.Linear model", f"{res['plain_tokens_per_s']:,.1f}", "", ""),
        ("fitness throughput, QES / plain", f"{100 * res['throughput_ratio']:.0f}%", ">= 70%",
         _target(res["throughput_ratio"], TARGET_THROUGHPUT, True)),
        ("perturb + restore per member / one member's fitness",
         f"{res['perturb_restore_s']:.3f} s / {res['fitness_s']:.3f} s = "
         f"{100 * res['perturb_restore_vs_fitness']:.1f}%", "<= 2%",
         _target(res["perturb_restore_vs_fitness"], TARGET_PERTURB, False)),
        (f"update per iteration (window {res['update_window']}) / an iteration's fitness ({p} members together)",
         f"{res['update_s']:.3f} s / {res['member_group_s']:.3f} s = {100 * res['update_vs_iteration']:.1f}%",
         "<= 5%", _target(res["update_vs_iteration"], TARGET_UPDATE, False)),
        (f"{p} members scored together / one member alone (same {s['batch']} prompts)",
         f"{res['member_group_s']:.3f} s / {res['member_alone_s']:.3f} s = {res['member_group_vs_alone']:.1f}x",
         "<= 3x on a GPU", _target(res["member_group_vs_alone"], TARGET_GROUP, False) if gpu else "n/a"),
        (f"fitness tokens/s, {p} members together / plain generate of the same {res['plain_group_rows']} rows",
         f"{res['member_group_tokens_per_s']:,.1f} / {res['plain_group_tokens_per_s']:,.1f} = "
         f"{100 * res['member_group_throughput_ratio']:.0f}%", ">= 70% on a GPU",
         _target(res["member_group_throughput_ratio"], TARGET_THROUGHPUT, True) if gpu else "n/a"),
        ("first member's responses, together = alone",
         f"{res['member_group_same_rows']}/{res['member_group_rows']} rows", "", ""),
    ] + compiled_rows(res)


def compiled_rows(res: dict[str, Any]) -> list[Row]:
    if "compiled_group_s" not in res:
        return []
    s, p = res["shapes"], res["member_group"]
    gpu = res["compute"]["device"] == "cuda"
    return [
        (f"{p} members together, compiled decode (finetune.decode: compiled) / one member alone",
         f"{res['compiled_group_s']:.3f} s / {res['member_alone_s']:.3f} s = {res['compiled_group_vs_alone']:.1f}x "
         f"(compiling: {res['compiled_compile_s']:.1f} s, once)", "<= 3x on a GPU",
         _target(res["compiled_group_vs_alone"], TARGET_GROUP, False) if gpu else "n/a"),
        (f"fitness tokens/s, {p} members together, compiled decode / plain generate of the same rows",
         f"{res['compiled_group_tokens_per_s']:,.1f} / {res['plain_group_tokens_per_s']:,.1f} = "
         f"{100 * res['compiled_throughput_ratio']:.0f}%", ">= 70% on a GPU",
         _target(res["compiled_throughput_ratio"], TARGET_THROUGHPUT, True) if gpu else "n/a"),
        (f"responses, compiled decode = eager ({s['batch']} prompts x {p} members)",
         f"{res['compiled_same_rows']}/{res['compiled_rows']} rows", "", ""),
    ]


def training_fitness_rows(res: dict[str, Any]) -> list[Row]:
    what = "training fitness (qes.generation.score / score_group)"
    if res["train_fitness_skipped"]:
        return [(what, "skipped: past the budget", "", "n/a")]
    p, s = res["train_fitness_members"], res["shapes"]
    alone, group = res["train_fitness_alone_s"], res["train_fitness_group_s"]
    exact = res["checks"].get("train_fitness_rewards_equal")
    return [
        (f"{what}, s per member: alone / {p} in one group ({res['train_fitness_prompts']} prompts, shared "
         f"{res['train_fitness_prefix']}-token prefix, stop at {STOP_TEXT}, <= {s['new_tokens']} new tokens)",
         f"{alone:.3f} s / {group:.3f} s = {alone / group:.1f}x faster batched", "", ""),
        ("training fitness rewards, batched = alone",
         f"{res['train_fitness_same_rewards']}/{p} members ({res['train_fitness_same_rows']}/"
         f"{res['train_fitness_rows']} responses; {res['train_fitness_stopped_rows']} stopped at the stop string)",
         "all in float32", "n/a" if exact is None else _ok(exact)),
    ]


def memory_rows(res: dict[str, Any]) -> list[Row]:
    what = "peak memory scoring members, QES / (plain inference + GPTQ tensors beside the dense cache)"
    codes = _mb(res["codes_bytes"])
    if res.get("memory_ratio") is None:
        return [(what, f"n/a on CPU (process peak RSS {_mb(res['peak_rss_bytes'])}; GPTQ tensors {codes})",
                 "<= 1.15x", "n/a")]
    scratch = res["update_scratch_bytes"]
    return [
        (what, f"{_mb(res['qes_fitness_peak_bytes'])} / ({_mb(res['plain_peak_bytes'])} + {codes}) = "
               f"{res['memory_ratio']:.2f}x", "<= 1.15x", _target(res["memory_ratio"], TARGET_MEMORY, False)),
        (f"peak memory of the QES run with the full-window update / plain inference (update scratch: bytes per "
         f"code of the largest chunk, {res['largest_chunk_codes']:,} codes)",
         f"{_mb(res['qes_peak_bytes'])} / {_mb(res['plain_peak_bytes'])} = {res['run_memory_ratio']:.2f}x "
         f"(scratch {_mb(scratch)}, {scratch / res['largest_chunk_codes']:.1f} B/code)", "", ""),
    ]


def device_line(device: torch.device) -> str:
    if device.type == "cuda":
        cpu = torch.backends.cpu.get_cpu_capability()
        return f"device: {torch.cuda.get_device_name(device)} (cuda), CPU capability {cpu}"
    return f"device: CPU, capability {torch.backends.cpu.get_cpu_capability()}, threads {torch.get_num_threads()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--size", choices=sorted(SIZES), help="one size (default: tiny on cpu, smollm2 and "
                                                              "qwen1.5b on cuda)")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="compute dtype (auto: bfloat16 on CUDA, float32 on the CPU)")
    parser.add_argument("--layers", type=int, help="override the number of decoder layers (quick checks)")
    parser.add_argument("--batch", type=int, help="override prompts per generate call")
    parser.add_argument("--new-tokens", type=int, help="override new tokens per prompt")
    parser.add_argument("--steps", type=int, help="override iterations of the fixed schedule (>= 1)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="wall-clock budget: phases past it stop repeating (default 420)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (default: 1 for the tiny size on a CPU, which gains nothing from "
                             "more and loses much to thread barriers on busy cores; torch's setting otherwise)")
    parser.add_argument("--decode", choices=["eager", "both"],
                        help="both: also score the member group with compiled decode steps (finetune.decode: "
                             "compiled; default on cuda; compiling takes minutes on a CPU)")
    parser.add_argument("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args(argv)

    command = "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: torch sees no CUDA device", file=sys.stderr)
        return 2
    dtype = compute_dtype(args.dtype, device)
    names = [args.size] if args.size else (["tiny"] if device.type == "cpu" else ["smollm2", "qwen1.5b"])
    if args.threads:
        torch.set_num_threads(args.threads)
    elif device.type == "cpu" and names == ["tiny"]:
        torch.set_num_threads(1)
    start = time.perf_counter()
    deadline = start + args.budget_s
    results = []
    for name in names:
        size = SIZES[name]
        overrides = {"layers": args.layers, "batch": args.batch, "new_tokens": args.new_tokens, "steps": args.steps}
        size = replace(size, **{k: v for k, v in overrides.items() if v})
        try:
            compiled = (args.decode or ("both" if device.type == "cuda" else "eager")) == "both"
            results.append(run_size(name, size, device, dtype, deadline, compiled))
        except Exception as error:  # report the other sizes all the same
            note(f"{name}: {type(error).__name__}: {error}")
            results.append({"size": name, "error": f"{type(error).__name__}: {error}".replace("|", "/")})
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    wall = time.perf_counter() - start

    import transformers

    lines = [device_line(device), f"torch {torch.__version__}, transformers {transformers.__version__}",
             f"command: `{command}`", "", "| size | measurement | value | target | result |", "|---|---|---|---|---|"]
    for res in results:
        lines += [f"| {res['size']} | {m} | {v} | {t} | {r} |" for m, v, t, r in rows_for(res)]
    lines += ["", f"total wall time {wall:.1f} s"]
    print("\n".join(lines), flush=True)

    passed = all("error" not in r and all(r["checks"].values()) for r in results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "device": device_line(device), "torch": torch.__version__, "transformers": transformers.__version__,
            "command": command, "wall_s": wall, "passed": passed, "gptqmodel_imported": "gptqmodel" in sys.modules,
            "sizes": results,
        }, indent=2) + "\n")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
