"""The seed log: a run's only state, from which the base checkpoint re-derives the tuned codes.

One directory per run::

    run.json            format version, the base's identity (codes_sha256 and a hash of every other part
                        that shapes the output), layers, noise tables, update constants, population,
                        global seed and every other hyperparameter
    steps/it-00000000.parquet ...
                        one file per iteration (its number is in the name), one row per member in
                        member order: seed, sign, coefficient (int), alpha_fp (int), reward (float32,
                        for people); the file's key-value metadata holds the iteration, the hash of
                        the previous record, the record's own hash and, on checkpoint iterations
                        and the last of a finished run, `qes.codes_sha256`, the codes' hash after
                        the iteration's update
    final.json          written once the run has finished: iterations, final codes_sha256, and the
                        hashes of run.json and of the last record

The records form a hash chain (:mod:`qes.logchain`: the step files as stored), and final.json holds
the last record's hash. Any edit, removal or reordering of a record, of run.json or of the tail of a
finished log breaks the chain, and the reader names the first record at fault. The chain proves
integrity, not authorship: whoever rewrites the whole chain can make a consistent log (there are no
signatures; :mod:`qes.signing` adds them).

Appends are crash-safe: a kill at any moment leaves either the complete step file or none (stray
temporary files are ignored and cleaned on resume).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qes.faults import fault_point
from qes.logchain import (
    STEP_NAME,
    LoggedStep,
    canonical_sha256,
    encode_record,
    read_record,
    step_name,
    write_atomic,
    write_json,
    write_step,
)
from qes.logform import FINAL_KEYS, RUN_KEYS, SeedLogError, check_form
from qes.logform import read_object as read_json
from qes.noise import NoiseSpec, member_seeds
from qes.update import UpdateConfig, alpha_fixed_point, alpha_schedule

FORMAT = "qes-seedlog"
VERSION = 2
REQUIRED_META = ("base_codes_sha256", "base", "layers", "noise", "update", "population", "global_seed", "train")


@dataclass
class SeedLog:
    """A run directory; `create` starts one, `open` reads and verifies an existing one.

    Opening walks the whole hash chain (a millisecond or less per iteration) and keeps the records,
    so a tampered log is refused before any model is loaded.
    """

    path: Path
    meta: dict[str, Any]
    records: list[LoggedStep] = field(default_factory=list)

    # --- writing -----------------------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | Path, meta: dict[str, Any]) -> SeedLog:
        """Start a new log; `meta` must hold every key of REQUIRED_META."""
        path = Path(path)
        if (path / "run.json").exists():
            raise SeedLogError(f"{path} already holds a seed log; refusing to overwrite it")
        missing = [key for key in REQUIRED_META if key not in meta]
        if missing:
            raise ValueError(f"seed log metadata lacks {', '.join(missing)}")
        (path / "steps").mkdir(parents=True, exist_ok=True)
        full = json.loads(json.dumps({"format": FORMAT, "version": VERSION, **meta}))
        write_json(path / "run.json", full)
        return cls(path, full)

    @property
    def run_sha256(self) -> str:
        return canonical_sha256(self.meta)

    @property
    def head(self) -> str:
        """Hash of the last record (of run.json while there is none): what the next record chains to."""
        return self.records[-1].record_sha256 if self.records else self.run_sha256

    def _step_path(self, iteration: int) -> Path:
        return self.path / "steps" / step_name(iteration)

    def append(self, logged: LoggedStep) -> None:
        step = logged.step
        n = len(step.seeds)
        if n != self.population:
            raise SeedLogError(f"step {step.iteration} has {n} members, the run has {self.population}")
        if step.iteration != len(self.records):
            raise SeedLogError(f"iteration {step.iteration} cannot follow {len(self.records)} logged iterations")
        table, metadata, record = encode_record(logged, self.head)
        target = self._step_path(step.iteration)
        if os.path.lexists(target):
            raise SeedLogError(f"{target} exists; a logged iteration is never rewritten")
        write_atomic(target, lambda tmp: write_step(tmp, table, metadata), fault=("append", step.iteration))
        rewards = tuple(table.column("reward").to_pylist())
        self.records.append(LoggedStep(step, rewards, logged.checkpoint, record))

    def finish(self, iterations: int, codes_sha256: str) -> None:
        """Write final.json; the last record carries the final codes hash as its checkpoint.

        A run planned to end here logged that checkpoint with its last iteration. A run stopped earlier
        and then ended at the iteration it had reached gets it now: its last record, which nothing
        chains to yet, is rewritten whole with the checkpoint added, before final.json names its hash.
        """
        if iterations != len(self.records):
            raise SeedLogError(f"cannot finish at iteration {iterations}: {len(self.records)} are logged")
        last = self.records[-1] if self.records else None
        if last is not None and last.checkpoint is None:
            self._add_last_checkpoint(codes_sha256)
        elif last is not None and last.checkpoint != codes_sha256:
            raise SeedLogError(
                f"cannot finish {self.path} with codes_sha256 {codes_sha256}: its last record's hash checkpoint "
                f"is {last.checkpoint}"
            )
        fault_point("finish", iterations)
        write_json(
            self.path / "final.json",
            {
                "iterations": iterations,
                "codes_sha256": codes_sha256,
                "run_sha256": self.run_sha256,
                "last_record_sha256": self.head,
            },
        )

    def _add_last_checkpoint(self, codes_sha256: str) -> None:
        last = self.records[-1]
        prev = self.records[-2].record_sha256 if len(self.records) > 1 else self.run_sha256
        table, metadata, record = encode_record(LoggedStep(last.step, last.rewards, codes_sha256), prev)
        write_atomic(self._step_path(last.step.iteration), lambda tmp: write_step(tmp, table, metadata))
        self.records[-1] = LoggedStep(last.step, last.rewards, codes_sha256, record)

    def reopen(self, codes_sha256: str) -> None:
        """Make a finished log unfinished again so that it can be continued past its end.

        `codes_sha256` is what replaying the log gave; it must be final.json's. Only final.json goes: the
        last record holds the same hash as its checkpoint (in logs written before every run's last
        record carried one, the next checkpoint of the continued run is the next check).
        """
        final = self.finished
        if final is None:
            return
        if codes_sha256 != final["codes_sha256"]:
            raise SeedLogError(
                f"{self.path}: replaying the log gives codes_sha256 {codes_sha256}, final.json records "
                f"{final['codes_sha256']}; cannot continue"
            )
        fault_point("reopen", self.iterations)
        (self.path / "final.json").unlink()

    def clean_partial(self) -> list[Path]:
        """Remove temporary files a killed append may have left; returns what was removed."""
        stray = sorted((self.path / "steps").glob(".tmp-*"))
        for p in stray:
            p.unlink()
        return stray

    # --- reading -----------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path) -> SeedLog:
        """Read a log and verify all of it: format, run.json, every record's hash and link, final.json."""
        path = Path(path)
        if not path.is_dir():
            raise SeedLogError(f"{path} is not a folder: not a seed log")
        run_file = path / "run.json"
        if not os.path.lexists(run_file):
            raise SeedLogError(f"{path} holds no run.json: not a seed log")
        meta = read_json(run_file, "seed log's run description")
        if meta.get("format") != FORMAT:
            raise SeedLogError(f"{run_file}: format {meta.get('format')!r} is not {FORMAT!r}")
        if meta.get("version") != VERSION:
            old = " (written before logs were hash-chained; it cannot be verified)" if meta.get("version") == 1 else ""
            raise SeedLogError(
                f"{run_file}: seed log format version {meta.get('version')!r}{old}; this qes reads version "
                f"{VERSION} only. Re-run the finetune to write a verifiable log."
            )
        missing = [key for key in REQUIRED_META if key not in meta]
        if missing:
            raise SeedLogError(f"{run_file} lacks {', '.join(missing)}: not a complete seed log")
        check_form(meta, run_file, RUN_KEYS)
        log = cls(path, meta)
        log._read_records()
        log._check_final()
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
    def iterations(self) -> int:
        return len(self.records)

    @property
    def finished(self) -> dict | None:
        final = self.path / "final.json"
        return read_json(final, "record of the finished run") if os.path.lexists(final) else None

    def step_files(self) -> list[Path]:
        steps = self.path / "steps"
        if not steps.is_dir():
            if os.path.lexists(steps):
                raise SeedLogError(f"{steps} is not a folder: the seed log's records cannot be read")
            raise SeedLogError(f"{self.path} has no steps/ directory")
        return sorted(p for p in steps.iterdir() if not p.name.startswith(".tmp-"))

    def _read_records(self) -> None:
        files = self.step_files()
        for expected, path in enumerate(files):
            match = STEP_NAME.match(path.name)
            if not match:
                raise SeedLogError(f"unexpected file {path} in the seed log's steps/")
            if int(match.group(1)) != expected:
                raise SeedLogError(
                    f"iterations in {self.path / 'steps'} are not contiguous: expected iteration {expected}, "
                    f"found {path.name} (a record was removed or renamed)"
                )
            logged, rows = read_record(path, expected, self.head, self.population)
            self._check_semantics(path, expected, rows)
            self.records.append(logged)

    def _check_semantics(self, path: Path, iteration: int, rows: dict[str, list]) -> None:
        """What the run's own settings fix: member seeds and signs, and the step size of the iteration."""
        train = self.meta["train"]
        seeds = member_seeds(int(self.meta["global_seed"]), iteration, self.population // 2)
        if rows["seed"] != [s for s in seeds for _ in (1, -1)] or rows["sign"] != [1, -1] * len(seeds):
            raise SeedLogError(f"step file {path}: members are not the mirrored pairs of iteration {iteration}")
        alpha = alpha_schedule(
            float(train["alpha"]), int(train["alpha_warmup"]), train["alpha_decay"], int(train["iterations"]),
            iteration,
        )
        want = alpha_fixed_point(alpha, float(train["sigma"]))
        if set(rows["alpha_fp"]) != {want}:
            raise SeedLogError(
                f"step file {path}: step size {sorted(set(rows['alpha_fp']))} differs from the run's "
                f"alpha schedule ({want} at iteration {iteration})"
            )

    def _check_final(self) -> None:
        final = self.finished
        if final is None:
            return
        where = self.path / "final.json"
        check_form(final, where, FINAL_KEYS)
        want = {
            "iterations": self.iterations,
            "run_sha256": self.run_sha256,
            "last_record_sha256": self.head,
        }
        for key, value in want.items():
            if final.get(key) != value:
                raise SeedLogError(
                    f"{where} does not match the log: {key} is {final.get(key)!r} there, the log gives {value!r} "
                    f"(run.json or records were edited or removed after the run finished)"
                )
        last = self.records[-1].checkpoint if self.records else None
        if last is not None and last != final["codes_sha256"]:
            raise SeedLogError(
                f"{where}: codes_sha256 is {final['codes_sha256']}, but the last record's hash checkpoint is {last}"
            )

    def require_complete(self, partial: bool = False) -> None:
        """Refuse an empty log, and an unfinished one unless `partial` (a run that did not finish)."""
        if self.iterations == 0:
            raise SeedLogError(f"the seed log {self.path} holds no iterations: there is nothing to re-derive")
        if self.finished is None and not partial:
            raise SeedLogError(
                f"the seed log {self.path} has no final.json: the run did not finish ({self.iterations} "
                f"iterations logged). Pass --partial to re-derive iteration {self.iterations} anyway."
            )

    def verify_base(self, identity: dict[str, Any]) -> None:
        """Refuse a base whose identity differs from the one the run started from, naming the parts."""
        want = self.meta["base"]
        if identity.get("sha256") == want.get("sha256"):
            return
        theirs, ours = want.get("parts", {}), identity.get("parts", {})
        differ = [part for part in sorted(set(theirs) | set(ours)) if theirs.get(part) != ours.get(part)]
        detail = "; ".join(
            f"{part}: log {str(theirs.get(part, 'absent'))[:16]}…, given {str(ours.get(part, 'absent'))[:16]}…"
            for part in differ
        )
        names = ", ".join(differ) or "identity"
        hint = ""
        if "codes" in differ:
            hint = (
                "; a base quantized again on another kind of CPU can differ (GPTQ's float arithmetic follows "
                "MKL's code path, which is not the same on Intel and AMD CPUs: the CPU is in the base's "
                "quant_report.json), so replay the log onto the checkpoint it was made from"
            )
        raise SeedLogError(
            f"base checkpoint mismatch in {names}: the seed log {self.path} was made from a different base "
            f"({detail}){hint}"
        )

    def read_step(self, iteration: int) -> LoggedStep:
        return self.records[iteration]

    def steps(self, start: int = 0) -> Iterator[LoggedStep]:
        yield from self.records[start:]

    def bytes_per_iteration(self) -> float:
        files = self.step_files()
        return sum(p.stat().st_size for p in files) / max(len(files), 1)


def no_op_report(seedlog: SeedLog, final: str) -> dict:
    """Whether the run changed anything: codes equal to the base's, members tied in every iteration."""
    tied = all(all(c == 0 for c in r.step.coefs) for r in seedlog.records)
    changed = final != seedlog.meta["base_codes_sha256"]
    warnings = []
    if not changed:
        why = "every member tied in every iteration" if tied else "no step was large enough to move a code"
        warnings.append(
            f"no code changed in {seedlog.iterations} iterations ({why}): the tuned model is the base model. "
            f"Try a larger alpha or sigma, more prompts per iteration, or a task the model scores unevenly on."
        )
    return {"codes_changed": changed, "all_members_tied": tied, "warnings": warnings}
