"""Snapshots of replayed codes at a log's hash checkpoints, so that scoring a later point starts there.

Scoring a run at iteration t replays its seed log from the base; in seed-replay mode every iteration
rebuilds its residual from the last K steps, so the replay costs about as much as the run's own updates
(minutes per point at 100 iterations on a CPU). A snapshot holds the packed GPTQ codes after iteration t,
and is derived data that is never trusted:

- it is named by the hash of the log record it follows, which chains the base identity and every earlier
  record, so a snapshot can only be picked up by a log with that exact history;
- it is taken only where the log holds a hash of the codes (a checkpoint or final.json), and loaded only
  if its codes hash to that same value; otherwise it is ignored (with a warning) and the replay starts
  from the base.

Scoring at iteration t needs the codes alone, so a snapshot at t itself serves every mode (the finetune
stage leaves one after its last iteration). To replay on from a snapshot, the engine's state must be the
codes alone: seed replay rebuilds its residual from the log window, and runs without error feedback have
none. Those runs also continue training from their latest snapshot (qes.train). A stored-residual run
carries an int16 residual per code, which is not snapshotted, so its points before the last iteration,
and its continuation, replay from the base.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from qes.codes import LayerCodes, quantized_linears
from qes.engine import Engine
from qes.identity import codes_sha256
from qes.replay import check_model_for_log, checked_hash
from qes.seedlog import SeedLog

log = logging.getLogger(__name__)

FORMAT = "qes-replay-state/1"
SUFFIX = ".safetensors"
#: residual modes whose engine state is the codes plus the log: a replay can go on from their snapshots
RESUMABLE_MODES = ("replay", "none")


def run_state_dir(run: str) -> str:
    """Where the workflow keeps run `run`'s snapshots (derived data, never a declared output): the finetune
    stage leaves its final codes there and the experiment points read and add to them."""
    return f"results/states/{run}"


def _path(state_dir: Path, seedlog: SeedLog, iteration: int) -> Path:
    return state_dir / f"{seedlog.records[iteration - 1].record_sha256}{SUFFIX}"


def engine_at(model: torch.nn.Module, seedlog: SeedLog, stop: int, state_dir: str | Path | None,
              base: dict | None = None) -> tuple[Engine, int]:
    """An engine over `model` (checked against the log and its base) at the latest verified snapshot of
    this log at or before `stop` (at `stop` itself only, for a stored residual), or at the base; returns it
    with the iteration it stands after. An engine after a stored-residual snapshot has no residual: it
    holds the codes to score, not a state to replay on from. `base` is the model's identity where the caller
    has it already (qes.identity.base_identity)."""
    layers = check_model_for_log(model, seedlog, base)
    start = 0
    if state_dir is not None:
        earliest = 1 if seedlog.update.mode in RESUMABLE_MODES else max(stop, 1)
        start = _load_latest(Path(state_dir), seedlog, stop, earliest, layers)
    engine = Engine(layers, seedlog.noise, seedlog.update)
    if start and seedlog.update.mode == "replay":
        window = seedlog.update.window
        engine.history.extend(seedlog.records[t].step for t in range(max(0, start - window), start))
    return engine, start


def _load_latest(state_dir: Path, seedlog: SeedLog, stop: int, earliest: int, layers: list[LayerCodes]) -> int:
    from safetensors import safe_open

    for t in range(stop, earliest - 1, -1):
        expected = checked_hash(seedlog, t)
        path = _path(state_dir, seedlog, t)
        if expected is None or not path.is_file():
            continue
        originals = [layer.qweight.detach().clone() for layer in layers]
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("format") != FORMAT or sorted(f.keys()) != sorted(x.name for x in layers):
                    raise ValueError(f"not a {FORMAT} snapshot of these layers")
                for layer in layers:
                    layer.qweight.copy_(f.get_tensor(layer.name))
        except (OSError, ValueError, RuntimeError) as err:
            _put_back(layers, originals)
            log.warning("ignoring replay snapshot %s: %s", path, err)
            continue
        got = codes_sha256(layers)
        if got != expected:
            _put_back(layers, originals)
            log.warning("ignoring replay snapshot %s: its codes hash to %s, the log holds %s after iteration %d",
                        path, got, expected, t)
            continue
        log.info("starting from the replay snapshot after iteration %d (codes_sha256 %s, as the log holds)",
                 t, got)
        return t
    return 0


def _put_back(layers: list[LayerCodes], originals: list[torch.Tensor]) -> None:
    for layer, original in zip(layers, originals):
        layer.qweight.copy_(original)


def save_snapshot(state_dir: str | Path, seedlog: SeedLog, iteration: int, model: torch.nn.Module) -> Path | None:
    """Keep the codes after `iteration` iterations where the log holds their hash, replacing this log's older
    snapshots; returns the file, or None when nothing was kept."""
    from safetensors.torch import save_file

    expected = checked_hash(seedlog, iteration) if iteration > 0 else None
    if expected is None:
        return None
    layers = quantized_linears(model)
    if codes_sha256(layers) != expected:
        raise ValueError(f"the codes to snapshot are not those the log holds after iteration {iteration}")
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = _path(state_dir, seedlog, iteration)
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    tensors = {layer.name: layer.qweight.detach().to("cpu").clone() for layer in layers}
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "iteration": str(iteration), "codes_sha256": expected})
    os.replace(tmp, path)
    mine = {r.record_sha256 for r in seedlog.records[: iteration - 1]}
    for old in state_dir.glob(f"*{SUFFIX}"):
        if old.name.removesuffix(SUFFIX) in mine:
            old.unlink(missing_ok=True)
    return path
