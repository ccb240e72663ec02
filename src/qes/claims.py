"""Exclusive claims on outputs: one writer at a time per output folder, and a recognisable stale claim.

A claim is a lock file beside the output (``.<name>.lock`` in the output's parent folder) that the claiming
process holds with ``flock`` and that names it (pid, host, command, start time). A second process that wants
the same output is refused with the lock file and the holder named. The kernel drops a flock when its holder
dies, however it dies, so a lock file that a dead process left on this host is taken over; one left by a
process on another host is refused (whether it still runs cannot be seen from here) and names the file to
remove once that process is gone.

Claims are re-entrant within a process: a command that claims its output and then writes it through
:func:`qes.fsutil.atomic_dir` (which claims again) holds one lock. Claims still held at exit are released.
"""

from __future__ import annotations

import atexit
import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


class OutputClaimed(RuntimeError):
    """Another process holds (or may hold) the claim on an output."""


@dataclass
class _Claim:
    fd: int
    owner: int
    count: int = 1
    created: list[Path] = field(default_factory=list)


_HELD: dict[Path, _Claim] = {}


def lock_path(out: str | Path) -> Path:
    """The lock file that claims `out`: beside it, in its parent folder with links resolved."""
    out = Path(os.path.abspath(out))
    return out.parent.resolve() / f".{out.name}.lock"


def missing_parents(path: Path) -> list[Path]:
    """The folders above `path` that do not exist yet, innermost first."""
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


def _holder_text(fd: int) -> dict:
    for _ in range(20):  # a new holder writes its record right after it locks
        raw = os.pread(fd, 4096, 0)
        if raw:
            try:
                data = json.loads(raw.decode())
                return data if isinstance(data, dict) else {}
            except (UnicodeDecodeError, json.JSONDecodeError):
                return {}
        time.sleep(0.05)
    return {}


def _describe(holder: dict) -> str:
    pid, host = holder.get("pid", "?"), holder.get("host", "?")
    command = f", running {holder['command']!r}" if holder.get("command") else ""
    since = f" since {holder['since']}" if holder.get("since") else ""
    return f"pid {pid} on host {host}{command}{since}"


def _open_locked(lock: Path, out: Path) -> int:
    """An open descriptor of `lock` that this process holds the flock of; refuses when another process does."""
    for _ in range(1000):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            raise OutputClaimed(f"cannot create {lock} to claim {out}: {err.strerror}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_text(fd)
            os.close(fd)
            raise OutputClaimed(
                f"{out} is being written by another process: its claim {lock} is held by {_describe(holder)}; "
                f"wait for it to finish or choose another output"
            ) from None
        except OSError as err:
            os.close(fd)
            raise OutputClaimed(f"cannot lock {lock} to claim {out}: {err.strerror}") from err
        try:
            same = os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # the holder released (and removed) the file between our open and our lock: start again
    raise OutputClaimed(f"cannot claim {out}: {lock} keeps being replaced by other processes")


def _take(fd: int, lock: Path, out: Path) -> None:
    """Record this process in the lock file, after checking that a left-over record may be taken over."""
    old = _holder_text(fd) if os.fstat(fd).st_size else {}
    host = socket.gethostname()
    if old and old.get("host") != host:
        raise OutputClaimed(
            f"{out} is claimed by {_describe(old)} ({lock}): its liveness cannot be checked from {host}. "
            f"If that process is no longer running, remove {lock} and run again"
        )
    if old:
        log.warning("taking over the claim on %s left by pid %s, which is no longer running", out, old.get("pid"))
    record = {"pid": os.getpid(), "host": host, "command": " ".join(sys.argv)[:300],
              "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)


def acquire(out: str | Path) -> Path:
    """Claim `out` for this process (again, if it already holds it); returns the lock file.

    Raises :class:`OutputClaimed` naming the lock file and its holder when another process holds it. Parent
    folders created for the lock file are removed again on release if they are still empty.
    """
    out = Path(out)
    lock = lock_path(out)
    held = _HELD.get(lock)
    if held is not None and held.owner == os.getpid():
        held.count += 1
        return lock
    created = missing_parents(lock)
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = _open_locked(lock, out)
        try:
            _take(fd, lock, out)
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        _remove_empty(created)
        raise
    _HELD[lock] = _Claim(fd, os.getpid(), created=created)
    return lock


def release(out: str | Path) -> None:
    """Give up one claim on `out`; the last one removes the lock file (and the folders it created, if empty)."""
    lock = lock_path(out)
    held = _HELD.get(lock)
    if held is None or held.owner != os.getpid():
        return
    held.count -= 1
    if held.count == 0:
        _drop(lock, held)


def _drop(lock: Path, held: _Claim) -> None:
    del _HELD[lock]
    try:
        if os.stat(lock, follow_symlinks=False).st_ino == os.fstat(held.fd).st_ino:
            os.unlink(lock)  # before the flock goes, so that a waiter that opened this file starts again
    except FileNotFoundError:
        pass
    os.close(held.fd)
    _remove_empty(held.created)


def _remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # innermost first
        try:
            folder.rmdir()
        except OSError:
            break


def release_all() -> None:
    """Release every claim this process holds (at exit, and at the end of a command)."""
    for lock, held in list(_HELD.items()):
        if held.owner == os.getpid():
            _drop(lock, held)


@contextmanager
def claimed(out: str | Path) -> Iterator[Path]:
    """Hold the claim on `out` for the block; yields the lock file."""
    lock = acquire(out)
    try:
        yield lock
    finally:
        release(out)


#: lock files whose claims a launching process holds for the ranks it starts (os.pathsep-separated)
INHERITED_ENV = "QES_INHERITED_CLAIMS"


def inherited(out: str | Path) -> bool:
    """Whether the process that started this one holds the claim on `out` for it (ranks of a launched run)."""
    return str(lock_path(out)) in os.environ.get(INHERITED_ENV, "").split(os.pathsep)


atexit.register(release_all)


@contextmanager
def inheriting(lock: Path) -> Iterator[None]:
    """Within the block, processes this one starts (with the environment) may write under `lock`'s claim."""
    before = os.environ.get(INHERITED_ENV)
    os.environ[INHERITED_ENV] = os.pathsep.join(filter(None, [before, str(lock)]))
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(INHERITED_ENV, None)
        else:
            os.environ[INHERITED_ENV] = before
