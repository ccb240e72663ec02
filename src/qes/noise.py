"""Counter-based sparse integer noise for perturbing quantized codes.

A member's perturbation of one layer is a sparse integer vector delta(seed, layer, k) over the layer's
codes. Every value is a pure function of (seed, layer key, k) computed with integer tensor operations
that never overflow int64 (add, xor, shift, mask, and multiplies of a 32-bit value by a constant below
2^31), so CPU and CUDA produce the same bits, and the result does not depend on how the work is chunked.
`torch.Generator`, numpy and `random` are deliberately not used: their streams differ across devices
and versions, and anything that reaches the codes must be re-derivable from the seed log alone.

Distribution (generator id ``blocksparse-v1``): each code independently gets the stochastic rounding
of sigma * eps, eps ~ N(0, 1), i.e. P(delta = j) = E[max(0, 1 - |sigma*eps - j|)]. At the small sigmas
used for quantized codes almost every delta is zero, so instead of drawing a value per code the codes
are cut into blocks of B = 4096 and, per block,

1. the number of non-zeros n ~ Binomial(B, p), p = P(delta != 0), is drawn by inverse CDF from one
   32-bit hash compared against an integer threshold table;
2. their positions are the images of 0..n-1 under a keyed bijection of [0, B) (xor / odd-multiply /
   xorshift rounds on 12 bits), so they are distinct and spread pseudo-randomly;
3. each non-zero gets a random sign from one hash bit and, only when sigma is large enough for
   |delta| >= 2 to have probability >= 2^-32, a magnitude drawn from a second threshold table.

A uniformly placed Binomial(B, p) subset is exactly an i.i.d. Bernoulli(p) mask, so the law per code is
the stochastic-rounding law up to the 2^-32 resolution of the tables; positions beyond the end of the
last block are dropped, which thins it to Binomial(remaining, p) and keeps it exact. The work is
proportional to the number of non-zeros. The float64 probabilities are computed once on the host and
turned into integer tables that are stored in the seed log, so replay never recomputes floats.

Mirrored sampling: a member is (seed, sign) and its perturbation is sign * delta(seed).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where tensors are made: reading a seed log needs no torch
    import torch

GENERATOR_ID = "blocksparse-v1"
BLOCK_BITS = 12
BLOCK = 1 << BLOCK_BITS
_M32 = 0xFFFFFFFF
_M12 = BLOCK - 1
_TWO32 = 1 << 32
# Stream tags keep the hashes used for different purposes independent of each other.
_TAG_COUNT, _TAG_PERM, _TAG_SIGN, _TAG_MAGNITUDE = 0x1B873593, 0x2F6B1F53, 0x4CF5AD43, 0x61C88647


def hash32(x):
    """A 32-bit integer finaliser; works on Python ints and int64 tensors holding values in [0, 2^32).

    Both multipliers are below 2^31, so every product stays below 2^63 and no int64 ever overflows.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x31848BAB) & _M32
    return x ^ (x >> 16)


def stream_key(seed: int, layer_key: int) -> int:
    """The 32-bit key of one member seed on one layer (layer_key is a 63-bit integer)."""
    if not 0 < seed < 2**31:
        raise ValueError(f"noise seeds must be in [1, 2^31), got {seed}")
    h = hash32(seed ^ 0x9E3779B9)
    h = hash32(h ^ (layer_key & _M32))
    return hash32(h ^ ((layer_key >> 32) & _M32))


def stochastic_rounding_pmf(sigma: float, tail: float = 2.0**-40) -> dict[int, float]:
    """P(delta = j) for delta = stochastic rounding of sigma * N(0, 1), in float64.

    Closed form of the triangle-kernel integral: with F(x) = Phi(x / sigma) and
    G(x) = sigma * phi(x / sigma), P(j) = G(j-1) - 2 G(j) + G(j+1) - (j-1)(F(j) - F(j-1))
    + (j+1)(F(j+1) - F(j)). Values with probability below `tail` are dropped.
    """
    if not sigma > 0:
        raise ValueError(f"sigma must be positive, got {sigma}")

    def upper(a: float, b: float) -> float:  # F(b) - F(a) for 0 <= a < b, accurate in the tail
        r = sigma * math.sqrt(2.0)
        return 0.5 * (math.erfc(a / r) - math.erfc(b / r))

    def g(x: float) -> float:
        return sigma * math.exp(-0.5 * (x / sigma) ** 2) / math.sqrt(2.0 * math.pi)

    def prob(j: int) -> float:  # j >= 1; the law is symmetric
        return (
            g(j - 1) - 2 * g(j) + g(j + 1)
            - (j - 1) * upper(j - 1, j)
            + (j + 1) * upper(j, j + 1)
        )

    pmf = {}
    j = 1
    while (p := prob(j)) >= tail:
        pmf[j] = pmf[-j] = p
        j += 1
    pmf[0] = 1.0 - 2.0 * sum(p for k, p in pmf.items() if k > 0)
    return dict(sorted(pmf.items()))


def _thresholds(probs: list[float]) -> list[int]:
    """Cumulative probabilities as u32 thresholds: a draw u selects the number of thresholds <= u."""
    out, acc = [], 0.0
    for p in probs[:-1]:
        acc += p
        t = min(_TWO32, round(acc * _TWO32))
        if t >= _TWO32:
            break
        out.append(t)
    return out


def _binomial_pmf(n: int, p: float) -> list[float]:
    log_p, log_q = math.log(p), math.log1p(-p)
    base = math.lgamma(n + 1)
    return [
        math.exp(base - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q)
        for k in range(n + 1)
    ]


@dataclass(frozen=True)
class NoiseSpec:
    """Everything that defines the noise stream; stored verbatim in the seed log."""

    sigma: float
    count_thresholds: tuple[int, ...]
    magnitude_thresholds: tuple[int, ...]
    block: int = BLOCK
    generator: str = GENERATOR_ID

    @classmethod
    def from_sigma(cls, sigma: float) -> NoiseSpec:
        pmf = stochastic_rounding_pmf(sigma)
        p_nonzero = 2.0 * sum(p for j, p in pmf.items() if j > 0)
        magnitudes = [2.0 * p / p_nonzero for j, p in pmf.items() if j > 0]
        return cls(
            sigma=sigma,
            count_thresholds=tuple(_thresholds(_binomial_pmf(BLOCK, p_nonzero))),
            magnitude_thresholds=tuple(_thresholds(magnitudes)),
        )

    @property
    def max_magnitude(self) -> int:
        """The largest |delta| the tables can draw (a bound known without generating any noise)."""
        return 1 + len(self.magnitude_thresholds)

    @property
    def density(self) -> float:
        """Expected fraction of non-zero codes, as encoded by the integer count table."""
        bounds = [0, *self.count_thresholds, _TWO32]
        mean = sum(k * (bounds[k + 1] - bounds[k]) for k in range(len(bounds) - 1))
        return mean / _TWO32 / self.block

    def to_json(self) -> dict:
        return {
            "generator": self.generator,
            "sigma": self.sigma,
            "block": self.block,
            "count_thresholds": list(self.count_thresholds),
            "magnitude_thresholds": list(self.magnitude_thresholds),
        }

    @classmethod
    def from_json(cls, data: dict) -> NoiseSpec:
        if data.get("generator") != GENERATOR_ID or data.get("block") != BLOCK:
            raise ValueError(
                f"unsupported noise generator {data.get('generator')!r} with block "
                f"{data.get('block')!r}; this version implements {GENERATOR_ID!r} with block {BLOCK}"
            )
        return cls(
            sigma=float(data["sigma"]),
            count_thresholds=tuple(int(t) for t in data["count_thresholds"]),
            magnitude_thresholds=tuple(int(t) for t in data["magnitude_thresholds"]),
        )


def _permute12(r: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """A keyed bijection of [0, 4096): three rounds of xor-key, odd multiply and xorshift."""
    x = r
    for round_ in range(3):
        k = hash32(keys ^ round_) if round_ else keys
        x = x ^ (k & _M12)
        x = (x * ((k >> 12) & _M12 | 1)) & _M12
        x = x ^ (x >> 6)
    return x


@functools.lru_cache(maxsize=16)
def _threshold_table(thresholds: tuple[int, ...], device: torch.device) -> torch.Tensor:
    import torch

    return torch.tensor(thresholds, dtype=torch.int64, device=device)


def _lookup(thresholds: tuple[int, ...], draws: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.searchsorted(_threshold_table(thresholds, draws.device), draws, right=True)


@dataclass(frozen=True)
class BlockTable:
    """The noise blocks of a group of layers laid end to end in one index space.

    Layer j owns flat indices [offsets[j], offsets[j] + sizes[j]); its blocks are listed in order.
    Generating noise for a whole group at once keeps the per-call overhead independent of the number
    of layers, and the result for each layer is the same as generating it alone.
    """

    keys: tuple[int, ...]
    sizes: tuple[int, ...]
    block_layer: torch.Tensor  # layer position of each block
    block_index: torch.Tensor  # block number inside its layer
    offsets: torch.Tensor  # first flat index of each layer
    layer_sizes: torch.Tensor
    key_words: torch.Tensor  # (low, high) 32-bit words of each layer key
    partial: bool  # whether some layer's last block runs past its end

    @classmethod
    def build(
        cls, keys: list[int], sizes: list[int], device: torch.device | str = "cpu"
    ) -> BlockTable:
        import torch

        blocks = [-(-n // BLOCK) for n in sizes]
        layer = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(blocks))
        first = torch.tensor([0, *blocks[:-1]]).cumsum(0)
        index = torch.arange(int(sum(blocks))) - first[layer]
        offsets = torch.tensor([0, *sizes[:-1]], dtype=torch.int64).cumsum(0)
        return cls(
            keys=tuple(keys),
            sizes=tuple(sizes),
            block_layer=layer.to(device),
            block_index=index.to(device),
            offsets=offsets.to(device),
            layer_sizes=torch.tensor(sizes, dtype=torch.int64, device=device),
            key_words=torch.tensor([[k & _M32, (k >> 32) & _M32] for k in keys], dtype=torch.int64, device=device),
            partial=any(n % BLOCK for n in sizes),
        )


def table_noise(spec: NoiseSpec, seed: int, table: BlockTable) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-zero entries of delta(seed) over a block table: (flat indices, values), both int64.

    Flat index = table.offsets[layer] + code index inside the layer. Entries come out grouped by
    layer and block, in no particular order inside a block, and are distinct.

    One host synchronisation a call (the number of non-zeros, which sizes the outputs): the tables stay on
    the device, the stream keys are computed there, and positions past a layer's end are only looked for
    when some layer has a partial last block.
    """
    import torch

    device = table.block_index.device
    bases = _stream_keys(seed, table.key_words)
    block_keys = hash32(table.block_index ^ bases[table.block_layer])
    counts = _lookup(spec.count_thresholds, hash32(block_keys ^ _TAG_COUNT))
    total = int(counts.sum())
    if total == 0:
        empty = torch.empty(0, dtype=torch.int64, device=device)
        return empty, empty
    owner = torch.repeat_interleave(torch.arange(len(counts), device=device), counts, output_size=total)
    first = torch.cumsum(counts, 0) - counts
    rank = torch.arange(total, dtype=torch.int64, device=device) - first[owner]
    keys = block_keys[owner]
    position = table.block_index[owner] * BLOCK + _permute12(rank, hash32(keys ^ _TAG_PERM))
    values = 1 - 2 * (hash32(hash32(keys ^ _TAG_SIGN) ^ rank) >> 31)
    if spec.magnitude_thresholds:
        draws = hash32(hash32(keys ^ _TAG_MAGNITUDE) ^ rank)
        values = values * (1 + _lookup(spec.magnitude_thresholds, draws))
    layer = table.block_layer[owner]
    if table.partial:
        keep = position < table.layer_sizes[layer]
        position, values, layer = position[keep], values[keep], layer[keep]
    return table.offsets[layer] + position, values


def _stream_keys(seed: int, key_words: torch.Tensor) -> torch.Tensor:
    """:func:`stream_key` of one seed for every layer of a table, computed on the table's device."""
    if not 0 < seed < 2**31:
        raise ValueError(f"noise seeds must be in [1, 2^31), got {seed}")
    h = hash32(key_words[:, 0] ^ hash32(seed ^ 0x9E3779B9))
    return hash32(h ^ key_words[:, 1])


def layer_noise(
    spec: NoiseSpec,
    seed: int,
    layer_key: int,
    num_codes: int,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-zero entries of delta(seed) on one layer: (code indices, values), both int64."""
    return table_noise(spec, seed, BlockTable.build([layer_key], [num_codes], device))


def member_seeds(global_seed: int, iteration: int, num_pairs: int) -> list[int]:
    """Seeds in [1, 2^31) of the mirrored pairs of one iteration, a pure function of its arguments."""
    h = hash32(hash32((global_seed & _M32) ^ 0x85EBCA6B) ^ (iteration & _M32))
    return [(hash32(h ^ hash32(pair + 1)) & 0x7FFFFFFF) or 1 for pair in range(num_pairs)]
