"""What a run's seed log says about its update signal: how often the mirrored pairs tied, and how much of
each step went to directions that no reward difference preferred.

With a coarse reward (0, 0.1 or 1) and a few prompts per member, the two members of a mirrored pair often
score the same. Pair z-scoring subtracts the mean pair difference, so such a tied pair still gets a
coefficient whenever another pair did not tie, and a step where a single pair differed gives that one
difference a full-size coefficient. These counts come from the logged rewards and coefficients alone, so
anyone holding the log can recompute them.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from pathlib import Path

#: iterations averaged at each end of the run for the training-reward trend
TREND_WINDOW = 10


@dataclass(frozen=True)
class StepSignal:
    """One iteration's pairs: how many differed, and the coefficient magnitude on tied and untied seeds."""

    pairs: int
    differing_pairs: int
    all_equal: bool
    tied_magnitude: int
    total_magnitude: int


def step_signal(rewards: tuple[float, ...], seeds: tuple[int, ...], signs: tuple[int, ...],
                coefs: tuple[int, ...]) -> StepSignal | None:
    """The pair statistics of one logged step, or None when its members are not mirrored pairs."""
    members: dict[int, list[tuple[int, float, int]]] = {}
    for seed, sign, reward, coef in zip(seeds, signs, rewards, coefs):
        members.setdefault(seed, []).append((sign, reward, coef))
    if any(sorted(sign for sign, _, _ in pair) != [-1, 1] for pair in members.values()):
        return None
    tied = total = differing = 0
    for pair in members.values():
        magnitude = abs(sum(sign * coef for sign, _, coef in pair))
        total += magnitude
        if pair[0][1] == pair[1][1]:
            tied += magnitude
        else:
            differing += 1
    return StepSignal(len(members), differing, len(set(rewards)) == 1, tied, total)


@dataclass(frozen=True)
class RunSignal:
    """A run's update signal over its first `iterations` logged steps."""

    iterations: int
    all_equal: int
    one_pair: int
    tied_magnitude: int
    total_magnitude: int
    changed_mean: float
    changed_max: float
    jumps: int
    reward_first: float
    reward_last: float


def run_signal(log_dir: str | Path, metrics: str | Path, iterations: int) -> RunSignal | None:
    """Pair statistics of a run's seed log (verified on opening) and the codes-changed trend of its metrics;
    None for a log without mirrored pairs."""
    import pyarrow.parquet as pq

    from qes.seedlog import SeedLog, SeedLogError

    seedlog = SeedLog.open(log_dir)
    if seedlog.iterations < iterations:
        raise SeedLogError(f"{log_dir}: {seedlog.iterations} logged iterations, the report needs {iterations}")
    signals = []
    for logged in seedlog.steps():
        if logged.step.iteration >= iterations:
            break
        step = logged.step
        signals.append(step_signal(logged.rewards, step.seeds, step.signs, step.coefs))
    if any(s is None for s in signals):
        return None
    rows = pq.read_table(metrics).to_pylist()[:iterations]
    changed = [row["changed_fraction"] for row in rows]
    rewards = [statistics.fmean(logged.rewards) for logged in seedlog.steps()][:iterations]
    # A step that moves more codes than half of one seed's noise support has pushed at least one seed past
    # the rounding threshold nearly everywhere: the jump a single differing pair gets under z-scoring.
    jump_at = 0.5 * seedlog.noise.density
    return RunSignal(
        iterations=len(signals),
        all_equal=sum(s.all_equal for s in signals),
        one_pair=sum(s.differing_pairs == 1 for s in signals),
        tied_magnitude=sum(s.tied_magnitude for s in signals),
        total_magnitude=sum(s.total_magnitude for s in signals),
        changed_mean=statistics.fmean(changed),
        changed_max=max(changed),
        jumps=sum(c > jump_at for c in changed),
        reward_first=statistics.fmean(rewards[:TREND_WINDOW]),
        reward_last=statistics.fmean(rewards[-TREND_WINDOW:]),
    )


def method_signal(runs: list[RunSignal | None]) -> dict | None:
    """A method's runs together: counts summed over seeds, the tied share over all coefficient magnitude,
    per-seed trends listed."""
    if not runs or any(r is None for r in runs):
        return None
    total = sum(r.total_magnitude for r in runs)
    return {
        "iterations": sum(r.iterations for r in runs),
        "all_equal": sum(r.all_equal for r in runs),
        "one_pair": sum(r.one_pair for r in runs),
        "tied_share": sum(r.tied_magnitude for r in runs) / total if total else 0.0,
        "changed_mean": statistics.fmean(r.changed_mean for r in runs),
        "changed_max": max(r.changed_max for r in runs),
        "jumps": sum(r.jumps for r in runs),
        "runs": [asdict(r) for r in runs],
    }


def signal_table(signals: dict[str, dict | None], labels: dict[str, str]) -> str:
    """Markdown: one row per method, seeds together."""
    lines = [
        "Training signal, from the seed logs (all seeds together):",
        "",
        "| method | iterations | all members equal (no update) | exactly one pair differed | "
        "coefficient share on tied pairs | codes changed per step, mean / max | jumps (> half a seed's support) | "
        f"training reward, first {TREND_WINDOW} → last {TREND_WINDOW} iterations (per seed) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, signal in signals.items():
        if signal is None:
            continue
        trend = ", ".join(f"{r['reward_first']:.3f} → {r['reward_last']:.3f}" for r in signal["runs"])
        lines.append(
            f"| {labels[name]} | {signal['iterations']} | {signal['all_equal']} | {signal['one_pair']} | "
            f"{signal['tied_share']:.0%} | {signal['changed_mean']:.2%} / {signal['changed_max']:.2%} | "
            f"{signal['jumps']} | {trend} |"
        )
    return "\n".join(lines)


def experiment_signal(methods: tuple[str, ...], seeds: tuple[int, ...], log_dirs: dict[str, str | Path],
                      metrics: dict[str, str | Path], iterations: int) -> dict[str, dict | None]:
    """Every compared method's signal, its runs named exp-<method>-s<seed> as in the experiments stage."""
    from qes.experiments import run_name

    return {
        method: method_signal([
            run_signal(log_dirs[run_name(method, s)], metrics[run_name(method, s)], iterations) for s in seeds
        ])
        for method in methods
    }
