"""The finetune stage: QES on a quantized checkpoint with the task's training prompts, in this process or as ranks.

Iteration t scores its members on ``batch_prompts`` training prompts picked by :func:`prompt_indices` from
(global seed, t), generating with the configured fitness path (:mod:`qes.generation`); :func:`qes.train.train`
runs the population loop and keeps the seed log. :func:`run_finetune` starts the ranks when there are several.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq

from qes.fsutil import refuse_overlap
from qes.hparams import FinetuneConfig, finetune_config, resolve_member_batch
from qes.runrecord import stage_meta
from qes.seedlog import SeedLog, no_op_report

log = logging.getLogger(__name__)


def prompt_indices(global_seed: int, iteration: int, total: int, count: int) -> list[int]:
    """The training prompts of an iteration: `count` distinct indices, a pure function of the arguments."""
    from qes.noise import hash32

    key = hash32(hash32((global_seed & 0xFFFFFFFF) ^ 0x27D4EB2F) ^ (iteration & 0xFFFFFFFF))
    order = sorted(range(total), key=lambda i: (hash32(key ^ hash32(i)), i))
    return sorted(order[: min(count, total)])

def resolve_device(device: str) -> str:
    import torch

    from qes.qlinear import require_cuda

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        require_cuda()
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return device

def finetune(
    quantized_dir: str | Path,
    train_parquet: str | Path,
    run_dir: str | Path,
    cfg: FinetuneConfig,
    on_iteration: Callable[[dict], None] | None = None,
    state_dir: str | Path | None = None,
) -> dict:
    """Run (or resume) QES on a quantized checkpoint with the task's training prompts. With `state_dir`,
    the final codes are left there as a replay snapshot (qes.replaystate), so that scoring the run at its
    last iteration, or continuing a seed-replay run, does not replay the log again."""
    from qes.checkpoint import describe_compute, load_quantized
    from qes.codes import quantized_linears
    from qes.decoding import StaticDecode
    from qes.dist import close_ranks, init_ranks
    from qes.generation import GenerationConfig, load_batch, score, score_group
    from qes.train import train

    refuse_overlap(run_dir, {"model": quantized_dir, "train": train_parquet}, "--run-dir")
    device = resolve_device(cfg.device)
    if cfg.decode == "compiled":
        StaticDecode.for_device(device)  # refuses a CPU that cannot compile, before any work
    ranks = init_ranks(device)
    model, tokenizer = load_quantized(quantized_dir, device=device, dtype=cfg.dtype, backend=cfg.backend)
    log.info("finetune on %s", json.dumps(describe_compute(model)))
    full = load_batch(tokenizer, train_parquet)
    generation = GenerationConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_prompts,
                                  prefix_cache=cfg.prefix_cache, decode=cfg.decode)
    member_batch = resolve_member_batch(cfg, device, len(ranks.members(cfg.train.population)))
    cache: dict[int, object] = {}

    def prompts(t: int):
        if t not in cache:
            cache.clear()
            picks = prompt_indices(cfg.train.global_seed, t, len(full), cfg.batch_prompts)
            cache[t] = full.subset(picks)
        return cache[t]

    def fitness(t: int) -> float:
        return score(model, prompts(t), generation).mean_reward

    def group_fitness(t: int, group) -> list[float]:
        return [r.mean_reward for r in score_group(model, prompts(t), generation, group)]

    log.info("fitness path: %s, %d member(s) per generation", json.dumps(cfg.fitness_path()), member_batch)
    started = time.perf_counter()
    extra = stage_meta(cfg, quantized_dir, train_parquet)
    layers = quantized_linears(model)
    try:
        final = train(model, layers, fitness, cfg.train, run_dir, extra, on_iteration, ranks,
                      group_fitness=group_fitness, member_batch=member_batch,
                      fitness_may_change=cfg.allow_fitness_change, state_dir=state_dir)
        if state_dir is not None and ranks.is_writer:
            from qes.replaystate import save_snapshot

            seedlog = SeedLog.open(run_dir)
            save_snapshot(state_dir, seedlog, seedlog.iterations, model)
    finally:
        close_ranks(ranks)
    summary = _summary(run_dir, final, cfg, device, time.perf_counter() - started)
    return {**summary, "compute": describe_compute(model), "member_batch": member_batch}

def seconds_per_iteration(run_dir: str | Path) -> float | None:
    """Median wall time of the run's iterations (from metrics.parquet): what sizes the next run on this machine."""
    path = Path(run_dir) / "metrics.parquet"
    if not path.is_file():
        return None
    seconds = sorted(pq.read_table(path, columns=["seconds_total"]).column(0).to_pylist())
    return round(seconds[len(seconds) // 2], 2) if seconds else None

def _summary(run_dir: str | Path, final: str, cfg: FinetuneConfig, device: str, seconds: float) -> dict:
    """summary.json of the stage; warns loudly (and fails under fail_if_unchanged) when nothing changed."""
    seedlog = SeedLog.open(run_dir)
    report = no_op_report(seedlog, final)
    for warning in report["warnings"]:
        log.warning("%s: %s", run_dir, warning)
    if cfg.fail_if_unchanged and not report["codes_changed"]:
        raise RuntimeError(f"finetune.fail_if_unchanged is set and {report['warnings'][0]}")
    return {
        "run_dir": str(run_dir),
        "codes_sha256": final,
        "base_codes_sha256": seedlog.meta["base_codes_sha256"],
        "base_sha256": seedlog.meta["base"]["sha256"],
        "iterations": seedlog.iterations,
        "device": device,
        "ranks": cfg.ranks,
        "seconds": round(seconds, 2),
        "seconds_per_iteration": seconds_per_iteration(run_dir),
        **report,
    }

def run_finetune(
    quantized_dir: str | Path,
    train_parquet: str | Path,
    run_dir: str | Path,
    block: dict,
    threads: int = 1,
    state_dir: str | Path | None = None,
) -> dict:
    """The finetune stage from the config's `finetune:` block: in this process, or as `ranks` ranks.

    With ranks > 1 (and not already one of them), starts `qes finetune` under the configured launcher
    with the same block and waits for it; the seed log then holds the result. The seed log folder is
    claimed (:mod:`qes.claims`) for the whole run, so a second finetune of the same run is refused.
    A run in this process leaves its final codes in `state_dir` (see :func:`finetune`); ranks leave none.
    """
    import tempfile

    import yaml

    from qes.claims import claimed, inheriting
    from qes.dist import launch, launched_world

    cfg = finetune_config(block)
    refuse_overlap(run_dir, {"model": quantized_dir, "train": train_parquet}, "--run-dir")
    if launched_world() is not None:  # a rank: rank 0 claims the log in train() unless its launcher holds it
        return finetune(quantized_dir, train_parquet, run_dir, cfg)
    if cfg.ranks == 1:
        with claimed(run_dir):
            return finetune(quantized_dir, train_parquet, run_dir, cfg, state_dir=state_dir)
    started = time.perf_counter()
    with (
        claimed(run_dir) as lock,  # held here for the ranks, which inherit it
        inheriting(lock),
        tempfile.TemporaryDirectory(prefix=".qes-launch-", dir=Path(run_dir).parent) as tmp,
    ):
        config = Path(tmp) / "finetune.yaml"
        config.write_text(yaml.safe_dump({"finetune": dict(block)}))
        args = ["finetune", "--model", str(quantized_dir), "--train", str(train_parquet), "--run-dir", str(run_dir)]
        launch(cfg.ranks, cfg.launcher, [*args, "--config", str(config)], threads)
    finished = SeedLog.open(run_dir).finished
    if finished is None:
        raise RuntimeError(f"the ranks exited without finishing the run in {run_dir}")
    return _summary(run_dir, finished["codes_sha256"], cfg, resolve_device(cfg.device), time.perf_counter() - started)
