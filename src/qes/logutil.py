"""Logging for pipeline steps: one log file that receives Python logging, stdout and stderr."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: `log.info(..., extra=PROGRESS)` also shows the line on the console of a pipeline step (one per iteration)
PROGRESS = {"progress": True}


def _for_console(record: logging.LogRecord) -> bool:
    """Warnings, errors (without their traceback) and progress lines reach the console."""
    if record.exc_info is not None:
        return False
    return record.levelno >= logging.WARNING or getattr(record, "progress", False)


class _ConsoleFormat(logging.Formatter):
    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def format(self, record: logging.LogRecord) -> str:
        if record.levelno >= logging.WARNING:
            return f"{record.levelname}: {record.getMessage()} (log: {self.path})"
        return f"{self.formatTime(record, '%H:%M:%S')} {record.getMessage()}"


@contextlib.contextmanager
def log_to(path: str | Path, level: int = logging.INFO) -> Iterator[logging.Logger]:
    """Send logging records and the process' stdout/stderr (also from C extensions) to ``path``.

    The project's warnings, errors and progress lines (``extra=PROGRESS``) also reach the console (the
    process' original stderr), one line each.
    An exception escaping the block is written to the log with its traceback, followed by its message as the
    log's last line; the console gets that line alone and the process exits with status 1 (the block is a
    pipeline step's whole script, so nothing is left to handle it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    root = logging.getLogger()
    previous_level = root.level
    with open(path, "a", buffering=1) as handle, os.fdopen(os.dup(saved[2]), "w", buffering=1) as console:
        for fd in (1, 2):
            os.dup2(handle.fileno(), fd)
        handler = logging.StreamHandler(handle)
        handler.setFormatter(logging.Formatter(FORMAT))
        loud = logging.StreamHandler(console)
        loud.addFilter(_for_console)
        loud.setFormatter(_ConsoleFormat(path))
        logger = logging.getLogger("qes")
        root.addHandler(handler)
        logger.addHandler(loud)  # the project's own warnings only, not every library's
        root.setLevel(level)
        try:
            yield logger
        except Exception as error:
            logger.exception("step failed")
            logger.error("%s: %s", type(error).__name__, error)
            failed = True
        except BaseException:
            logger.exception("step interrupted")
            raise
        else:
            failed = False
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            root.removeHandler(handler)
            logger.removeHandler(loud)
            root.setLevel(previous_level)
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
    if failed:
        raise SystemExit(1)
