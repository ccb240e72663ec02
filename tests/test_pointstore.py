"""Committed curve points: reused only when scored from the same inputs, scored again otherwise."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from _synthetic_run import CFG, fitness_of

import qes.evaluate
from qes.checkpoint import load_quantized
from qes.codes import quantized_linears
from qes.evaluate import EvaluateConfig
from qes.experiments import score_point
from qes.pointstore import check_provenance, data_sha256, publish_points
from qes.seedlog import SeedLog
from qes.tasks import make_task_data
from qes.train import train

EVALUATE = EvaluateConfig(max_new_tokens=6, batch_size=4, limit=4, backend="dense", dtype="float32")


@pytest.fixture(scope="module")
def setup(tiny_gptq, tiny_float_dir, tmp_path_factory) -> tuple[Path, Path, Path]:
    """(base, a finished 6-iteration seed-replay run, a held-out file of 4 Countdown problems)."""
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    base = tiny_gptq(4)
    folder = tmp_path_factory.mktemp("points")
    model, _ = load_quantized(base, backend="dense")
    train(model, quantized_linears(model), fitness_of(model), CFG, folder / "run")
    tokenizer = AutoTokenizer.from_pretrained(tiny_float_dir)
    make_task_data({"name": "countdown", "train_size": 4, "eval_size": 4}, tokenizer, folder / "train.parquet",
                   folder / "eval.parquet")
    return base, folder / "run", folder / "eval.parquet"


def _score(setup, out: Path, committed: Path | None, iteration: int = 4, cfg: EvaluateConfig = EVALUATE) -> dict:
    base, run, data = setup
    out.mkdir(parents=True, exist_ok=True)
    return score_point(base, run, iteration, data, cfg, out / f"it-{iteration}.json",
                       out / f"it-{iteration}_examples.parquet", committed=committed)


def _refuse_scoring(monkeypatch) -> None:
    def fail(*args, **kwargs):
        raise AssertionError("the point was scored although a committed copy matched")

    monkeypatch.setattr(qes.evaluate, "evaluate_loaded", fail)


def test_a_published_point_is_reused_with_its_examples(setup, tmp_path, monkeypatch, caplog) -> None:
    first = _score(setup, tmp_path / "a", None)
    assert first["key"]["parts"]["record"] == SeedLog.open(setup[1]).records[3].record_sha256
    publish_points({("exp-replay-s0", 4): tmp_path / "a" / "it-4.json"}, tmp_path / "report")
    committed = tmp_path / "report" / "exp-replay-s0"
    assert sorted(p.name for p in committed.iterdir()) == ["it-4.json", "it-4_examples.parquet"]

    _refuse_scoring(monkeypatch)
    with caplog.at_level(logging.INFO, logger="qes.pointstore"):
        again = _score(setup, tmp_path / "b", committed)
    assert again == first and "reused" in caplog.text
    assert (tmp_path / "b" / "it-4.json").read_bytes() == (tmp_path / "a" / "it-4.json").read_bytes()
    examples = [pq.read_table(tmp_path / d / "it-4_examples.parquet").to_pylist() for d in ("a", "b")]
    assert examples[0] == examples[1] and len(examples[0]) == 4


def test_a_point_kept_for_a_log_serves_the_same_records_in_another_folder(setup, tmp_path, monkeypatch) -> None:
    import shutil

    base, run, data = setup
    _score(setup, tmp_path / "a", None)
    publish_points({("exp-replay-s0", 4): tmp_path / "a" / "it-4.json"}, tmp_path / "report")
    moved = tmp_path / "moved" / "exp-replay-s0"  # log_dir changed: the same records, another folder
    shutil.copytree(run, moved)

    (tmp_path / "b").mkdir()
    _refuse_scoring(monkeypatch)
    point = score_point(base, moved, 4, data, EVALUATE, tmp_path / "b" / "it-4.json",
                        tmp_path / "b" / "it-4_examples.parquet", committed=tmp_path / "report" / "exp-replay-s0")
    assert point["seed_log"] == str(moved)
    check_provenance({("exp-replay-s0", 4): tmp_path / "b" / "it-4.json"}, {"exp-replay-s0": moved}, data)


def test_publishing_leaves_no_partial_file_and_keeps_other_points(setup, tmp_path) -> None:
    _score(setup, tmp_path / "a", None)
    report = tmp_path / "report"
    (report / "other-run").mkdir(parents=True)
    (report / "other-run" / "it-9.json").write_text("{}")
    publish_points({("run", 4): tmp_path / "a" / "it-4.json"}, report)
    assert sorted(str(p.relative_to(report)) for p in report.rglob("*") if p.is_file()) == [
        "other-run/it-9.json", "run/it-4.json", "run/it-4_examples.parquet"]
    assert (report / "run" / "it-4.json").read_bytes() == (tmp_path / "a" / "it-4.json").read_bytes()


def test_a_point_is_keyed_by_the_backend_that_ran_not_the_one_asked_for(setup, tmp_path, monkeypatch) -> None:
    auto = _score(setup, tmp_path / "a", None, cfg=dataclasses.replace(EVALUATE, backend="auto"))
    ran = auto["key"]["parts"]["compute"]["backends"]
    assert "backend" not in auto["key"]["parts"]["evaluate"] and len(ran) == 1
    publish_points({("run", 4): tmp_path / "a" / "it-4.json"}, tmp_path / "report")

    _refuse_scoring(monkeypatch)
    pinned = _score(setup, tmp_path / "b", tmp_path / "report" / "run",
                    cfg=dataclasses.replace(EVALUATE, backend=next(iter(ran))))
    assert pinned == auto


def test_other_inputs_are_scored_again(setup, tmp_path, monkeypatch, caplog) -> None:
    _score(setup, tmp_path / "a", None)
    publish_points({("run", 4): tmp_path / "a" / "it-4.json"}, tmp_path / "report")
    committed = tmp_path / "report" / "run"
    scored: list[str] = []
    real = qes.evaluate.evaluate_loaded

    def counting(model, tokenizer, name, *args):
        scored.append(name)
        return real(model, tokenizer, name, *args)

    monkeypatch.setattr(qes.evaluate, "evaluate_loaded", counting)
    shorter = dataclasses.replace(EVALUATE, max_new_tokens=5)
    with caplog.at_level(logging.INFO, logger="qes.pointstore"):
        point = _score(setup, tmp_path / "b", committed, cfg=shorter)
    assert scored and point["key"]["parts"]["evaluate"]["max_new_tokens"] == 5
    assert "(evaluate differ)" in caplog.text

    # a committed point from another log record (here: another iteration's file under this name)
    (committed / "it-4.json").rename(committed / "it-2.json")
    (committed / "it-4_examples.parquet").rename(committed / "it-2_examples.parquet")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qes.pointstore"):
        point = _score(setup, tmp_path / "c", committed, iteration=2)
    assert len(scored) == 2 and "(record differ)" in caplog.text
    assert point["iteration"] == 2


def test_the_data_hash_reads_rows_and_task_not_bytes(setup, tmp_path) -> None:
    data = setup[2]
    table = pq.read_table(data)
    pq.write_table(table, tmp_path / "same.parquet", compression="none", row_group_size=1)
    assert (tmp_path / "same.parquet").read_bytes() != data.read_bytes()
    assert data_sha256(tmp_path / "same.parquet") == data_sha256(data)
    pq.write_table(table.slice(0, 3), tmp_path / "fewer.parquet")
    assert data_sha256(tmp_path / "fewer.parquet") != data_sha256(data)


def test_the_summary_refuses_a_point_scored_from_another_log_or_data(setup, tmp_path) -> None:
    import json
    import shutil

    base, run, data = setup
    _score(setup, tmp_path / "points", None)
    point = tmp_path / "points" / "it-4.json"
    check_provenance({("exp-replay-s0", 4): point}, {"exp-replay-s0": run}, data)

    other_log = tmp_path / "other" / "exp-replay-s0"  # the same run name in another experiment's folder
    shutil.copytree(run, other_log)
    with pytest.raises(ValueError, match=f"seed log {run}, not {other_log}"):
        check_provenance({("exp-replay-s0", 4): point}, {"exp-replay-s0": other_log}, data)

    other_data = tmp_path / "eval.parquet"
    table = pq.read_table(data)
    pq.write_table(table.slice(0, 3), other_data)
    with pytest.raises(ValueError, match=r"scoring data [0-9a-f]{12}, not [0-9a-f]{12}") as refused:
        check_provenance({("exp-replay-s0", 4): point}, {"exp-replay-s0": run}, other_data)
    assert f"Delete {point.parent} and run again" in str(refused.value)

    earlier = json.loads(point.read_text())  # a point of an earlier run of that name, since restarted
    earlier["key"]["parts"]["record"] = SeedLog.open(run).records[2].record_sha256
    point.write_text(json.dumps(earlier))
    with pytest.raises(ValueError, match=f"another log record at iteration 4 than {run} holds now"):
        check_provenance({("exp-replay-s0", 4): point}, {"exp-replay-s0": run}, data)
