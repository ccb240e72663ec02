"""Replay snapshots: a later point starts from a verified snapshot and reaches the same codes as from the base."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch
from _synthetic_run import CFG, fitness_of

from qes.checkpoint import load_quantized
from qes.codes import quantized_linears
from qes.identity import codes_sha256
from qes.replay import replay_steps
from qes.replaystate import engine_at, save_snapshot
from qes.seedlog import SeedLog
from qes.train import train
from qes.update import UpdateConfig


@pytest.fixture(scope="module", params=["replay", "none", "stored"])
def run(request, tiny_gptq, tmp_path_factory) -> tuple[Path, Path, str]:
    """A finished 6-iteration run (checkpoints after 2, 4 and 6) in one residual mode: (base, log, final hash)."""
    torch.set_num_threads(1)
    base = tiny_gptq(4)
    cfg = dataclasses.replace(CFG, update=UpdateConfig(mode=request.param, window=3))
    run_dir = tmp_path_factory.mktemp(f"run-{request.param}")
    model, _ = load_quantized(base, backend="dense")
    final = train(model, quantized_linears(model), fitness_of(model), cfg, run_dir)
    return base, run_dir, final


def _replay(base: Path, run_dir: Path, stop: int, states: Path | None) -> tuple[torch.nn.Module, int, str]:
    seedlog = SeedLog.open(run_dir)
    model, _ = load_quantized(base, backend="dense")
    engine, start = engine_at(model, seedlog, stop, states)
    replay_steps(engine, seedlog, start=start, stop=stop)
    return model, start, engine.codes_sha256()


def test_a_later_point_starts_from_the_snapshot_and_reaches_the_logged_codes(run, tmp_path) -> None:
    base, run_dir, final = run
    seedlog = SeedLog.open(run_dir)
    model, start, at_4 = _replay(base, run_dir, 4, tmp_path)
    assert start == 0 and at_4 == seedlog.records[3].checkpoint
    saved = save_snapshot(tmp_path, seedlog, 4, model)
    assert saved == tmp_path / f"{seedlog.records[3].record_sha256}.safetensors"
    # the snapshot's own iteration is scored from it in every mode
    _, start, again = _replay(base, run_dir, 4, tmp_path)
    assert (start, again) == (4, at_4)
    _, start, at_6 = _replay(base, run_dir, 6, tmp_path)
    if seedlog.update.mode == "stored":  # its residual is state the snapshot does not hold
        assert (start, at_6) == (0, final)
        return
    # seed replay needs the window before iteration 4 back in the engine's history to get this right
    assert (start, at_6) == (4, final)


def test_the_finetune_stage_leaves_its_final_codes(run, tmp_path) -> None:
    """What the finetune stage saves after its last iteration serves the run's last point in every mode."""
    base, run_dir, final = run
    seedlog = SeedLog.open(run_dir)
    model, _ = load_quantized(base, backend="dense")
    engine, _ = engine_at(model, seedlog, 6, None)
    replay_steps(engine, seedlog, stop=6)
    assert save_snapshot(tmp_path, seedlog, 6, model) is not None
    fresh, _ = load_quantized(base, backend="dense")
    engine, start = engine_at(fresh, seedlog, 6, tmp_path)
    assert (start, engine.codes_sha256(), codes_sha256(fresh)) == (6, final, final)


def test_only_checked_iterations_are_kept_and_older_snapshots_go(run, tmp_path) -> None:
    base, run_dir, _ = run
    seedlog = SeedLog.open(run_dir)
    model, _, _ = _replay(base, run_dir, 3, None)
    assert save_snapshot(tmp_path, seedlog, 3, model) is None  # no hash in the log after iteration 3
    model, _, _ = _replay(base, run_dir, 2, None)
    first = save_snapshot(tmp_path, seedlog, 2, model)
    model, _, _ = _replay(base, run_dir, 4, tmp_path)
    second = save_snapshot(tmp_path, seedlog, 4, model)
    assert not first.exists() and sorted(tmp_path.iterdir()) == [second]
    with pytest.raises(ValueError, match="not those the log holds after iteration 6"):
        save_snapshot(tmp_path, seedlog, 6, model)


def test_a_snapshot_with_other_codes_is_ignored(run, tmp_path, caplog) -> None:
    base, run_dir, _ = run
    seedlog = SeedLog.open(run_dir)
    model, _, _ = _replay(base, run_dir, 4, None)
    path = save_snapshot(tmp_path, seedlog, 4, model)
    # the same file name holding the codes after iteration 2: a snapshot that lies about its place
    model, _, _ = _replay(base, run_dir, 2, None)
    from safetensors.torch import save_file

    layers = quantized_linears(model)
    save_file({x.name: x.qweight.clone() for x in layers}, str(path),
              metadata={"format": "qes-replay-state/1"})
    with caplog.at_level(logging.WARNING):
        fresh, _ = load_quantized(base, backend="dense")
        base_codes = codes_sha256(fresh)
        engine, start = engine_at(fresh, seedlog, 4, tmp_path)
    assert start == 0 and codes_sha256(fresh) == base_codes
    assert f"ignoring replay snapshot {path}" in caplog.text and "the log holds" in caplog.text
    replay_steps(engine, seedlog, stop=4)
    assert engine.codes_sha256() == seedlog.records[3].checkpoint


def test_continuing_a_run_starts_from_its_final_snapshot_where_the_codes_are_its_state(run, tmp_path,
                                                                                       caplog) -> None:
    """Two more iterations from the finished run's final snapshot log exactly what they log from the base.

    The continuation scores members through the forward caches, so a cache left stale by the loaded
    snapshot would change the rewards, the steps and the hashes."""
    import shutil

    base, run_dir, final = run
    more = dataclasses.replace(CFG, iterations=8, update=SeedLog.open(run_dir).update)
    logs = {}
    for name, states in (("from-base", None), ("from-snapshot", tmp_path / "states")):
        shutil.copytree(run_dir, tmp_path / name)
        model, _ = load_quantized(base, backend="dense")
        if states is not None:
            engine, _ = engine_at(model, SeedLog.open(run_dir), 6, None)
            replay_steps(engine, SeedLog.open(run_dir), stop=6)
            save_snapshot(states, SeedLog.open(run_dir), 6, model)
            model, _ = load_quantized(base, backend="dense")
        caplog.clear()
        with caplog.at_level(logging.INFO):
            logs[name] = train(model, quantized_linears(model), fitness_of(model), more, tmp_path / name,
                               state_dir=states)
        resumed = "from the replay snapshot after iteration 6" in caplog.text
        replayed = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming"))
        if states is not None and more.update.mode != "stored":
            assert resumed and replayed.endswith("replaying 0 of 6 logged iterations")
        else:  # a stored residual is state the snapshot does not hold
            assert not resumed and replayed.endswith("replaying 6 of 6 logged iterations")
    assert logs["from-snapshot"] == logs["from-base"] != final
    records = [[r.record_sha256 for r in SeedLog.open(tmp_path / name).records] for name in logs]
    assert records[0] == records[1] and len(records[0]) == 8
