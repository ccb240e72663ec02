"""A real in-process QES run on the tiny GPTQ model, exact replay from its log, and refused corruptions."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from qes.checkpoint import load_quantized
from qes.codes import quantized_linears
from qes.hparams import TrainConfig
from qes.identity import codes_sha256
from qes.replay import engine_for_log, replay_checkpoint, replay_steps
from qes.seedlog import SeedLog, SeedLogError
from qes.train import train
from qes.update import UpdateConfig, shape_rewards

PROMPT = torch.tensor([[1, 5, 9, 12, 40, 77, 100, 3, 3]])


def synthetic_fitness(model):
    """A smooth, code-dependent score: the mean log-probability of a fixed continuation."""

    def fitness(t: int) -> float:
        with torch.no_grad():
            logits = model(PROMPT).logits.float()
        target = PROMPT[0, 1:]
        logp = torch.log_softmax(logits[0, :-1], -1).gather(1, target[:, None])
        return float(logp.mean()) + 0.01 * (t % 3)

    return fitness


CFG = TrainConfig(
    iterations=6,
    population=6,
    sigma=0.3,
    alpha=0.2,
    global_seed=7,
    checkpoint_every=2,
    update=UpdateConfig(mode="replay", window=3),
)


def _train(base: Path, run_dir: Path, cfg: TrainConfig = CFG) -> str:
    model, _ = load_quantized(base)
    return train(model, quantized_linears(model), synthetic_fitness(model), cfg, run_dir)


@pytest.fixture(scope="module")
def finished_run(tiny_gptq, tmp_path_factory) -> tuple[Path, Path, str]:
    base = tiny_gptq(4)
    run_dir = tmp_path_factory.mktemp("run") / "log"
    final = _train(base, run_dir)
    return base, run_dir, final


def test_run_changes_codes_and_replay_is_exact(finished_run, tmp_path) -> None:
    base, run_dir, final = finished_run
    model, _ = load_quantized(base)
    assert final != codes_sha256(model)
    seedlog = SeedLog.open(run_dir)
    assert seedlog.iterations == 6
    assert seedlog.finished == {
        "iterations": 6, "codes_sha256": final, "run_sha256": seedlog.run_sha256, "last_record_sha256": seedlog.head,
    }
    assert seedlog.meta["base"]["parts"]["codes"] == seedlog.meta["base_codes_sha256"] == codes_sha256(model)
    report = replay_checkpoint(base, run_dir, tmp_path / "tuned")
    assert report["codes_sha256"] == final
    reloaded, _ = load_quantized(tmp_path / "tuned")
    assert codes_sha256(reloaded) == final
    assert seedlog.bytes_per_iteration() < 1024
    assert [s.checkpoint is not None for s in seedlog.steps()] == [False, True] * 3
    metrics = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    assert [m["iteration"] for m in metrics] == list(range(6))
    assert any(m["changed"] > 0 for m in metrics)


def test_stored_mode_run_replays_exactly(tiny_gptq, tmp_path) -> None:
    cfg = TrainConfig(**{**CFG.__dict__, "update": UpdateConfig(mode="stored", gamma=0.9)})
    final = _train(tiny_gptq(4), tmp_path / "log", cfg)
    assert replay_checkpoint(tiny_gptq(4), tmp_path / "log", tmp_path / "out")["codes_sha256"] == final


def test_finished_run_is_not_redone_and_config_change_refused(finished_run, tmp_path) -> None:
    base, run_dir, final = finished_run
    copy = tmp_path / "log"
    shutil.copytree(run_dir, copy)
    assert _train(base, copy) == final
    with pytest.raises(SeedLogError, match="different 'train'"):
        _train(base, copy, TrainConfig(**{**CFG.__dict__, "alpha": 0.3}))


def test_resume_after_truncation_gives_identical_log(finished_run, tmp_path) -> None:
    base, run_dir, final = finished_run
    copy = tmp_path / "log"
    shutil.copytree(run_dir, copy)
    for name in ("it-00000004.parquet", "it-00000005.parquet"):
        (copy / "steps" / name).unlink()
    (copy / "final.json").unlink()
    (copy / "steps" / ".tmp-it-00000004.parquet").write_bytes(b"half-written")
    assert _train(base, copy) == final
    for name in sorted(p.name for p in (run_dir / "steps").iterdir()):
        a = pq.read_table(run_dir / "steps" / name)
        b = pq.read_table(copy / "steps" / name)
        assert a.equals(b), name
    assert not list((copy / "steps").glob(".tmp-*"))


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "log"
    shutil.copytree(run_dir, copy)
    return copy


def _replay(base: Path, copy: Path) -> None:
    model, _ = load_quantized(base)
    seedlog = SeedLog.open(copy)
    replay_steps(engine_for_log(model, seedlog), seedlog)


def test_wrong_version_refused(finished_run, tmp_path) -> None:
    base, run_dir, _ = finished_run
    copy = _copy(run_dir, tmp_path)
    meta = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**meta, "version": 99}))
    with pytest.raises(SeedLogError, match="format version 99; this qes reads version 2 only"):
        SeedLog.open(copy)


def test_gap_in_iterations_refused(finished_run, tmp_path) -> None:
    copy = _copy(finished_run[1], tmp_path)
    (copy / "steps" / "it-00000002.parquet").unlink()
    with pytest.raises(SeedLogError, match="not contiguous: expected iteration 2, found it-00000003.parquet"):
        SeedLog.open(copy)


def test_truncated_file_refused(finished_run, tmp_path) -> None:
    base, run_dir, _ = finished_run
    copy = _copy(run_dir, tmp_path)
    path = copy / "steps" / "it-00000003.parquet"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(SeedLogError, match="it-00000003.parquet is truncated or corrupted"):
        _replay(base, copy)


def test_other_base_refused(finished_run, tiny_gptq, tmp_path) -> None:
    _, run_dir, _ = finished_run
    with pytest.raises(SeedLogError, match="base checkpoint mismatch"):
        _replay(tiny_gptq(4, 64), _copy(run_dir, tmp_path))


def test_shaping() -> None:
    z = shape_rewards([1.0, 0.0, 0.0, 0.0, 0.5, 0.5], "pair_zscore", 3.0)
    # pair differences 1, 0, 0 -> mean 1/3, std sqrt(2)/3 -> z = sqrt(2), -1/sqrt(2), -1/sqrt(2)
    assert z[0] == pytest.approx(2**0.5 / 2) and z[1] == pytest.approx(-(2**0.5) / 2)
    assert z[2] == pytest.approx(-0.5 / 2**0.5) and sum(z) == pytest.approx(0.0)
    assert shape_rewards([0.2] * 4, "pair_zscore", 3.0) == [0.0] * 4
    assert shape_rewards([3.0, 1.0, 2.0, 2.0], "centered_rank", 3.0) == [0.5, -0.5, 0.0, 0.0]


def test_finished_run_continues_to_more_iterations(finished_run, tmp_path) -> None:
    """With a constant step size a finished run grows: the result equals a run planned that long from the start."""
    base, run_dir, final = finished_run
    copy = _copy(run_dir, tmp_path)
    longer = TrainConfig(**{**CFG.__dict__, "iterations": 8})
    extended = _train(base, copy, longer)
    fresh = _train(base, tmp_path / "fresh", longer)
    assert extended == fresh != final
    grown, planned = SeedLog.open(copy), SeedLog.open(tmp_path / "fresh")
    assert grown.finished["iterations"] == 8 and grown.records[5].checkpoint == final  # the old end stays checked
    assert [(r.step, r.checkpoint) for r in grown.records] == [(r.step, r.checkpoint) for r in planned.records]
    for t in range(6):  # what was logged before is kept byte for byte
        name = f"it-{t:08d}.parquet"
        assert (copy / "steps" / name).read_bytes() == (run_dir / "steps" / name).read_bytes()
    assert replay_checkpoint(base, copy, tmp_path / "out")["codes_sha256"] == extended
    assert _train(base, copy, CFG) == extended  # asking for fewer iterations leaves the longer run as it is


def test_cosine_run_cannot_be_continued(tiny_gptq, tmp_path) -> None:
    cosine = TrainConfig(**{**CFG.__dict__, "iterations": 3, "alpha_decay": "cosine"})
    _train(tiny_gptq(4), tmp_path / "log", cosine)
    with pytest.raises(SeedLogError, match="different 'train'"):
        _train(tiny_gptq(4), tmp_path / "log", TrainConfig(**{**cosine.__dict__, "iterations": 4}))
