"""The phases of gpu_check.py: plain inference, the QES run, member batching, training fitness and the replays."""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from _gpu_models import (
    FULL_STEPS,
    GLOBAL_SEED,
    SIGMA,
    STOP_TEXT,
    WINDOW,
    Size,
    build_plain,
    build_qes,
    codes_bytes,
    codes_only,
    embeddings_tied,
    fitness_prompts,
    fixed_step,
    reference_layers,
    training_members,
)

from qes.backends.dense import dequantize_weight
from qes.checkpoint import describe_compute
from qes.codes import LayerCodes, quantized_linears
from qes.engine import Engine, StepStats
from qes.generation import FitnessResult, GenerationConfig, PromptBatch, generate, generate_group, score, score_group
from qes.identity import codes_sha256
from qes.members import MemberGroup
from qes.noise import NoiseSpec, member_seeds
from qes.train import _score_members  # the member loop of training itself, one member or a group at a time
from qes.update import Step, UpdateConfig


def note(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def new_engine(layers: list[LayerCodes]) -> Engine:
    return Engine(layers, NoiseSpec.from_sigma(SIGMA), UpdateConfig(mode="replay", window=WINDOW))


class Clock:
    """Timestamps taken once the device has finished its queued work, and the device's peak memory."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.peaks: dict[str, int] = {}  # per kind of segment: the highest peak
        self.growth: dict[str, int] = {}  # per kind of segment: the most it rose above the memory held at its start

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

    @contextmanager
    def segment(self, kind: str) -> Iterator[None]:
        """Record the peak memory of the block under ``kind`` (CUDA only; the process-wide peak is reset)."""
        if not self.cuda:
            yield
            return
        held = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield
        peak = torch.cuda.max_memory_allocated()
        self.peaks[kind] = max(self.peaks.get(kind, 0), peak)
        self.growth[kind] = max(self.growth.get(kind, 0), peak - held)


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


# --- plain inference -------------------------------------------------------------------------------


def plain_phase(size: Size, config: Any, batch: PromptBatch, gen_cfg: GenerationConfig, device: torch.device,
                dtype: torch.dtype, deadline: float) -> tuple[dict[str, Any], torch.Tensor]:
    """Plain inference of the vanilla float model, alone on the device."""
    clock = Clock(device)
    model = build_plain(size, config, device, dtype)
    clock.reset_peak()
    res: dict[str, Any] = {"plain_resident_bytes": clock.allocated_bytes(), "tied_plain": embeddings_tied(model)}
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


# --- the QES run -----------------------------------------------------------------------------------


def scored_iterations(name: str, size: Size, model: torch.nn.Module, engine: Engine, batch: PromptBatch,
                      gen_cfg: GenerationConfig, clock: Clock, deadline: float) -> dict[str, Any]:
    """Iterations of the fixed schedule that perturb, score and restore every member, then update."""
    started = time.perf_counter()
    pert, fit, rates, updates, changed, hits, steps = [], [], [], [], 0, 0, 0
    for t in range(size.steps):
        step = fixed_step(t, size.population)
        for seed, sign in zip(step.seeds, step.signs):
            with clock.segment("fitness"):
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
        seconds, stats = timed_update(engine, step, clock)
        updates.append([len(engine.history), seconds])
        changed += stats.changed
        steps += 1
        note(f"{name}: iteration {t}: {stats.changed:,} codes changed")
        elapsed = time.perf_counter() - started
        if steps >= 2 and (elapsed * (steps + 1) / steps > size.seconds or time.perf_counter() > deadline):
            break
    return {"steps": steps, "run_hash_device": engine.codes_sha256(), "changed_codes": changed,
            "perturb_boundary_hits": hits, "qes_tokens": tokens, "qes_tokens_per_s": statistics.median(rates),
            "perturb_restore_s": statistics.median(pert), "fitness_s": statistics.median(fit),
            "update_s_by_window": updates}


def timed_update(engine: Engine, step: Step, clock: Clock) -> tuple[float, StepStats]:
    with clock.segment("update"):
        t0 = clock.now()
        stats = engine.apply(step)
        return clock.now() - t0, stats


def window_steps(name: str, size: Size, engine: Engine, clock: Clock, done: int,
                 updates: list[list[float]]) -> dict[str, Any]:
    """More fixed steps (no fitness needed) until FULL_STEPS: the residual window fills and steps leave it."""
    note(f"{name}: fixed steps {done} .. {FULL_STEPS - 1}: the residual window fills")
    for t in range(done, FULL_STEPS):
        seconds, _ = timed_update(engine, fixed_step(t, size.population), clock)
        updates.append([len(engine.history), seconds])
    full = [s for window, s in updates if window == WINDOW]
    return {"window_steps": max(done, FULL_STEPS), "update_window": int(updates[-1][0]),
            "update_s": statistics.median(full) if full else updates[-1][1], "update_s_by_window": updates}


def qes_phase(name: str, size: Size, config: Any, batch: PromptBatch, gen_cfg: GenerationConfig,
              device: torch.device, dtype: torch.dtype, deadline: float, compiled: bool = False
              ) -> tuple[dict[str, Any], torch.Tensor]:
    """The QES run: the scored iterations, the full-window steps, member batching and training fitness; then the
    dense caches and the codes (after all of it: scoring members must leave no trace)."""
    clock = Clock(device)
    model = build_qes(size, config, device, dtype)
    engine = new_engine(quantized_linears(model))
    clock.reset_peak()
    res: dict[str, Any] = {"qes_resident_bytes": clock.allocated_bytes(), "codes": engine.num_codes,
                           "layers": len(engine.layers), "compute": describe_compute(model),
                           "codes_bytes": codes_bytes(model), "largest_chunk_codes": max(c.size for c in engine.chunks),
                           "tied_qes": embeddings_tied(model), "base_hash_device": engine.codes_sha256()}
    logits = last_logits(model, batch, device)
    timed_generate(model, batch, gen_cfg, clock)  # warm-up
    clock.reset_peak()
    res.update(scored_iterations(name, size, model, engine, batch, gen_cfg, clock, deadline))
    res.update(window_steps(name, size, engine, clock, res["steps"], res["update_s_by_window"]))
    fitness_peak, update_peak = clock.peaks.get("fitness"), clock.peaks.get("update")
    res.update(qes_fitness_peak_bytes=fitness_peak, update_scratch_bytes=clock.growth.get("update"),
               qes_peak_bytes=max(fitness_peak, update_peak) if clock.cuda else None)
    res.update(member_phase(name, size, model, engine, batch, gen_cfg, dtype, clock))
    if compiled:
        res.update(compiled_member_phase(name, model, engine, batch, gen_cfg, dtype, clock, res))
    res.update(training_fitness_phase(name, size, model, engine, clock, deadline, res["fitness_s"]))
    good, total = dense_caches_exact(model)
    names = set(reference_layers(config))
    res.update(dense_cache_exact_layers=good, dense_cache_layers=total, window_hash_device=engine.codes_sha256(),
               window_ref_hash_device=codes_sha256([x for x in engine.layers if x.name in names]),
               reference_layers=len(names))
    return res, logits


# --- scoring several members -----------------------------------------------------------------------


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


def compiled_member_phase(name: str, model: torch.nn.Module, engine: Engine, batch: PromptBatch,
                          gen_cfg: GenerationConfig, dtype: torch.dtype, clock: Clock, res: dict[str, Any]
                          ) -> dict[str, Any]:
    """The member group of :func:`member_phase` again with ``decode: compiled`` (fixed-shape steps through
    torch.compile, CUDA graphs on CUDA): the first call compiles (its seconds are reported), the second is timed;
    every member's responses must come out as the eager group's."""
    note(f"{name}: {res['member_group']} members together, compiled decode")
    cfg = replace(gen_cfg, decode="compiled")
    members = [(s, sign) for s in member_seeds(GLOBAL_SEED, 1 << 20, res["member_group"] // 2) for sign in (1, -1)]
    eager, _ = generate_group(model, batch, gen_cfg, MemberGroup(engine, members, dtype))
    t0 = clock.now()
    generate_group(model, batch, cfg, MemberGroup(engine, members, dtype))  # compiles
    t1 = clock.now()
    compiled, tokens = generate_group(model, batch, cfg, MemberGroup(engine, members, dtype))
    t2 = clock.now()
    return {"compiled_compile_s": t1 - t0, "compiled_group_s": t2 - t1,
            "compiled_group_tokens_per_s": sum(tokens) / (t2 - t1),
            "compiled_same_rows": sum(a == b for x, y in zip(eager, compiled) for a, b in zip(x, y)),
            "compiled_rows": sum(len(x) for x in eager)}


def training_fitness_phase(name: str, size: Size, model: torch.nn.Module, engine: Engine, clock: Clock,
                           deadline: float, fitness_s: float) -> dict[str, Any]:
    """The population scored as finetune scores it: ``fitness`` / ``group_fitness`` built as in qes.finetune
    (qes.generation.score / score_group, prefix cache per member, the prompts' shared prefix, the task's stop
    string) and run by training's member loop, one member at a time and all of them in one group."""
    batch = fitness_prompts(size)
    cfg = GenerationConfig(max_new_tokens=size.new_tokens, batch_size=len(batch))
    members = training_members(size.population)
    if time.perf_counter() + (2 * len(members) + 2) * fitness_s > deadline:
        note(f"{name}: training fitness skipped: past the budget")
        return {"train_fitness_skipped": True}
    note(f"{name}: training fitness, {len(members)} members alone and in one group")
    alone: list[FitnessResult] = []
    group: list[FitnessResult] = []

    def fitness(t: int) -> float:
        alone.append(score(model, batch, cfg))
        return alone[-1].mean_reward

    def group_fitness(t: int, scopes: MemberGroup) -> list[float]:
        group.extend(score_group(model, batch, cfg, scopes))
        return [r.mean_reward for r in group[-scopes.size :]]

    everyone = list(range(len(members)))
    score(model, batch, cfg)  # warm-up
    t0 = clock.now()
    one = _score_members(engine, model, members, everyone, FULL_STEPS, fitness, group_fitness, 1)
    t1 = clock.now()
    together = _score_members(engine, model, members, everyone, FULL_STEPS, fitness, group_fitness, len(members))
    t2 = clock.now()
    return {"train_fitness_skipped": False, "train_fitness_members": len(members),
            "train_fitness_prompts": len(batch), "train_fitness_prefix": batch.chunks(len(batch), True)[0].prefix_len,
            "train_fitness_alone_s": (t1 - t0) / len(members), "train_fitness_group_s": (t2 - t1) / len(members),
            "train_fitness_same_rewards": sum(one.rewards[i] == together.rewards[i] for i in everyone),
            "train_fitness_rewards": [one.rewards[i] for i in everyone], **responses_agree(alone, group)}


def responses_agree(alone: list[FitnessResult], group: list[FitnessResult]) -> dict[str, int]:
    """How many responses the group gave as the members alone did, and how the members' rows ended."""
    pairs = zip(alone, group)
    return {"train_fitness_same_rows": sum(x == y for a, b in pairs for x, y in zip(a.responses, b.responses)),
            "train_fitness_rows": sum(len(a.responses) for a in alone),
            "train_fitness_stopped_rows": sum(r.endswith(STOP_TEXT) for a in alone for r in a.responses),
            "train_fitness_tokens": sum(a.generated_tokens for a in alone)}


# --- replays ---------------------------------------------------------------------------------------


def replay_codes(size: Size, config: Any, device: torch.device, steps: int, total: int,
                 names: list[str] | None = None) -> dict[str, Any]:
    """Fresh codes on ``device`` (no forward path), the fixed steps through Engine.apply: the base hash, the hash
    after ``steps`` (all layers), the hash after ``total`` (of the layers ``names``; all when None), s/step."""
    engine = new_engine(codes_only(size, config, device))
    res: dict[str, Any] = {"base": engine.codes_sha256(), "layers": len(engine.layers)}
    clock = Clock(device)
    start = clock.now()
    for t in range(steps):
        engine.apply(fixed_step(t, size.population))
    res.update(s_per_step=(clock.now() - start) / max(steps, 1), after_steps=engine.codes_sha256())
    done = steps
    if names is not None and len(names) < len(engine.layers):
        del engine
        gc.collect()
        engine, done = new_engine(codes_only(size, config, device, names)), 0
    for t in range(done, total):
        engine.apply(fixed_step(t, size.population))
    res["after_window"] = engine.codes_sha256()
    return res
