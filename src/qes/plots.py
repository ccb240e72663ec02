"""PNG figures of a run: the training reward curve and base-vs-tuned held-out metrics."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pyarrow.parquet as pq


def plot_training_reward(metrics_parquet: str | Path, out_png: str | Path, title: str = "") -> None:
    """Mean and max member reward per iteration (with min as a band), and codes changed per step."""
    rows = pq.read_table(metrics_parquet).to_pylist()
    it = [r["iteration"] + 1 for r in rows]
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True, height_ratios=[3, 1])
    ax.fill_between(it, [r["reward_min"] for r in rows], [r["reward_max"] for r in rows],
                    color="tab:blue", alpha=0.15, label="min-max over members")
    ax.plot(it, [r["reward_mean"] for r in rows], color="tab:blue", marker=".", label="mean over members")
    ax.plot(it, [r["reward_max"] for r in rows], color="tab:orange", lw=1, label="max over members")
    ax.set_ylabel("training reward")
    ax.set_title(title or "QES training reward")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    if not any(r["changed"] for r in rows):
        ax.text(0.5, 0.5, "no code changed in any iteration:\nthe tuned model is the base model", color="tab:red",
                ha="center", va="center", transform=ax.transAxes, fontsize=11, weight="bold")
    ax2.bar(it, [100 * r["changed_fraction"] for r in rows], color="tab:gray")
    ax2.set_ylabel("codes changed (%)")
    ax2.set_xlabel("iteration")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def plot_base_vs_tuned(metrics: dict, out_png: str | Path, title: str = "") -> None:
    """Grouped bars of accuracy, format rate and mean reward for the base and the tuned model."""
    names = [("accuracy", "accuracy"), ("format_rate", "format rate"), ("mean_reward", "mean reward")]
    base = [metrics["base"][k] for k, _ in names]
    tuned = [metrics["tuned"][k] for k, _ in names]
    x = range(len(names))
    fig, ax = plt.subplots(figsize=(6, 4))
    b1 = ax.bar([i - 0.2 for i in x], base, width=0.4, label="base (quantized)", color="tab:gray")
    b2 = ax.bar([i + 0.2 for i in x], tuned, width=0.4, label="tuned (QES)", color="tab:green")
    for bars in (b1, b2):
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(list(x), [label for _, label in names])
    ax.set_ylim(0, max(max(base), max(tuned), 0.05) * 1.25)
    ax.set_title(title or f"held-out, n = {metrics['base']['n']}")
    if metrics.get("codes_changed") is False:
        ax.text(0.5, 0.92, "no code changed: tuned = base", color="tab:red", ha="center", transform=ax.transAxes,
                weight="bold")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
