"""The comparison's run settings, sweep selection and summary (the runs themselves are ordinary finetune runs)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from qes.experiments import ExperimentConfig, finetune_block, summarize, summarize_sweep, table

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


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="unknown method 'adam'"):
        finetune_block("exp-adam-s0", BASE, ExperimentConfig())
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


def test_summary_mean_and_std_over_seeds() -> None:
    cfg = ExperimentConfig(methods=("quzo", "replay"), seeds=(0, 1))
    heldout = {"base": {"accuracy": 0.1, "format_rate": 0.9, "mean_reward": 0.2, "n": 64}}
    for method, accs in (("quzo", (0.1, 0.3)), ("replay", (0.2, 0.2))):
        for seed, acc in zip((0, 1), accs):
            heldout[f"exp-{method}-s{seed}"] = {"accuracy": acc, "format_rate": 1.0, "mean_reward": acc, "n": 64}
    summary = summarize(heldout, cfg)
    assert summary["methods"]["quzo"]["accuracy"]["mean"] == pytest.approx(0.2)
    assert summary["methods"]["quzo"]["accuracy"]["std"] == pytest.approx(0.141421, abs=1e-6)
    assert summary["methods"]["replay"]["accuracy"]["std"] == 0.0
    text = table(summary)
    assert "| QuZO-style (no error feedback) | 0.200 ± 0.141 |" in text and text.count("\n") == 4
