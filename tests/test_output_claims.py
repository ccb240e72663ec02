"""Outputs are claimed by one writer at a time, and --overwrite never writes into an input, through links or not.

The concurrency tests start real `qes` processes. The first one stops itself right after it claimed its
output (a hook around the claim, nothing else changed), so that "the second starts while the first runs"
does not depend on how fast this machine is.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _synthetic_run import CFG, fitness_of

from qes import claims
from qes.checkpoint import load_quantized
from qes.codes import quantized_linears
from qes.fsutil import file_hashes, write_file_atomic
from qes.logchain import write_atomic
from qes.train import train

# `python -c` body: run `qes ARGS`, stopping (SIGSTOP) once right after the output was claimed.
STOP_AFTER_CLAIM = """
import os, signal, sys
import qes.claims as claims
acquire = claims.acquire
def stop_once(out):
    lock = acquire(out)
    if not os.environ.get("STOPPED"):
        os.environ["STOPPED"] = "1"
        os.kill(os.getpid(), signal.SIGSTOP)
    return lock
claims.acquire = stop_once
from qes.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k != "QES_FAULT"}, "OMP_NUM_THREADS": "1"}


def _qes(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qes.cli", *args], capture_output=True, text=True, env=_env(),
                          timeout=600)


def _stopped_after_claim(*args: str) -> subprocess.Popen:
    """`qes ARGS` in a process that has claimed its output and is now stopped."""
    process = subprocess.Popen([sys.executable, "-c", STOP_AFTER_CLAIM, *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "T":
            return process
        assert process.poll() is None, process.communicate()
        time.sleep(0.02)
    process.kill()
    raise AssertionError("the first process never reached its claim")


@pytest.fixture(scope="module")
def run(tiny_gptq, tmp_path_factory) -> tuple[Path, Path, str]:
    base = tiny_gptq(4)
    run_dir = tmp_path_factory.mktemp("claims") / "log"
    model, _ = load_quantized(base, backend="dense")
    return base, run_dir, train(model, quantized_linears(model), fitness_of(model), CFG, run_dir)


def test_a_second_replay_into_the_same_output_is_refused_while_the_first_runs(run, tmp_path: Path) -> None:
    base, log, final = run
    out = tmp_path / "out"
    args = ("replay", "--base", str(base), "--log", str(log), "--out", str(out))
    started = time.monotonic()
    first = _stopped_after_claim(*args)
    lock = tmp_path / ".out.lock"
    assert json.loads(lock.read_text())["pid"] == first.pid
    time.sleep(max(0.0, 2 - (time.monotonic() - started)))
    try:
        second = _qes(*args)
    finally:
        first.send_signal(signal.SIGCONT)
    stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    assert stdout.strip().splitlines()[-1] == final
    assert second.returncode == 2
    last = second.stderr.strip().splitlines()[-1]
    assert last.startswith(f"qes replay: error: {out} is being written by another process: its claim {lock} is "
                           f"held by pid {first.pid} on host {socket.gethostname()}, running "), last
    assert last.endswith("; wait for it to finish or choose another output")
    assert not lock.exists()
    written = file_hashes(out)
    again = _qes(*args)  # afterwards: refused without --overwrite, and the first output is kept
    assert again.returncode == 2 and "already holds files; pass --overwrite" in again.stderr
    assert file_hashes(out) == written and not lock.exists()


def test_a_claim_left_by_a_dead_process_is_taken_over(run, tmp_path: Path) -> None:
    base, log, final = run
    out = tmp_path / "out"
    args = ("replay", "--base", str(base), "--log", str(log), "--out", str(out))
    first = _stopped_after_claim(*args)
    first.kill()
    first.wait()
    lock = tmp_path / ".out.lock"
    assert json.loads(lock.read_text())["pid"] == first.pid  # left behind by the killed process
    result = _qes(*args)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == final
    assert f"left by pid {first.pid}, which is no longer running" in result.stderr
    assert not lock.exists()


def test_a_claim_from_another_host_is_refused_naming_the_file(run, tmp_path: Path) -> None:
    base, log, _ = run
    out = tmp_path / "out"
    lock = tmp_path / ".out.lock"
    lock.write_text(json.dumps({"pid": 4242, "host": "node-elsewhere"}))
    result = _qes("replay", "--base", str(base), "--log", str(log), "--out", str(out))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"qes replay: error: {out} is claimed by pid 4242 on host node-elsewhere ({lock}): its liveness cannot "
        f"be checked from {socket.gethostname()}. If that process is no longer running, remove {lock} and run again"
    )
    assert not out.exists() and json.loads(lock.read_text())["pid"] == 4242


def _command(name: str, tmp_path: Path, tiny_float_dir: Path, out: Path) -> list[str]:
    folder, file = tmp_path / "in", tmp_path / "in" / "file.json"
    folder.mkdir(exist_ok=True)
    file.write_text("{}")
    return {
        "replay": ["replay", "--base", str(folder), "--log", str(folder), "--out", str(out)],
        "export": ["export", "--base", str(folder), "--tuned", str(folder), "--log", str(folder),
                   "--metrics", str(file), "--out", str(out)],
        "evaluate": ["evaluate", "--base", str(folder), "--tuned", str(folder), "--eval", str(file),
                     "--out", str(out)],
        "quantize": ["quantize", str(tiny_float_dir), "--out", str(out)],
        "task-data": ["task-data", "--model", str(tiny_float_dir), "--out", str(out)],
        "fetch": ["fetch", "--source", f"local:{tiny_float_dir}", "--out", str(out)],
        "finetune": ["finetune", "--model", str(folder), "--train", str(file), "--run-dir", str(out)],
    }[name]


@pytest.mark.parametrize("name", ["replay", "export", "evaluate", "quantize", "task-data", "fetch", "finetune"])
def test_every_command_that_writes_an_output_claims_it(name: str, tmp_path: Path, tiny_float_dir: Path) -> None:
    out = tmp_path / "results" / "out"
    with claims.claimed(out) as lock:
        result = _qes(*_command(name, tmp_path, tiny_float_dir, out))
        assert result.returncode == 2
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith(f"qes {name}: error: {out} is being written by another process: its claim {lock} "
                               f"is held by pid {os.getpid()} on host {socket.gethostname()}"), result.stderr
        assert sorted(p.name for p in out.parent.iterdir()) == [".out.lock"]
    assert not (tmp_path / "results").exists()  # the claim's folder goes with it


def test_claims_are_reentrant_and_leave_nothing_behind(tmp_path: Path) -> None:
    out = tmp_path / "a" / "b" / "out"
    lock = claims.acquire(out)
    assert lock == tmp_path / "a" / "b" / ".out.lock"
    assert json.loads(lock.read_text()) | {"since": "", "command": ""} == {
        "pid": os.getpid(), "host": socket.gethostname(), "since": "", "command": ""}
    assert claims.acquire(out) == lock  # this process again: the same claim
    claims.release(out)
    assert lock.exists()
    claims.release(out)
    assert not (tmp_path / "a").exists()


# --- --overwrite and links -----------------------------------------------------------------------------------


def _linked_base(base: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A base folder made of links to files kept in another folder (the store), as in a model cache."""
    store, linked = tmp_path / "store", tmp_path / "base"
    store.mkdir()
    linked.mkdir()
    for item in base.iterdir():
        (store / item.name).write_bytes(item.read_bytes())
        (linked / item.name).symlink_to(store / item.name)
    return store, linked


@pytest.mark.parametrize("out_kind", ["the store", "a link to the store"])
def test_overwrite_never_writes_into_files_the_base_links_to(run, tmp_path: Path, out_kind: str) -> None:
    base, log, _ = run
    store, linked = _linked_base(base, tmp_path)
    out = store
    if out_kind == "a link to the store":
        out = tmp_path / "out"
        out.symlink_to(store)
    before = file_hashes(store)
    result = _qes("replay", "--base", str(linked), "--log", str(log), "--out", str(out), "--overwrite")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    shown = re.escape(f"--out {out}" + (f" (a link to {store})" if out != store else ""))
    assert re.fullmatch(
        f"qes replay: error: {shown} contains {re.escape(str(store))}/([^/ ]+), which {re.escape(str(linked))}/\\1 "
        f"of the input --base {re.escape(str(linked))} links to: writing there would overwrite it; choose an "
        f"output folder outside every input", last), last
    assert file_hashes(store) == before and file_hashes(linked) == before
    assert all(p.is_symlink() for p in linked.iterdir())


def test_overwrite_replaces_a_linked_output_and_never_writes_through_it(run, tmp_path: Path) -> None:
    base, log, final = run
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    out = tmp_path / "out"
    out.symlink_to(elsewhere)
    result = _qes("replay", "--base", str(base), "--log", str(log), "--out", str(out), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not out.is_symlink() and (out / "replay_report.json").is_file()
    assert [p.name for p in elsewhere.iterdir()] == ["keep.txt"] and (elsewhere / "keep.txt").read_text() == "mine"
    assert json.loads((out / "replay_report.json").read_text())["codes_sha256"] == final


def test_file_writes_replace_links_instead_of_writing_through_them(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("untouched")
    path = tmp_path / "summary.json"
    path.symlink_to(victim)
    write_file_atomic(path, "{}")
    assert not path.is_symlink() and path.read_text() == "{}"
    stray = tmp_path / ".tmp-final.json"  # the temporary name of a seed-log file, planted as a link
    stray.symlink_to(victim)
    write_atomic(tmp_path / "final.json", lambda tmp: tmp.write_text("{}"))
    assert victim.read_text() == "untouched" and (tmp_path / "final.json").read_text() == "{}"


def test_an_output_that_appears_while_it_is_written_is_left_alone(tmp_path: Path) -> None:
    from qes.fsutil import atomic_dir

    target = tmp_path / "out"
    appeared = f"{target} appeared while it was being written by another process"
    with pytest.raises(FileExistsError, match=appeared), atomic_dir(target) as tmp:
        (tmp / "mine.txt").write_text("mine")
        target.mkdir()  # a writer that did not claim it
        (target / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and [p.name for p in target.iterdir()] == [
        "theirs.txt"]
