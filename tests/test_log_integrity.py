"""A tamper-evident seed log, a complete base identity, and outputs that never overwrite inputs.

Every tampering is made by editing a real seed log (a finished 6-iteration run on the tiny GPTQ model whose
codes change), the way a careless user or an adversary would: values edited with the file's metadata kept,
records removed, renamed or re-chained, run.json and final.json edited, the base checkpoint altered.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _synthetic_run import fitness_of

from qes.checkpoint import load_quantized
from qes.codes import quantized_linears
from qes.fsutil import file_hashes
from qes.hparams import TrainConfig
from qes.logchain import PREV_KEY, RECORD_KEY, STEP_SCHEMA, record_sha256
from qes.replay import ReplayMismatch, replay_checkpoint
from qes.seedlog import SeedLog, SeedLogError
from qes.train import train
from qes.update import UpdateConfig

CFG = TrainConfig(
    iterations=6, population=6, sigma=0.3, alpha=0.2, global_seed=5, checkpoint_every=2,
    update=UpdateConfig(mode="replay", window=3),
)


@pytest.fixture(scope="module")
def run(tiny_gptq, tmp_path_factory) -> tuple[Path, Path, str]:
    base = tiny_gptq(4)
    run_dir = tmp_path_factory.mktemp("integrity") / "log"
    model, _ = load_quantized(base, backend="dense")
    final = train(model, quantized_linears(model), fitness_of(model), CFG, run_dir)
    return base, run_dir, final


@pytest.fixture
def log(run, tmp_path) -> Path:
    """A fresh copy of the finished run's seed log, to tamper with."""
    copy = tmp_path / "log"
    shutil.copytree(run[1], copy)
    return copy


def _step(log: Path, iteration: int) -> Path:
    return log / "steps" / f"it-{iteration:08d}.parquet"


def rewrite_step(log: Path, iteration: int, rows: Callable[[dict], None] | None = None,
                 metadata: Callable[[dict], None] | None = None) -> None:
    """Edit one step file's columns and/or key-value metadata and write it back as a valid Parquet file."""
    path = _step(log, iteration)
    table = pq.read_table(path)
    data = table.to_pydict()
    meta = {k: v for k, v in (table.schema.metadata or {}).items() if not k.startswith(b"ARROW")}
    if rows:
        rows(data)
    if metadata:
        metadata(meta)
    pq.write_table(pa.table(data, schema=STEP_SCHEMA.with_metadata(meta)), path)


def rechain(log: Path, start: int) -> None:
    """What a forger who knows the format does: recompute every hash from `start` on (and final.json)."""
    seedlog_meta = json.loads((log / "run.json").read_text())
    from qes.logchain import canonical_sha256

    prev = canonical_sha256(seedlog_meta)
    count = len(list((log / "steps").glob("it-*.parquet")))
    for iteration in range(count):
        path = _step(log, iteration)
        table = pq.read_table(path)
        meta = dict(table.schema.metadata)
        checkpoint = meta.get(b"qes.codes_sha256")
        record = record_sha256(prev, iteration, table.to_pydict(), checkpoint.decode() if checkpoint else None)
        if iteration >= start:
            meta[PREV_KEY], meta[RECORD_KEY] = prev.encode(), record.encode()
            pq.write_table(table.replace_schema_metadata(meta), path)
        prev = record
    final = json.loads((log / "final.json").read_text())
    final.update(last_record_sha256=prev, run_sha256=canonical_sha256(seedlog_meta))
    (log / "final.json").write_text(json.dumps(final))


def _edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data, indent=1))


def _add(column: str, index: int, delta) -> Callable[[dict], None]:
    def edit(rows: dict) -> None:
        rows[column][index] += delta

    return edit


def _strip_checkpoint(meta: dict) -> None:
    meta.pop(b"qes.codes_sha256", None)


TAMPERINGS: dict[str, tuple[Callable[[Path], None], str]] = {
    "coefficient +1": (lambda d: rewrite_step(d, 2, _add("coef", 0, 1)), "iteration 2 .* was altered"),
    "coefficient +1000": (lambda d: rewrite_step(d, 0, _add("coef", 3, 1000)), "iteration 0 .* was altered"),
    "coefficient sign flipped": (
        lambda d: rewrite_step(d, 4, lambda r: r["coef"].__setitem__(1, -r["coef"][1])), "iteration 4 .* was altered"),
    "reward of the last record": (lambda d: rewrite_step(d, 5, _add("reward", 2, 0.25)), "iteration 5 .* was altered"),
    "step size": (lambda d: rewrite_step(d, 1, lambda r: r.__setitem__("alpha_fp", [a + 1 for a in r["alpha_fp"]])),
                  "iteration 1 .* was altered"),
    "seed": (lambda d: rewrite_step(d, 3, _add("seed", 0, 1)), "iteration 3 .* was altered"),
    "sign": (lambda d: rewrite_step(d, 3, lambda r: r["sign"].reverse()), "iteration 3 .* was altered"),
    "hash checkpoints stripped": (
        lambda d: [rewrite_step(d, t, metadata=_strip_checkpoint) for t in (1, 3, 5)], "iteration 1 .* was altered"),
    "coefficient with its own hash recomputed": (
        lambda d: (rewrite_step(d, 2, _add("coef", 0, 1 << 14)), _fix_own_hash(d, 2)),
        "iteration 3 .* does not follow the record of iteration 2"),
    "sigma in run.json": (lambda d: _edit_json(d / "run.json", lambda m: m["train"].__setitem__("sigma", 0.31)),
                          "iteration 0 .* does not follow run.json"),
    "gamma in run.json": (lambda d: _edit_json(d / "run.json", lambda m: m["update"].__setitem__("gamma", 0.5)),
                          "iteration 0 .* does not follow run.json"),
    "alpha in run.json": (lambda d: _edit_json(d / "run.json", lambda m: m["train"].__setitem__("alpha", 0.1)),
                          "iteration 0 .* does not follow run.json"),
    "base hash in run.json": (
        lambda d: _edit_json(d / "run.json", lambda m: m.__setitem__("base_codes_sha256", "0" * 64)),
        "iteration 0 .* does not follow run.json"),
    "record removed from the middle": (lambda d: _step(d, 2).unlink(), "expected iteration 2, found it-00000003"),
    "last record removed": (lambda d: _step(d, 5).unlink(), "final.json does not match the log: iterations is 6"),
    "records swapped": (
        lambda d: (_step(d, 2).rename(d / "x"), _step(d, 3).rename(_step(d, 2)), (d / "x").rename(_step(d, 3))),
        "holds iteration 3, not 2: records were renamed or reordered"),
    "final.json codes edited": (lambda d: _edit_json(d / "final.json", lambda f: f.__setitem__("iterations", 5)),
                                "final.json does not match the log: iterations is 5"),
    "final.json empty": (lambda d: (d / "final.json").write_text(""), "final.json is empty"),
    "final.json garbage": (lambda d: (d / "final.json").write_bytes(b"\xff\xfe\x00garbage"),
                           "final.json is not valid JSON"),
    "run.json empty": (lambda d: (d / "run.json").write_text(""), "run.json is empty"),
    "run.json garbage": (lambda d: (d / "run.json").write_bytes(b"\x89PNG\r\n"), "run.json is not valid JSON"),
    "old format version": (lambda d: _edit_json(d / "run.json", lambda m: m.__setitem__("version", 1)),
                           "format version 1 .written before logs were hash-chained"),
}


def _fix_own_hash(log: Path, iteration: int) -> None:
    path = _step(log, iteration)
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    checkpoint = meta.get(b"qes.codes_sha256")
    meta[RECORD_KEY] = record_sha256(
        meta[PREV_KEY].decode(), iteration, table.to_pydict(), checkpoint.decode() if checkpoint else None
    ).encode()
    pq.write_table(table.replace_schema_metadata(meta), path)


def _qes(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "qes.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.parametrize("name", list(TAMPERINGS))
def test_tampering_is_refused_naming_the_record(log: Path, name: str) -> None:
    tamper, message = TAMPERINGS[name]
    tamper(log)
    with pytest.raises(SeedLogError, match=message):
        SeedLog.open(log)


@pytest.mark.parametrize("name", ["coefficient +1", "records swapped", "final.json garbage"])
def test_verify_log_command_refuses_tampering(log: Path, name: str) -> None:
    assert _qes("verify-log", str(log)).returncode == 0
    TAMPERINGS[name][0](log)
    result = _qes("verify-log", str(log))
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("qes verify-log: error: ") and str(log) in last, result.stderr


def test_verify_log_reports_the_run(run) -> None:
    _, run_dir, final = run
    result = _qes("verify-log", str(run_dir))
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    seedlog = SeedLog.open(run_dir)
    assert report["iterations"] == 6 and report["finished"] and report["codes_sha256"] == final
    assert report["last_record_sha256"] == seedlog.head and report["base_sha256"] == seedlog.meta["base"]["sha256"]


def test_rechained_forgery_passes_the_chain_but_not_replay(run, log: Path, tmp_path: Path) -> None:
    """The chain proves integrity, not authorship: a forger who recomputes every hash makes a consistent log.

    Replay still stops at the first hash checkpoint the forged coefficient contradicts.
    """
    base = run[0]
    rewrite_step(log, 2, _add("coef", 0, 1 << 15))
    rechain(log, 2)
    SeedLog.open(log)  # consistent
    with pytest.raises(ReplayMismatch, match="after iteration 3 is .* but the seed log recorded"):
        replay_checkpoint(base, log, tmp_path / "out")


def test_unfinished_log_needs_partial(run, log: Path, tmp_path: Path) -> None:
    base, run_dir, final = run
    for iteration in (4, 5):
        _step(log, iteration).unlink()
    (log / "final.json").unlink()
    with pytest.raises(SeedLogError, match="has no final.json: the run did not finish .4 iterations logged.*--partial"):
        replay_checkpoint(base, log, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    result = _qes("replay", "--base", str(base), "--log", str(log), "--out", str(tmp_path / "partial"), "--partial")
    assert result.returncode == 0, result.stderr
    assert "re-derived iteration 4; the run did not finish" in result.stderr
    report = json.loads(result.stdout.splitlines()[0])
    assert report["iterations"] == 4 and report["finished"] is False
    assert report["codes_sha256"] == SeedLog.open(log).records[3].checkpoint != final


def test_replay_until_a_curve_point(run, tmp_path: Path) -> None:
    """`--until N` re-derives the model after iteration N of a finished log: the codes its checkpoint recorded."""
    base, run_dir, final = run
    result = _qes("replay", "--base", str(base), "--log", str(run_dir), "--out", str(tmp_path / "it4"), "--until", "4")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[0])
    assert (report["iterations"], report["until"]) == (4, 4)
    assert report["codes_sha256"] == SeedLog.open(run_dir).records[3].checkpoint != final
    assert "did not finish" not in result.stderr
    assert replay_checkpoint(base, run_dir, tmp_path / "it6", until=6)["codes_sha256"] == final
    with pytest.raises(SeedLogError, match="until iteration 7: it holds 6"):
        replay_checkpoint(base, run_dir, tmp_path / "it7", until=7)
    assert not (tmp_path / "it7").exists()


def test_empty_log_is_refused(run, log: Path, tmp_path: Path) -> None:
    shutil.rmtree(log / "steps")
    (log / "steps").mkdir()
    (log / "final.json").unlink()
    with pytest.raises(SeedLogError, match="holds no iterations"):
        replay_checkpoint(run[0], log, tmp_path / "out", partial=True)


# --- the base identity ---------------------------------------------------------------------------------


def _altered_base(base: Path, tmp_path: Path, tensor_suffix: str | None = None, config_edit=None) -> Path:
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "base"
    shutil.copytree(base, copy)
    if tensor_suffix is not None:
        tensors = load_file(copy / "model.safetensors")
        key = sorted(k for k in tensors if k.endswith(tensor_suffix))[0]
        if tensor_suffix == ".qzeros":
            tensors[key] = tensors[key] ^ 1
        else:
            tensors[key] = tensors[key].clone()
            tensors[key].view(-1)[0] *= 4
        save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    if config_edit is not None:
        _edit_json(copy / "config.json", config_edit)
    return copy


@pytest.mark.parametrize(
    ("suffix", "config_edit", "part"),
    [
        (".qweight", None, "codes"),
        (".scales", None, "scales"),
        (".qzeros", None, "zeros"),
        ("embed_tokens.weight", None, "tensors"),
        ("norm.weight", None, "tensors"),
        (None, lambda c: c["quantization_config"].__setitem__("damp_percent", 0.5), "quantization_config"),
        (None, lambda c: c.__setitem__("rms_norm_eps", 1e-3), "model_config"),
    ],
)
def test_altered_base_is_refused_naming_the_part(run, tmp_path: Path, suffix, config_edit, part: str) -> None:
    base, run_dir, _ = run
    altered = _altered_base(base, tmp_path, suffix, config_edit)
    with pytest.raises(SeedLogError, match=f"base checkpoint mismatch in {part}:") as refused:
        replay_checkpoint(altered, run_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # other codes are what quantizing again on another kind of CPU gives: the message says so
    assert ("not the same on Intel and AMD CPUs" in str(refused.value)) == (part == "codes")


def test_replayed_checkpoint_carries_the_base_parts(run, tmp_path: Path) -> None:
    from qes.identity import checkpoint_parts

    base, run_dir, final = run
    replay_checkpoint(base, run_dir, tmp_path / "out")
    want = SeedLog.open(run_dir).meta["base"]["parts"]
    got = checkpoint_parts(tmp_path / "out")
    assert {k: got[k] for k in ("scales", "zeros", "g_idx", "tensors", "quantization_config", "model_config")} == {
        k: want[k] for k in ("scales", "zeros", "g_idx", "tensors", "quantization_config", "model_config")
    }


# --- outputs never overwrite inputs ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("where", "relation"),
    [("log", "is the input --log"), ("base", "is the input --base"), ("log/steps", "lies inside the input --log"),
     (".", "contains the input --base")],
)
def test_replay_never_writes_over_its_inputs(run, tmp_path: Path, where: str, relation: str) -> None:
    base, run_dir, _ = run
    work = tmp_path / "work"
    shutil.copytree(run_dir, work / "log")
    shutil.copytree(base, work / "base")
    before = file_hashes(work)
    out = work if where == "." else work / where
    result = _qes("replay", "--base", str(work / "base"), "--log", str(work / "log"), "--out", str(out), "--overwrite")
    assert result.returncode == 2
    assert relation in result.stderr.strip().splitlines()[-1], result.stderr
    assert file_hashes(work) == before


def test_existing_output_needs_overwrite(run, tmp_path: Path) -> None:
    base, run_dir, final = run
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = _qes("replay", "--base", str(base), "--log", str(run_dir), "--out", str(out))
    assert result.returncode == 2 and "already holds files; pass --overwrite" in result.stderr
    assert (out / "notes.txt").read_text() == "mine"
    result = _qes("replay", "--base", str(base), "--log", str(run_dir), "--out", str(out), "--overwrite")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == final and not (out / "notes.txt").exists()


def test_missing_inputs_are_named(tmp_path: Path) -> None:
    result = _qes("export", "--base", str(tmp_path), "--tuned", str(tmp_path), "--log", str(tmp_path),
                  "--metrics", str(tmp_path / "metrics.json"), "--out", str(tmp_path / "x"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        f"qes export: error: --metrics {tmp_path / 'metrics.json'}: expected a file, found nothing there"
    )
    result = _qes("task-data", "--model", "/nonexistent", "--out", str(tmp_path / "data"))
    assert result.stderr.strip().splitlines()[-1] == (
        "qes task-data: error: --model /nonexistent: expected a folder, found nothing there"
    )
    assert not (tmp_path / "data").exists()


def test_failed_fetch_leaves_no_empty_folder(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "qes.cli", "fetch", "--source", "hf:someorg/somerepo"],
                            cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2
    assert "cannot download 'someorg/somerepo'" in result.stderr.strip().splitlines()[-1]
    assert list(tmp_path.iterdir()) == []  # not even results/models/


def test_a_stage_error_ends_the_log_and_reaches_the_console(tmp_path: Path) -> None:
    script = (
        "import logging\n"
        "from qes.logutil import PROGRESS, log_to\n"
        "from qes.seedlog import SeedLog\n"
        f"with log_to({str(tmp_path / 'stage.log')!r}) as log:\n"
        "    log.warning('heads up')\n"
        "    logging.getLogger('qes.train').info('iter 1/2  reward mean 0.5000', extra=PROGRESS)\n"
        "    logging.getLogger('qes.train').info('details for the log only')\n"
        f"    SeedLog.open({str(tmp_path)!r})\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    log_lines = (tmp_path / "stage.log").read_text().strip().splitlines()
    assert "Traceback" in (tmp_path / "stage.log").read_text()
    assert log_lines[-1].endswith(f"ERROR qes: SeedLogError: {tmp_path} holds no run.json: not a seed log")
    console = result.stderr.strip().splitlines()
    assert console[0] == f"WARNING: heads up (log: {tmp_path / 'stage.log'})"
    assert console[1].endswith(" iter 1/2  reward mean 0.5000") and len(console) == 3  # progress, not details
    assert "details for the log only" in (tmp_path / "stage.log").read_text()
    assert console[-1] == (
        f"ERROR: SeedLogError: {tmp_path} holds no run.json: not a seed log (log: {tmp_path / 'stage.log'})"
    )
    assert not any("Traceback" in line for line in console)


def test_finetune_refuses_a_folder_that_is_not_a_seed_log(tiny_gptq, tmp_path: Path) -> None:
    from qes.train import open_or_create

    model, _ = load_quantized(tiny_gptq(4), backend="none")
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "data.csv").write_text("a,b\n")
    from qes.identity import base_identity

    with pytest.raises(SeedLogError, match="holds files but no seed log"):
        open_or_create(folder, CFG, quantized_linears(model), base_identity(model), {})
    assert sorted(p.name for p in folder.iterdir()) == ["data.csv"]


def test_base_identity_is_independent_of_load_dtype_and_backend(tiny_gptq) -> None:
    from qes.identity import base_identity

    a, _ = load_quantized(tiny_gptq(4), backend="none")
    b, _ = load_quantized(tiny_gptq(4), dtype="bfloat16", backend="dense")
    assert base_identity(a) == base_identity(b)
    assert hashlib.sha256(json.dumps(base_identity(a)["parts"], sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest() == base_identity(a)["sha256"]
