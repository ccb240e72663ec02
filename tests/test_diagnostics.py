"""What the seed logs say about the update signal: tied pairs, single differing pairs, their share of a step."""

from __future__ import annotations

from pathlib import Path

import pytest

from qes.diagnostics import experiment_signal, run_signal, signal_table, step_signal
from qes.update import quantize_coefficients, shape_rewards

LOGS = Path(__file__).resolve().parent / "data" / "logs"  # real seed logs kept as fixtures (see its README)
SEEDS = (11, 11, 22, 22, 33, 33, 44, 44)
SIGNS = (1, -1) * 4


def _signal(rewards: tuple[float, ...], shaping: str):
    coefs = quantize_coefficients(shape_rewards(list(rewards), shaping, 3.0))
    return step_signal(rewards, SEEDS, SIGNS, coefs)


def test_one_differing_pair_under_pair_zscore_gives_half_the_step_to_tied_pairs() -> None:
    # differences (0.1, 0, 0, 0): z = +sqrt(3) for the differing pair, -1/sqrt(3) for each tied one
    signal = _signal((0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0), "pair_zscore")
    assert (signal.pairs, signal.differing_pairs, signal.all_equal) == (4, 1, False)
    assert signal.tied_magnitude / signal.total_magnitude == pytest.approx(0.5, abs=1e-4)


def test_centred_ranks_give_tied_pairs_no_net_coefficient() -> None:
    signal = _signal((0.2, 0.1, 0.1, 0.1, 0.1, 0.1, 0.0, 0.0), "centered_rank")
    assert signal.differing_pairs == 1 and signal.tied_magnitude == 0 and signal.total_magnitude > 0


def test_equal_rewards_and_unmirrored_members() -> None:
    signal = _signal((0.1,) * 8, "pair_zscore")
    assert signal.all_equal and signal.differing_pairs == 0 and signal.total_magnitude == 0
    assert step_signal((0.1, 0.2, 0.3), (1, 2, 3), (1, 1, 1), (5, 0, -5)) is None


def test_arithmetic_logs_give_their_known_counts() -> None:
    runs = LOGS / "arithmetic"
    methods, seeds = ("quzo", "stored", "replay"), (0, 1, 2)
    names = [f"exp-{m}-s{s}" for m in methods for s in seeds]
    signal = experiment_signal(methods, seeds, {n: runs / n for n in names},
                               {n: runs / n / "metrics.parquet" for n in names}, 50)
    assert sum(signal[m]["iterations"] for m in methods) == 450
    assert sum(signal[m]["all_equal"] for m in methods) == 130
    assert sum(signal[m]["one_pair"] for m in methods) == 96
    tied = sum(r["tied_magnitude"] for m in methods for r in signal[m]["runs"])
    total = sum(r["total_magnitude"] for m in methods for r in signal[m]["runs"])
    assert tied / total == pytest.approx(0.29, abs=0.005)
    text = signal_table(signal, {m: m for m in methods})
    assert "| replay | 150 | 36 | 41 | 31% |" in text


def test_countdown_pairs_rarely_tie() -> None:
    run = LOGS / "countdown-replay-s1"
    signal = run_signal(run, run / "metrics.parquet", 50)
    assert (signal.iterations, signal.all_equal, signal.one_pair) == (50, 0, 0)
    assert signal.tied_magnitude / signal.total_magnitude < 0.02


def test_a_log_shorter_than_the_report_is_refused() -> None:
    from qes.seedlog import SeedLogError

    run = LOGS / "countdown-replay-s1"
    with pytest.raises(SeedLogError, match="50 logged iterations, the report needs 51"):
        run_signal(run, run / "metrics.parquet", 51)


def test_the_report_table_carries_the_signal() -> None:
    from qes.experiments import ExperimentConfig, summarize, table

    run = LOGS / "countdown-replay-s1"
    cfg = ExperimentConfig(methods=("replay",), seeds=(1,), iterations=50)
    signal = experiment_signal(("replay",), (1,), {"exp-replay-s1": run},
                               {"exp-replay-s1": run / "metrics.parquet"}, 50)
    scores = {("base-w4", 0): {"accuracy": 0.002, "format_rate": 0.79, "mean_reward": 0.081, "n": 500},
              ("exp-replay-s1", 50): {"accuracy": 0.006, "format_rate": 0.678, "mean_reward": 0.074}}
    summary = summarize(scores, cfg, 4, signal)
    assert summary["signal"]["replay"]["iterations"] == 50
    assert "| QES, seed replay | 50 | 0 | 0 | 1% |" in table(summary)
