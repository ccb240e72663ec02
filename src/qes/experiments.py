"""The paper's comparison on one model: base vs QuZO-style (no error feedback) vs QES stored vs QES seed replay.

Every method is the finetune stage with one setting changed (the residual mode, optionally the replay
window K and the code width), run for several global seeds on the same iteration budget. Each run is
scored at curve points (every `curve_every` iterations and at the end) by replaying its seed log to that
iteration, with every hash checkpoint verified, and evaluating the re-derived model; the base model is the
curve's iteration 0. The summary reports mean and spread over seeds. The step sizes (sigma, alpha) come
from a sweep scored on the training reward only (`sweep-*` runs); the held-out set never influences them.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qes.evaluate import EvaluateConfig

log = logging.getLogger(__name__)

#: residual mode of the finetune stage per method family
MODES = {"quzo": "none", "stored": "stored", "replay": "replay"}
FAMILY_LABELS = {
    "quzo": "QuZO-style (no error feedback)",
    "stored": "QES, stored residual",
    "replay": "QES, seed replay",
}
KEYS = ("accuracy", "format_rate", "mean_reward")
_METHOD = re.compile(r"^(?P<family>[a-z]+)(?:-k(?P<window>[1-9][0-9]*))?(?:-w(?P<bits>[0-9]+))?$")
_RUN = re.compile(r"^exp-(?P<method>[a-z0-9-]+)-s(?P<seed>[0-9]+)$")
_BASE = re.compile(r"^base-w(?P<bits>[0-9]+)$")
_SWEEP = re.compile(r"^sweep-(?P<index>[0-9]+)$")


@dataclass(frozen=True)
class Method:
    """One compared method: `quzo`, `stored` or `replay`, with `-k<K>` (replay window) and `-w<bits>` (code
    width; the quantize block's otherwise), e.g. `replay-k50` or `replay-w8`."""

    name: str
    family: str
    window: int | None = None
    bits: int | None = None

    @classmethod
    def parse(cls, name: str) -> Method:
        from qes.schema import allowed

        widths = allowed(("quantize", "bits"))  # those the quantize stage makes
        spelled = ", ".join(map(str, widths[:-1])) + f" or {widths[-1]}"
        match = _METHOD.match(name)
        if match is None or match["family"] not in MODES:
            raise ValueError(
                f"experiments.methods: unknown method {name!r}; use quzo, stored or replay, optionally followed "
                f"by -k<window> (replay only) and -w<bits> ({spelled}), e.g. replay-k50 or replay-w8"
            )
        if match["window"] and match["family"] != "replay":
            raise ValueError(f"experiments.methods: {name!r}: a window (-k) applies to replay only")
        if match["bits"] and int(match["bits"]) not in widths:
            raise ValueError(f"experiments.methods: {name!r}: bits must be {spelled} (those the quantize stage makes)")
        return cls(name, match["family"], int(match["window"]) if match["window"] else None,
                   int(match["bits"]) if match["bits"] else None)

    def label(self, default_bits: int) -> str:
        details = [f"K = {self.window}"] if self.window else []
        details += [f"INT{self.bits}"] if self.bits and self.bits != default_bits else []
        return FAMILY_LABELS[self.family] + (f" ({', '.join(details)})" if details else "")


@dataclass(frozen=True)
class ExperimentConfig:
    """The comparison's methods, seeds, budget and curve points (the config's `experiments:` block)."""

    methods: tuple[str, ...] = ("quzo", "stored", "replay")
    seeds: tuple[int, ...] = (0, 1, 2)
    iterations: int = 8
    batch_prompts: int = 8
    sigma: float = 0.01
    alpha: float = 0.003
    eval_limit: int | None = 64
    score_split: str = "eval"
    curve_every: int | None = None
    report_dir: str = "results/experiments"
    sweep: tuple[tuple[float, float], ...] = ()
    sweep_iterations: int = 6
    sweep_seed: int = 1000
    log_dir: str | None = None

    def __post_init__(self) -> None:
        for method in self.methods:
            Method.parse(method)

    @classmethod
    def from_dict(cls, values: dict) -> ExperimentConfig:
        """The config's experiments block, validated by the config schema (its defaults fill the gaps)."""
        from qes.config import complete

        values = complete(dict(values), "experiments", source="experiments settings")
        for key in ("methods", "seeds"):
            values[key] = tuple(values[key])
        values["sweep"] = tuple((float(p["sigma"]), float(p["alpha"])) for p in values["sweep"])
        return cls(**values)

    def runs(self) -> list[str]:
        return [run_name(m, s) for m in self.methods for s in self.seeds]

    def sweep_runs(self) -> list[str]:
        return [f"sweep-{i}" for i in range(len(self.sweep))]

    def curve_points(self) -> list[int]:
        """Iterations at which every run is scored (the final one always; 0 is the base model)."""
        every = self.curve_every or self.iterations
        return sorted({*range(every, self.iterations + 1, every), self.iterations})

    def bases(self, default_bits: int) -> list[str]:
        """Names of the base models the methods start from: base-w<bits>."""
        return sorted({f"base-w{Method.parse(m).bits or default_bits}" for m in self.methods})

    def points(self, default_bits: int) -> list[tuple[str, int]]:
        """Every (model, iteration) the summary scores: each base at 0, each run at its curve points."""
        return [(b, 0) for b in self.bases(default_bits)] + [
            (run, t) for run in self.runs() for t in self.curve_points()
        ]


def run_name(method: str, seed: int) -> str:
    return f"exp-{method}-s{seed}"


def finetune_block(run: str, base: dict, cfg: ExperimentConfig) -> dict:
    """The finetune settings of `run`: an experiment or sweep run gets its own, any other run the base block."""
    block = copy.deepcopy(base)
    if match := _RUN.match(run):
        method, seed = Method.parse(match["method"]), int(match["seed"])
        block.update(iterations=cfg.iterations, batch_prompts=cfg.batch_prompts, global_seed=seed,
                     sigma=cfg.sigma, alpha=cfg.alpha)
        block["residual"] = {**block.get("residual", {}), "mode": MODES[method.family]}
        if method.window is not None:
            block["residual"]["window"] = method.window
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


def run_bits(run: str) -> int | None:
    """Code width an experiment run (exp-<method>-s<seed>) or base point (base-w<bits>) asks for; None for
    every other run, which uses the quantize block's."""
    if match := _RUN.match(run):
        return Method.parse(match["method"]).bits
    if match := _BASE.match(run):
        return int(match["bits"])
    return None


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


def score_point(base: str | Path, log_dir: str | Path | None, iteration: int, eval_parquet: str | Path,
                cfg: EvaluateConfig, out_json: str | Path, out_examples: str | Path,
                state_dir: str | Path | None = None, committed: str | Path | None = None) -> dict:
    """Metrics of one curve point on the scoring split: the base itself at iteration 0, otherwise the run's
    seed log replayed onto the base up to `iteration` (its chain, the base's identity and every hash
    checkpoint on the way verified), in memory on the evaluation's own backend. With `state_dir`, the
    replay starts from this log's latest verified snapshot there (qes.replaystate) and leaves one at
    `iteration` for the next point. With `committed`, a point kept there (qes.pointstore) is reused instead
    when it was scored from the same inputs."""
    import tempfile

    from qes.evaluate import evaluate_loaded, load_for_evaluation
    from qes.pointstore import point_key, reuse_point, write_point
    from qes.replay import point_check, replay_steps, unchecked_note
    from qes.replaystate import engine_at, save_snapshot
    from qes.seedlog import SeedLog, SeedLogError

    point: dict = {"iteration": iteration}
    seedlog = None
    if iteration > 0:
        if log_dir is None:
            raise ValueError(f"iteration {iteration} of a base model: only iteration 0 exists")
        seedlog = SeedLog.open(log_dir)
        if iteration > seedlog.iterations:
            raise SeedLogError(f"cannot score {log_dir} at iteration {iteration}: it holds {seedlog.iterations}")
    model, tokenizer = load_for_evaluation(base, cfg)
    key = point_key(model, seedlog, iteration, eval_parquet, cfg)
    if committed is not None and (kept := reuse_point(committed, iteration, key, out_json, out_examples, log_dir)):
        return kept
    point["key"] = key
    if seedlog is not None:
        engine, start = engine_at(model, seedlog, iteration, state_dir)
        replay_steps(engine, seedlog, start=start, stop=iteration)
        point |= {"seed_log": str(log_dir), "codes_sha256": engine.codes_sha256(), **point_check(seedlog, iteration)}
        if point["check"] == "unchecked":
            log.warning("%s: %s", log_dir, unchecked_note({**point, "iterations": iteration}))
        if state_dir is not None:
            save_snapshot(state_dir, seedlog, iteration, model)
    name = f"{log_dir} at iteration {iteration}" if seedlog is not None else str(base)
    with tempfile.TemporaryDirectory() as tmp:
        metrics = evaluate_loaded(model, tokenizer, name, eval_parquet, cfg, Path(tmp) / "metrics.json",
                                  out_examples)
    point |= {k: metrics[k] for k in (*KEYS, "n")} | {"base": str(base)}
    write_point(point, out_json)
    return point


def _label(name: str, default_bits: int) -> str:
    if match := _BASE.match(name):
        return f"base (GPTQ INT{match['bits']}, untuned)"
    return Method.parse(name).label(default_bits)


def summarize(scores: dict[tuple[str, int], dict], cfg: ExperimentConfig, default_bits: int,
              signal: dict[str, dict | None] | None = None) -> dict:
    """Per method: the scores at every curve point (mean, std and values over seeds), the final one, and its
    difference to the method's base in points and in units of the seed-to-seed standard deviation; with
    `signal` (qes.diagnostics.experiment_signal), what the seed logs say about each method's updates."""
    methods: dict[str, dict] = {}
    for base in cfg.bases(default_bits):
        final = {k: _mean_std([scores[(base, 0)][k]]) for k in KEYS}
        methods[base] = {"label": _label(base, default_bits), "runs": [base], "final": final,
                         "curve": [{"iteration": 0, **final}]}
    for name in cfg.methods:
        base = f"base-w{Method.parse(name).bits or default_bits}"
        runs = [run_name(name, s) for s in cfg.seeds]
        curve = methods[base]["curve"] + [
            {"iteration": t, **{k: _mean_std([scores[(r, t)][k] for r in runs]) for k in KEYS}}
            for t in cfg.curve_points()
        ]
        final = {k: curve[-1][k] for k in KEYS}
        gain = final["accuracy"]["mean"] - methods[base]["final"]["accuracy"]["mean"]
        std = final["accuracy"]["std"]
        methods[name] = {"label": _label(name, default_bits), "runs": runs, "base": base, "final": final,
                         "curve": curve, "accuracy_gain": gain,
                         "accuracy_gain_in_seed_std": gain / std if std > 0 else None}
    some_base = cfg.bases(default_bits)[0]
    return {"methods": methods, "n": scores[(some_base, 0)]["n"], "split": cfg.score_split,
            "seeds": list(cfg.seeds), "iterations": cfg.iterations, "curve_points": cfg.curve_points(),
            "sigma": cfg.sigma, "alpha": cfg.alpha, "batch_prompts": cfg.batch_prompts,
            **({"signal": signal} if signal is not None else {})}


def table(summary: dict) -> str:
    """Markdown: the final scores per method, the accuracy at every curve point, and the training signal
    read from the seed logs when the summary has it."""
    split = "held-out" if summary["split"] == "eval" else "training-set"
    lines = [
        f"Scored on {summary['n']} {split} problems (greedy), after {summary['iterations']} iterations; "
        f"mean ± standard deviation over seeds {summary['seeds']}.",
        "",
        "| method | accuracy | format rate | mean reward | accuracy − base | per seed (accuracy) |",
        "|---|---|---|---|---|---|",
    ]
    for method in summary["methods"].values():
        cells = [f"{method['final'][k]['mean']:.3f} ± {method['final'][k]['std']:.3f}" for k in KEYS]
        gain = method.get("accuracy_gain")
        ratio = method.get("accuracy_gain_in_seed_std")
        gain_cell = "" if gain is None else f"{gain:+.3f}" + ("" if ratio is None else f" ({ratio:+.1f} std)")
        seeds = ", ".join(f"{v:.3f}" for v in method["final"]["accuracy"]["values"])
        lines.append(f"| {method['label']} | " + " | ".join(cells) + f" | {gain_cell} | {seeds} |")
    points = [0, *summary["curve_points"]]
    lines += ["", "Accuracy at each iteration (0 is the base):", "",
              "| method | " + " | ".join(str(t) for t in points) + " |",
              "|---|" + "---|" * len(points)]
    for method in summary["methods"].values():
        if "base" not in method:
            continue
        cells = {p["iteration"]: f"{p['accuracy']['mean']:.3f} ± {p['accuracy']['std']:.3f}" for p in method["curve"]}
        lines.append(f"| {method['label']} | " + " | ".join(cells.get(t, "") for t in points) + " |")
    if summary.get("signal"):
        from qes.diagnostics import signal_table

        labels = {name: method["label"] for name, method in summary["methods"].items()}
        lines += ["", signal_table(summary["signal"], labels)]
    return "\n".join(lines)


def widen_to_span(ax, span: float = 0.05) -> None:
    """Show at least `span` of a score axis, so that one problem in 500 does not fill a panel.

    Scores lie in [0, 1]: a narrow range near either end is widened away from it.
    """
    lo, hi = ax.get_ylim()
    if hi - lo < span:
        middle = min(max((lo + hi) / 2, 0.45 * span), 1.0 - 0.45 * span)
        ax.set_ylim(middle - span / 2, middle + span / 2)


def plot_scores(summary: dict, out_png: str | Path) -> None:
    """Accuracy, format rate and mean reward against iteration per method: mean over seeds, min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4.2))
    methods = [m for m in summary["methods"].values() if "base" in m]
    scored = sorted({p["iteration"] for m in methods for p in m["curve"]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, key, title in zip(axes, KEYS, ("accuracy", "format rate", "mean reward")):
        for method, color in zip(methods, colors):
            its = [p["iteration"] for p in method["curve"]]
            ax.plot(its, [p[key]["mean"] for p in method["curve"]], color=color, marker="o", label=method["label"])
            ax.fill_between(its, [min(p[key]["values"]) for p in method["curve"]],
                            [max(p[key]["values"]) for p in method["curve"]], color=color, alpha=0.15)
        ax.set_xlabel("iteration")
        ax.set_xticks(scored)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        widen_to_span(ax)
    split = "held-out" if summary["split"] == "eval" else "training-set"
    fig.suptitle(f"{split} scores (n = {summary['n']}, greedy), mean over seeds {summary['seeds']}; band: min-max")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def plot_curves(metrics: dict[str, str | Path], cfg: ExperimentConfig, out_png: str | Path,
                default_bits: int) -> None:
    """Training reward per iteration of every method: mean over seeds, with the seeds' range as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for method, color in zip(cfg.methods, colors):
        curves = [[r["reward_mean"] for r in pq.read_table(metrics[run_name(method, s)]).to_pylist()]
                  for s in cfg.seeds]
        its = range(1, min(len(c) for c in curves) + 1)
        per_it = [[c[i - 1] for c in curves] for i in its]
        ax.plot(list(its), [statistics.fmean(v) for v in per_it], color=color, marker=".",
                label=_label(method, default_bits))
        ax.fill_between(list(its), [min(v) for v in per_it], [max(v) for v in per_it], color=color, alpha=0.15)
    ax.set_xlabel("iteration")
    ax.set_ylabel("training reward (mean over members)")
    ax.set_title(f"training reward, mean over {len(cfg.seeds)} seeds (band: min-max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def write_report(summary: dict, out_json: str | Path, out_md: str | Path) -> None:
    # Unsorted keys: the methods stay in the config's order, the order of the table and the figures' colours.
    Path(out_json).write_text(json.dumps(summary, indent=2) + "\n")
    Path(out_md).write_text(table(summary) + "\n")
