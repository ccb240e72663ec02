"""Every seed-log file that cannot be read or holds a value of the wrong form is refused naming the file and
the key; every finished run's last record carries the final codes hash; replay says whether the point it
wrote was checked against a hash the log holds.

Junk values are planted behind a consistent hash chain (every hash recomputed, as a forger would), so it
is the form check that refuses them, not the chain.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _synthetic_run import CFG, fitness_of
from test_log_integrity import rechain, rewrite_step

from qes.checkpoint import load_quantized
from qes.codes import quantized_linears
from qes.replay import replay_checkpoint
from qes.seedlog import SeedLog, SeedLogError
from qes.train import train

REPO = Path(__file__).resolve().parents[1]


def _train(base: Path, run_dir: Path, cfg=CFG, on_iteration=None) -> str:
    model, _ = load_quantized(base, backend="dense")
    return train(model, quantized_linears(model), fitness_of(model), cfg, run_dir, on_iteration=on_iteration)


@pytest.fixture(scope="module")
def run(tiny_gptq, tmp_path_factory) -> tuple[Path, Path, str]:
    """A finished 6-iteration run with hash checkpoints after iterations 2, 4 and 6."""
    base = tiny_gptq(4)
    run_dir = tmp_path_factory.mktemp("forms") / "log"
    return base, run_dir, _train(base, run_dir)


@pytest.fixture
def log(run, tmp_path) -> Path:
    copy = tmp_path / "log"
    shutil.copytree(run[1], copy)
    return copy


def _qes(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "qes.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def _last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


# --- files that cannot be read ---------------------------------------------------------------------------------


def _loop(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.name)


UNREADABLE = {
    "final.json is a folder": (lambda d: ((d / "final.json").unlink(), (d / "final.json").mkdir()),
                               "{d}/final.json is a folder, not a file (record of the finished run)"),
    "final.json is a link loop": (lambda d: _loop(d / "final.json"),
                                  "{d}/final.json cannot be read (record of the finished run): Too many levels of "
                                  "symbolic links"),
    "final.json is a dangling link": (
        lambda d: ((d / "final.json").unlink(), (d / "final.json").symlink_to(d / "gone.json")),
        "{d}/final.json is a link to {d}/gone.json, which does not exist (record of the finished run)"),
    "run.json is a link loop": (lambda d: _loop(d / "run.json"),
                                "{d}/run.json cannot be read (seed log's run description): Too many levels of "
                                "symbolic links"),
    "a record is a folder": (
        lambda d: ((d / "steps" / "it-00000002.parquet").unlink(), (d / "steps" / "it-00000002.parquet").mkdir()),
        "{d}/steps/it-00000002.parquet is a folder, not a file (step record)"),
    "steps is a link loop": (lambda d: (shutil.rmtree(d / "steps"), (d / "steps").symlink_to("steps")),
                             "{d}/steps is not a folder: the seed log's records cannot be read"),
}


@pytest.mark.parametrize("name", list(UNREADABLE))
def test_unreadable_files_are_refused_by_name(log: Path, name: str) -> None:
    spoil, message = UNREADABLE[name]
    spoil(log)
    with pytest.raises(SeedLogError) as caught:
        SeedLog.open(log)
    assert str(caught.value) == message.format(d=log)


def test_a_final_json_link_loop_is_not_an_unfinished_run(run, log: Path, tmp_path: Path) -> None:
    _loop(log / "final.json")
    for command in (["verify-log", str(log), "--partial"],
                    ["replay", "--base", str(run[0]), "--log", str(log), "--out", str(tmp_path / "out"), "--partial"]):
        result = _qes(*command)
        assert result.returncode == 2
        assert _last_line(result) == (f"qes {command[0]}: error: {log}/final.json cannot be read (record of the "
                                      f"finished run): Too many levels of symbolic links")
    assert not (tmp_path / "out").exists()


# --- values of the wrong form behind a consistent chain --------------------------------------------------------


def _set(*keys_and_value):
    *keys, value = keys_and_value

    def edit(meta: dict) -> None:
        node = meta
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] = value

    return edit


JUNK_RUN = {
    "population NaN": (_set("population", float("nan")), "population is NaN, expected an even integer >= 2"),
    "population a string": (_set("population", "6"), 'population is "6", expected an even integer >= 2'),
    "population odd": (_set("population", 7), "population is 7, expected an even integer >= 2"),
    "global seed a float": (_set("global_seed", 11.5), "global_seed is 11.5, expected an integer >= 0"),
    "global seed true": (_set("global_seed", True), "global_seed is true, expected an integer >= 0"),
    "iterations a string": (_set("train", "iterations", "6"), 'train.iterations is "6", expected an integer >= 1'),
    "sigma NaN": (_set("train", "sigma", float("nan")), "train.sigma is NaN, expected a finite number > 0"),
    "alpha infinite": (_set("train", "alpha", float("inf")), "train.alpha is Infinity, expected a finite number"),
    "window a float": (_set("update", "window", 3.5), "update.window is 3.5, expected an integer >= 0"),
    "noise thresholds": (_set("noise", "count_thresholds", [1, "x"]),
                         'noise.count_thresholds is [1, "x"], expected a list of integers'),
    "base hash": (_set("base_codes_sha256", "x"),
                  'base_codes_sha256 is "x", expected a sha256 (64 lowercase hex digits)'),
    "layers": (_set("layers", [{"name": "a"}]), "layers is [{\"name\": \"a\"}], expected a list of layers, each "
                                                "with a name and integer out, in and bits"),
    "train missing": (lambda meta: meta.pop("train"), "train is missing"),
}


def _rewrite_run_json(log: Path, edit) -> None:
    meta = json.loads((log / "run.json").read_text())
    edit(meta)
    (log / "run.json").write_text(json.dumps(meta, indent=2))
    rechain(log, 0)


@pytest.mark.parametrize("name", list(JUNK_RUN))
def test_junk_in_run_json_is_refused_naming_the_key(log: Path, name: str) -> None:
    edit, message = JUNK_RUN[name]
    if name == "train missing":
        edit(meta := json.loads((log / "run.json").read_text()))
        (log / "run.json").write_text(json.dumps(meta))
        message = "run.json lacks train: not a complete seed log"
    else:
        _rewrite_run_json(log, edit)
        message = f"run.json: {message}"
    with pytest.raises(SeedLogError) as caught:
        SeedLog.open(log)
    assert str(caught.value) == f"{log}/{message}"


def test_verify_log_refuses_junk_in_run_json(log: Path) -> None:
    _rewrite_run_json(log, _set("population", float("nan")))
    result = _qes("verify-log", str(log))
    assert result.returncode == 2
    assert _last_line(result) == (f"qes verify-log: error: {log}/run.json: population is NaN, expected an even "
                                  f"integer >= 2")


@pytest.mark.parametrize(
    ("key", "value"),
    [("codes_sha256", "x"), ("codes_sha256", "A" * 64), ("codes_sha256", 7), ("iterations", float("nan"))],
)
def test_verify_log_checks_the_form_of_every_hash_it_prints(log: Path, key: str, value) -> None:
    final = json.loads((log / "final.json").read_text())
    final[key] = value
    (log / "final.json").write_text(json.dumps(final))
    result = _qes("verify-log", str(log))
    assert result.returncode == 2
    wanted = "a sha256 (64 lowercase hex digits)" if key == "codes_sha256" else "an integer >= 1"
    assert _last_line(result) == (f"qes verify-log: error: {log}/final.json: {key} is {json.dumps(value)}, "
                                  f"expected {wanted}")


def test_a_junk_hash_checkpoint_is_refused_naming_the_record(log: Path) -> None:
    rewrite_step(log, 1, metadata=lambda meta: meta.__setitem__(b"qes.codes_sha256", b"x"))
    rechain(log, 1)
    with pytest.raises(SeedLogError) as caught:
        SeedLog.open(log)
    assert str(caught.value) == (f"{log}/steps/it-00000001.parquet: qes.codes_sha256 is 'x', expected a sha256 "
                                 f"(64 lowercase hex digits)")


def test_final_json_must_agree_with_the_last_checkpoint(log: Path) -> None:
    last = SeedLog.open(log).records[-1].checkpoint
    final = json.loads((log / "final.json").read_text())
    final["codes_sha256"] = "0" * 64
    (log / "final.json").write_text(json.dumps(final))
    result = _qes("verify-log", str(log))
    assert result.returncode == 2
    assert _last_line(result) == (f"qes verify-log: error: {log}/final.json: codes_sha256 is {'0' * 64}, but the "
                                  f"last record's hash checkpoint is {last}")


@pytest.mark.parametrize("mode", ["verify-log", "verify-log --partial", "replay", "replay --partial",
                                  "replay --until 0"])
def test_an_empty_log_is_refused_in_every_mode(run, log: Path, tmp_path: Path, mode: str) -> None:
    shutil.rmtree(log / "steps")
    (log / "steps").mkdir()
    (log / "final.json").unlink()
    command, *options = mode.split()
    out = tmp_path / "out"
    args = [str(log)] if command == "verify-log" else ["--base", str(run[0]), "--log", str(log), "--out", str(out)]
    result = _qes(command, *args, *options)
    assert result.returncode == 2
    assert _last_line(result) == (f"qes {command}: error: the seed log {log} holds no iterations: there is nothing "
                                  f"to re-derive")
    assert not out.exists() and not (tmp_path / ".out.lock").exists()


# --- the last record's checkpoint and checked points -----------------------------------------------------------


def test_every_finished_run_ends_with_a_checkpoint(tiny_gptq, tmp_path: Path) -> None:
    """Planned to end off the checkpoint grid, or stopped early and then ended where it stood."""
    base = tiny_gptq(4)
    planned = _train(base, tmp_path / "planned", dataclasses.replace(CFG, iterations=5))
    assert SeedLog.open(tmp_path / "planned").records[-1].checkpoint == planned

    def stop_after_three(row: dict) -> None:
        if row["iteration"] == 2:
            raise KeyboardInterrupt

    stopped = tmp_path / "stopped"
    with pytest.raises(KeyboardInterrupt):
        _train(base, stopped, dataclasses.replace(CFG, iterations=9), stop_after_three)
    assert SeedLog.open(stopped).records[-1].checkpoint is None and not (tmp_path / ".stopped.lock").exists()
    final = _train(base, stopped, dataclasses.replace(CFG, iterations=3))  # ended where it stood
    seedlog = SeedLog.open(stopped)
    assert seedlog.iterations == 3 and seedlog.records[-1].checkpoint == final == seedlog.finished["codes_sha256"]
    report = replay_checkpoint(base, stopped, tmp_path / "out")
    assert report["codes_sha256"] == final and report["check"] == "checked"


def test_a_log_without_a_last_checkpoint_still_verifies_replays_and_continues(run, log: Path, tmp_path: Path) -> None:
    """The shape of logs written before every last record carried the final hash (tests/data/logs/pilot-replay-s0)."""
    base, run_dir, final = run
    rewrite_step(log, 5, metadata=lambda meta: meta.pop(b"qes.codes_sha256"))
    rechain(log, 5)
    assert SeedLog.open(log).records[-1].checkpoint is None
    report = replay_checkpoint(base, log, tmp_path / "out")
    assert (report["codes_sha256"], report["check"], report["checked_against"]) == (final, "checked", "final.json")
    longer = dataclasses.replace(CFG, iterations=8)
    assert _train(base, log, longer) == _train(base, tmp_path / "planned", longer)


def test_replay_until_says_whether_the_point_was_checked(run, tmp_path: Path) -> None:
    base, run_dir, final = run
    result = _qes("replay", "--base", str(base), "--log", str(run_dir), "--out", str(tmp_path / "it3"), "--until", "3")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[0])
    assert (report["check"], report["nearest_checkpoint"]) == ("unchecked", 4)
    assert json.loads((tmp_path / "it3" / "replay_report.json").read_text())["check"] == "unchecked"
    assert ("qes replay: the codes after iteration 3 are unchecked: the seed log holds no hash checkpoint there; "
            "the nearest is after iteration 4 (--until 4)") in result.stderr.splitlines()
    expected = {0: "the base identity in run.json", 2: "the hash checkpoint after iteration 2",
                4: "the hash checkpoint after iteration 4", 6: "final.json"}
    for until, against in expected.items():
        report = replay_checkpoint(base, run_dir, tmp_path / f"it{until}", until=until)
        assert (report["check"], report["checked_against"]) == ("checked", against)
    assert replay_checkpoint(base, run_dir, tmp_path / "it5", until=5)["nearest_checkpoint"] == 6


def test_a_partial_replay_off_the_checkpoint_grid_is_unchecked(run, log: Path, tmp_path: Path) -> None:
    for iteration in (3, 4, 5):
        (log / "steps" / f"it-{iteration:08d}.parquet").unlink()
    (log / "final.json").unlink()
    report = replay_checkpoint(run[0], log, tmp_path / "out", partial=True)
    assert (report["iterations"], report["check"], report["nearest_checkpoint"]) == (3, "unchecked", 2)


COMMITTED_LOGS = sorted(str(p.parent.relative_to(REPO)) for pattern in ("experiments/*/runs/*/run.json",
                         "tests/data/logs/**/run.json") for p in REPO.glob(pattern))


@pytest.mark.parametrize("log_dir", COMMITTED_LOGS)
def test_committed_logs_still_verify(log_dir: str) -> None:
    result = _qes("verify-log", str(REPO / log_dir), "--partial")
    assert result.returncode == 0, result.stderr
