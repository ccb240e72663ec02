"""Perturb / restore / update on a real (tiny) GPTQ model, and the fixed-point update rules."""

from __future__ import annotations

import pytest
import torch

import qes.arena
from qes.checkpoint import load_quantized
from qes.codes import quantized_linears
from qes.engine import Engine
from qes.identity import codes_sha256
from qes.noise import NoiseSpec
from qes.packing import pack_codes
from qes.update import (
    ALPHA_BITS,
    COEF_BITS,
    RESIDUAL_BITS,
    Step,
    UpdateConfig,
    feedback_step,
    quantize_coefficients,
)

PROMPT = torch.tensor([[1, 5, 9, 12, 40, 77, 100]])


def _model(tiny_gptq, bits: int = 4):
    model, _ = load_quantized(tiny_gptq(bits))
    return model


def _set_codes(model, fill) -> None:
    """Overwrite every layer's codes with fill(layer, Q) (used to place codes at the boundaries)."""
    for layer in quantized_linears(model):
        codes = layer.codes().long()
        layer.qweight.copy_(pack_codes(fill(layer, codes), layer.bits))


def _steps(count: int, pairs: int = 3, alpha_over_sigma: float = 4.0) -> list[Step]:
    out = []
    for t in range(count):
        seeds, signs, coefs = [], [], []
        for p in range(pairs):
            seed = 1000 + 17 * t + p
            c = quantize_coefficients([((t + p) % 5 - 2) * 0.7, -(((t * p) % 3) - 1) * 0.9])
            seeds += [seed, seed]
            signs += [1, -1]
            coefs += list(c)
        out.append(Step(t, round(alpha_over_sigma * (1 << ALPHA_BITS)), tuple(seeds), tuple(signs), tuple(coefs)))
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_restore_is_exact_including_boundaries(tiny_gptq, bits: int) -> None:
    model = _model(tiny_gptq, bits)
    top = (1 << bits) - 1
    # A third of the codes at 0, a third at the maximum: plenty of gated positions.
    def fill(layer, q):
        third = torch.arange(q.numel()).view(q.shape) % 3
        return torch.where(third == 0, 0, torch.where(third == 1, top, q))

    _set_codes(model, fill)
    engine = Engine(quantized_linears(model), NoiseSpec.from_sigma(0.6), UpdateConfig(chunk_codes=30_000))
    before = engine.codes_sha256()
    logits = model(PROMPT).logits
    hits = 0
    for seed in range(1, 41):
        p = engine.perturb(seed * 7919, 1 if seed % 2 else -1)
        hits += p.boundary_hits
        assert engine.codes_sha256() != before
        engine.restore(p)
        assert engine.codes_sha256() == before
    assert hits > 1000
    assert torch.equal(model(PROMPT).logits, logits)
    assert codes_sha256(model) == before


def test_perturbation_is_live_and_mirrored(tiny_gptq) -> None:
    model = _model(tiny_gptq)
    _set_codes(model, lambda layer, q: q.clamp(2, 13))  # no code at a boundary: nothing gated
    layers = quantized_linears(model)
    engine = Engine(layers, NoiseSpec.from_sigma(0.3), UpdateConfig())
    base = [layer.codes().long() for layer in layers]
    logits = model(PROMPT).logits
    plus = engine.perturb(4242, 1)
    assert plus.boundary_hits == 0
    up = [layer.codes().long() - b for layer, b in zip(layers, base)]
    assert not torch.equal(model(PROMPT).logits, logits)
    engine.restore(plus)
    minus = engine.perturb(4242, -1)
    down = [layer.codes().long() - b for layer, b in zip(layers, base)]
    engine.restore(minus)
    assert all(torch.equal(u, -d) for u, d in zip(up, down))
    assert sum(int((u != 0).sum()) for u in up) > 0.2 * engine.num_codes


def test_feedback_step_by_hand() -> None:
    one = 1 << RESIDUAL_BITS
    cfg = UpdateConfig(mode="stored", gamma=0.5)
    u = torch.tensor([int(0.3 * one), int(0.7 * one), int(-0.6 * one), int(2.6 * one), int(0.9 * one)])
    e = torch.tensor([int(0.4 * one), 0, 0, 0, int(-1.5 * one)])
    codes = torch.tensor([5, 5, 0, 14, 7])
    applied, residual = feedback_step(u, e, codes, 15, cfg)
    # s = u + e / 2: [0.5, 0.7, -0.6, 2.6, 0.15] codes; rounding half up gives [1, 1, -1, 3, 0];
    # code 0 - 1 and 14 + 3 leave [0, 15] and are dropped with their residual reset.
    assert applied.tolist() == [1, 1, 0, 0, 0]
    s = u + ((e * 32768 + 32768) >> 16)
    assert residual.tolist() == [int(s[0]) - one, int(s[1]) - one, 0, 0, int(s[4])]
    none = UpdateConfig(mode="none")
    applied, _ = feedback_step(u, e, codes, 15, none)
    assert applied.tolist() == [0, 1, 0, 0, 1]  # the residual input is ignored without feedback
    clamp = UpdateConfig(mode="stored", gamma=0.9)
    u, e = torch.tensor([int(0.49 * one)]), torch.tensor([int(1.5 * one)])
    _, residual = feedback_step(u, e, torch.tensor([3]), 15, clamp)
    # 0.49 + 0.9 * 1.5 = 1.84 -> step 2, residual -0.16 (within the clamp)
    assert abs(int(residual) / one + 0.16) < 1e-3


def test_gradient_scale_by_hand(tiny_gptq) -> None:
    """One seed, C = 1.0, alpha/sigma = 1: every non-zero delta moves its code by exactly delta."""
    model = _model(tiny_gptq)
    _set_codes(model, lambda layer, q: q.clamp(3, 12))
    layers = quantized_linears(model)
    noise = NoiseSpec.from_sigma(0.3)
    engine = Engine(layers, noise, UpdateConfig(mode="none"))
    before = [layer.codes().long() for layer in layers]
    p = engine.perturb(555, 1)
    expected = [layer.codes().long() - b for layer, b in zip(layers, before)]
    engine.restore(p)
    stats = engine.apply(Step(0, 1 << ALPHA_BITS, (555,), (1,), (1 << COEF_BITS,)))
    got = [layer.codes().long() - b for layer, b in zip(layers, before)]
    assert all(torch.equal(g, x) for g, x in zip(got, expected))
    assert stats.changed == sum(int((x != 0).sum()) for x in expected) and stats.boundary_hits == 0


def _run(
    tiny_gptq, cfg: UpdateConfig, steps: list[Step], clamp: tuple[int, int] = (2, 13), hits: list | None = None
) -> list[str]:
    model = _model(tiny_gptq)
    _set_codes(model, lambda layer, q: q.clamp(*clamp))
    engine = Engine(quantized_linears(model), NoiseSpec.from_sigma(0.3), cfg)
    hashes = []
    for step in steps:
        stats = engine.apply(step)
        if hits is not None:
            hits.append(stats.boundary_hits)
        hashes.append(engine.codes_sha256())
    return hashes


def test_replay_window_equals_stored_without_boundaries(tiny_gptq) -> None:
    steps = _steps(6, alpha_over_sigma=0.3)
    hits: list[int] = []
    stored = _run(tiny_gptq, UpdateConfig(mode="stored", gamma=0.9), steps, clamp=(6, 9), hits=hits)
    assert hits == [0] * 6  # the precondition: no code touches a boundary
    replay = _run(tiny_gptq, UpdateConfig(mode="replay", gamma=0.9, window=6), steps, clamp=(6, 9))
    short = _run(tiny_gptq, UpdateConfig(mode="replay", gamma=0.9, window=2), steps, clamp=(6, 9))
    assert stored == replay
    assert short[:3] == stored[:3] and short != stored
    assert len(set(stored)) == 6  # every step moved some code


def test_steps_without_coefficients(tiny_gptq) -> None:
    """A step whose rewards were all equal has no coefficient: it moves nothing, in the window or last."""
    steps = _steps(5, alpha_over_sigma=0.3)
    idle = [Step(t, s.alpha_fp, s.seeds, s.signs, (0,) * len(s.coefs)) for t, s in enumerate(steps)]
    mixed = [steps[0], idle[1], steps[2], idle[3], idle[4]]
    for mode in ("replay", "stored", "none"):
        config = UpdateConfig(mode=mode, gamma=0.9, window=3)
        hashes = _run(tiny_gptq, config, mixed, clamp=(6, 9))
        assert hashes[1] == hashes[0] and hashes[0] != hashes[2], mode
    replay = _run(tiny_gptq, UpdateConfig(mode="replay", gamma=0.9, window=5), mixed, clamp=(6, 9))
    stored = _run(tiny_gptq, UpdateConfig(mode="stored", gamma=0.9), mixed, clamp=(6, 9))
    assert replay == stored


def test_gamma_zero_is_the_baseline(tiny_gptq) -> None:
    steps = _steps(4)
    baseline = _run(tiny_gptq, UpdateConfig(mode="none"), steps)
    assert _run(tiny_gptq, UpdateConfig(mode="stored", gamma=0.0), steps) == baseline
    assert _run(tiny_gptq, UpdateConfig(mode="replay", gamma=0.0, window=3), steps) == baseline
    assert _run(tiny_gptq, UpdateConfig(mode="stored", gamma=0.9), steps) != baseline


def test_chunking_does_not_change_results(tiny_gptq) -> None:
    steps = _steps(3)
    a = _run(tiny_gptq, UpdateConfig(mode="replay", window=2, chunk_codes=1 << 30), steps)
    b = _run(tiny_gptq, UpdateConfig(mode="replay", window=2, chunk_codes=5000), steps)
    assert a == b


@pytest.mark.parametrize("bits", [4, 8])
def test_dense_and_located_gathers_agree(tiny_gptq, monkeypatch, bits: int) -> None:
    """Arena.gather unpacks the whole arena for large index sets and locates each index otherwise: both
    read the same codes, and a stored-residual run (whose gathers grow with its residual) is unchanged."""
    model = _model(tiny_gptq, bits)
    _set_codes(model, lambda layer, q: (q * 7 + torch.arange(q.numel()).view(q.shape)) % (1 << bits))
    engine = Engine(quantized_linears(model), NoiseSpec.from_sigma(0.3), UpdateConfig(chunk_codes=5000))
    for chunk in engine.chunks:
        truth = torch.cat([layer.codes().reshape(-1) for layer in chunk.arena.layers]).long()
        index = torch.arange(3, chunk.size, 5)
        read = {}
        for name, ratio in (("located", 0), ("dense", 1 << 40)):
            monkeypatch.setattr(qes.arena, "DENSE_GATHER", ratio)
            read[name] = chunk.arena.gather(index)
        assert torch.equal(read["located"], truth[index]) and torch.equal(read["dense"], truth[index])
    hashes = {}
    for ratio in (0, 1 << 40):
        monkeypatch.setattr(qes.arena, "DENSE_GATHER", ratio)
        hashes[ratio] = _run(tiny_gptq, UpdateConfig(mode="stored", gamma=0.9), _steps(4))
    assert hashes[0] == hashes[1 << 40] and len(set(hashes[0])) == 4


def test_config_errors() -> None:
    with pytest.raises(ValueError, match=r"finetune\.residual\.mode: 'full' is not one of \['replay', 'stored'"):
        UpdateConfig(mode="full")
    with pytest.raises(ValueError, match=r"finetune\.residual\.gamma: 1\.0 is greater than or equal to the maximum"):
        UpdateConfig(gamma=1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_update_equals_cpu(tiny_gptq) -> None:
    steps = _steps(4)
    hashes = {}
    for device in ("cpu", "cuda"):
        model, _ = load_quantized(tiny_gptq(4), device=device)
        engine = Engine(quantized_linears(model), NoiseSpec.from_sigma(0.3), UpdateConfig(mode="replay", window=2))
        for step in steps:
            p = engine.perturb(step.seeds[0], 1)
            engine.restore(p)
            engine.apply(step)
        hashes[device] = engine.codes_sha256()
    assert hashes["cpu"] == hashes["cuda"]


def test_backends_follow_the_same_codes(tiny_gptq) -> None:
    """int4pack and dense runs of the same steps give identical codes at every step, and each backend's
    forward pass moves with perturb and comes back exactly with restore."""
    steps = _steps(3)
    hashes = {}
    for backend in ("dense", "int4pack"):
        model, _ = load_quantized(tiny_gptq(4), backend=backend)
        engine = Engine(quantized_linears(model), NoiseSpec.from_sigma(0.3), UpdateConfig(window=2))
        assert {chunk.arena.backend for chunk in engine.chunks} == {backend}
        before = model(PROMPT).logits
        trace = [engine.codes_sha256()]
        for step in steps:
            p = engine.perturb(step.seeds[0], 1)
            perturbed = model(PROMPT).logits
            assert not torch.equal(perturbed, before)
            trace.append(engine.codes_sha256())
            engine.restore(p)
            assert torch.equal(model(PROMPT).logits, before)
            engine.apply(step)
            before = model(PROMPT).logits
            trace.append(engine.codes_sha256())
        hashes[backend] = trace
    assert hashes["dense"] == hashes["int4pack"]


def test_noise_memo_returns_the_generated_noise_and_keeps_the_newest_seeds(tiny_gptq) -> None:
    from qes.engine import NoiseMemo
    from qes.noise import table_noise

    engine = Engine(quantized_linears(_model(tiny_gptq)), NoiseSpec.from_sigma(0.3), UpdateConfig())
    table = engine.chunks[0].table
    memo = NoiseMemo(engine.noise)
    for seed in (5, 6, 5):
        index, delta = memo.get(table, seed)
        want_index, want_delta = table_noise(engine.noise, seed, table)
        assert torch.equal(index, want_index) and torch.equal(delta, want_delta) and delta.dtype == torch.int64
    assert [seed for _, seed in memo.entries] == [6, 5]  # most recently used last
    one_seed = memo._bytes() // 2
    memo.budget = one_seed
    memo.get(table, 7)
    assert [seed for _, seed in memo.entries] == [7]  # over budget: only the newest stays
