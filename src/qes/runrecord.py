"""What run.json records and when a log may be resumed: its keys written once, compared key by key.

A run resumes only under the settings it was started with: the same base, hyperparameters, prompts and fitness
path (the number of iterations may grow when the step size is constant). The workflow checks this while it
plans its jobs (:func:`check_resumable`), before Snakemake removes a finished run's outputs, so nothing here
imports torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from qes import __version__
from qes.hparams import FinetuneConfig, TrainConfig, finetune_config
from qes.noise import NoiseSpec
from qes.seedlog import SeedLog, SeedLogError


def run_meta(cfg: TrainConfig, layers: list[dict], base: dict, extra: dict) -> dict:
    """run.json of a new run: the base's identity, the layers (:func:`qes.replay.layer_manifest`), the noise and
    update settings, every hyperparameter and ``extra`` (the stage's record, :func:`stage_meta`)."""
    return {
        "base_codes_sha256": base["parts"]["codes"],
        "base": base,
        "layers": layers,
        "noise": NoiseSpec.from_sigma(cfg.sigma).to_json(),
        "update": cfg.update.to_json(),
        "population": cfg.population,
        "global_seed": cfg.global_seed,
        "train": cfg.to_json(),
        "qes_version": __version__,
        **extra,
    }


def stage_meta(cfg: FinetuneConfig, quantized_dir: str | Path, train_parquet: str | Path) -> dict:
    """What run.json records of the finetune stage beyond the QES hyperparameters."""
    return {
        "base_checkpoint": str(quantized_dir),
        "task_data": str(train_parquet),
        "batch_prompts": cfg.batch_prompts,
        "max_new_tokens": cfg.max_new_tokens,
        "fitness": cfg.fitness_path(),
    }


#: the fitness path of runs logged before run.json recorded one: transformers' generate, one member at a time
LEGACY_FITNESS = {"member_batch": 1, "prefix_cache": "row", "decode": "eager"}


def _comparable(meta: dict, fitness_may_change: bool = False) -> dict:
    skip = ("format", "version", "qes_version", "base", "base_codes_sha256")
    skip += ("fitness",) if fitness_may_change else ()
    out = {k: v for k, v in meta.items() if k not in skip}
    # How the engine cuts the model into chunks changes its memory and speed, never its results.
    if isinstance(out.get("update"), dict):
        out["update"] = {k: v for k, v in out["update"].items() if k != "chunk_codes"}
    if isinstance(out.get("train"), dict) and isinstance(out["train"].get("update"), dict):
        update = {k: v for k, v in out["train"]["update"].items() if k != "chunk_codes"}
        out["train"] = {**out["train"], "update": update}
    if not fitness_may_change and "fitness" not in out and "max_new_tokens" in out:
        out["fitness"] = LEGACY_FITNESS  # a finetune-stage log from before the fitness path was recorded
    if isinstance(out.get("fitness"), dict) and "decode" not in out["fitness"]:
        out["fitness"] = {**out["fitness"], "decode": "eager"}  # recorded before decode could be compiled
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
        **stage_meta(cfg, quantized_dir, train_parquet),
    }
    logged = {key: seedlog.meta[key] for key in expected if key in seedlog.meta}
    refuse_other_config(run_dir, logged, expected, cfg.allow_fitness_change)
