"""The fixed-shape decode step (``finetune.decode: compiled``) against the eager member decoder on the tiny GPTQ
model: the fixed corrections against the CSR ones, the same greedy tokens with the step run eagerly, traced by
dynamo as one graph and compiled by inductor, and buffers that stay in place from call to call."""

from __future__ import annotations

import pytest
import torch

from qes.checkpoint import load_quantized
from qes.codes import quantized_linears
from qes.decoding import STATIC_BUCKET, StaticDecode, cpu_compiler, greedy_group
from qes.engine import Engine
from qes.generation import MIN_SHARED_PREFIX, make_batch
from qes.members import FixedCorrection, MemberCorrection, MemberGroup
from qes.noise import NoiseSpec, member_seeds
from qes.tasks.countdown import CountdownConfig, PromptStyle, build_prompt, generate_split
from qes.update import UpdateConfig

MEMBERS = [(s, sign) for s in member_seeds(3, 0, 2) for sign in (1, -1)]
OTHER_MEMBERS = [(s, sign) for s in member_seeds(3, 1, 2) for sign in (1, -1)]
TASK = CountdownConfig(num_count_min=2, num_count_max=3, number_min=1, number_max=10, target_min=1, target_max=20,
                       train_size=0, eval_size=6, seed=1)


def _model(path, sigma: float = 0.5):
    model, tokenizer = load_quantized(path, dtype="float32", backend="dense")
    return model, tokenizer, Engine(quantized_linears(model), NoiseSpec.from_sigma(sigma), UpdateConfig())


def _chunk(tokenizer, n: int = 4):
    style = PromptStyle()
    problems = generate_split(TASK, "eval")[:n]
    batch = make_batch(tokenizer, problems, [build_prompt(tokenizer, p, style) for p in problems],
                       style.assistant_prefix)
    chunk = batch.chunks(n, share_prefix=True)[0]
    assert chunk.prefix_len >= MIN_SHARED_PREFIX
    return batch, chunk


def _decode(model, batch, chunk, group, static, tokens: int = 10):
    return greedy_group(model, chunk.input_ids, chunk.attention_mask, chunk.prefix_len, tokens,
                        batch.eos_token_id, None, group, static).tokens


def test_fixed_corrections_equal_the_csr_ones(tiny_gptq):
    model, _, engine = _model(tiny_gptq(4))
    deltas = [engine.member_deltas(seed, sign) for seed, sign in MEMBERS]
    layer = engine.layers[0]
    module = layer.module
    per_member = [d.get(layer.name) for d in deltas]
    csr = MemberCorrection(module, per_member, torch.float32)
    fixed = FixedCorrection(module, per_member, torch.float32)
    assert fixed.nnz == csr.nnz > 0
    assert fixed.rows.numel() >= fixed.nnz and fixed.rows.numel() % 4096 == 0
    x = torch.linspace(-2, 2, len(MEMBERS) * 3 * module.in_features).reshape(len(MEMBERS) * 3, module.in_features)
    base = torch.zeros(x.shape[0], module.out_features)
    want, got = csr.add_to(base, x), fixed.add_to(base, x)
    assert float(want.abs().max()) > 0
    assert float((got - want).abs().max() / want.abs().max()) < 1e-6
    # the next group's correction reuses the same buffers, rewritten in place
    before = [t.data_ptr() for t in module.fixed_correction]
    other = [engine.member_deltas(seed, sign).get(layer.name) for seed, sign in OTHER_MEMBERS]
    again = FixedCorrection(module, other, torch.float32)
    assert [t.data_ptr() for t in module.fixed_correction] == before
    want = MemberCorrection(module, other, torch.float32).add_to(base, x)
    assert float((again.add_to(base, x) - want).abs().max() / want.abs().max()) < 1e-6


def test_fixed_shape_step_decodes_the_eager_tokens(tiny_gptq):
    model, tokenizer, engine = _model(tiny_gptq(4))
    batch, chunk = _chunk(tokenizer)
    eager = _decode(model, batch, chunk, MemberGroup(engine, MEMBERS, torch.float32), None)
    static = _decode(model, batch, chunk, MemberGroup(engine, MEMBERS, torch.float32), StaticDecode(backend=None))
    assert static == eager
    assert len({tuple(map(tuple, eager[m * 4 : (m + 1) * 4])) for m in range(len(MEMBERS))}) > 1
    buffers = model._qes_static_buffers
    assert buffers.mask.shape[-1] % STATIC_BUCKET == 0 and buffers.prefix_mask.shape[-1] % STATIC_BUCKET == 0
    # the unperturbed model, one member: the same tokens, in the same buffers when the shape is the same
    assert _decode(model, batch, chunk, None, StaticDecode(backend=None)) == _decode(model, batch, chunk, None, None)


def test_dynamo_traces_the_step_as_one_graph_and_keeps_it(tiny_gptq):
    torch._dynamo.reset()
    model, tokenizer, engine = _model(tiny_gptq(4))
    batch, chunk = _chunk(tokenizer)
    plan = StaticDecode(backend="eager")  # dynamo's tracing and guards without inductor's compile time
    counters = torch._dynamo.utils.counters
    counters.clear()
    for members in (MEMBERS, OTHER_MEMBERS):
        eager = _decode(model, batch, chunk, MemberGroup(engine, members, torch.float32), None)
        traced = _decode(model, batch, chunk, MemberGroup(engine, members, torch.float32), plan)
        assert traced == eager
    # fullgraph=True: a graph break would have raised; the second group of members reuses the first graph
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.skipif(cpu_compiler() is None, reason="inductor needs a C++ compiler")
def test_inductor_compiled_step_decodes_the_eager_tokens(tiny_gptq):
    torch._dynamo.reset()
    model, tokenizer, engine = _model(tiny_gptq(4))
    batch, chunk = _chunk(tokenizer)
    eager = _decode(model, batch, chunk, MemberGroup(engine, MEMBERS, torch.float32), None, tokens=6)
    compiled = _decode(model, batch, chunk, MemberGroup(engine, MEMBERS, torch.float32), StaticDecode(), tokens=6)
    assert compiled == eager


def test_compiled_decode_on_a_cpu_without_a_compiler_is_refused(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    with pytest.raises(RuntimeError, match="finetune.decode: compiled on the CPU needs a C\\+\\+ compiler.*"
                                           "'no-such-c\\+\\+-compiler' is not on PATH.*decode: eager"):
        StaticDecode.for_device("cpu")
    assert StaticDecode.for_device("cuda") == StaticDecode(mode="reduce-overhead")
