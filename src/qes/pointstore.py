"""Committed curve points: a scored point is kept beside the report and reused while its inputs are unchanged.

Scoring a point costs a replay of the seed log plus a greedy evaluation (minutes per point on a CPU), and
`results/` does not travel with a clone. A point's scores are a function of the base checkpoint, the log
up to its iteration, the scoring data, the evaluation settings and the arithmetic they ran on, so each
point records a key over exactly those (`point_key`). The summary copies every point it read into
``<report_dir>/curve_points/<name>/`` (`publish_points`); the next time that point is asked for, anywhere,
the committed copy is reused only if its key equals the key computed there (`reuse_point`), and scored
again otherwise. A reward implemented in code that changed without changing the data is not in the key: delete
the folder to re-score everything.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from qes.evaluate import EvaluateConfig
    from qes.seedlog import SeedLog

log = logging.getLogger(__name__)

#: the parts of a model's compute record (qes.checkpoint) that can change its greedy completions; the CPU
#: model too, since MKL and oneDNN choose their kernels by CPU, not only by instruction set
COMPUTE_KEYS = ("device", "gpu", "dtype", "backends", "int4pack_dtype", "cpu_model", "cpu_capability",
                "cpu_native_bf16")


def data_sha256(parquet: str | Path) -> str:
    """Hash of a task parquet's rows and task metadata, independent of how the file's bytes were laid out."""
    import pyarrow.parquet as pq

    from qes.logchain import canonical_sha256

    table = pq.read_table(parquet)
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items() if k != b"ARROW:schema"}
    return canonical_sha256(json.loads(json.dumps({"meta": meta, "rows": table.to_pylist()}, default=str)))


def point_key(model: torch.nn.Module, seedlog: SeedLog | None, iteration: int, eval_parquet: str | Path,
              cfg: EvaluateConfig) -> dict[str, Any]:
    """``{"sha256": ..., "parts": {...}}`` over what a point's scores depend on. Call it on the base model,
    before any replay: the log record at `iteration` then pins the codes the point evaluates."""
    from dataclasses import asdict

    from qes.checkpoint import describe_compute
    from qes.identity import base_identity
    from qes.logchain import canonical_sha256

    compute = describe_compute(model)
    # the backend that ran is in the compute record; the one asked for ("auto" or a name) is left out, so a
    # point scored where auto chose dense serves a run that asks for dense, and the reverse
    evaluate = {k: v for k, v in asdict(cfg).items() if k != "backend"}
    parts = {
        "base": base_identity(model)["sha256"],
        "record": seedlog.records[iteration - 1].record_sha256 if seedlog is not None and iteration else None,
        "data": data_sha256(eval_parquet),
        "evaluate": evaluate,
        "compute": {k: compute[k] for k in COMPUTE_KEYS if k in compute},
    }
    return {"sha256": canonical_sha256(parts), "parts": parts}


def write_point(point: dict, out_json: str | Path) -> None:
    """A point's JSON, in the one layout that both scoring and reuse write."""
    Path(out_json).write_text(json.dumps(point, indent=2, sort_keys=True) + "\n")


def _files(folder: Path, iteration: int) -> tuple[Path, Path]:
    return folder / f"it-{iteration}.json", folder / f"it-{iteration}_examples.parquet"


def reuse_point(committed: str | Path, iteration: int, key: dict[str, Any], out_json: str | Path,
                out_examples: str | Path, seed_log: str | Path | None = None) -> dict | None:
    """The committed point at `iteration` copied to the outputs if its key is `key`; None (outputs untouched)
    when there is none or it was scored from something else. With `seed_log`, the copy names that log: the
    key pins the log's records, so the same records kept under another folder (a moved or renamed log_dir)
    score the same."""
    point_json, examples = _files(Path(committed), iteration)
    if not (point_json.is_file() and examples.is_file()):
        return None
    point = json.loads(point_json.read_text())
    stored = point.get("key") or {}
    if stored.get("sha256") != key["sha256"]:
        differ = sorted(k for k in key["parts"] if (stored.get("parts") or {}).get(k) != key["parts"][k])
        log.info("%s was scored from other inputs (%s differ): scoring it again", point_json, ", ".join(differ))
        return None
    if seed_log is not None:
        point["seed_log"] = str(seed_log)
    shutil.copyfile(examples, out_examples)
    write_point(point, out_json)
    log.info("%s: reused (key %s)", point_json, key["sha256"])
    return point


def _copy_atomically(source: Path, target: Path) -> None:
    # an interrupted copy must not leave a truncated file that a later run would take for a kept point
    partial = target.with_name(f".{target.name}.partial")
    shutil.copyfile(source, partial)
    os.replace(partial, target)


def publish_points(points: dict[tuple[str, int], str | Path], folder: str | Path) -> None:
    """Copy every scored point (its JSON and the examples beside it) into ``folder/<name>/``; points kept
    there from other runs are left as they are."""
    folder = Path(folder)
    for (name, iteration), path in points.items():
        point_json, examples = _files(folder / name, iteration)
        source_json, source_examples = _files(Path(path).parent, iteration)
        point_json.parent.mkdir(parents=True, exist_ok=True)
        _copy_atomically(source_examples, examples)
        _copy_atomically(source_json, point_json)


def check_provenance(points: dict[tuple[str, int], str | Path], seed_logs: dict[str, str | Path],
                     eval_parquet: str | Path) -> None:
    """Refuse a point that was not scored from this experiment's seed log (up to its iteration) and data.

    ``results/experiments/points/<run>/`` is named by the run alone, so two experiments that share a working
    folder and a run name (``exp-replay-s0``) meet there, and Snakemake does not always re-score a point
    whose seed log or data changed under it: its input on the finished run is ``ancient`` so that a run
    that grows keeps its earlier points. The point's key names what it was scored from; it must be this.
    """
    from qes.seedlog import SeedLog

    data = data_sha256(eval_parquet)
    records: dict[str, list[str]] = {}

    def record(log_dir: str, iteration: int) -> str | None:
        if log_dir not in records:
            records[log_dir] = [r.record_sha256 for r in SeedLog.open(log_dir).records]
        return records[log_dir][iteration - 1] if iteration <= len(records[log_dir]) else None

    for (name, iteration), path in points.items():
        point = json.loads(Path(path).read_text())
        parts = (point.get("key") or {}).get("parts") or {}
        found = []
        if parts.get("data") != data:
            found.append(f"scoring data {str(parts.get('data'))[:12]}, not {data[:12]} ({eval_parquet})")
        log_dir = str(seed_logs.get(name))
        if iteration and point.get("seed_log") != log_dir:
            found.append(f"seed log {point.get('seed_log')}, not {log_dir}")
        elif iteration and parts.get("record") != record(log_dir, iteration):
            found.append(f"another log record at iteration {iteration} than {log_dir} holds now")
        if found:
            raise ValueError(
                f"{path} was scored from {'; '.join(found)}: it belongs to another experiment or an earlier "
                f"run of the same name. Delete {Path(path).parent} and run again to score it for this one."
            )
