"""Check a device end to end on synthetic GPTQ models of real architectures: exactness, speed, memory.

    python benchmarks/gpu_check.py --device cuda                   # smollm2 and qwen1.5b shapes, < 8 min on one GPU
    python benchmarks/gpu_check.py --device cpu --size tiny        # a 2-layer llama, seconds on a CPU
    python benchmarks/gpu_check.py --device cuda --json gpu.json   # also write the numbers

Nothing is downloaded or read from disk. Each size is a transformers model of a real architecture (``tiny``: a
2-layer llama; ``smollm2``: SmolLM2-135M's shapes, group 64 because 576 inputs do not split into groups of
128; ``qwen1.5b``: Qwen2.5-1.5B's shapes, group 128, biased q/k/v, untied lm_head) assembled by
:func:`qes.codes.assemble_quantized` from GPTQ INT4 tensors made in memory. Codes, zero points, scales,
embeddings, biases and prompts are all functions of a counter hash (:func:`qes.noise.hash32`) turned into
floats by exact operations only (a 24-bit integer times a power of two), so the same model comes out bit for
bit on any device. Scales keep the random model's activations finite, which is checked.

Per size, in this order:

1. **plain**: a vanilla transformers model whose linears are ordinary ``torch.nn.Linear`` layers holding the
   dequantized weights, alone on the device; greedy batched generation (:func:`qes.fitness.generate`, KV
   cache, left padding) of the synthetic prompts; tokens/s and peak memory.
2. **QES run**: the GPTQ model (backend ``dense``: bf16 on CUDA) alone on the device, and the engine
   (seed-replay residual, K = 10). ``steps`` iterations of a fixed schedule: each member is perturbed, scored
   by the same generation and restored, then the update is applied. Seeds come from ``member_seeds`` and the
   integer coefficients from fixed rewards (``shape_rewards`` + ``quantize_coefficients``), never from the
   fitness, so the codes after the schedule are the same on every device. Then more fixed steps fill the
   residual window, and the update is timed at the full window. Last, every layer's dense cache is compared
   with a full dequantization of its current codes, bit for bit.
3. **replay** on the device: fresh codes (no float weights), the same steps through ``Engine.apply``.
4. **CPU reference**: fresh codes on the CPU (backend ``none``), the same steps.

After the run, one member is scored alone and ``members`` members together (:mod:`qes.members`: decode steps
for all of them at once, the base product shared, each member's sparse perturbation added on its rows), and
the plain model generates the same number of rows in one call: on a GPU the group should cost at most 3x one
member and reach 70% of the plain rows' tokens/s.

The codes hash after the schedule must be one and the same in 2, 3 and 4: the run's perturb/restore pairs
leave no trace and the update is integer-exact. The table reports it with the throughput ratio (target
>= 70%), the ES overhead against one member's fitness (perturb + restore per member, and the update per
iteration; target <= 5% each) and peak memory of the QES run against plain inference (``max_memory_allocated``,
reset once each model is built and warmed up; target <= 1.15x; on a CPU only the process's peak RSS is given).
The dense backend keeps a bf16 weight beside the INT4 codes, so its floor there is about
1 + 0.25 x (linear share of the weights). The exit status is 1 when an exactness check fails (hashes, dense
caches, finite activations), whatever the timings. Progress goes to stderr, the table to stdout.

Time boxes: plain repeats stop past ``--budget-s``; QES iterations stop (never below 2) when the next one
would pass the size's ``seconds`` or the budget; the full-window update gets half the size's ``seconds``. The
replay and the CPU reference always apply exactly the steps the run did.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

try:  # run from a checkout without `pip install -e .`
    import qes  # noqa: F401
except ImportError:  # pragma: no cover - depends on the environment
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from qes import _env  # noqa: F401  (environment defaults only; GPTQModel is never imported here)
from qes.codes import (
    QuantLinear,
    Scheme,
    assemble_quantized,
    describe_compute,
    layer_key,
    pack_codes,
    quantized_linears,
)
from qes.engine import Engine
from qes.fitness import GenerationConfig, PromptBatch, generate, generate_group
from qes.members import MemberGroup
from qes.noise import NoiseSpec, hash32, member_seeds
from qes.qlinear import CodesOnlyBackend, GPTQLinear, compute_dtype, dequantize_weight
from qes.update import Step, UpdateConfig, alpha_fixed_point, quantize_coefficients, shape_rewards

BITS = 4
SIGMA = 0.01
ALPHA = 0.007  # alpha / sigma = 0.7: steps below one code, so the residual carries over between steps
WINDOW = 10
GLOBAL_SEED = 20240607
M32 = 0xFFFFFFFF
CHUNK = 1 << 24  # elements hashed at a time when filling large float tensors
TARGET_THROUGHPUT = 0.70
TARGET_OVERHEAD = 0.05
TARGET_MEMORY = 1.15
TARGET_GROUP = 3.0


@dataclass(frozen=True)
class Size:
    """An architecture's shapes and how much of each phase to run on it."""

    arch: str  # llama | qwen2
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    group: int
    batch: int  # prompts per generate call
    prompt: int  # longest prompt, tokens
    new_tokens: int
    population: int
    steps: int  # iterations of the fixed schedule
    plain_repeats: int
    members: int  # members scored together in the member-batching phase
    seconds: float  # time box of the QES run (iterations stop early past it, never below 2)


SIZES = {
    "tiny": Size("llama", 256, 512, 2, 4, 2, 1024, True, 128, batch=4, prompt=16, new_tokens=16,
                 population=4, steps=3, plain_repeats=3, members=4, seconds=30),
    "smollm2": Size("llama", 576, 1536, 30, 9, 3, 49152, True, 64, batch=64, prompt=64, new_tokens=128,
                    population=4, steps=3, plain_repeats=3, members=8, seconds=100),
    "qwen1.5b": Size("qwen2", 1536, 8960, 28, 12, 2, 151936, False, 128, batch=32, prompt=64, new_tokens=64,
                     population=4, steps=2, plain_repeats=2, members=32, seconds=100),
}


def note(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- deterministic content --------------------------------------------------------------------------


def _hashes(tag: str, start: int, count: int, device: torch.device) -> torch.Tensor:
    """hash(tag, k) for k in [start, start + count) as int64 in [0, 2^32): the same bits on every device."""
    key = layer_key(tag)
    k = torch.arange(start, start + count, dtype=torch.int64, device=device)
    return hash32(hash32(k ^ (key & M32)) ^ ((key >> 32) & M32))


def _uniform(tag: str, shape: tuple[int, ...], log2_amplitude: int, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    """Values in [-2^a, 2^a): a signed 24-bit integer times 2^(a - 23), exact in float32, then cast."""
    n = math.prod(shape)
    out = torch.empty(n, dtype=dtype, device=device)
    for start in range(0, n, CHUNK):
        h = _hashes(tag, start, min(CHUNK, n - start), device)
        value = ((h >> 8) - (1 << 23)).to(torch.float32) * 2.0 ** (log2_amplitude - 23)
        out[start : start + h.numel()] = value.to(dtype)
    return out.view(shape)


def gptq_tensors(name: str, in_f: int, out_f: int, group: int, device: torch.device) -> dict[str, torch.Tensor]:
    """GPTQ tensors of one layer (exact zero points): uniform codes 0..15 around the zero points 7 and 8.

    Each packed ``qweight`` word is one hash (eight 4-bit codes), which keeps the CPU reference of the
    largest size to seconds.
    """
    h = _hashes(f"{name}/codes", 0, in_f // 8 * out_f, device)
    qweight = ((h ^ 0x80000000) - 0x80000000).to(torch.int32).view(in_f // 8, out_f)
    groups = in_f // group
    hz = _hashes(f"{name}/zeros", 0, groups * out_f, device)
    zeros = (7 + (hz & 1)).view(groups, out_f)  # mean 7.5, like the codes
    # 1024..2047 times 2^-19: [0.002, 0.0039), 11 significant bits, exact in fp16; weight std about 0.013.
    scales = ((hz >> 8) & 1023) + 1024
    return {
        "qweight": qweight,
        "qzeros": pack_codes(zeros.to(torch.uint8), BITS).t().contiguous(),  # [in/g, out/p]
        "scales": (scales.to(torch.float32) * 2.0**-19).to(torch.float16).view(groups, out_f),
        "g_idx": (torch.arange(in_f, device=device) // group).to(torch.int32),
    }


def hf_config(size: Size) -> Any:
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
        num_hidden_layers=size.layers, num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads, tie_word_embeddings=size.tied, max_position_embeddings=4096,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    if size.arch == "llama":
        return LlamaConfig(**common, rms_norm_eps=1e-5)
    return Qwen2Config(**common, rms_norm_eps=1e-6, use_sliding_window=False)


@dataclass(frozen=True)
class LinearShape:
    name: str
    in_features: int
    out_features: int
    bias: bool


def architecture(config: Any) -> tuple[list[LinearShape], list[tuple[str, tuple[int, ...]]]]:
    """The quantized linears (every decoder linear) and the other parameters, read off a meta-device model."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = [
        LinearShape(name, m.in_features, m.out_features, m.bias is not None)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}."
    ]
    owned = {f"{x.name}.{p}" for x in linears for p in ("weight", "bias")}
    others = [(n, tuple(p.shape)) for n, p in model.named_parameters() if n not in owned]
    return sorted(linears, key=lambda x: x.name), others


def checkpoint_tensors(config: Any, group: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Everything a GPTQ checkpoint of ``config`` holds, made on ``device``."""
    linears, others = architecture(config)
    tensors: dict[str, torch.Tensor] = {}
    for x in linears:
        for attr, t in gptq_tensors(x.name, x.in_features, x.out_features, group, device).items():
            tensors[f"{x.name}.{attr}"] = t
        if x.bias:
            tensors[f"{x.name}.bias"] = _uniform(f"{x.name}/bias", (x.out_features,), -6, dtype, device)
    for name, shape in others:
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(shape, dtype=dtype, device=device)
        else:  # embeddings, lm_head: std about 0.018
            tensors[name] = _uniform(name, shape, -5, dtype, device)
    return tensors


def synthetic_prompts(size: Size) -> PromptBatch:
    """``batch`` prompts of hashed token ids, of different lengths (so generation pads on the left).

    The end-of-sequence id is one past the vocabulary: greedy decoding never picks it, so every row
    generates exactly ``new_tokens`` tokens and both sides of a comparison do the same work.
    """
    rows = []
    for r in range(size.batch):
        length = size.prompt - int(hash32(r + 1) % (size.prompt // 2))
        h = _hashes(f"prompt/{r}", 0, length, torch.device("cpu"))
        rows.append(tuple(int(t) for t in 1 + h % (size.vocab - 1)))
    n = len(rows)
    return PromptBatch((None,) * n, ("",) * n, ("",) * n, tuple(rows), _IdText(), pad_token_id=0,
                       eos_token_id=size.vocab)


class _IdText:
    """Stands in for a tokenizer: the synthetic prompts have no text, responses are rendered as ids."""

    def batch_decode(self, rows, skip_special_tokens: bool = True) -> list[str]:
        return [" ".join(map(str, r)) for r in rows]


def fixed_step(t: int, population: int) -> Step:
    """Iteration ``t`` of the fixed schedule: seeds from (GLOBAL_SEED, t), coefficients from fixed rewards."""
    seeds = member_seeds(GLOBAL_SEED, t, population // 2)
    rewards = [hash32(((t * population + j) & M32) ^ 0x5BD1E995) / 2.0**32 for j in range(population)]
    return Step(
        iteration=t,
        alpha_fp=alpha_fixed_point(ALPHA, SIGMA),
        seeds=tuple(s for s in seeds for _ in (1, -1)),
        signs=tuple(sign for _ in seeds for sign in (1, -1)),
        coefs=quantize_coefficients(shape_rewards(rewards, "pair_zscore", 3.0)),
    )


# --- models ----------------------------------------------------------------------------------------


def build_qes(size: Size, config: Any, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    tensors = checkpoint_tensors(config, size.group, device, dtype)
    return assemble_quantized(config, tensors, Scheme(BITS, size.group, zeros_stored_minus_one=False), device,
                              dtype, backend="dense", source=f"<synthetic {size.arch}>")


def build_plain(size: Size, config: Any, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The same model with plain ``torch.nn.Linear`` layers holding the dequantized weights."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    qes_model = build_qes(size, config, device, dtype)
    layers = {x.name: x.module for x in quantized_linears(qes_model)}
    state = {}
    for key, value in qes_model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner not in layers:
            state[key] = value.clone()
    for name, module in layers.items():
        state[f"{name}.weight"] = dequantize_weight(module, dtype)
        if module.bias is not None:
            state[f"{name}.bias"] = module.bias.detach().to(dtype)
    del qes_model, layers
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _, unexpected = model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    on_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if unexpected or on_meta:
        raise RuntimeError(f"plain model: unexpected {unexpected[:3]}, not loaded {on_meta[:3]}")
    return model.to(device).eval()


def codes_only(size: Size, config: Any, device: torch.device) -> list[QuantLinear]:
    """Fresh codes of every layer on ``device``, with no forward path and no float weights."""
    linears, _ = architecture(config)
    out = []
    for x in linears:
        module = GPTQLinear(x.in_features, x.out_features, BITS, size.group, bias=False, device=device)
        for attr, t in gptq_tensors(x.name, x.in_features, x.out_features, size.group, device).items():
            getattr(module, attr).copy_(t)
        module.use_backend(CodesOnlyBackend())
        out.append(QuantLinear(x.name, module, BITS, x.in_features, x.out_features))
    return out


# --- measuring -------------------------------------------------------------------------------------


class Clock:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def reset_peak(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_bytes(self) -> int | None:
        return torch.cuda.max_memory_allocated() if self.cuda else None

    def allocated_bytes(self) -> int | None:
        return torch.cuda.memory_allocated() if self.cuda else None


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def last_logits(model: torch.nn.Module, batch: PromptBatch, device: torch.device) -> torch.Tensor:
    [chunk] = batch.chunks(len(batch))
    with torch.no_grad():
        out = model(input_ids=chunk.input_ids.to(device), attention_mask=chunk.attention_mask.to(device),
                    logits_to_keep=1)
    return out.logits[:, -1].float().cpu()


def timed_generate(model, batch: PromptBatch, cfg: GenerationConfig, clock: Clock) -> tuple[int, float]:
    start = clock.now()
    _, tokens = generate(model, batch, cfg)
    return tokens, clock.now() - start


def dense_caches_exact(model: torch.nn.Module) -> tuple[int, int]:
    """(layers whose dense cache equals a full dequantization of their current codes, layers)."""
    layers = quantized_linears(model)
    good = 0
    for layer in layers:
        module = layer.module
        good += bool(torch.equal(module.dense_weight, dequantize_weight(module, module.backend.dtype)))
    return good, len(layers)


def plain_phase(size: Size, config: Any, batch: PromptBatch, gen_cfg: GenerationConfig, device: torch.device,
                dtype: torch.dtype, deadline: float) -> tuple[dict[str, Any], torch.Tensor]:
    """Plain inference of the vanilla float model, alone on the device."""
    clock = Clock(device)
    model = build_plain(size, config, device, dtype)
    clock.reset_peak()
    res: dict[str, Any] = {"plain_resident_bytes": clock.allocated_bytes()}
    logits = last_logits(model, batch, device)
    timed_generate(model, batch, gen_cfg, clock)  # warm-up
    clock.reset_peak()
    rates = []
    for _ in range(size.plain_repeats):
        tokens, seconds = timed_generate(model, batch, gen_cfg, clock)
        rates.append(tokens / seconds)
        if time.perf_counter() > deadline:
            break
    res.update(plain_peak_bytes=clock.peak_bytes(), plain_tokens=tokens, plain_tokens_per_s=statistics.median(rates),
               plain_repeats=len(rates))
    rows = batch.subset(list(range(len(batch))) * size.members)  # the rows of a member group, in one call
    tokens, seconds = timed_generate(model, rows, replace(gen_cfg, batch_size=len(rows)), clock)
    res.update(plain_group_rows=len(rows), plain_group_tokens_per_s=tokens / seconds)
    return res, logits


def member_phase(name: str, size: Size, model: torch.nn.Module, engine: Engine, batch: PromptBatch,
                 gen_cfg: GenerationConfig, dtype: torch.dtype, clock: Clock) -> dict[str, Any]:
    """One member scored alone against ``size.members`` members scored together (qes.members), the same
    prompts; the first member's responses must come out the same either way (up to float rounding)."""
    note(f"{name}: {size.members} members scored together")
    members = [(s, sign) for s in member_seeds(GLOBAL_SEED, 1 << 20, size.members // 2) for sign in (1, -1)]
    generate_group(model, batch, gen_cfg, MemberGroup(engine, members[:1], dtype))  # warm-up
    t0 = clock.now()
    (alone,), _ = generate_group(model, batch, gen_cfg, MemberGroup(engine, members[:1], dtype))
    t1 = clock.now()
    together, tokens = generate_group(model, batch, gen_cfg, MemberGroup(engine, members, dtype))
    t2 = clock.now()
    return {"member_group": len(members), "member_alone_s": t1 - t0, "member_group_s": t2 - t1,
            "member_group_tokens_per_s": sum(tokens) / (t2 - t1),
            "member_group_same_rows": sum(a == b for a, b in zip(alone, together[0])),
            "member_group_rows": len(alone), "member_group_peak_bytes": clock.peak_bytes()}


def qes_phase(name: str, size: Size, config: Any, batch: PromptBatch, gen_cfg: GenerationConfig,
              device: torch.device, dtype: torch.dtype, deadline: float) -> tuple[dict[str, Any], torch.Tensor]:
    """The QES run: every member perturbed, scored and restored, then the update; then the full-window update."""
    clock = Clock(device)
    model = build_qes(size, config, device, dtype)
    engine = Engine(quantized_linears(model), NoiseSpec.from_sigma(SIGMA), UpdateConfig(mode="replay", window=WINDOW))
    clock.reset_peak()
    res: dict[str, Any] = {"qes_resident_bytes": clock.allocated_bytes(), "codes": engine.num_codes,
                           "layers": len(engine.layers), "compute": describe_compute(model)}
    res["base_hash_device"] = engine.codes_sha256()
    logits = last_logits(model, batch, device)
    timed_generate(model, batch, gen_cfg, clock)  # warm-up
    clock.reset_peak()
    started = time.perf_counter()
    pert, fit, rates, updates, changed, hits, steps = [], [], [], [], 0, 0, 0
    for t in range(size.steps):
        step = fixed_step(t, size.population)
        for seed, sign in zip(step.seeds, step.signs):
            t0 = clock.now()
            perturbation = engine.perturb(seed, sign)
            t1 = clock.now()
            tokens, seconds = timed_generate(model, batch, gen_cfg, clock)
            t2 = clock.now()
            engine.restore(perturbation)
            pert.append(t1 - t0 + clock.now() - t2)
            fit.append(seconds)
            rates.append(tokens / seconds)
            hits += perturbation.boundary_hits
        t0 = clock.now()
        stats = engine.apply(step)
        updates.append(clock.now() - t0)
        changed += stats.changed
        steps += 1
        note(f"{name}: iteration {t}: {stats.changed:,} codes changed")
        elapsed = time.perf_counter() - started
        if steps >= 2 and (elapsed * (steps + 1) / steps > size.seconds or time.perf_counter() > deadline):
            break
    res.update(steps=steps, run_hash_device=engine.codes_sha256(), changed_codes=changed, perturb_boundary_hits=hits,
               qes_tokens=tokens, qes_tokens_per_s=statistics.median(rates), perturb_restore_s=statistics.median(pert),
               fitness_s=statistics.median(fit), update_s_by_window=[[i + 1, s] for i, s in enumerate(updates)])

    # The update at the full residual window: more fixed steps, timed once the window is full.
    note(f"{name}: update at the full window")
    full, t = [], steps
    stop = min(time.perf_counter() + size.seconds / 2, deadline)
    while len(full) < 2 and time.perf_counter() < stop:
        t0 = clock.now()
        engine.apply(fixed_step(t, size.population))
        seconds = clock.now() - t0
        updates.append(seconds)
        if len(engine.history) == WINDOW:
            full.append(seconds)
        t += 1
    res.update(update_window=len(engine.history), update_s=statistics.median(full) if full else updates[-1],
               qes_peak_bytes=clock.peak_bytes())
    res.update(member_phase(name, size, model, engine, batch, gen_cfg, dtype, clock))
    good, total = dense_caches_exact(model)
    res.update(dense_cache_exact_layers=good, dense_cache_layers=total, dense_cache_checked_after_steps=t)
    return res, logits


def replay_codes(size: Size, config: Any, device: torch.device, steps: int) -> tuple[str, str, float]:
    """Fresh codes on ``device`` (no forward path), the fixed steps through Engine.apply: (base hash, hash, s/step)."""
    engine = Engine(codes_only(size, config, device), NoiseSpec.from_sigma(SIGMA),
                    UpdateConfig(mode="replay", window=WINDOW))
    base = engine.codes_sha256()
    clock = Clock(device)
    start = clock.now()
    for t in range(steps):
        engine.apply(fixed_step(t, size.population))
    seconds = (clock.now() - start) / max(steps, 1)
    return base, engine.codes_sha256(), seconds


def run_size(name: str, size: Size, device: torch.device, dtype: torch.dtype, deadline: float) -> dict[str, Any]:
    started = time.perf_counter()
    config = hf_config(size)
    batch = synthetic_prompts(size)
    # synthetic token ids have no text, so no stop strings
    gen_cfg = GenerationConfig(max_new_tokens=size.new_tokens, batch_size=size.batch, share_prefix=False,
                               stop_strings=())
    res: dict[str, Any] = {"size": name, "shapes": asdict(size), "dtype": str(dtype).removeprefix("torch."),
                           "sigma": SIGMA, "alpha": ALPHA, "window": WINDOW, "population": size.population}

    note(f"{name}: plain model")
    plain, plain_logits = plain_phase(size, config, batch, gen_cfg, device, dtype, deadline)
    res.update(plain)
    Clock(device).reset_peak()
    note(f"{name}: QES model and engine")
    run, qes_logits = qes_phase(name, size, config, batch, gen_cfg, device, dtype, deadline)
    res.update(run)
    Clock(device).reset_peak()
    res["finite"] = bool(torch.isfinite(plain_logits).all() and torch.isfinite(qes_logits).all())
    res["logits_std"] = float(plain_logits.std())
    res["max_abs_logit_diff_qes_vs_plain"] = float((plain_logits - qes_logits).abs().max())

    note(f"{name}: replay on {device.type}")
    _, res["replay_hash_device"], res["replay_s_per_step_device"] = replay_codes(size, config, device, res["steps"])
    gc.collect()
    note(f"{name}: CPU reference")
    res["base_hash_cpu"], res["hash_cpu"], res["replay_s_per_step_cpu"] = replay_codes(
        size, config, torch.device("cpu"), res["steps"])
    gc.collect()

    res["peak_rss_bytes"] = peak_rss_bytes()
    res["seconds"] = time.perf_counter() - started
    res["checks"] = {
        "base_hash_equal": res["base_hash_cpu"] == res["base_hash_device"],
        "run_hash_equal": res["hash_cpu"] == res["run_hash_device"],
        "replay_hash_equal": res["hash_cpu"] == res["replay_hash_device"],
        "dense_caches_exact": res["dense_cache_exact_layers"] == res["dense_cache_layers"],
        "finite": res["finite"],
        "codes_changed": res["changed_codes"] > 0,
    }
    res["throughput_ratio"] = res["qes_tokens_per_s"] / res["plain_tokens_per_s"]
    res["perturb_restore_vs_fitness"] = res["perturb_restore_s"] / res["fitness_s"]
    res["update_vs_fitness"] = res["update_s"] / res["fitness_s"]
    res["member_group_vs_alone"] = res["member_group_s"] / res["member_alone_s"]
    res["member_group_throughput_ratio"] = res["member_group_tokens_per_s"] / res["plain_group_tokens_per_s"]
    p = size.population
    res["iteration_overhead"] = (p * res["perturb_restore_s"] + res["update_s"]) / (p * res["fitness_s"])
    if res["plain_peak_bytes"]:
        res["memory_ratio"] = res["qes_peak_bytes"] / res["plain_peak_bytes"]
    return res


# --- report ----------------------------------------------------------------------------------------


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:,.0f} MB"


def _target(value: float, limit: float, at_least: bool) -> str:
    return "met" if (value >= limit if at_least else value <= limit) else "missed"


def _ok(flag: bool) -> str:
    return "ok" if flag else "FAILED"


def rows_for(res: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    if "error" in res:
        return [("error", res["error"], "", "FAILED")]
    s, c = res["shapes"], res["checks"]
    rows = [
        ("model", f"{s['arch']}, {s['layers']} layers, hidden {s['hidden']}, {res['layers']} GPTQ layers, "
                  f"{res['codes']:,} INT4 codes, group {s['group']}, dense {res['dtype']}", "", ""),
        ("base codes hash, CPU / device", f"{res['base_hash_cpu']} / {res['base_hash_device']}", "equal",
         _ok(c["base_hash_equal"])),
        (f"codes hash after {res['steps']} fixed steps (P={res['population']}), CPU (codes only)",
         res["hash_cpu"], "", ""),
        ("codes hash, device run (perturb, fitness, restore, update)", res["run_hash_device"], "= CPU",
         _ok(c["run_hash_equal"])),
        ("codes hash, device replay (fresh codes, Engine.apply)", res["replay_hash_device"], "= CPU",
         _ok(c["replay_hash_equal"])),
        ("codes changed by the fixed steps", f"{res['changed_codes']:,}", "> 0", _ok(c["codes_changed"])),
        (f"dense cache = full dequantization of the codes (after {res['dense_cache_checked_after_steps']} steps)",
         f"{res['dense_cache_exact_layers']}/{res['dense_cache_layers']} layers bit for bit", "all",
         _ok(c["dense_caches_exact"])),
        ("activations finite (last-position logits, QES and plain)",
         f"{'yes' if res['finite'] else 'NO'} (logit std {res['logits_std']:.3f}, "
         f"max abs diff {res['max_abs_logit_diff_qes_vs_plain']:.2g})", "yes", _ok(c["finite"])),
        (f"fitness tokens/s, perturbed QES model ({s['batch']} x {s['new_tokens']} new tokens)",
         f"{res['qes_tokens_per_s']:,.1f}", "", ""),
        ("plain generate tokens/s, float nn.Linear model", f"{res['plain_tokens_per_s']:,.1f}", "", ""),
        ("fitness throughput, QES / plain", f"{100 * res['throughput_ratio']:.0f}%", ">= 70%",
         _target(res["throughput_ratio"], TARGET_THROUGHPUT, True)),
        ("perturb + restore per member / one member's fitness",
         f"{res['perturb_restore_s']:.3f} s / {res['fitness_s']:.3f} s = "
         f"{100 * res['perturb_restore_vs_fitness']:.1f}%", "<= 5%",
         _target(res["perturb_restore_vs_fitness"], TARGET_OVERHEAD, False)),
        (f"update per iteration (window {res['update_window']}) / one member's fitness",
         f"{res['update_s']:.3f} s / {res['fitness_s']:.3f} s = {100 * res['update_vs_fitness']:.1f}%", "<= 5%",
         _target(res["update_vs_fitness"], TARGET_OVERHEAD, False)),
    ]
    gpu = res["compute"]["device"] == "cuda"
    p = res["member_group"]
    rows += [
        (f"{p} members scored together / one member alone (same {s['batch']} prompts)",
         f"{res['member_group_s']:.3f} s / {res['member_alone_s']:.3f} s = {res['member_group_vs_alone']:.1f}x",
         "<= 3x on a GPU", _target(res["member_group_vs_alone"], TARGET_GROUP, False) if gpu else "n/a"),
        (f"fitness tokens/s, {p} members together / plain generate of the same {res['plain_group_rows']} rows",
         f"{res['member_group_tokens_per_s']:,.1f} / {res['plain_group_tokens_per_s']:,.1f} = "
         f"{100 * res['member_group_throughput_ratio']:.0f}%", ">= 70% on a GPU",
         _target(res["member_group_throughput_ratio"], TARGET_THROUGHPUT, True) if gpu else "n/a"),
        ("first member's responses, together = alone",
         f"{res['member_group_same_rows']}/{res['member_group_rows']} rows", "", ""),
    ]
    if res.get("memory_ratio") is not None:
        rows.append(("peak memory, QES run / plain inference",
                     f"{_mb(res['qes_peak_bytes'])} / {_mb(res['plain_peak_bytes'])} = {res['memory_ratio']:.2f}x",
                     "<= 1.15x", _target(res["memory_ratio"], TARGET_MEMORY, False)))
    else:
        rows.append(("peak memory, QES run / plain inference",
                     f"n/a on CPU (process peak RSS {_mb(res['peak_rss_bytes'])})", "<= 1.15x", "n/a"))
    rows.append(("wall time of this size", f"{res['seconds']:.1f} s", "", ""))
    return rows


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
            results.append(run_size(name, size, device, dtype, deadline))
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
