"""The counter-based noise: pinned values, distribution, independence, mirroring, chunking, devices."""

from __future__ import annotations

import math

import pytest
import torch

from qes.noise import (
    BLOCK,
    BlockTable,
    NoiseSpec,
    hash32,
    layer_noise,
    member_seeds,
    stochastic_rounding_pmf,
    table_noise,
)

SPEC = NoiseSpec.from_sigma(0.01)


def dense(spec: NoiseSpec, seed: int, key: int, n: int, device: str = "cpu") -> torch.Tensor:
    index, values = layer_noise(spec, seed, key, n, device)
    out = torch.zeros(n, dtype=torch.int64, device=device)
    out[index] = values
    return out


def test_golden_values() -> None:
    # The stream is part of the seed-log contract: these values must never change silently.
    assert hash32(0) == 0 and hash32(1) == 774041739 and hash32(123456789) == 3988780646
    index, values = layer_noise(SPEC, 12345, 987654321, 576 * 1536)
    assert index.numel() == 7003
    assert index[:5].tolist() == [1514, 2232, 796, 1858, 1628]
    assert values[:5].tolist() == [-1, -1, -1, 1, 1]
    assert int(index.sum()) == 3106796724 and int(values.sum()) == -29
    big = NoiseSpec.from_sigma(0.7)
    index, values = layer_noise(big, 7, 42, 10_000)
    assert (index.numel(), int(values.abs().sum()), int(values.sum())) == (5182, 5715, 39)
    assert member_seeds(1234, 0, 3) == [1314131945, 1552790870, 559037130]


def test_pmf_matches_numerical_integration() -> None:
    for sigma in (0.01, 0.3, 1.2):
        pmf = stochastic_rounding_pmf(sigma)
        assert math.isclose(sum(pmf.values()), 1.0, abs_tol=1e-12)
        # E[max(0, 1 - |sigma*eps - j|)] by midpoint quadrature over eps.
        steps = 400_000
        for j in (0, 1, 2):
            acc = 0.0
            for s in range(steps):
                eps = -10 + 20 * (s + 0.5) / steps
                acc += max(0.0, 1 - abs(sigma * eps - j)) * math.exp(-eps * eps / 2)
            expected = acc * 20 / steps / math.sqrt(2 * math.pi)
            assert math.isclose(pmf.get(j, 0.0), expected, rel_tol=1e-6, abs_tol=1e-12), (sigma, j)
    assert math.isclose(1 - stochastic_rounding_pmf(0.01)[0], 0.01 * math.sqrt(2 / math.pi), rel_tol=1e-3)


@pytest.mark.parametrize("sigma", [0.01, 0.1, 0.6])
def test_distribution_chi_square(sigma: float) -> None:
    """>= 10^7 draws per sigma: value frequencies match the stochastic-rounding law."""
    spec = NoiseSpec.from_sigma(sigma)
    pmf = stochastic_rounding_pmf(sigma)
    n = 1 << 22
    counts: dict[int, int] = {}
    draws = 0
    for seed in (11, 12, 13):
        index, values = layer_noise(spec, seed, 5, n)
        draws += n
        vals, cnt = torch.unique(values, return_counts=True)
        for v, c in zip(vals.tolist(), cnt.tolist()):
            counts[v] = counts.get(v, 0) + c
    counts[0] = draws - sum(counts.values())
    assert draws >= 10**7
    chi2, dof = 0.0, -1
    lumped_obs = lumped_exp = 0.0
    for j, p in pmf.items():
        expected = p * draws
        if expected < 20:
            lumped_obs += counts.get(j, 0)
            lumped_exp += expected
            continue
        chi2 += (counts.get(j, 0) - expected) ** 2 / expected
        dof += 1
    if lumped_exp >= 20:
        chi2 += (lumped_obs - lumped_exp) ** 2 / lumped_exp
        dof += 1
    assert set(counts) <= set(pmf), (set(counts), set(pmf))
    # 99.9% quantile of chi-square is below dof + 5 sqrt(2 dof) + 10 for these small dof.
    assert chi2 < dof + 5 * math.sqrt(2 * max(dof, 1)) + 10, (chi2, dof, counts)


def test_positions_uniform_within_blocks() -> None:
    index, _ = layer_noise(NoiseSpec.from_sigma(0.05), 99, 3, BLOCK * 512)
    position = index % BLOCK
    hist = torch.bincount(position // 256, minlength=16).double()
    expected = index.numel() / 16
    chi2 = float(((hist - expected) ** 2 / expected).sum())
    assert chi2 < 15 + 5 * math.sqrt(30) + 10
    assert torch.unique(index).numel() == index.numel()


def test_no_correlation_across_seeds_and_layers() -> None:
    spec = NoiseSpec.from_sigma(0.2)
    n = 1 << 20
    base = dense(spec, 1000, 77, n).double()
    for other in (dense(spec, 1001, 77, n), dense(spec, 1000, 78, n), dense(spec, 2, 77, n)):
        other = other.double()
        corr = float(((base - base.mean()) * (other - other.mean())).mean() / (base.std() * other.std()))
        assert abs(corr) < 5 / math.sqrt(n), corr


def test_chunking_and_layer_grouping_independence() -> None:
    keys, sizes = [11, 22, 33, 44], [5000, BLOCK * 3 + 17, 70_000, 1]
    spec = NoiseSpec.from_sigma(0.3)
    whole_index, whole_values = table_noise(spec, 4242, BlockTable.build(keys, sizes))
    offset = 0
    for key, size in zip(keys, sizes):
        index, values = layer_noise(spec, 4242, key, size)
        mask = (whole_index >= offset) & (whole_index < offset + size)
        assert torch.equal(whole_index[mask] - offset, index)
        assert torch.equal(whole_values[mask], values)
        offset += size
    # Any split of the layer list into groups gives the same per-layer streams.
    left_index, _ = table_noise(spec, 4242, BlockTable.build(keys[:2], sizes[:2]))
    assert torch.equal(left_index, whole_index[whole_index < sizes[0] + sizes[1]])


def test_seed_range_is_checked() -> None:
    with pytest.raises(ValueError, match="seeds must be in"):
        layer_noise(SPEC, 0, 1, 10)
    with pytest.raises(ValueError, match="seeds must be in"):
        layer_noise(SPEC, 2**31, 1, 10)


def test_spec_round_trip_and_foreign_generator() -> None:
    assert NoiseSpec.from_json(SPEC.to_json()) == SPEC
    with pytest.raises(ValueError, match="unsupported noise generator 'other'"):
        NoiseSpec.from_json({**SPEC.to_json(), "generator": "other"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_equals_cpu() -> None:
    keys, sizes = [101, 202, 303], [576 * 1536, 576 * 576, 12345]
    for sigma in (0.01, 0.7):
        spec = NoiseSpec.from_sigma(sigma)
        cpu = table_noise(spec, 999, BlockTable.build(keys, sizes, "cpu"))
        gpu = table_noise(spec, 999, BlockTable.build(keys, sizes, "cuda"))
        assert torch.equal(cpu[0], gpu[0].cpu()) and torch.equal(cpu[1], gpu[1].cpu())
