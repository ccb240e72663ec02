"""The settings of a QES run and of the finetune stage: frozen dataclasses, checked against the config schema.

:class:`TrainConfig` holds the QES hyperparameters (all of them go into run.json), :class:`FinetuneConfig`
the finetune stage's (prompts, decoding budget, fitness path, device, ranks); :func:`finetune_config` builds
both from the config's ``finetune:`` block. Nothing here imports torch, so the workflow can check settings
while it plans its jobs.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from qes.config import ConfigError, check_values, complete, finetune_conflicts
from qes.update import UpdateConfig, alpha_schedule


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

@dataclass(frozen=True)
class FinetuneConfig:
    """The finetune stage: QES hyperparameters, prompts per iteration and decoding budget."""

    train: TrainConfig = field(default_factory=TrainConfig)
    batch_prompts: int = 16
    max_new_tokens: int = 48
    member_batch: int | str = "auto"
    prefix_cache: str = "member"
    decode: str = "eager"
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
        return {"member_batch": self.member_batch, "prefix_cache": self.prefix_cache, "decode": self.decode}

    def to_block(self) -> dict:
        """The settings as the config's `finetune:` block (without the run name)."""
        train = {k: v for k, v in asdict(self.train).items() if k != "update"}
        update = self.train.update
        residual = {"mode": update.mode, "gamma": update.gamma, "window": update.window, "clamp": update.residual_clamp}
        stage = {k: v for k, v in asdict(self).items() if k != "train"}
        return {**train, "residual": residual, **stage}

def finetune_config(values: dict, source: str = "finetune settings") -> FinetuneConfig:
    """The config's finetune block as a FinetuneConfig, validated by the schema; keys left out take its defaults."""
    values = complete(values, "finetune", source=source)
    residual = values.pop("residual")
    residual["residual_clamp"] = residual.pop("clamp")
    stage_keys = [f for f in FinetuneConfig.__dataclass_fields__ if f != "train"]
    outer = {k: values.pop(k) for k in stage_keys}
    values.pop("run")
    return FinetuneConfig(train=TrainConfig(**values, update=UpdateConfig(**residual)), **outer)


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
