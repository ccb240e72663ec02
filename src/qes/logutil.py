"""Logging for pipeline steps: one log file that receives Python logging, stdout and stderr."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def log_to(path: str | Path, level: int = logging.INFO) -> Iterator[logging.Logger]:
    """Send logging records and the process' stdout/stderr (also from C extensions) to ``path``.

    An exception escaping the block is written to the log with its traceback, then re-raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    root = logging.getLogger()
    previous_level = root.level
    with open(path, "a", buffering=1) as handle:
        for fd in (1, 2):
            os.dup2(handle.fileno(), fd)
        handler = logging.StreamHandler(handle)
        handler.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(handler)
        root.setLevel(level)
        logger = logging.getLogger("qes")
        try:
            yield logger
        except BaseException:
            logger.exception("step failed")
            raise
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            root.removeHandler(handler)
            root.setLevel(previous_level)
            for fd, copy in saved.items():
                os.dup2(copy, fd)
                os.close(copy)
