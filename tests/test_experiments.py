"""The comparison's run settings, sweep selection and summary (the runs themselves are ordinary finetune runs)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qes.experiments import (
    ExperimentConfig,
    Method,
    finetune_block,
    plot_scores,
    run_bits,
    summarize,
    summarize_sweep,
    table,
    widen_to_span,
)

BASE = {"run": "default", "iterations": 20, "batch_prompts": 16, "sigma": 0.02, "alpha": 0.008, "global_seed": 0,
        "residual": {"mode": "replay", "gamma": 0.9, "window": 10, "clamp": 1.5}}


def test_each_method_changes_only_its_residual_mode_and_seed() -> None:
    cfg = ExperimentConfig(iterations=7, batch_prompts=4, sigma=0.01, alpha=0.002)
    blocks = {m: finetune_block(f"exp-{m}-s2", BASE, cfg) for m in ("quzo", "stored", "replay")}
    assert {m: b["residual"]["mode"] for m, b in blocks.items()} == {"quzo": "none", "stored": "stored",
                                                                    "replay": "replay"}
    for run, block in blocks.items():
        assert (block["iterations"], block["batch_prompts"], block["global_seed"]) == (7, 4, 2)
        assert (block["sigma"], block["alpha"], block["residual"]["window"]) == (0.01, 0.002, 10)
        assert block["run"] == f"exp-{run}-s2"
    assert finetune_block("default", BASE, cfg) == BASE  # any other run keeps the config's block
    assert BASE["residual"]["mode"] == "replay"  # and the config itself is not modified


def test_method_names_set_window_and_code_width() -> None:
    cfg = ExperimentConfig(methods=("replay-k50", "replay-w8", "stored-w8", "quzo"))
    k50 = finetune_block("exp-replay-k50-s1", BASE, cfg)
    assert (k50["residual"]["mode"], k50["residual"]["window"], k50["global_seed"]) == ("replay", 50, 1)
    assert finetune_block("exp-replay-w8-s0", BASE, cfg)["residual"]["window"] == 10  # the config's window
    assert [run_bits(r) for r in ("exp-replay-w8-s0", "exp-replay-k50-s0", "base-w8", "default")] == [8, None, 8, None]
    assert cfg.bases(default_bits=4) == ["base-w4", "base-w8"]
    assert Method.parse("replay-k50-w8").label(4) == "QES, seed replay (K = 50, INT8)"
    assert Method.parse("replay-w4").label(4) == "QES, seed replay"


def test_curve_points_and_scored_models() -> None:
    cfg = ExperimentConfig(methods=("replay", "replay-w8"), seeds=(0, 1), iterations=60, curve_every=25)
    assert cfg.curve_points() == [25, 50, 60]
    assert ExperimentConfig(iterations=8).curve_points() == [8]
    points = cfg.points(default_bits=4)
    assert points[:2] == [("base-w4", 0), ("base-w8", 0)]
    assert ("exp-replay-w8-s1", 50) in points and len(points) == 2 + 4 * 3


@pytest.mark.parametrize("method, message", [
    ("adam", "unknown method 'adam'"),
    ("quzo-k50", "a window .-k. applies to replay only"),
    ("replay-w2", "bits must be 4 or 8"),
])
def test_bad_method_names_are_refused(method: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExperimentConfig(methods=(method,))
    with pytest.raises(ValueError, match=message):
        finetune_block(f"exp-{method}-s0", BASE, ExperimentConfig())


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="experiments.methods.0: 'replay-k0' does not match"):
        ExperimentConfig.from_dict({"methods": ["replay-k0"]})
    with pytest.raises(ValueError, match=r"experiments: Additional properties are not allowed \('method' was"):
        ExperimentConfig.from_dict({"method": ["quzo"]})
    with pytest.raises(ValueError, match="has only 1 entries"):
        finetune_block("sweep-3", BASE, ExperimentConfig.from_dict({"sweep": [{"sigma": 0.1, "alpha": 0.1}]}))


def test_sweep_picks_by_training_reward_only(tmp_path) -> None:
    cfg = ExperimentConfig.from_dict({"sweep": [{"sigma": 0.01, "alpha": 0.002}, {"sigma": 0.02, "alpha": 0.008}],
                                      "sweep_iterations": 4})
    assert finetune_block("sweep-1", BASE, cfg)["sigma"] == 0.02
    paths = {}
    for i, curve in enumerate(([0.5, 0.5, 0.1, 0.1], [0.0, 0.0, 0.2, 0.3])):
        paths[f"sweep-{i}"] = tmp_path / f"{i}.parquet"
        pq.write_table(pa.Table.from_pylist([{"iteration": t, "reward_mean": r} for t, r in enumerate(curve)]),
                       paths[f"sweep-{i}"])
    result = summarize_sweep(paths, cfg)
    assert result["best"] == {"sigma": 0.02, "alpha": 0.008}  # last half: 0.25 beats 0.1
    assert [round(c["training_reward_last_half"], 6) for c in result["candidates"]] == [0.1, 0.25]


def test_summary_curves_and_gain_over_seeds(tmp_path) -> None:
    cfg = ExperimentConfig(methods=("quzo", "replay"), seeds=(0, 1), iterations=50, curve_every=25)
    scores = {("base-w4", 0): {"accuracy": 0.1, "format_rate": 0.9, "mean_reward": 0.2, "n": 64}}
    for method, accs in (("quzo", (0.1, 0.3)), ("replay", (0.2, 0.2))):
        for seed, acc in zip((0, 1), accs):
            for t in (25, 50):
                value = acc * t / 50
                scores[(f"exp-{method}-s{seed}", t)] = {"accuracy": value, "format_rate": 1.0, "mean_reward": value}
    summary = summarize(scores, cfg, default_bits=4)
    quzo, replay = summary["methods"]["quzo"], summary["methods"]["replay"]
    assert quzo["final"]["accuracy"]["mean"] == pytest.approx(0.2)
    assert quzo["final"]["accuracy"]["std"] == pytest.approx(0.141421, abs=1e-6)
    assert quzo["accuracy_gain"] == pytest.approx(0.1)
    assert quzo["accuracy_gain_in_seed_std"] == pytest.approx(0.1 / 0.141421, abs=1e-4)
    assert replay["final"]["accuracy"]["std"] == 0.0 and replay["accuracy_gain_in_seed_std"] is None
    assert [p["iteration"] for p in replay["curve"]] == [0, 25, 50]
    assert [p["accuracy"]["mean"] for p in replay["curve"]] == pytest.approx([0.1, 0.1, 0.2])
    assert summary["n"] == 64 and summary["curve_points"] == [25, 50]
    text = table(summary)
    quzo_row = "| QuZO-style (no error feedback) | 0.200 ± 0.141 | 1.000 ± 0.000 | 0.200 ± 0.141 | +0.100 (+0.7 std) |"
    assert quzo_row in text
    assert "| base (GPTQ INT4, untuned) | 0.100 ± 0.000 |" in text
    assert "| QES, seed replay | 0.100 ± 0.000 | 0.100 ± 0.000 | 0.200 ± 0.000 |" in text
    plot_scores(summary, tmp_path / "scores.png")
    assert (tmp_path / "scores.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("values", "expected"),
    [((0.998, 1.0), (0.9525, 1.0025)), ((0.04, 0.06), (0.025, 0.075)), ((0.002, 0.012), (-0.0025, 0.0475)),
     ((0.0, 0.3), None)],
)
def test_a_score_axis_shows_at_least_its_span(values, expected) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 25], values)
    before = ax.get_ylim()
    widen_to_span(ax, span=0.05)
    assert ax.get_ylim() == pytest.approx(expected or before)
    plt.close(fig)
