"""Re-derive tuned codes from a base GPTQ checkpoint and a seed log, verifying every hash checkpoint."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import torch

from qes.checkpoint import load_quantized, save_quantized
from qes.codes import LayerCodes, quantized_linears
from qes.engine import Engine
from qes.faults import fault_point
from qes.fsutil import refuse_overlap
from qes.identity import base_identity, codes_sha256
from qes.logchain import LoggedStep
from qes.seedlog import SeedLog, SeedLogError

log = logging.getLogger(__name__)


class ReplayMismatch(SeedLogError):
    """The codes after some iteration differ from the hash the log recorded there."""


def layer_manifest(layers: list[LayerCodes]) -> list[dict]:
    """Names, shapes and widths of the trained layers, as stored in run.json."""
    return [
        {"name": x.name, "out": x.out_features, "in": x.in_features, "bits": x.bits}
        for x in sorted(layers, key=lambda layer: layer.name)
    ]


def engine_for_log(model: torch.nn.Module, seedlog: SeedLog, base: dict | None = None) -> Engine:
    """An engine over `model` configured from the log, after checking its layers and its complete base identity.

    Any backend will do: the engine changes the GPTQ integers and keeps every backend's cache in step,
    so a log replays to the same codes whichever forward path the model was loaded with.
    """
    return Engine(check_model_for_log(model, seedlog, base), seedlog.noise, seedlog.update)


def check_model_for_log(model: torch.nn.Module, seedlog: SeedLog, base: dict | None = None) -> list[LayerCodes]:
    """The model's quantized layers, after checking them and the model's base identity against the log."""
    layers = quantized_linears(model)
    found = layer_manifest(layers)
    if found != seedlog.meta["layers"]:
        have = {x["name"]: x for x in found}
        for want in seedlog.meta["layers"]:
            if have.get(want["name"]) != want:
                raise SeedLogError(
                    f"the model's layers differ from the seed log's: log has {want}, "
                    f"model has {have.get(want['name'])}"
                )
        raise SeedLogError(f"the model has {len(found)} quantized layers, the seed log {len(seedlog.meta['layers'])}")
    seedlog.verify_base(base or base_identity(model, codes_sha256(layers)))
    return layers


def replay_steps(
    engine: Engine,
    seedlog: SeedLog,
    start: int = 0,
    stop: int | None = None,
    on_step: Callable[[LoggedStep], None] | None = None,
) -> int:
    """Apply logged iterations [start, stop) to the engine, verifying each checkpoint; returns stop."""
    stop = seedlog.iterations if stop is None else stop
    for iteration in range(start, stop):
        logged = seedlog.read_step(iteration)
        fault_point("replay", iteration)
        engine.apply(logged.step)
        if logged.checkpoint is not None:
            got = engine.codes_sha256()
            if got != logged.checkpoint:
                raise ReplayMismatch(
                    f"codes_sha256 after iteration {iteration} is {got}, but the seed log recorded "
                    f"{logged.checkpoint}: the replay does not reproduce the run (the engine or the base differs)"
                )
        if on_step is not None:
            on_step(logged)
    return stop


def checked_hash(seedlog: SeedLog, iteration: int) -> str | None:
    """The codes hash the log holds for the state after `iteration` iterations (> 0), or None."""
    finished = seedlog.finished
    if finished is not None and finished["iterations"] == iteration:
        return finished["codes_sha256"]
    return seedlog.records[iteration - 1].checkpoint


def point_check(seedlog: SeedLog, iterations: int) -> dict:
    """How the codes after `iterations` logged iterations are checked by a replay that stops there.

    ``{"check": "checked", "checked_against": ...}`` where the log holds their hash (the base identity at 0,
    a record's hash checkpoint, final.json), else ``{"check": "unchecked", "nearest_checkpoint": M}``: M
    (in the same count of iterations) is the nearest checkpoint after them, or before them if none follows.
    """
    finished = seedlog.finished
    if iterations == 0:
        return {"check": "checked", "checked_against": "the base identity in run.json"}
    if checked_hash(seedlog, iterations) is not None:
        at_end = finished is not None and finished["iterations"] == iterations
        where = "final.json" if at_end else f"the hash checkpoint after iteration {iterations}"
        return {"check": "checked", "checked_against": where}
    points = sorted({t + 1 for t, r in enumerate(seedlog.records) if r.checkpoint is not None}
                    | ({finished["iterations"]} if finished is not None else set()))
    later = [p for p in points if p > iterations]
    nearest = later[0] if later else points[-1] if points else None
    return {"check": "unchecked", "nearest_checkpoint": nearest}


def unchecked_note(report: dict) -> str:
    """One line saying that the re-derived codes were not checked against a hash, and where one is."""
    nearest = report.get("nearest_checkpoint")
    where = f"the nearest is after iteration {nearest} (--until {nearest})" if nearest else "it holds none"
    return (f"the codes after iteration {report['iterations']} are unchecked: the seed log holds no hash "
            f"checkpoint there; {where}")


def replay_checkpoint(
    base: str | Path, log_dir: str | Path, out_dir: str | Path, partial: bool = False, until: int | None = None
) -> dict:
    """`qes replay`: base checkpoint + seed log -> verified tuned GPTQ checkpoint in out_dir.

    The whole log is verified (hash chain, final.json) before the model is loaded; an unfinished log is
    refused unless `partial`, and then the report says which iteration was re-derived. `until` stops after
    that many iterations (a point on the run's curve): a verified prefix of the log, finished or not. An
    empty log is always refused. The report's `check` says whether the result was checked against a hash
    the log holds for it (:func:`point_check`).
    """
    started = time.perf_counter()
    refuse_overlap(out_dir, {"seed log": log_dir, "base": base})
    seedlog = SeedLog.open(log_dir)
    seedlog.require_complete(partial or until is not None)  # an empty log is refused even with --until 0
    if until is not None and not 0 <= until <= seedlog.iterations:
        raise SeedLogError(f"cannot replay {log_dir} until iteration {until}: it holds {seedlog.iterations}")
    finished = seedlog.finished
    if finished is not None and until is not None and until != finished["iterations"]:
        finished = None
    model, tokenizer = load_quantized(base, backend="none")
    engine = engine_for_log(model, seedlog)
    iterations = replay_steps(engine, seedlog, stop=until)
    final = engine.codes_sha256()
    if finished is not None and finished["codes_sha256"] != final:
        raise ReplayMismatch(
            f"the run finished at iteration {finished['iterations']} with codes_sha256 "
            f"{finished['codes_sha256']}, replay reached {iterations} iterations with {final}"
        )
    report = {
        "base": str(base),
        "seed_log": str(log_dir),
        "iterations": iterations,
        "finished": finished is not None,
        "until": until,
        "base_codes_sha256": seedlog.meta["base_codes_sha256"],
        "base_sha256": seedlog.meta["base"]["sha256"],
        "codes_sha256": final,
        **point_check(seedlog, iterations),
        "seconds": round(time.perf_counter() - started, 3),
    }
    save_quantized(model, tokenizer, out_dir, {"replay_report.json": json.dumps(report, indent=2) + "\n"})
    if finished is None and until is None:
        log.warning("re-derived iteration %d; the run did not finish", iterations)
    if report["check"] == "unchecked":
        log.warning("%s", unchecked_note(report))
    log.info("replayed %d iterations: codes_sha256 %s", iterations, final)
    return report
