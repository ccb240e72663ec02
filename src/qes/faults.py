"""Fault injection for the crash-and-resume tests.

Setting QES_FAULT="<point>:<iteration>" makes the process kill itself with SIGKILL (as `kill -9` would)
when it reaches that point of that iteration: `fitness` (a member is perturbed and being scored),
`update` (the codes were updated in memory, the step is not logged yet), `append` (the step's file is
written under its temporary name, not yet renamed), `finish` (every step is logged, final.json is not
written; the iteration is the run's length) or `replay` (a resuming run is replaying the log). A
suffix "@<rank>" limits it to one rank of a multi-rank run ("fitness:2@1"). Unset, it costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal


def fault_point(point: str, iteration: int) -> None:
    fault = os.environ.get("QES_FAULT")
    if fault is None:
        return
    where, _, rank = fault.partition("@")
    if where != f"{point}:{iteration}":
        return
    if rank and rank != os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")):
        return
    os.kill(os.getpid(), signal.SIGKILL)
