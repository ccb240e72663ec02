"""The population across ranks: each rank scores its share of the members, only rewards cross the wire.

Every rank holds the whole model and applies the same integer update to its own copy, so weights are
never sent: the update is a pure function of the seeds and the gathered rewards, and the integer
engine gives the same bits on every rank. Rank 0 alone writes the seed log and the metrics; at each
hash checkpoint all ranks compare their codes_sha256, so a rank that drifted stops the run at once.

Ranks are started by ``torchrun`` (one node) or by ``srun`` (a SLURM allocation); :func:`launch`
builds either command line around ``qes finetune`` and :func:`init_ranks` joins the process group
from the environment the launcher left (torchrun's RANK/WORLD_SIZE, or srun's SLURM_PROCID/NTASKS).
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import subprocess
import sys
from dataclasses import dataclass

log = logging.getLogger(__name__)

#: Longest a rank waits for the others at a collective before the run fails (a member's fitness on a
#: slow CPU takes well under a minute; a dead rank is normally noticed by the launcher much sooner).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=20)
LAUNCHERS = ("torchrun", "srun")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the population split: rank `rank` of `world` (1 = no process group)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def members(self, count: int) -> range:
        """The member indices this rank scores (round robin, so every rank gets count/world of them)."""
        return range(self.rank, count, self.world)

    def gather_rewards(self, mine: dict[int, float], count: int) -> list[float]:
        """All `count` rewards, in member order, on every rank.

        Each slot is written by exactly one rank and zero elsewhere, so a float64 sum gives every
        reward bit for bit (x + 0.0 == x).
        """
        if self.world == 1:
            return [mine[i] for i in range(count)]
        import torch
        import torch.distributed as dist

        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        values = torch.zeros(count, dtype=torch.float64, device=device)
        for index, reward in mine.items():
            values[index] = reward
        dist.all_reduce(values)
        return values.cpu().tolist()

    def check_same(self, codes_sha256: str, iteration: int) -> None:
        """Fail if any rank's codes differ from rank 0's (they must never: the update is integer-exact)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        hashes: list[str | None] = [None] * self.world
        dist.all_gather_object(hashes, codes_sha256)
        if len(set(hashes)) != 1:
            raise RuntimeError(
                f"ranks disagree on the codes after iteration {iteration}: "
                + ", ".join(f"rank {r}: {h}" for r, h in enumerate(hashes))
            )

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()


def launched_world() -> tuple[int, int, int] | None:
    """(rank, world, local rank) if this process was started as one rank of several, else None."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if env.get("QES_LAUNCHER") == "srun" and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return None


def init_ranks(device: str) -> Ranks:
    """Join the process group the launcher set up (gloo on CPU, nccl on CUDA); a lone process gets Ranks()."""
    placed = launched_world()
    if placed is None or placed[1] == 1:
        return Ranks()
    rank, world, local_rank = placed
    import torch
    import torch.distributed as dist

    if device.startswith("cuda"):
        # All of the node's GPUs are visible (torchrun, srun without binding) or one per task (srun with GPU
        # binding, where every task's GPU is cuda:0): local rank modulo the visible GPUs is right either way.
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if device.startswith("cuda") else "gloo",
            init_method="env://",
            rank=rank,
            world_size=world,
            timeout=COLLECTIVE_TIMEOUT,
        )
    log.info("rank %d of %d (local %d) joined the %s group", rank, world, local_rank, dist.get_backend())
    return Ranks(rank=rank, world=world, local_rank=local_rank)


def close_ranks(ranks: Ranks) -> None:
    if ranks.world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(ranks: int, launcher: str, args: list[str], threads: int) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start `qes <args>` as `ranks` ranks.

    `threads` is what the job has: in all for torchrun (shared out between the ranks), per task for
    srun (the SLURM executor allocates the rule's threads to every task of the job).
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"finetune.launcher must be one of {LAUNCHERS}, got {launcher!r}")
    env = dict(os.environ)
    per_rank = max(1, threads // ranks) if launcher == "torchrun" else max(1, threads)
    env["OMP_NUM_THREADS"] = str(per_rank)
    if launcher == "torchrun":
        # --standalone: a private rendezvous on a free local port; the agent stops every rank if one fails.
        head = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
        return [*head, "-m", "qes.cli", "-v", *args], env
    qes = [sys.executable, "-m", "qes.cli", "-v", *args]
    env.update(QES_LAUNCHER="srun", MASTER_ADDR=socket.gethostname(), MASTER_PORT=str(_free_port()))
    head = ["srun", f"--ntasks={ranks}", f"--cpus-per-task={per_rank}", "--kill-on-bad-exit=1"]
    return [*head, *qes], env


def launch(ranks: int, launcher: str, args: list[str], threads: int) -> None:
    """Run `qes <args>` as `ranks` ranks (their output goes to this process's stdout/stderr) and wait.

    Raises if any rank failed: the launcher stops the other ranks, so a dead rank never leaves a hang.
    """
    command, env = launch_command(ranks, launcher, args, threads)
    log.info("starting %d ranks: %s", ranks, " ".join(command))
    sys.stdout.flush()
    sys.stderr.flush()
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise RuntimeError(
            f"{launcher} with {ranks} ranks exited with status {result.returncode} (the ranks' output is above). "
            "The seed log keeps every finished iteration: run again to resume."
        )
