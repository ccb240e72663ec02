"""The seed log: a run's only state, from which the base checkpoint re-derives the tuned codes.

One directory per run::

    run.json            format version, base codes_sha256, layers, noise tables, update constants,
                        population, global seed and every other hyperparameter
    steps/it-00000000.parquet ...
                        one file per iteration (its number is in the name), one row per member in
                        member order: seed, sign, coefficient (int), alpha_fp (int), reward (float32,
                        for people);
                        on checkpoint iterations the file's key-value metadata holds
                        `qes.codes_sha256`, the codes' hash after the iteration's update
    final.json          written once the run has finished: iterations and final codes_sha256

Appends are crash-safe: a step file is written under a temporary name, flushed to disk and renamed,
so a kill at any moment leaves either the complete file or none (stray temporary files are ignored
and cleaned on resume). Parquet page checksums catch corrupted files. The reader validates format
version, contiguity of iterations, member count and file integrity, and names the file at fault.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from qes.faults import fault_point
from qes.noise import NoiseSpec
from qes.update import Step, UpdateConfig

FORMAT = "qes-seedlog"
VERSION = 1
_STEP_NAME = re.compile(r"^it-(\d{8})\.parquet$")

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
# Small files matter (the log is a run's artefact, target <= 1 KB an iteration at population 50):
# no Arrow schema copy, no statistics, no dictionaries; page checksums catch corruption.
_WRITE_OPTIONS = dict(
    compression="zstd", store_schema=False, write_statistics=False, use_dictionary=False,
    write_page_checksum=True,
)


class SeedLogError(RuntimeError):
    """A seed log that cannot be trusted; the message says which file and why."""


@dataclass(frozen=True)
class LoggedStep:
    step: Step
    rewards: tuple[float, ...]
    checkpoint: str | None


def _write_atomic(path: Path, write, fault: tuple[str, int] | None = None) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
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


def _write_json(path: Path, data: dict) -> None:
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n"))


def _write_step(path: Path, table: pa.Table, checkpoint: str | None) -> None:
    with pq.ParquetWriter(path, table.schema, **_WRITE_OPTIONS) as writer:
        writer.write_table(table)
        if checkpoint is not None:
            writer.add_key_value_metadata({CHECKPOINT_KEY: checkpoint.encode()})


@dataclass
class SeedLog:
    """A run directory; `create` starts one, `open` validates an existing one."""

    path: Path
    meta: dict[str, Any]

    # --- writing -----------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, meta: dict[str, Any]) -> SeedLog:
        """Start a new log. `meta` must hold base_codes_sha256, layers, noise, update, population."""
        path = Path(path)
        if (path / "run.json").exists():
            raise SeedLogError(f"{path} already holds a seed log; refusing to overwrite it")
        for key in ("base_codes_sha256", "layers", "noise", "update", "population"):
            if key not in meta:
                raise ValueError(f"seed log metadata lacks {key!r}")
        (path / "steps").mkdir(parents=True, exist_ok=True)
        full = {"format": FORMAT, "version": VERSION, **meta}
        _write_json(path / "run.json", full)
        return cls(path, full)

    def append(self, logged: LoggedStep) -> None:
        step = logged.step
        n = len(step.seeds)
        if n != self.population:
            raise SeedLogError(f"step {step.iteration} has {n} members, the run has {self.population}")
        table = pa.table(
            {
                "seed": list(step.seeds),
                "sign": list(step.signs),
                "coef": list(step.coefs),
                "alpha_fp": [step.alpha_fp] * n,
                "reward": list(logged.rewards),
            },
            schema=STEP_SCHEMA,
        )

        target = self.path / "steps" / f"it-{step.iteration:08d}.parquet"
        if target.exists():
            raise SeedLogError(f"{target} exists; a logged iteration is never rewritten")
        _write_atomic(
            target,
            lambda tmp: _write_step(tmp, table, logged.checkpoint),
            fault=("append", step.iteration),
        )

    def finish(self, iterations: int, codes_sha256: str) -> None:
        _write_json(self.path / "final.json", {"iterations": iterations, "codes_sha256": codes_sha256})

    def clean_partial(self) -> list[Path]:
        """Remove temporary files a killed append may have left; returns what was removed."""
        stray = sorted((self.path / "steps").glob(".tmp-*"))
        for p in stray:
            p.unlink()
        return stray

    # --- reading -----------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> SeedLog:
        path = Path(path)
        run_file = path / "run.json"
        if not run_file.is_file():
            raise SeedLogError(f"{path} holds no run.json: not a seed log")
        try:
            meta = json.loads(run_file.read_text())
        except json.JSONDecodeError as err:
            raise SeedLogError(f"{run_file} is corrupted: {err}") from err
        if meta.get("format") != FORMAT:
            raise SeedLogError(f"{run_file}: format {meta.get('format')!r} is not {FORMAT!r}")
        if meta.get("version") != VERSION:
            raise SeedLogError(
                f"{run_file}: seed log format version {meta.get('version')!r}, "
                f"this qes reads version {VERSION}"
            )
        log = cls(path, meta)
        _ = log.iterations  # validates contiguity now
        return log

    @property
    def population(self) -> int:
        return int(self.meta["population"])

    @property
    def noise(self) -> NoiseSpec:
        return NoiseSpec.from_json(self.meta["noise"])

    @property
    def update(self) -> UpdateConfig:
        return UpdateConfig.from_json(self.meta["update"])

    @property
    def finished(self) -> dict | None:
        final = self.path / "final.json"
        return json.loads(final.read_text()) if final.is_file() else None

    def step_files(self) -> list[Path]:
        steps = self.path / "steps"
        if not steps.is_dir():
            raise SeedLogError(f"{self.path} has no steps/ directory")
        return sorted(p for p in steps.iterdir() if not p.name.startswith(".tmp-"))

    @property
    def iterations(self) -> int:
        """Number of logged iterations; raises unless they are exactly 0..n-1."""
        numbers = []
        for p in self.step_files():
            match = _STEP_NAME.match(p.name)
            if not match:
                raise SeedLogError(f"unexpected file {p} in the seed log's steps/")
            numbers.append(int(match.group(1)))
        for expected, found in enumerate(numbers):
            if found != expected:
                raise SeedLogError(
                    f"iterations in {self.path / 'steps'} are not contiguous: "
                    f"expected iteration {expected}, found {found}"
                )
        return len(numbers)

    def verify_base(self, codes_sha256: str) -> None:
        want = self.meta["base_codes_sha256"]
        if codes_sha256 != want:
            raise SeedLogError(
                f"base checkpoint mismatch: the seed log {self.path} was made from codes_sha256 "
                f"{want}, the given base has {codes_sha256}"
            )

    def read_step(self, iteration: int) -> LoggedStep:
        path = self.path / "steps" / f"it-{iteration:08d}.parquet"
        try:
            table = pq.read_table(path, page_checksum_verification=True)
        except FileNotFoundError as err:
            raise SeedLogError(f"missing step file {path}") from err
        except (pa.ArrowException, OSError) as err:
            raise SeedLogError(f"step file {path} is truncated or corrupted: {err}") from err
        if table.schema.remove_metadata() != STEP_SCHEMA:
            raise SeedLogError(f"step file {path} has schema {table.schema}, expected {STEP_SCHEMA}")
        rows = table.to_pydict()
        if table.num_rows != self.population:
            raise SeedLogError(
                f"step file {path} holds {table.num_rows} members, the run has {self.population}"
            )
        if len(set(rows["alpha_fp"])) != 1:
            raise SeedLogError(f"step file {path} mixes step sizes")
        checkpoint = (table.schema.metadata or {}).get(CHECKPOINT_KEY)
        step = Step(
            iteration=iteration,
            alpha_fp=rows["alpha_fp"][0],
            seeds=tuple(rows["seed"]),
            signs=tuple(rows["sign"]),
            coefs=tuple(rows["coef"]),
        )
        return LoggedStep(step, tuple(rows["reward"]), checkpoint.decode() if checkpoint else None)

    def steps(self, start: int = 0) -> Iterator[LoggedStep]:
        for iteration in range(start, self.iterations):
            yield self.read_step(iteration)

    def bytes_per_iteration(self) -> float:
        files = self.step_files()
        return sum(p.stat().st_size for p in files) / max(len(files), 1)
