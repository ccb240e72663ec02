"""Member-batched fitness on the tiny GPTQ model: batched logits, the member decoder against transformers'
generate, grouped scoring against member-by-member scoring, a member-batched run that replays exactly, and the
recorded fitness path (the real SmolLM2: test_workflow_e2e)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from qes.checkpoint import load_quantized
from qes.codes import quantized_linears
from qes.engine import Engine
from qes.generation import GenerationConfig, make_batch, score, score_group
from qes.hparams import FinetuneConfig, TrainConfig, resolve_member_batch
from qes.identity import codes_sha256
from qes.members import MemberGroup
from qes.noise import NoiseSpec, member_seeds
from qes.replay import engine_for_log, replay_steps
from qes.runrecord import check_resumable, refuse_other_config
from qes.seedlog import SeedLog, SeedLogError
from qes.tasks.countdown import CountdownConfig, PromptStyle, build_prompt, generate_split
from qes.train import train
from qes.update import UpdateConfig

PROMPTS = torch.tensor([[1, 5, 9, 12, 40, 77, 100, 3, 3], [1, 7, 8, 30, 31, 32, 33, 34, 35]])
MEMBERS = [(s, sign) for s in member_seeds(3, 0, 2) for sign in (1, -1)]
TASK = CountdownConfig(num_count_min=2, num_count_max=3, number_min=1, number_max=10, target_min=1, target_max=20,
                       train_size=0, eval_size=6, seed=1)


def _model(path: Path, backend: str = "auto"):
    model, tokenizer = load_quantized(path, dtype="float32", backend=backend)
    # a large sigma, so that every member's model differs visibly from the base
    return model, tokenizer, Engine(quantized_linears(model), NoiseSpec.from_sigma(0.5), UpdateConfig())


def _batch(tokenizer, n: int = 6):
    style = PromptStyle()
    problems = generate_split(TASK, "eval")[:n]
    prompts = [build_prompt(tokenizer, p, style) for p in problems]
    return make_batch(tokenizer, problems, prompts, style.assistant_prefix)


@pytest.mark.parametrize("backend", ["dense", "auto"])
def test_batched_logits_equal_member_by_member(tiny_gptq_dir, backend):
    model, _, engine = _model(tiny_gptq_dir, backend)
    before = codes_sha256(model)
    expected = []
    for seed, sign in MEMBERS:
        p = engine.perturb(seed, sign)
        with torch.no_grad():
            expected.append(model(PROMPTS).logits)
        engine.restore(p)
    base = model(PROMPTS).logits.detach()
    group = MemberGroup(engine, MEMBERS, torch.float32)
    with group.together(), torch.no_grad():
        got = model(PROMPTS.repeat(len(MEMBERS), 1)).logits
    expected = torch.cat(expected)
    scale = expected.abs().max()
    assert float((got - expected).abs().max() / scale) < 1e-5
    assert float((expected - base.repeat(len(MEMBERS), 1, 1)).abs().max() / scale) > 1e-2  # members differ
    assert codes_sha256(model) == before  # together() never touches the codes
    with torch.no_grad():
        assert torch.equal(model(PROMPTS).logits, base)  # and leaves no correction behind


def test_member_decoder_matches_transformers_generate(tiny_gptq):
    model, tokenizer, _ = _model(tiny_gptq(4))
    batch = _batch(tokenizer)
    cfg = GenerationConfig(max_new_tokens=12, batch_size=4)
    member = score(model, batch, cfg)
    row = score(model, batch, replace(cfg, prefix_cache="row"))
    plain = score(model, batch, replace(cfg, share_prefix=False))  # no shared prefix: every token per row
    assert member.responses == row.responses == plain.responses
    assert member.rewards == row.rewards


def test_group_scores_equal_member_by_member(tiny_gptq):
    model, tokenizer, engine = _model(tiny_gptq(4))
    batch = _batch(tokenizer)
    cfg = GenerationConfig(max_new_tokens=12, batch_size=6)
    alone = []
    for seed, sign in MEMBERS:
        p = engine.perturb(seed, sign)
        alone.append(score(model, batch, cfg))
        engine.restore(p)
    group = MemberGroup(engine, MEMBERS, torch.float32)
    together = score_group(model, batch, cfg, group)
    assert [r.responses for r in together] == [r.responses for r in alone]
    assert [r.generated_tokens for r in together] == [r.generated_tokens for r in alone]
    assert len({tuple(r.responses) for r in alone}) > 1  # the members really generate differently
    assert group.boundary_hits > 0 and group.seconds > 0


def test_prefix_cache_row_scores_one_member_only(tiny_gptq):
    model, tokenizer, engine = _model(tiny_gptq(4))
    with pytest.raises(ValueError, match="prefix_cache: member"):
        score_group(model, _batch(tokenizer), GenerationConfig(prefix_cache="row"), MemberGroup(engine, MEMBERS, None))
    with pytest.raises(ValueError, match="prefix_cache"):
        GenerationConfig(prefix_cache="shared")


def _logp_fitness(model):
    def rewards(rows: int) -> list[float]:
        with torch.no_grad():
            logits = model(PROMPTS[:1].repeat(rows, 1)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(2, PROMPTS[:1, 1:, None].expand(rows, -1, 1))
        return [float(x) for x in logp.mean(dim=(1, 2)).exp()]

    return (lambda t: rewards(1)[0]), (lambda t, group: _in_group(group, rewards))


def _in_group(group: MemberGroup, rewards) -> list[float]:
    with group.together():
        return rewards(group.size)


CFG = TrainConfig(iterations=4, population=8, sigma=0.3, alpha=0.2, global_seed=5, checkpoint_every=2,
                  update=UpdateConfig(mode="replay", window=3))


def test_member_batched_run_replays_to_its_hash(tiny_gptq, tmp_path):
    base = tiny_gptq(4)
    finals = {}
    for batch_size in (1, 4):
        model, _ = load_quantized(base, dtype="float32")
        fitness, group_fitness = _logp_fitness(model)
        finals[batch_size] = train(model, quantized_linears(model), fitness, CFG, tmp_path / f"mb{batch_size}",
                                   group_fitness=group_fitness, member_batch=batch_size)
    fresh, _ = load_quantized(base, backend="none")
    seedlog = SeedLog.open(tmp_path / "mb4")
    engine = engine_for_log(fresh, seedlog)
    replay_steps(engine, seedlog)
    assert engine.codes_sha256() == finals[4] == seedlog.finished["codes_sha256"]
    assert finals[4] != seedlog.meta["base_codes_sha256"]
    # iteration 0 starts from the same codes: the same rewards up to float rounding
    first = [pq.read_table(tmp_path / f"mb{b}" / "steps" / "it-00000000.parquet").column("reward").to_pylist()
             for b in (1, 4)]
    assert first[0] == pytest.approx(first[1], rel=1e-5)
    metrics = pq.read_table(tmp_path / "mb4" / "metrics.parquet").to_pylist()
    assert all(r["perturb_boundary_hits"] >= 0 and r["seconds_perturb_restore"] > 0 for r in metrics)


def test_member_batch_resolution():
    cfg = FinetuneConfig()
    assert resolve_member_batch(cfg, "cpu", 8) == 4
    assert resolve_member_batch(cfg, "cuda", 8) == 8
    assert resolve_member_batch(replace(cfg, member_batch=16), "cpu", 8) == 8
    assert resolve_member_batch(replace(cfg, prefix_cache="row"), "cuda", 8) == 1
    with pytest.raises(Exception, match="prefix_cache member"):
        resolve_member_batch(replace(cfg, prefix_cache="row", member_batch=4), "cpu", 8)
    with pytest.raises(Exception, match="finetune.decode: compiled needs prefix_cache member"):
        replace(cfg, prefix_cache="row", decode="compiled")
    with pytest.raises(Exception, match="decode"):
        replace(cfg, decode="graph")
    with pytest.raises(ValueError, match="decode compiled needs prefix_cache member"):
        GenerationConfig(prefix_cache="row", decode="compiled")


def test_resume_refuses_another_fitness_path(tiny_gptq, tmp_path):
    base = tiny_gptq(4)
    run_dir = tmp_path / "run"
    model, _ = load_quantized(base, dtype="float32")
    fitness, _ = _logp_fitness(model)
    cfg = FinetuneConfig(train=replace(CFG, iterations=1), member_batch=1)
    extra = {"base_checkpoint": str(base), "task_data": "train.parquet", "batch_prompts": cfg.batch_prompts,
             "max_new_tokens": cfg.max_new_tokens, "fitness": cfg.fitness_path()}
    train(model, quantized_linears(model), fitness, cfg.train, run_dir, extra)
    recorded = json.loads((run_dir / "run.json").read_text())["fitness"]
    assert recorded == {"member_batch": 1, "prefix_cache": "member", "decode": "eager"}
    block = {**cfg.to_block(), "iterations": 2}
    check_resumable(run_dir, block, base, "train.parquet")  # the same path: fine
    for change in ({"member_batch": 4}, {"prefix_cache": "row", "decode": "eager"}, {"decode": "compiled"}):
        with pytest.raises(SeedLogError, match="different 'fitness'.*allow_fitness_change"):
            check_resumable(run_dir, {**block, **change}, base, "train.parquet")
        check_resumable(run_dir, {**block, **change, "allow_fitness_change": True}, base, "train.parquet")
    fresh, _ = load_quantized(base, dtype="float32")
    with pytest.raises(SeedLogError, match="different 'fitness'"):
        train(fresh, quantized_linears(fresh), fitness, replace(cfg.train, iterations=2), run_dir,
              {**extra, "fitness": {"member_batch": 4, "prefix_cache": "member"}})


def test_fitness_path_recorded_before_decode_resumes_eager(tmp_path):
    """run.json written before the decode steps could be compiled records two keys: those runs decoded eagerly."""
    meta = {"max_new_tokens": 48, "fitness": {"member_batch": "auto", "prefix_cache": "member"}}
    refuse_other_config(tmp_path, meta, {**meta, "fitness": {**meta["fitness"], "decode": "eager"}})
    with pytest.raises(SeedLogError, match=r"different 'fitness'.*'decode': 'compiled'"):
        refuse_other_config(tmp_path, meta, {**meta, "fitness": {**meta["fitness"], "decode": "compiled"}})


def test_log_without_fitness_path_resumes_on_the_row_path(repo_root):
    """A seed log written before run.json recorded the fitness path was scored one member at a time by
    transformers' generate; resuming it asks for that path (or allow_fitness_change)."""
    run_dir = repo_root / "tests/data/logs/pilot-replay-s0"
    meta = SeedLog.open(run_dir).meta
    assert "fitness" not in meta
    train_block = {k: v for k, v in meta["train"].items() if k != "update"}
    update = meta["update"]
    residual = {"mode": update["mode"], "gamma": update["gamma"], "window": update["window"],
                "clamp": update["residual_clamp"]}
    block = {**train_block, "residual": residual, "batch_prompts": 16, "max_new_tokens": 48}
    args = (meta["base_checkpoint"], meta["task_data"])
    logged = r"\{'member_batch': 1, 'prefix_cache': 'row', 'decode': 'eager'\}"
    with pytest.raises(SeedLogError, match=r"different 'fitness' \(log: " + logged):
        check_resumable(run_dir, block, *args)
    check_resumable(run_dir, {**block, "member_batch": 1, "prefix_cache": "row"}, *args)
    check_resumable(run_dir, {**block, "allow_fitness_change": True}, *args)
