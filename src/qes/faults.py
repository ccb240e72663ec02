"""Fault injection for the crash-and-resume tests.

Setting QES_FAULT="<point>:<iteration>" makes the process kill itself with SIGKILL (as `kill -9` would)
when it reaches that point of that iteration: `fitness` (a member is perturbed and being scored),
`update` (the codes were updated in memory, the step is not logged yet) or `append` (the step's file is
written under its temporary name, not yet renamed). Unset, it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal


def fault_point(point: str, iteration: int) -> None:
    if os.environ.get("QES_FAULT") == f"{point}:{iteration}":
        os.kill(os.getpid(), signal.SIGKILL)
