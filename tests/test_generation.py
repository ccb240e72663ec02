"""Generation, scoring and held-out evaluation on GPTQ checkpoints of a tiny llama (real SmolLM2: test_workflow_e2e)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from qes.checkpoint import load_quantized
from qes.evaluate import evaluate_heldout
from qes.generation import (
    GenerationConfig,
    common_prefix_length,
    generated_lengths,
    make_batch,
    quant_linear_names,
    require_quantized,
    score,
)
from qes.tasks.countdown import CountdownConfig, PromptStyle, build_prompt, generate_split

TASK = CountdownConfig(
    num_count_min=2,
    num_count_max=3,
    number_min=1,
    number_max=10,
    target_min=1,
    target_max=20,
    train_size=0,
    eval_size=6,
    seed=1,
)


def _batch(tokenizer, n: int = 6, style: PromptStyle | None = None):
    style = style or PromptStyle()
    problems = generate_split(TASK, "eval")[:n]
    prompts = [build_prompt(tokenizer, p, style) for p in problems]
    return make_batch(tokenizer, problems, prompts, style.assistant_prefix)


@pytest.fixture(scope="module")
def tiny_model(tiny_gptq):
    return load_quantized(tiny_gptq(4))


def test_generated_lengths():
    new = torch.tensor([[5, 6, 2, 0], [2, 0, 0, 0], [5, 6, 7, 8]])
    assert generated_lengths(new, eos_token_id=2) == [3, 1, 4]
    # a row stopped at a stop string is padded (pad 0 here), not ended by EOS
    stopped = torch.tensor([[5, 6, 0, 0], [5, 2, 0, 0], [5, 6, 7, 8]])
    assert generated_lengths(stopped, eos_token_id=2, pad_token_id=0) == [2, 2, 4]


def test_prompt_batch_left_padding(tiny_model):
    _, tokenizer = tiny_model
    batch = _batch(tokenizer)
    lengths = [len(t) for t in batch.token_ids]
    assert len(set(lengths)) > 1, "problems should give prompts of different lengths"
    for chunk in batch.chunks(4):
        assert chunk.prefix_len == 0
        ids, mask = chunk.input_ids, chunk.attention_mask
        for j, i in enumerate(range(chunk.rows.start, chunk.rows.stop)):
            n = lengths[i]
            assert ids[j, -n:].tolist() == list(batch.token_ids[i])
            assert mask[j].tolist() == [0] * (ids.shape[1] - n) + [1] * n
            assert (ids[j, : ids.shape[1] - n] == batch.pad_token_id).all()


def test_prompt_batch_shared_prefix_layout(tiny_model):
    _, tokenizer = tiny_model
    batch = _batch(tokenizer)
    for chunk in batch.chunks(4, share_prefix=True):
        rows = batch.token_ids[chunk.rows]
        p = chunk.prefix_len
        assert p == common_prefix_length(rows) and p > 100  # system message and worked examples
        for j, r in enumerate(rows):
            real = chunk.input_ids[j][chunk.attention_mask[j] == 1].tolist()
            assert real == list(r)
            assert chunk.attention_mask[j, :p].all() and chunk.attention_mask[j, -1] == 1
    assert common_prefix_length([(1, 2, 3), (1, 2, 4)]) == 2
    assert common_prefix_length([(1, 2), (1, 2, 3)]) == 1  # every row keeps a token of its own


def test_score_is_quantized_deterministic_and_batch_independent(tiny_model):
    model, tokenizer = tiny_model
    require_quantized(model)
    assert len(quant_linear_names(model)) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    batch = _batch(tokenizer)
    cfg = GenerationConfig(max_new_tokens=12, batch_size=4)
    first = score(model, batch, cfg)
    assert len(first.rewards) == len(first.responses) == len(first.records) == 6
    assert first.mean_reward == pytest.approx(sum(first.rewards) / 6)
    assert 6 <= first.generated_tokens <= 6 * 12 and first.seconds > 0
    again = score(model, batch, cfg)
    assert again.responses == first.responses
    one_by_one = score(model, batch, GenerationConfig(max_new_tokens=12, batch_size=1))
    assert one_by_one.responses == first.responses, "left padding must not change greedy outputs"
    unshared = score(model, batch, GenerationConfig(max_new_tokens=12, batch_size=4, share_prefix=False))
    assert unshared.responses == first.responses, "sharing the prompt prefix must not change greedy outputs"


def test_float_model_is_refused(tiny_float_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_float_dir)
    with pytest.raises(ValueError, match="no GPTQ quantized linear layers"):
        require_quantized(model)


def test_evaluate_heldout_writes_files(tiny_model, tmp_path):
    model, tokenizer = tiny_model
    batch = _batch(tokenizer, n=3)
    metrics = evaluate_heldout(
        model,
        batch,
        GenerationConfig(max_new_tokens=8, batch_size=2),
        tmp_path / "metrics.json",
        tmp_path / "examples.parquet",
        extra={"label": "base"},
    )
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert on_disk == metrics
    for key in ("accuracy", "format_rate", "mean_reward", "n", "generation_seconds", "tokens_per_second"):
        assert key in on_disk
    assert on_disk["n"] == 3 and on_disk["label"] == "base"
    table = pq.read_table(tmp_path / "examples.parquet").to_pylist()
    assert [r["id"] for r in table] == [p.id for p in batch.rows]
    assert {"prompt", "response", "reward", "format_ok", "correct", "reason"} <= set(table[0])
