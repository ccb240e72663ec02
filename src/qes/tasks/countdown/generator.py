"""Seeded Countdown problems: every problem solvable by construction, with a reference solution, from a
splitmix64 counter RNG of its own, so the sets are identical on every Python version and platform."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from qes.tasks.countdown.problems import Problem
from qes.tasks.countdown.prompt import RESERVED

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class CountdownConfig:
    """Difficulty and sizes of a generated Countdown data set (all bounds inclusive).

    The defaults are the workflow's: 2-3 numbers in 1..10, targets in 1..20, the easiest setting that is
    still a real task.  The QES paper's setting is ``num_count_min=3, num_count_max=4, number_max=100,
    target_max=100``.
    """

    num_count_min: int = 2
    num_count_max: int = 3
    number_min: int = 1
    number_max: int = 10
    target_min: int = 1
    target_max: int = 20
    train_size: int = 200
    eval_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.num_count_min <= self.num_count_max <= 8:
            raise ValueError("need 2 <= num_count_min <= num_count_max <= 8")
        if not 1 <= self.number_min <= self.number_max:
            raise ValueError("need 1 <= number_min <= number_max")
        if not 1 <= self.target_min <= self.target_max:
            raise ValueError("need 1 <= target_min <= target_max")
        if self.train_size < 0 or self.eval_size < 0:
            raise ValueError("train_size and eval_size must be >= 0")


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _hash_ints(*values: int) -> int:
    h = 0x243F6A8885A308D3
    for v in values:
        h = _splitmix64(h ^ (v & _MASK64))
    return h


class _Rng:
    """Tiny counter-based integer RNG: identical draws on every Python version and platform."""

    def __init__(self, *key: int) -> None:
        self._key = _hash_ints(*key)
        self._counter = 0

    def _next(self) -> int:
        self._counter += 1
        return _splitmix64(self._key ^ _splitmix64(self._counter))

    def below(self, n: int) -> int:
        """Uniform integer in [0, n) by rejection (no modulo bias)."""
        limit = (1 << 64) - ((1 << 64) % n)
        while True:
            x = self._next()
            if x < limit:
                return x % n

    def between(self, lo: int, hi: int) -> int:
        return lo + self.below(hi - lo + 1)


_OPS = ("+", "-", "*", "/")


def _random_solution(rng: _Rng, numbers: Sequence[int], lo: int, hi: int) -> tuple[int, str] | None:
    """Combine the numbers pairwise in random order into one value in [lo, hi].

    Intermediate values stay positive integers (larger minus smaller, exact division only), as in
    the card game.  Returns (value, expression) or None when this draw does not land in range.
    """
    items = [(n, str(n)) for n in numbers]
    while len(items) > 1:
        i = rng.below(len(items))
        a = items.pop(i)
        b = items.pop(rng.below(len(items)))
        op = _OPS[rng.below(4)]
        if op == "-" and a[0] == b[0]:
            op = "+"
        if op == "/" and not (b[0] != 0 and a[0] % b[0] == 0):
            a, b = b, a
            if not (b[0] != 0 and a[0] % b[0] == 0):
                op = "*"
        if op == "-" and a[0] < b[0]:
            a, b = b, a
        value = {"+": a[0] + b[0], "-": a[0] - b[0], "*": a[0] * b[0]}.get(op)
        if value is None:
            value = a[0] // b[0]
        items.append((value, f"({a[1]} {op} {b[1]})" if items else f"{a[1]} {op} {b[1]}"))
    value, expr = items[0]
    return (value, expr) if lo <= value <= hi else None


def _generate_one(cfg: CountdownConfig, stream: int, index: int) -> tuple[tuple[int, ...], int, str]:
    rng = _Rng(cfg.seed, stream, index)
    for _ in range(10_000):
        count = rng.between(cfg.num_count_min, cfg.num_count_max)
        numbers = tuple(rng.between(cfg.number_min, cfg.number_max) for _ in range(count))
        for _ in range(20):
            found = _random_solution(rng, numbers, cfg.target_min, cfg.target_max)
            if found is not None:
                return numbers, found[0], found[1]
    raise ValueError(f"no solvable problem found for {cfg}: widen the target range")


def _split_of(key: tuple[tuple[int, ...], int], seed: int) -> str:
    """Each canonical key belongs to exactly one split (a hash of the key): disjoint by design."""
    return "eval" if _hash_ints(seed, key[1], *key[0]) & 1 else "train"


def generate_split(
    cfg: CountdownConfig, split: str, exclude: frozenset[tuple[tuple[int, ...], int]] = frozenset()
) -> list[Problem]:
    """The ``split`` ('train' or 'eval') problems of ``cfg``: deterministic, unique keys.

    Keys are partitioned between the splits by a hash, so each split depends only on the difficulty,
    the seed and its own size, and train and eval never share a key.  The first ``k`` problems of a
    split are the same for every size >= k.  The few-shot demonstrations' problems never occur, nor do
    the canonical keys in ``exclude`` (e.g. those of a user-given file for the other split).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    size = cfg.train_size if split == "train" else cfg.eval_size
    stream = 0 if split == "train" else 1
    out: list[Problem] = []
    seen: set[tuple[tuple[int, ...], int]] = set()
    index = 0
    max_draws = 200 * size + 10_000
    while len(out) < size:
        if index >= max_draws:
            raise ValueError(
                f"only {len(out)} distinct {split} problems after {index} draws (asked for {size}):"
                " the difficulty settings allow too few problems"
            )
        numbers, target, solution = _generate_one(cfg, stream, index)
        index += 1
        problem = Problem(f"{split}-{len(out):06d}", numbers, target, solution)
        if problem.key in seen or problem.key in RESERVED or problem.key in exclude:
            continue
        if _split_of(problem.key, cfg.seed) != split:
            continue
        seen.add(problem.key)
        out.append(problem)
    return out
