"""The QES population loop: perturb -> score -> restore per member, shape, update, log; resumable.

Iteration t draws its member seeds from (global seed, t) and scores every member with
`fitness(t)` on the perturbed model (the task picks its prompt batch from t too), so a resumed run
makes exactly the choices an uninterrupted one would. The seed log is the only state: resuming
replays it onto the base codes, verifying every hash checkpoint, and continues at the next iteration.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from qes import __version__
from qes.codes import QuantLinear, base_identity, codes_sha256
from qes.config import ConfigError, check_values, complete, finetune_conflicts
from qes.dist import Ranks
from qes.engine import Engine
from qes.faults import fault_point
from qes.fsutil import refuse_overlap
from qes.logutil import PROGRESS
from qes.members import MemberGroup
from qes.noise import NoiseSpec, member_seeds
from qes.replay import engine_for_log, layer_manifest, replay_steps
from qes.seedlog import LoggedStep, SeedLog, SeedLogError, _write_atomic, no_op_report
from qes.update import Step, UpdateConfig, alpha_fixed_point, alpha_schedule, quantize_coefficients

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of one QES run (all of them go into run.json)."""

    iterations: int = 20
    population: int = 8
    sigma: float = 0.01
    alpha: float = 0.003
    alpha_warmup: int = 0
    alpha_decay: str = "constant"
    shaping: str = "pair_zscore"
    coef_clip: float = 3.0
    global_seed: int = 0
    checkpoint_every: int = 5
    update: UpdateConfig = field(default_factory=UpdateConfig)

    def __post_init__(self) -> None:
        block = {k: v for k, v in asdict(self).items() if k != "update"}
        check_values("finetune", block, source="finetune settings")
        problems = finetune_conflicts(block)
        if problems:
            raise ConfigError("invalid finetune settings:\n  " + "\n  ".join(problems))

    def alpha_at(self, t: int) -> float:
        """Step size of iteration t: linear warm-up, then constant or cosine decay to zero."""
        return alpha_schedule(self.alpha, self.alpha_warmup, self.alpha_decay, self.iterations, t)

    def to_json(self) -> dict:
        data = asdict(self)
        data["update"] = self.update.to_json()
        return data


def shape_rewards(rewards: list[float], shaping: str, clip: float) -> list[float]:
    """Per-member float coefficients from rewards ordered (+s0, -s0, +s1, -s1, ...).

    pair_zscore: z-score of the pair differences r(+s) - r(-s), split as +z/2 and -z/2 so that the
    seed's combined coefficient is z; centered_rank: ranks of all rewards mapped to [-0.5, 0.5].
    Both are clipped to +-clip. Identical rewards give zero coefficients (no update).
    """
    if shaping == "pair_zscore":
        diffs = [rewards[i] - rewards[i + 1] for i in range(0, len(rewards), 2)]
        mean = sum(diffs) / len(diffs)
        std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / len(diffs))
        out = []
        for d in diffs:
            z = 0.0 if std < 1e-12 else max(-clip, min(clip, (d - mean) / std))
            out += [z / 2, -z / 2]
        return out
    order = sorted(range(len(rewards)), key=lambda i: (rewards[i], i))
    ranks = [0.0] * len(rewards)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and rewards[order[j + 1]] == rewards[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    n = len(rewards)
    return [max(-clip, min(clip, r / (n - 1) - 0.5)) for r in ranks]


def _run_meta(cfg: TrainConfig, layers: list[QuantLinear], base: dict, extra: dict) -> dict:
    return {
        "base_codes_sha256": base["parts"]["codes"],
        "base": base,
        "layers": layer_manifest(layers),
        "noise": NoiseSpec.from_sigma(cfg.sigma).to_json(),
        "update": cfg.update.to_json(),
        "population": cfg.population,
        "global_seed": cfg.global_seed,
        "train": cfg.to_json(),
        "qes_version": __version__,
        **extra,
    }


#: the fitness path of runs logged before run.json recorded one: transformers' generate, one member at a time
LEGACY_FITNESS = {"member_batch": 1, "prefix_cache": "row"}


def _comparable(meta: dict, fitness_may_change: bool = False) -> dict:
    skip = ("format", "version", "qes_version", "base", "base_codes_sha256")
    skip += ("fitness",) if fitness_may_change else ()
    out = {k: v for k, v in meta.items() if k not in skip}
    if not fitness_may_change and "fitness" not in out and "max_new_tokens" in out:
        out["fitness"] = LEGACY_FITNESS  # a finetune-stage log from before the fitness path was recorded
    return out


def _without_length(meta: dict) -> dict:
    """The settings with the run's length left out: with a constant step size (after any warm-up) nothing
    an iteration does depends on how many iterations the run has, so a run may be continued past its end."""
    train = meta.get("train")
    if not isinstance(train, dict) or train.get("alpha_decay") != "constant":
        return meta
    return {**meta, "train": {k: v for k, v in train.items() if k != "iterations"}}


def refuse_other_config(run_dir: Path, old: dict, new: dict, fitness_may_change: bool = False) -> None:
    """Refuse to resume a run whose logged settings differ from the given ones, naming the first difference.

    The number of iterations may differ when the step size is constant: the run is then continued (or, if it
    is already longer, left as it is). The fitness path may differ when ``fitness_may_change``.
    """
    old = _comparable(old, fitness_may_change)
    new = _comparable(json.loads(json.dumps(new)), fitness_may_change)
    if _without_length(old) == _without_length(new):
        return
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            hint = " (or set finetune.allow_fitness_change)" if key == "fitness" else ""
            raise SeedLogError(
                f"{run_dir} holds a run with a different {key!r} (log: {old.get(key)!r}, config: "
                f"{new.get(key)!r}); refusing to resume it. Choose another run name or remove the folder{hint}."
            )


def open_or_create(run_dir: Path, cfg: TrainConfig, layers: list[QuantLinear], base: dict, extra: dict,
                   fitness_may_change: bool = False) -> SeedLog:
    """Open the run's seed log if it exists (refusing a different base or config), else create it."""
    meta = _run_meta(cfg, layers, base, extra)
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
        _write_atomic(self.path, lambda tmp: pq.write_table(table, tmp))


@dataclass
class _Scored:
    rewards: dict[int, float] = field(default_factory=dict)
    seconds_fitness: float = 0.0
    seconds_perturb: float = 0.0
    hits: int = 0


def _score_members(engine: Engine, model, members: list[tuple[int, int]], mine: list[int], t: int,
                   fitness: Callable[[int], float],
                   group_fitness: Callable[[int, MemberGroup], list[float]] | None, member_batch: int) -> _Scored:
    """Rewards of this rank's members (indices `mine` into `members`): one at a time on codes perturbed in
    place, or in groups of `member_batch` (perturb and restore time is then part of the group's)."""
    out = _Scored()
    if member_batch == 1:
        for index in mine:
            a = time.perf_counter()
            p = engine.perturb(*members[index])
            b = time.perf_counter()
            fault_point("fitness", t)
            out.rewards[index] = float(fitness(t))
            c = time.perf_counter()
            engine.restore(p)
            out.seconds_perturb += (b - a) + (time.perf_counter() - c)
            out.seconds_fitness += c - b
            out.hits += p.boundary_hits
        return out
    dtype = next(model.parameters()).dtype
    for start in range(0, len(mine), member_batch):
        indices = mine[start : start + member_batch]
        group = MemberGroup(engine, [members[i] for i in indices], dtype)
        a = time.perf_counter()
        fault_point("fitness", t)
        rewards = group_fitness(t, group)
        out.seconds_fitness += time.perf_counter() - a - group.seconds
        out.seconds_perturb += group.seconds
        out.hits += group.boundary_hits
        out.rewards.update(zip(indices, map(float, rewards), strict=True))
    return out


def train(
    model,
    layers: list[QuantLinear],
    fitness: Callable[[int], float],
    cfg: TrainConfig,
    run_dir: str | Path,
    extra_meta: dict | None = None,
    on_iteration: Callable[[dict], None] | None = None,
    ranks: Ranks | None = None,
    group_fitness: Callable[[int, MemberGroup], list[float]] | None = None,
    member_batch: int = 1,
    fitness_may_change: bool = False,
) -> str:
    """Run (or resume) QES on `model` in place; returns the final codes_sha256.

    `fitness(t)` scores the model as it currently is on iteration t's prompt batch. With `member_batch` > 1,
    members are scored in groups of that size by `group_fitness(t, group)` instead (one reward per member of
    the :class:`qes.members.MemberGroup`). With several `ranks`, each scores its share of the members and
    rank 0 alone writes the log and metrics.
    """
    if member_batch > 1 and group_fitness is None:
        raise ValueError("member_batch > 1 needs a group_fitness")
    run_dir = Path(run_dir)
    ranks = ranks or Ranks()
    base = base_identity(model, codes_sha256(layers))
    if ranks.is_writer:
        seedlog = open_or_create(run_dir, cfg, layers, base, extra_meta or {}, fitness_may_change)
        seedlog.clean_partial()
    ranks.barrier()
    if not ranks.is_writer:
        seedlog = SeedLog.open(run_dir)
        seedlog.verify_base(base)
    done = seedlog.iterations
    engine = engine_for_log(model, seedlog, base) if done else Engine(layers, seedlog.noise, seedlog.update)
    if done:
        log.info("resuming %s: replaying %d logged iterations", run_dir, done, extra=PROGRESS)
        replay_steps(engine, seedlog)
    finished = seedlog.finished
    if finished is not None and finished["iterations"] >= cfg.iterations:
        log.info("run %s already finished at iteration %d", run_dir, finished["iterations"])
        return finished["codes_sha256"]
    if finished is not None:
        # Continue a finished run: its last record holds the codes hash final.json had, and without
        # final.json the log is an ordinary unfinished run until the new end is reached.
        log.info("continuing %s from iteration %d to %d", run_dir, finished["iterations"], cfg.iterations)
        if ranks.is_writer:
            seedlog.reopen()
        ranks.barrier()
    metrics = Metrics(run_dir / "metrics.parquet")
    metrics.load(done)
    pairs = cfg.population // 2
    for t in range(done, cfg.iterations):
        t0 = time.perf_counter()
        seeds = member_seeds(cfg.global_seed, t, pairs)
        members = [(s, sign) for s in seeds for sign in (1, -1)]
        scored = _score_members(engine, model, members, ranks.members(len(members)), t, fitness, group_fitness,
                                member_batch)
        mine, t_fit, t_pert, hits = scored.rewards, scored.seconds_fitness, scored.seconds_perturb, scored.hits
        a = time.perf_counter()
        rewards = ranks.gather_rewards(mine, len(members))
        t_wait = time.perf_counter() - a
        coefs = quantize_coefficients(shape_rewards(rewards, cfg.shaping, cfg.coef_clip))
        step = Step(
            iteration=t,
            alpha_fp=alpha_fixed_point(cfg.alpha_at(t), cfg.sigma),
            seeds=tuple(s for s, _ in members),
            signs=tuple(sign for _, sign in members),
            coefs=coefs,
        )
        a = time.perf_counter()
        stats = engine.apply(step)
        fault_point("update", t)
        t_update = time.perf_counter() - a
        last = t == cfg.iterations - 1
        checkpoint = engine.codes_sha256() if last or (t + 1) % cfg.checkpoint_every == 0 else None
        if checkpoint is not None:
            ranks.check_same(checkpoint, t)
        if not ranks.is_writer:
            continue
        seedlog.append(LoggedStep(step, tuple(rewards), checkpoint))
        row = {
            "iteration": t,
            "reward_mean": sum(rewards) / len(rewards),
            "reward_max": max(rewards),
            "reward_min": min(rewards),
            "changed_fraction": stats.changed_fraction,
            "changed": stats.changed,
            "update_boundary_hits": stats.boundary_hits,
            "perturb_boundary_hits": hits,
            "alpha": cfg.alpha_at(t),
            "seconds_fitness": t_fit,
            "seconds_perturb_restore": t_pert,
            "seconds_update": t_update,
            "seconds_rank_wait": t_wait,
            "ranks": ranks.world,
            "seconds_total": time.perf_counter() - t0,
        }
        metrics.add(row)
        log.info(
            "iter %d/%d  reward mean %.4f max %.4f  changed %.4f%%  boundary %d/%d  "
            "fitness %.1fs perturb+restore %.2fs update %.2fs",
            t + 1, cfg.iterations, row["reward_mean"], row["reward_max"], 100 * row["changed_fraction"],
            hits, stats.boundary_hits, t_fit, t_pert, t_update, extra=PROGRESS,
        )
        if on_iteration is not None:
            on_iteration(row)
    final = engine.codes_sha256()
    ranks.check_same(final, cfg.iterations)
    if ranks.is_writer:
        seedlog.finish(cfg.iterations, final)
    return final


# --- the finetune stage: a quantized checkpoint + the task's training prompts ----------------------


@dataclass(frozen=True)
class FinetuneConfig:
    """The finetune stage: QES hyperparameters, prompts per iteration and decoding budget."""

    train: TrainConfig = field(default_factory=TrainConfig)
    batch_prompts: int = 16
    max_new_tokens: int = 48
    member_batch: int | str = "auto"
    prefix_cache: str = "member"
    allow_fitness_change: bool = False
    device: str = "auto"
    backend: str = "auto"
    dtype: str = "auto"
    ranks: int = 1
    launcher: str = "torchrun"
    fail_if_unchanged: bool = False

    def __post_init__(self) -> None:
        stage = {k: v for k, v in asdict(self).items() if k != "train"}
        check_values("finetune", stage, source="finetune settings")
        problems = finetune_conflicts({**self.to_block(), "ranks": self.ranks})
        if problems:
            raise ConfigError("invalid finetune settings:\n  " + "\n  ".join(problems))

    def fitness_path(self) -> dict:
        """How members are scored, as run.json records it: a run keeps it unless allow_fitness_change."""
        return {"member_batch": self.member_batch, "prefix_cache": self.prefix_cache}

    def to_block(self) -> dict:
        """The settings as the config's `finetune:` block (without the run name)."""
        train = {k: v for k, v in asdict(self.train).items() if k != "update"}
        update = self.train.update
        residual = {"mode": update.mode, "gamma": update.gamma, "window": update.window, "clamp": update.residual_clamp}
        stage = {k: v for k, v in asdict(self).items() if k != "train"}
        return {**train, "residual": residual, **stage}


def prompt_indices(global_seed: int, iteration: int, total: int, count: int) -> list[int]:
    """The training prompts of an iteration: `count` distinct indices, a pure function of the arguments."""
    from qes.noise import hash32

    key = hash32(hash32((global_seed & 0xFFFFFFFF) ^ 0x27D4EB2F) ^ (iteration & 0xFFFFFFFF))
    order = sorted(range(total), key=lambda i: (hash32(key ^ hash32(i)), i))
    return sorted(order[: min(count, total)])


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return device


def _stage_meta(cfg: FinetuneConfig, quantized_dir: str | Path, train_parquet: str | Path) -> dict:
    """What run.json records of the finetune stage beyond the QES hyperparameters."""
    return {
        "base_checkpoint": str(quantized_dir),
        "task_data": str(train_parquet),
        "batch_prompts": cfg.batch_prompts,
        "max_new_tokens": cfg.max_new_tokens,
        "fitness": cfg.fitness_path(),
    }


#: members a CPU scores together under member_batch auto (the default model: see docs/BENCHMARKS.md)
CPU_MEMBER_BATCH = 4


def resolve_member_batch(cfg: FinetuneConfig, device: str, members_per_rank: int) -> int:
    """Members per generation: the configured number, or under auto all of the rank's on CUDA and
    CPU_MEMBER_BATCH on the CPU; 1 with prefix_cache row (transformers' generate scores one member)."""
    if cfg.prefix_cache == "row":
        if cfg.member_batch not in ("auto", 1):
            raise ConfigError(f"finetune.member_batch: {cfg.member_batch} needs prefix_cache member (row scores "
                              "one member at a time)")
        return 1
    if cfg.member_batch == "auto":
        wanted = members_per_rank if device == "cuda" else CPU_MEMBER_BATCH
    else:
        wanted = int(cfg.member_batch)
    return max(1, min(wanted, members_per_rank))


def check_resumable(run_dir: str | Path, block: dict, quantized_dir: str | Path, train_parquet: str | Path) -> None:
    """Refuse settings that differ from those of the seed log already in `run_dir` (if any), or a broken log.

    The workflow calls this while it plans the jobs, so a run that cannot be resumed is refused before
    Snakemake removes the finished outputs of the earlier run.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").exists():
        return
    cfg = finetune_config(block)
    seedlog = SeedLog.open(run_dir)
    expected = {
        "train": cfg.train.to_json(),
        "population": cfg.train.population,
        "global_seed": cfg.train.global_seed,
        "update": cfg.train.update.to_json(),
        **_stage_meta(cfg, quantized_dir, train_parquet),
    }
    logged = {key: seedlog.meta[key] for key in expected if key in seedlog.meta}
    refuse_other_config(run_dir, logged, expected, cfg.allow_fitness_change)


def finetune(
    quantized_dir: str | Path,
    train_parquet: str | Path,
    run_dir: str | Path,
    cfg: FinetuneConfig,
    on_iteration: Callable[[dict], None] | None = None,
) -> dict:
    """Run (or resume) QES on a quantized checkpoint with the task's training prompts."""
    from qes.codes import describe_compute, load_quantized, quantized_linears
    from qes.dist import close_ranks, init_ranks
    from qes.fitness import GenerationConfig, load_batch, score, score_group

    refuse_overlap(run_dir, {"model": quantized_dir, "train": train_parquet}, "--run-dir")
    device = resolve_device(cfg.device)
    ranks = init_ranks(device)
    model, tokenizer = load_quantized(quantized_dir, device=device, dtype=cfg.dtype, backend=cfg.backend)
    log.info("finetune on %s", json.dumps(describe_compute(model)))
    full = load_batch(tokenizer, train_parquet)
    generation = GenerationConfig(max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_prompts,
                                  prefix_cache=cfg.prefix_cache)
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
    extra = _stage_meta(cfg, quantized_dir, train_parquet)
    layers = quantized_linears(model)
    try:
        final = train(model, layers, fitness, cfg.train, run_dir, extra, on_iteration, ranks,
                      group_fitness=group_fitness, member_batch=member_batch,
                      fitness_may_change=cfg.allow_fitness_change)
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
) -> dict:
    """The finetune stage from the config's `finetune:` block: in this process, or as `ranks` ranks.

    With ranks > 1 (and not already one of them), starts `qes finetune` under the configured launcher
    with the same block and waits for it; the seed log then holds the result.
    """
    import tempfile

    import yaml

    from qes.dist import launch, launched_world

    cfg = finetune_config(block)
    if cfg.ranks == 1 or launched_world() is not None:
        return finetune(quantized_dir, train_parquet, run_dir, cfg)
    started = time.perf_counter()
    Path(run_dir).parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".qes-launch-", dir=Path(run_dir).parent) as tmp:
        config = Path(tmp) / "finetune.yaml"
        config.write_text(yaml.safe_dump({"finetune": dict(block)}))
        args = ["finetune", "--model", str(quantized_dir), "--train", str(train_parquet), "--run-dir", str(run_dir)]
        launch(cfg.ranks, cfg.launcher, [*args, "--config", str(config)], threads)
    finished = SeedLog.open(run_dir).finished
    if finished is None:
        raise RuntimeError(f"the ranks exited without finishing the run in {run_dir}")
    return _summary(run_dir, finished["codes_sha256"], cfg, resolve_device(cfg.device), time.perf_counter() - started)


def finetune_config(values: dict, source: str = "finetune settings") -> FinetuneConfig:
    """The config's finetune block as a FinetuneConfig, validated by the schema; keys left out take its defaults."""
    values = complete(values, "finetune", source=source)
    residual = values.pop("residual")
    residual["residual_clamp"] = residual.pop("clamp")
    stage_keys = [f for f in FinetuneConfig.__dataclass_fields__ if f != "train"]
    outer = {k: values.pop(k) for k in stage_keys}
    values.pop("run")
    return FinetuneConfig(train=TrainConfig(**values, update=UpdateConfig(**residual)), **outer)
