"""A seed log's records as stored: one Parquet step file per iteration, each hash-chained to the one before.

Record t's hash covers every column, its iteration, its hash checkpoint and the hash of record t-1 (for t = 0,
of run.json, which holds the base identity); the file's key-value metadata holds the iteration, the previous
record's hash, the record's own hash and, when there is one, the checkpoint (`qes.codes_sha256`). Any edit,
removal or reordering of a record breaks the chain, and :func:`read_record` names the record at fault.

Writes are crash-safe (:func:`write_atomic`): a file is written under a temporary name, flushed to disk and
renamed, so a kill at any moment leaves either the complete file or none. Parquet page checksums catch
corrupted files.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from qes.faults import fault_point
from qes.logform import SeedLogError, check_checkpoint, read_bytes
from qes.update import Step

STEP_NAME = re.compile(r"^it-(\d{8})\.parquet$")

STEP_SCHEMA = pa.schema(
    [
        ("seed", pa.int32()),
        ("sign", pa.int8()),
        ("coef", pa.int32()),
        ("alpha_fp", pa.int64()),
        ("reward", pa.float32()),
    ]
)
CHECKPOINT_KEY = b"qes.codes_sha256"
ITERATION_KEY = b"qes.iteration"
PREV_KEY = b"qes.prev_sha256"
RECORD_KEY = b"qes.record_sha256"
# Small files matter (the log is a run's artefact, target <= 1 KB an iteration at population 50):
# no Arrow schema copy, no statistics, no dictionaries; page checksums catch corruption.
_WRITE_OPTIONS = dict(
    compression="zstd", store_schema=False, write_statistics=False, use_dictionary=False,
    write_page_checksum=True,
)


@dataclass(frozen=True)
class LoggedStep:
    """One iteration as logged: its update step, the members' rewards, its hash checkpoint and record hash."""

    step: Step
    rewards: tuple[float, ...]
    checkpoint: str | None
    record_sha256: str = field(default="", compare=False)


def step_name(iteration: int) -> str:
    """The file name of iteration `iteration`'s record under steps/."""
    return f"it-{iteration:08d}.parquet"


def canonical_sha256(data: Any) -> str:
    """sha256 of a JSON value in canonical form (sorted keys, no whitespace): formatting never counts."""
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def record_sha256(prev: str, iteration: int, rows: dict[str, list], checkpoint: str | None) -> str:
    """Hash of one step record: every column as stored (rewards as float32 values), the iteration,
    the checkpoint and the previous record's hash."""
    return canonical_sha256(
        {
            "prev": prev,
            "iteration": iteration,
            "checkpoint": checkpoint,
            **{name: rows[name] for name in STEP_SCHEMA.names},
        }
    )


def write_atomic(path: Path, write: Callable[[Path], Any], fault: tuple[str, int] | None = None) -> None:
    """Write `path` under a temporary name, flush it and rename it into place (a link there is replaced)."""
    tmp = path.with_name(f".tmp-{path.name}")
    if os.path.lexists(tmp):
        tmp.unlink()  # a stray temporary file, or a link that must not be written through
    write(tmp)
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if fault is not None:
        fault_point(*fault)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json(path: Path, data: dict) -> None:
    """`data` as indented JSON with sorted keys, written atomically."""
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def encode_record(logged: LoggedStep, prev: str) -> tuple[pa.Table, dict[bytes, bytes], str]:
    """A record as stored, chained to the record hash `prev`: its table, its file metadata and its hash."""
    step = logged.step
    table = pa.table(
        {
            "seed": list(step.seeds),
            "sign": list(step.signs),
            "coef": list(step.coefs),
            "alpha_fp": [step.alpha_fp] * len(step.seeds),
            "reward": list(logged.rewards),
        },
        schema=STEP_SCHEMA,
    )
    record = record_sha256(prev, step.iteration, table.to_pydict(), logged.checkpoint)
    metadata = {ITERATION_KEY: str(step.iteration).encode(), PREV_KEY: prev.encode(), RECORD_KEY: record.encode()}
    if logged.checkpoint is not None:
        metadata[CHECKPOINT_KEY] = logged.checkpoint.encode()
    return table, metadata, record


def write_step(path: Path, table: pa.Table, metadata: dict[bytes, bytes]) -> None:
    """Write an encoded record (:func:`encode_record`) to `path` as a Parquet step file."""
    with pq.ParquetWriter(path, table.schema, **_WRITE_OPTIONS) as writer:
        writer.write_table(table)
        writer.add_key_value_metadata(metadata)


def _read_table(path: Path) -> pa.Table:
    try:  # one read into memory and no thread pool: a step file is about 1 KB, and a log has thousands
        source = pa.BufferReader(pa.py_buffer(read_bytes(path, "step record")))
        table = pq.ParquetFile(source, page_checksum_verification=True).read(use_threads=False)
    except (pa.ArrowException, OSError) as err:
        raise SeedLogError(f"step file {path} is truncated or corrupted: {err}") from err
    if table.schema.remove_metadata() != STEP_SCHEMA:
        raise SeedLogError(f"step file {path} has schema {table.schema}, expected {STEP_SCHEMA}")
    return table


def read_record(path: Path, iteration: int, prev: str, population: int) -> tuple[LoggedStep, dict[str, list]]:
    """Read the step file of `iteration` and check its place in the chain (after the record hash `prev`), its
    own hash, its size (`population` members) and the form of its checkpoint; returns the record and its
    columns."""
    table = _read_table(path)
    metadata = table.schema.metadata or {}
    stored_iteration = metadata.get(ITERATION_KEY, b"").decode(errors="replace")
    if stored_iteration != str(iteration):
        raise SeedLogError(
            f"step file {path} holds iteration {stored_iteration or '?'}, not {iteration}: records were "
            f"renamed or reordered"
        )
    checkpoint = metadata.get(CHECKPOINT_KEY)
    checkpoint = checkpoint.decode(errors="replace") if checkpoint else None
    rows = table.to_pydict()
    record = record_sha256(prev, iteration, rows, checkpoint)
    if metadata.get(PREV_KEY, b"").decode(errors="replace") != prev:
        what = "run.json" if iteration == 0 else f"the record of iteration {iteration - 1}"
        raise SeedLogError(
            f"seed log record of iteration {iteration} ({path}) does not follow {what}: {what} was edited, "
            f"or records were removed or reordered"
        )
    if metadata.get(RECORD_KEY, b"").decode(errors="replace") != record:
        raise SeedLogError(
            f"seed log record of iteration {iteration} ({path}) was altered: its content (seeds, signs, "
            f"coefficients, step size, rewards or hash checkpoint) does not match its recorded hash"
        )
    if table.num_rows != population:
        raise SeedLogError(f"step file {path} holds {table.num_rows} members, the run has {population}")
    if checkpoint is not None:
        check_checkpoint(checkpoint, path, CHECKPOINT_KEY.decode())
    step = Step(
        iteration=iteration,
        alpha_fp=rows["alpha_fp"][0],
        seeds=tuple(rows["seed"]),
        signs=tuple(rows["sign"]),
        coefs=tuple(rows["coef"]),
    )
    return LoggedStep(step, tuple(rows["reward"]), checkpoint, record), rows
