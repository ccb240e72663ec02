"""Run QES with a synthetic fitness on a GPTQ checkpoint: `python _synthetic_run.py BASE RUN_DIR`.

Used by the crash/resume tests as a real, separately killed process, and by the rank tests under
torchrun (it then joins the process group); prints the final codes_sha256.
"""

import os
import sys
from pathlib import Path

import torch

from qes.checkpoint import load_quantized
from qes.codes import quantized_linears
from qes.dist import close_ranks, init_ranks
from qes.hparams import TrainConfig
from qes.train import train
from qes.update import UpdateConfig

PROMPT = torch.tensor([[1, 5, 9, 12, 40, 77, 100, 3, 3]])
CFG = TrainConfig(
    iterations=6,
    population=6,
    sigma=0.3,
    alpha=0.2,
    global_seed=11,
    checkpoint_every=2,
    update=UpdateConfig(mode="replay", window=3),
)


def fitness_of(model: torch.nn.Module):
    """A smooth, positive, code-dependent score: the mean probability of a fixed continuation."""

    def fitness(t: int) -> float:
        with torch.no_grad():
            logits = model(PROMPT).logits.float()
        logp = torch.log_softmax(logits[0, :-1], -1).gather(1, PROMPT[0, 1:, None])
        return float(logp.mean().exp())

    return fitness


def log_files(run_dir: Path) -> dict[str, bytes]:
    """Every file of a run's seed log by relative path, without metrics.parquet (wall-clock timings)."""
    files = {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    files.pop("metrics.parquet")
    return files


def main() -> None:
    torch.set_num_threads(1)  # the same float reductions in every process, however many ranks
    ranks = init_ranks("cpu")
    model, _ = load_quantized(sys.argv[1], backend=os.environ.get("QES_TEST_BACKEND", "dense"))

    final = train(model, quantized_linears(model), fitness_of(model), CFG, sys.argv[2], ranks=ranks)
    close_ranks(ranks)
    if ranks.is_writer:
        print(final)


if __name__ == "__main__":
    main()
