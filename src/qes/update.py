"""The QES update in fixed-point integers: gradient estimate, error feedback, boundary anti-windup.

Everything from the logged integers to the new codes is integer arithmetic in this order, per code k:

    g[k]     = sum over members m of C_m * delta_m[k]                (C_m = round(c_m * 2^COEF_BITS))
    u[k]     = rsr(g[k] * A_t, COEF_BITS + ALPHA_BITS - RESIDUAL_BITS)  (A_t = round(alpha_t / sigma * 2^ALPHA_BITS))
    s[k]     = u[k] + rsr(G * e[k], GAMMA_BITS)                     (G = round(gamma * 2^GAMMA_BITS))
    d[k]     = rsr(s[k], RESIDUAL_BITS)                              (the step in whole codes)
    applied  = d[k] if 0 <= Q[k] + d[k] <= max_code else 0           (a step that would leave the range is dropped)
    e'[k]    = clamp(s[k] - applied * 2^RESIDUAL_BITS, +-E) if applied or d[k] == 0 else 0

with rsr(x, n) = floor((x + 2^(n-1)) / 2^n) (round half up) and E = round(clamp * 2^RESIDUAL_BITS). The
residual e is in units of 2^-RESIDUAL_BITS codes. Where a step is dropped at the range boundary the
residual is reset to zero, so pushes into a wall do not wind up. The update is not divided by the
population size (as in the paper).

Residual modes: `stored` keeps e for every code (int16); `replay` keeps no residual and rebuilds e each
iteration from the last `window` logged steps, starting from zero at the window's start and gating
against the current codes; `none` is the no-feedback baseline (QuZO-style), identical to `stored` with
gamma = 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are made: reading a seed log needs no torch
    import torch

COEF_BITS = 16
ALPHA_BITS = 24
RESIDUAL_BITS = 14
GAMMA_BITS = 16
MODES = ("stored", "replay", "none")


@dataclass(frozen=True)
class UpdateConfig:
    """Residual mode and the constants of the fixed-point update (all logged in run.json)."""

    mode: str = "replay"
    gamma: float = 0.9
    window: int = 10
    residual_clamp: float = 1.5
    chunk_codes: int = 1 << 24

    def __post_init__(self) -> None:
        from qes.config import check_values

        block = {"mode": self.mode, "gamma": self.gamma, "window": self.window, "clamp": self.residual_clamp}
        check_values(("finetune", "residual"), block, source="residual settings")
        if self.chunk_codes < 1:
            raise ValueError(f"chunk_codes must be >= 1, got {self.chunk_codes}")

    @property
    def gamma_fp(self) -> int:
        return 0 if self.mode == "none" else round(self.gamma * (1 << GAMMA_BITS))

    @property
    def clamp_fp(self) -> int:
        return round(self.residual_clamp * (1 << RESIDUAL_BITS))

    def to_json(self) -> dict:
        return {
            "mode": self.mode,
            "gamma": self.gamma,
            "gamma_fp": self.gamma_fp,
            "window": self.window,
            "residual_clamp": self.residual_clamp,
            "clamp_fp": self.clamp_fp,
            "coef_bits": COEF_BITS,
            "alpha_bits": ALPHA_BITS,
            "residual_bits": RESIDUAL_BITS,
            "gamma_bits": GAMMA_BITS,
            "chunk_codes": self.chunk_codes,
        }

    @classmethod
    def from_json(cls, data: dict) -> UpdateConfig:
        widths = (data["coef_bits"], data["alpha_bits"], data["residual_bits"], data["gamma_bits"])
        if widths != (COEF_BITS, ALPHA_BITS, RESIDUAL_BITS, GAMMA_BITS):
            raise ValueError(
                f"fixed-point widths {widths} in the log differ from this version's "
                f"{(COEF_BITS, ALPHA_BITS, RESIDUAL_BITS, GAMMA_BITS)}"
            )
        return cls(
            mode=data["mode"],
            gamma=float(data["gamma"]),
            window=int(data["window"]),
            residual_clamp=float(data["residual_clamp"]),
            chunk_codes=int(data["chunk_codes"]),
        )


@dataclass(frozen=True)
class Step:
    """One logged iteration: the members' (seed, sign) and integer coefficients, and A_t."""

    iteration: int
    alpha_fp: int
    seeds: tuple[int, ...]
    signs: tuple[int, ...]
    coefs: tuple[int, ...]

    def seed_coefficients(self) -> list[tuple[int, int]]:
        """Mirrored members share a seed: combine sign * C per seed, in first-seen order."""
        combined: dict[int, int] = {}
        for seed, sign, coef in zip(self.seeds, self.signs, self.coefs):
            combined[seed] = combined.get(seed, 0) + sign * coef
        return [(seed, c) for seed, c in combined.items() if c != 0]


def quantize_coefficients(values: list[float]) -> tuple[int, ...]:
    """Float shaped fitness -> logged integers round(c * 2^COEF_BITS) (half away from zero)."""
    scale = float(1 << COEF_BITS)
    return tuple(int(abs(v) * scale + 0.5) * (1 if v >= 0 else -1) for v in values)


def alpha_schedule(alpha: float, warmup: int, decay: str, iterations: int, t: int) -> float:
    """Step size of iteration t: linear warm-up over `warmup` iterations, then constant or cosine decay to zero."""
    if t < warmup:
        return alpha * (t + 1) / (warmup + 1)
    if decay == "cosine":
        span = max(iterations - warmup, 1)
        return alpha * 0.5 * (1 + math.cos(math.pi * (t - warmup) / span))
    return alpha


def alpha_fixed_point(alpha: float, sigma: float) -> int:
    """A_t = round(alpha / sigma * 2^ALPHA_BITS), the logged step size."""
    return round(alpha / sigma * (1 << ALPHA_BITS))


def rsr(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round-half-up right shift of an int64 tensor by `bits` (floor((x + 2^(bits-1)) / 2^bits))."""
    return (x + (1 << (bits - 1))) >> bits


def gradient_part(g: torch.Tensor, alpha_fp: int) -> torch.Tensor:
    """u = rsr(g * A_t) in residual units."""
    return rsr(g * alpha_fp, COEF_BITS + ALPHA_BITS - RESIDUAL_BITS)


def feedback_step(
    u: torch.Tensor, e: torch.Tensor, codes: torch.Tensor, max_code: int, cfg: UpdateConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """One error-feedback step on aligned int64 tensors: returns (applied code deltas, new residual)."""
    import torch

    s = u + rsr(e * cfg.gamma_fp, GAMMA_BITS) if cfg.gamma_fp else u
    d = rsr(s, RESIDUAL_BITS)
    target = codes + d
    inside = (target >= 0) & (target <= max_code)
    applied = torch.where(inside, d, torch.zeros_like(d))
    residual = (s - (applied << RESIDUAL_BITS)).clamp_(-cfg.clamp_fp, cfg.clamp_fp)
    residual = torch.where(inside, residual, torch.zeros_like(residual))
    return applied, residual


def check_range(max_abs_coef_sum: int, max_noise: int, alpha_fp: int) -> None:
    """Refuse a step whose products could overflow int64 (never the case at sane settings)."""
    if max_abs_coef_sum * max_noise * max(alpha_fp, 1) >= 1 << 62:
        raise OverflowError(
            f"fixed-point overflow: sum|C| = {max_abs_coef_sum}, max |delta| = {max_noise}, "
            f"A_t = {alpha_fp}; lower alpha / sigma or the population"
        )


def shape_rewards(rewards: list[float], shaping: str, clip: float) -> list[float]:
    """Per-member float coefficients from rewards ordered (+s0, -s0, +s1, -s1, ...).

    pair_zscore: z-score of the pair differences r(+s) - r(-s), split as +z/2 and -z/2 so that the
    seed's combined coefficient is z; centered_rank: ranks of all rewards mapped to [-0.5, 0.5].
    Both are clipped to +-clip. Identical rewards give zero coefficients (no update).
    """
    if shaping == "pair_zscore":
        diffs = [rewards[i] - rewards[i + 1] for i in range(0, len(rewards), 2)]
        mean = sum(diffs) / len(diffs)
        std = math.sqrt(sum((d - mean) ** 2 for d in diffs) / len(diffs))
        out = []
        for d in diffs:
            z = 0.0 if std < 1e-12 else max(-clip, min(clip, (d - mean) / std))
            out += [z / 2, -z / 2]
        return out
    order = sorted(range(len(rewards)), key=lambda i: (rewards[i], i))
    ranks = [0.0] * len(rewards)
    i = 0
    while i < len(order):  # ties share their mean rank
        j = i
        while j + 1 < len(order) and rewards[order[j + 1]] == rewards[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2
        i = j + 1
    n = len(rewards)
    return [max(-clip, min(clip, r / (n - 1) - 0.5)) for r in ranks]
