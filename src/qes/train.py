"""The QES population loop: perturb -> score -> restore per member, shape, update, log; resumable.

Iteration t draws its member seeds from (global seed, t) and scores every member with
`fitness(t)` on the perturbed model (the task picks its prompt batch from t too), so a resumed run
makes exactly the choices an uninterrupted one would. The seed log is the only state: resuming
replays it onto the base codes, verifying every hash checkpoint, and continues at the next iteration.
Given the run's snapshot folder, a seed-replay or no-feedback run replays only the iterations after its
latest verified snapshot (qes.replaystate), whose codes hash to what the log holds there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from qes.claims import claimed, inherited
from qes.codes import LayerCodes
from qes.dist import Ranks
from qes.engine import Engine, StepStats
from qes.faults import fault_point
from qes.hparams import TrainConfig
from qes.identity import base_identity, codes_sha256
from qes.logchain import LoggedStep, write_atomic
from qes.logutil import PROGRESS
from qes.members import MemberGroup
from qes.noise import member_seeds
from qes.replay import ReplayMismatch, engine_for_log, layer_manifest, replay_steps
from qes.runrecord import refuse_other_config, run_meta
from qes.seedlog import SeedLog, SeedLogError
from qes.update import Step, alpha_fixed_point, quantize_coefficients, shape_rewards

log = logging.getLogger(__name__)


def open_or_create(run_dir: Path, cfg: TrainConfig, layers: list[LayerCodes], base: dict, extra: dict,
                   fitness_may_change: bool = False) -> SeedLog:
    """Open the run's seed log if it exists (refusing a different base or config), else create it."""
    meta = run_meta(cfg, layer_manifest(layers), base, extra)
    if not (run_dir / "run.json").exists():
        if run_dir.is_dir() and any(run_dir.iterdir()):
            raise SeedLogError(f"{run_dir} holds files but no seed log (run.json); refusing to write a run into it")
        return SeedLog.create(run_dir, meta)
    seedlog = SeedLog.open(run_dir)
    seedlog.verify_base(base)
    refuse_other_config(run_dir, seedlog.meta, meta, fitness_may_change)
    return seedlog

@dataclass
class Metrics:
    """Per-iteration metrics (rewards, codes changed, phase timings), kept as Parquet for plots."""

    path: Path
    rows: list[dict] = field(default_factory=list)

    def load(self, upto: int) -> None:
        if self.path.is_file():
            self.rows = [r for r in pq.read_table(self.path).to_pylist() if r["iteration"] < upto]

    def add(self, row: dict) -> None:
        self.rows.append(row)
        table = pa.Table.from_pylist(self.rows)
        write_atomic(self.path, lambda tmp: pq.write_table(table, tmp))

@dataclass
class _Scored:
    rewards: dict[int, float] = field(default_factory=dict)
    seconds_fitness: float = 0.0
    seconds_perturb: float = 0.0
    hits: int = 0
    seconds_update: float = 0.0
    seconds_rank_wait: float = 0.0

def _score_members(engine: Engine, model, members: list[tuple[int, int]], mine: list[int], t: int,
                   fitness: Callable[[int], float],
                   group_fitness: Callable[[int, MemberGroup], list[float]] | None, member_batch: int) -> _Scored:
    """Rewards of this rank's members (indices `mine` into `members`): one at a time on codes perturbed in
    place, or in groups of `member_batch` (perturb and restore time is then part of the group's)."""
    out = _Scored()
    if member_batch == 1:
        for index in mine:
            a = engine.clock()
            p = engine.perturb(*members[index])
            b = engine.clock()
            fault_point("fitness", t)
            out.rewards[index] = float(fitness(t))
            c = engine.clock()
            engine.restore(p)
            out.seconds_perturb += (b - a) + (engine.clock() - c)
            out.seconds_fitness += c - b
            out.hits += p.boundary_hits
        return out
    dtype = next(model.parameters()).dtype
    for start in range(0, len(mine), member_batch):
        indices = mine[start : start + member_batch]
        group = MemberGroup(engine, [members[i] for i in indices], dtype)
        a = engine.clock()
        fault_point("fitness", t)
        rewards = group_fitness(t, group)
        out.seconds_fitness += engine.clock() - a - group.seconds
        out.seconds_perturb += group.seconds
        out.hits += group.boundary_hits
        out.rewards.update(zip(indices, map(float, rewards), strict=True))
    return out

def train(
    model,
    layers: list[LayerCodes],
    fitness: Callable[[int], float],
    cfg: TrainConfig,
    run_dir: str | Path,
    extra_meta: dict | None = None,
    on_iteration: Callable[[dict], None] | None = None,
    ranks: Ranks | None = None,
    group_fitness: Callable[[int, MemberGroup], list[float]] | None = None,
    member_batch: int = 1,
    fitness_may_change: bool = False,
    state_dir: str | Path | None = None,
) -> str:
    """Run (or resume) QES on `model` in place; returns the final codes_sha256.

    `fitness(t)` scores the model as it currently is on iteration t's prompt batch. With `member_batch` > 1,
    members are scored in groups of that size by `group_fitness(t, group)` instead (one reward per member of
    the :class:`qes.members.MemberGroup`). With several `ranks`, each scores its share of the members and
    rank 0 alone writes the log and metrics. With `state_dir`, a resumed run starts from its snapshots
    there where its residual mode allows (see the module's docstring).
    """
    if member_batch > 1 and group_fitness is None:
        raise ValueError("member_batch > 1 needs a group_fitness")
    run_dir = Path(run_dir)
    ranks = ranks or Ranks()
    with ExitStack() as claim:
        if ranks.is_writer and not inherited(run_dir):
            claim.enter_context(claimed(run_dir))  # one writer per seed log, for the whole run
        return _run(model, fitness, cfg, run_dir, on_iteration, ranks, group_fitness, member_batch,
                    _open_and_catch_up(model, layers, cfg, run_dir, extra_meta or {}, ranks, fitness_may_change,
                                       state_dir))


def _run(model, fitness: Callable[[int], float], cfg: TrainConfig, run_dir: Path,
         on_iteration: Callable[[dict], None] | None, ranks: Ranks,
         group_fitness: Callable[[int, MemberGroup], list[float]] | None, member_batch: int,
         opened: tuple[SeedLog, Engine]) -> str:
    """The loop of :func:`train` from the log's last iteration to the run's end; returns the final codes hash."""
    seedlog, engine = opened
    finished = seedlog.finished
    if finished is not None and finished["iterations"] >= cfg.iterations:
        log.info("run %s already finished at iteration %d", run_dir, finished["iterations"])
        return finished["codes_sha256"]
    if finished is not None:
        # Continue a finished run: the replay reproduced final.json's codes hash, and without final.json
        # the log is an ordinary unfinished run until the new end is reached.
        log.info("continuing %s from iteration %d to %d", run_dir, finished["iterations"], cfg.iterations)
        if ranks.is_writer:
            seedlog.reopen(engine.codes_sha256())
        ranks.barrier()
    metrics = Metrics(run_dir / "metrics.parquet")
    metrics.load(seedlog.iterations)
    for t in range(seedlog.iterations, cfg.iterations):
        started = time.perf_counter()
        members = [(s, sign) for s in member_seeds(cfg.global_seed, t, cfg.population // 2) for sign in (1, -1)]
        scored = _score_members(engine, model, members, ranks.members(len(members)), t, fitness, group_fitness,
                                member_batch)
        waited = time.perf_counter()
        rewards = ranks.gather_rewards(scored.rewards, len(members))
        scored.seconds_rank_wait = time.perf_counter() - waited
        step = _step(cfg, t, members, rewards)
        updating = engine.clock()
        stats = engine.apply(step)
        fault_point("update", t)
        scored.seconds_update = engine.clock() - updating
        last = t == cfg.iterations - 1
        checkpoint = engine.codes_sha256() if last or (t + 1) % cfg.checkpoint_every == 0 else None
        if checkpoint is not None:
            ranks.check_same(checkpoint, t)
        if not ranks.is_writer:
            continue
        seedlog.append(LoggedStep(step, tuple(rewards), checkpoint))
        row = _metrics_row(cfg, t, rewards, stats, scored, ranks.world, time.perf_counter() - started)
        metrics.add(row)
        _report(cfg, row)
        if on_iteration is not None:
            on_iteration(row)
    final = engine.codes_sha256()
    ranks.check_same(final, cfg.iterations)
    if ranks.is_writer:
        seedlog.finish(cfg.iterations, final)
    return final


def _open_and_catch_up(model, layers: list[LayerCodes], cfg: TrainConfig, run_dir: Path, extra_meta: dict,
                       ranks: Ranks, fitness_may_change: bool,
                       state_dir: str | Path | None) -> tuple[SeedLog, Engine]:
    """The run's seed log (created by the writer rank) and an engine whose codes are at its last iteration."""
    base = base_identity(model, codes_sha256(layers))
    if ranks.is_writer:
        seedlog = open_or_create(run_dir, cfg, layers, base, extra_meta, fitness_may_change)
        seedlog.clean_partial()
    ranks.barrier()
    if not ranks.is_writer:
        seedlog = SeedLog.open(run_dir)
        seedlog.verify_base(base)
    done = seedlog.iterations
    if not done:
        return seedlog, Engine(layers, seedlog.noise, seedlog.update)
    engine, start = _engine_to_resume(model, seedlog, base, state_dir)
    log.info("resuming %s: replaying %d of %d logged iterations", run_dir, done - start, done, extra=PROGRESS)
    replay_steps(engine, seedlog, start)
    finished = seedlog.finished
    if finished is not None and engine.codes_sha256() != finished["codes_sha256"]:
        raise ReplayMismatch(
            f"replaying {run_dir} gives codes_sha256 {engine.codes_sha256()}, but its final.json records "
            f"{finished['codes_sha256']}: the replay does not reproduce the run"
        )
    return seedlog, engine


def _engine_to_resume(model, seedlog: SeedLog, base: dict,
                      state_dir: str | Path | None) -> tuple[Engine, int]:
    """An engine at the log's latest verified snapshot in `state_dir`, where the codes are the whole state, or
    at the base; with the iteration it stands after. A stored residual is not in a snapshot: from the base."""
    from qes.replaystate import RESUMABLE_MODES, engine_at

    if state_dir is None or seedlog.update.mode not in RESUMABLE_MODES:
        return engine_for_log(model, seedlog, base), 0
    return engine_at(model, seedlog, seedlog.iterations, state_dir, base)


def _step(cfg: TrainConfig, t: int, members: list[tuple[int, int]], rewards: list[float]) -> Step:
    """Iteration t's update as the log records it: shaped rewards quantized to integer coefficients."""
    return Step(
        iteration=t,
        alpha_fp=alpha_fixed_point(cfg.alpha_at(t), cfg.sigma),
        seeds=tuple(s for s, _ in members),
        signs=tuple(sign for _, sign in members),
        coefs=quantize_coefficients(shape_rewards(rewards, cfg.shaping, cfg.coef_clip)),
    )


def _metrics_row(cfg: TrainConfig, t: int, rewards: list[float], stats: StepStats, scored: _Scored, world: int,
                 seconds: float) -> dict:
    return {
        "iteration": t,
        "reward_mean": sum(rewards) / len(rewards),
        "reward_max": max(rewards),
        "reward_min": min(rewards),
        "changed_fraction": stats.changed_fraction,
        "changed": stats.changed,
        "update_boundary_hits": stats.boundary_hits,
        "perturb_boundary_hits": scored.hits,
        "alpha": cfg.alpha_at(t),
        "seconds_fitness": scored.seconds_fitness,
        "seconds_perturb_restore": scored.seconds_perturb,
        "seconds_update": scored.seconds_update,
        "seconds_rank_wait": scored.seconds_rank_wait,
        "ranks": world,
        "seconds_total": seconds,
    }


def _report(cfg: TrainConfig, row: dict) -> None:
    log.info(
        "iter %d/%d  reward mean %.4f max %.4f  changed %.4f%%  boundary %d/%d  "
        "fitness %.1fs perturb+restore %.2fs update %.2fs",
        row["iteration"] + 1, cfg.iterations, row["reward_mean"], row["reward_max"], 100 * row["changed_fraction"],
        row["perturb_boundary_hits"], row["update_boundary_hits"], row["seconds_fitness"],
        row["seconds_perturb_restore"], row["seconds_update"], extra=PROGRESS,
    )
