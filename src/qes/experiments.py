"""The paper's comparison on one model: base vs QuZO-style (no error feedback) vs QES stored vs QES seed replay.

Every method is the finetune stage with one setting changed (the residual mode), run for several global
seeds on the same iteration budget; the held-out set is scored once for the base model and once per
tuned model, and the summary reports mean and standard deviation over seeds. The step sizes (sigma,
alpha) come from a sweep scored on the training reward only (`sweep-*` runs); the held-out set never
influences them.
"""

from __future__ import annotations

import copy
import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qes.evaluate import EvaluateConfig

#: method name -> residual mode of the finetune stage
METHODS = {"quzo": "none", "stored": "stored", "replay": "replay"}
LABELS = {
    "base": "base (GPTQ, untuned)",
    "quzo": "QuZO-style (no error feedback)",
    "stored": "QES, stored residual",
    "replay": "QES, seed replay",
}
KEYS = ("accuracy", "format_rate", "mean_reward")
_RUN = re.compile(r"^exp-(?P<method>[a-z]+)-s(?P<seed>\d+)$")
_SWEEP = re.compile(r"^sweep-(?P<index>\d+)$")


@dataclass(frozen=True)
class ExperimentConfig:
    """The comparison's methods, seeds and budget (the config's `experiments:` block)."""

    methods: tuple[str, ...] = ("quzo", "stored", "replay")
    seeds: tuple[int, ...] = (0, 1, 2)
    iterations: int = 8
    batch_prompts: int = 8
    sigma: float = 0.01
    alpha: float = 0.003
    eval_limit: int | None = 64
    sweep: tuple[tuple[float, float], ...] = ()
    sweep_iterations: int = 6
    sweep_seed: int = 1000
    log_dir: str | None = None

    @classmethod
    def from_dict(cls, values: dict) -> ExperimentConfig:
        """The config's experiments block, validated by the config schema (its defaults fill the gaps)."""
        from qes.config import complete

        values = complete(dict(values), "experiments", source="experiments settings")
        for key in ("methods", "seeds"):
            values[key] = tuple(values[key])
        values["sweep"] = tuple((float(p["sigma"]), float(p["alpha"])) for p in values["sweep"])
        cfg = cls(**values)
        bad = [m for m in cfg.methods if m not in METHODS]
        if bad:
            raise ValueError(f"experiments.methods: unknown {bad}; choose from {sorted(METHODS)}")
        return cfg

    def runs(self) -> list[str]:
        return [run_name(m, s) for m in self.methods for s in self.seeds]

    def sweep_runs(self) -> list[str]:
        return [f"sweep-{i}" for i in range(len(self.sweep))]


def run_name(method: str, seed: int) -> str:
    return f"exp-{method}-s{seed}"


def finetune_block(run: str, base: dict, cfg: ExperimentConfig) -> dict:
    """The finetune settings of `run`: an experiment or sweep run gets its own, any other run the base block."""
    block = copy.deepcopy(base)
    if match := _RUN.match(run):
        method, seed = match["method"], int(match["seed"])
        if method not in METHODS:
            raise ValueError(f"run {run!r}: unknown method {method!r}; choose from {sorted(METHODS)}")
        block.update(iterations=cfg.iterations, batch_prompts=cfg.batch_prompts, global_seed=seed,
                     sigma=cfg.sigma, alpha=cfg.alpha)
        block["residual"] = {**block.get("residual", {}), "mode": METHODS[method]}
    elif match := _SWEEP.match(run):
        index = int(match["index"])
        if index >= len(cfg.sweep):
            raise ValueError(f"run {run!r}: experiments.sweep has only {len(cfg.sweep)} entries")
        sigma, alpha = cfg.sweep[index]
        block.update(iterations=cfg.sweep_iterations, batch_prompts=cfg.batch_prompts,
                     global_seed=cfg.sweep_seed, sigma=sigma, alpha=alpha)
        block["residual"] = {**block.get("residual", {}), "mode": "replay"}
    block["run"] = run
    return block


def _mean_std(values: list[float]) -> dict:
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "values": values,
    }


def summarize_sweep(metrics: dict[str, str | Path], cfg: ExperimentConfig) -> dict:
    """Mean training reward over the last half of each sweep run; the best (sigma, alpha) by that alone."""
    import pyarrow.parquet as pq

    rows = []
    for i, (sigma, alpha) in enumerate(cfg.sweep):
        rewards = [r["reward_mean"] for r in pq.read_table(metrics[f"sweep-{i}"]).to_pylist()]
        tail = rewards[len(rewards) // 2 :]
        rows.append({"run": f"sweep-{i}", "sigma": sigma, "alpha": alpha,
                     "training_reward_last_half": statistics.fmean(tail), "training_reward": rewards})
    best = max(rows, key=lambda r: r["training_reward_last_half"])
    return {"candidates": rows, "best": {"sigma": best["sigma"], "alpha": best["alpha"]},
            "criterion": "mean training reward over the last half of the sweep iterations (held-out set unused)"}


def evaluate_all(base_dir: str | Path, tuned: dict[str, str | Path], eval_parquet: str | Path,
                 cfg: EvaluateConfig, out_dir: str | Path) -> dict[str, dict]:
    """Held-out metrics of the base model and of every tuned model (same prompts), one JSON each."""
    from qes.evaluate import evaluate_model

    out_dir = Path(out_dir)
    results = {}
    for name, model_dir in {"base": base_dir, **tuned}.items():
        results[name] = evaluate_model(model_dir, eval_parquet, cfg, out_dir / f"{name}.json",
                                       out_dir / f"{name}_examples.parquet")
    return results


def summarize(heldout: dict[str, dict], cfg: ExperimentConfig) -> dict:
    """Mean and standard deviation over seeds per method of the held-out metrics."""
    methods = {"base": {k: _mean_std([heldout["base"][k]]) for k in KEYS}}
    for method in cfg.methods:
        runs = [run_name(method, s) for s in cfg.seeds]
        methods[method] = {k: _mean_std([heldout[r][k] for r in runs]) for k in KEYS}
    return {"methods": methods, "n": heldout["base"]["n"], "seeds": list(cfg.seeds), "iterations": cfg.iterations,
            "sigma": cfg.sigma, "alpha": cfg.alpha}


def table(summary: dict) -> str:
    lines = [
        "| method | accuracy | format rate | mean reward |",
        "|---|---|---|---|",
    ]
    for method, metrics in summary["methods"].items():
        cells = [f"{metrics[k]['mean']:.3f} ± {metrics[k]['std']:.3f}" for k in KEYS]
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(metrics: dict[str, str | Path], cfg: ExperimentConfig, out_png: str | Path) -> None:
    """Training reward per iteration of every method: mean over seeds, with the seeds' range as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, color in zip(cfg.methods, ("tab:gray", "tab:blue", "tab:green", "tab:red")):
        curves = [[r["reward_mean"] for r in pq.read_table(metrics[run_name(method, s)]).to_pylist()]
                  for s in cfg.seeds]
        its = range(1, min(len(c) for c in curves) + 1)
        per_it = [[c[i - 1] for c in curves] for i in its]
        ax.plot(list(its), [statistics.fmean(v) for v in per_it], color=color, marker=".", label=LABELS[method])
        ax.fill_between(list(its), [min(v) for v in per_it], [max(v) for v in per_it], color=color, alpha=0.15)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training reward (mean over members)")
    ax.set_title(f"Countdown training reward, mean over {len(cfg.seeds)} seeds (band: min-max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def write_report(summary: dict, out_json: str | Path, out_md: str | Path) -> None:
    Path(out_json).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    Path(out_md).write_text(table(summary) + "\n")
