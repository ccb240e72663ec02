"""Signed seed logs: `qes sign-log`, `qes verify-log --signer`, `qes replay --require-signature` and export.

Keys are real ed25519 keys made with ssh-keygen; the log is a real finished 6-iteration run on the tiny GPTQ
model. Where ssh-keygen is missing, the module installs openssh-client with apt-get (root needed), and
skips, saying why, where it cannot.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from _synthetic_run import fitness_of
from test_log_integrity import CFG, _add, rechain, rewrite_step

from qes.checkpoint import load_quantized
from qes.cli import main
from qes.codes import quantized_linears
from qes.export import export_run
from qes.replay import replay_checkpoint
from qes.seedlog import SeedLog
from qes.signing import SIGNATURE, SignatureError, verify_signature
from qes.train import train

ALICE = "alice@example.org"


def _install() -> str | None:
    """Install ssh-keygen (Debian's openssh-client) if needed; returns a reason to skip, or None."""
    if shutil.which("ssh-keygen"):
        return None
    if os.geteuid() != 0:
        return "ssh-keygen is not installed and installing openssh-client needs root"
    if not shutil.which("apt-get"):
        return "ssh-keygen is not installed and there is no apt-get to install openssh-client"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "openssh-client"]
    for command in (["apt-get", "update", "-qq"], install):
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        if result.returncode != 0:
            return f"`{' '.join(command)}` failed: {result.stderr.strip()[-500:]}"
    return None if shutil.which("ssh-keygen") else "ssh-keygen is still missing after installing openssh-client"


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """Private keys of alice and mallory, and an allowed-signers file that lists alice only."""
    reason = _install()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("keys")
    paths = {}
    for name in ("alice", "mallory"):
        paths[name] = folder / name
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(paths[name])],
                       check=True, timeout=60)
    public = (folder / "alice.pub").read_text().split()[:2]
    paths["allowed"] = folder / "allowed_signers"
    paths["allowed"].write_text(f'{ALICE} namespaces="qes-seedlog" {" ".join(public)}\n')
    return paths


@pytest.fixture(scope="module")
def run(tiny_gptq, tmp_path_factory) -> tuple[Path, Path]:
    base = tiny_gptq(4)
    run_dir = tmp_path_factory.mktemp("signing") / "log"
    model, _ = load_quantized(base, backend="dense")
    train(model, quantized_linears(model), fitness_of(model), CFG, run_dir)
    return base, run_dir


@pytest.fixture
def log(run, tmp_path) -> Path:
    copy = tmp_path / "log"
    shutil.copytree(run[1], copy)
    return copy


def _qes(capsys, *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def _refusal(err: str, command: str) -> str:
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"qes {command}: error: "), err
    return last


def test_signed_log_verifies_from_a_copy(keys, log, run, tmp_path, capsys) -> None:
    rc, out, _ = _qes(capsys, "sign-log", log, "--key", keys["alice"], "--identity", ALICE)
    assert rc == 0
    signed = json.loads(out)
    assert signed["statement"]["finished"] and signed["statement"]["last_record_sha256"] == SeedLog.open(log).head
    assert json.loads((log / "signature.json").read_text())["identity"] == ALICE
    moved = tmp_path / "elsewhere" / "copied-log"
    shutil.copytree(log, moved)
    for extra in ([], ["--identity", ALICE]):
        rc, out, err = _qes(capsys, "verify-log", moved, "--signer", keys["allowed"], *extra)
        assert rc == 0, err
        report = json.loads(out)["signature"]
        assert report["ok"] and report["signer"] == ALICE
        assert report["key_fingerprint"] == signed["key_fingerprint"].strip() != ""
    rc, out, err = _qes(capsys, "replay", "--base", run[0], "--log", moved, "--out", tmp_path / "tuned",
                        "--require-signature", keys["allowed"])
    assert rc == 0, err
    assert json.loads(out.splitlines()[0])["signature"]["signer"] == ALICE


def test_forged_log_is_refused(keys, log, run, tmp_path, capsys) -> None:
    """A forger who recomputes the chain makes a consistent log, but not one the signature covers."""
    assert _qes(capsys, "sign-log", log, "--key", keys["alice"])[0] == 0
    rewrite_step(log, 2, _add("coef", 0, 1))
    rechain(log, 2)
    SeedLog.open(log)  # the chain alone does not notice
    rc, _, err = _qes(capsys, "verify-log", log, "--signer", keys["allowed"])
    assert rc == 2
    assert "does not cover the seed log" in _refusal(err, "verify-log")
    assert "last_record_sha256, codes_sha256 differ" not in err  # a rechained forgery keeps the final codes hash
    assert "last_record_sha256 differ" in err
    out = tmp_path / "tuned"
    rc, _, err = _qes(capsys, "replay", "--base", run[0], "--log", log, "--out", out,
                      "--require-signature", keys["allowed"])
    assert rc == 2 and "does not cover the seed log" in _refusal(err, "replay")
    assert not out.exists()


def test_grown_log_needs_a_new_signature(keys, log, capsys) -> None:
    held = log.parent / "held"
    held.mkdir()
    for name in ("steps/it-00000004.parquet", "steps/it-00000005.parquet", "final.json"):
        shutil.move(log / name, held / Path(name).name)
    rc, out, err = _qes(capsys, "sign-log", log, "--key", keys["alice"])
    assert rc == 0 and "signed an unfinished run (iteration 4)" in err
    assert json.loads(out)["statement"] == {**json.loads(out)["statement"], "finished": False, "codes_sha256": None}
    assert _qes(capsys, "verify-log", log, "--partial", "--signer", keys["allowed"])[0] == 0
    for name in ("it-00000004.parquet", "it-00000005.parquet"):
        shutil.move(held / name, log / "steps" / name)
    shutil.move(held / "final.json", log / "final.json")
    rc, _, err = _qes(capsys, "verify-log", log, "--signer", keys["allowed"])
    assert rc == 2
    assert "signed at iteration 4, unfinished, the log is at iteration 6, finished" in _refusal(err, "verify-log")
    before = (log / SIGNATURE).read_bytes()
    rc, _, err = _qes(capsys, "sign-log", log, "--key", keys["alice"])
    assert rc == 2 and "already exists (it covers iteration 4, unfinished" in _refusal(err, "sign-log")
    assert "--overwrite" in err and (log / SIGNATURE).read_bytes() == before
    assert _qes(capsys, "sign-log", log, "--key", keys["alice"], "--overwrite")[0] == 0
    assert _qes(capsys, "verify-log", log, "--signer", keys["allowed"])[0] == 0


def test_unknown_signer_is_refused(keys, log, capsys) -> None:
    assert _qes(capsys, "sign-log", log, "--key", keys["mallory"], "--identity", ALICE)[0] == 0
    rc, _, err = _qes(capsys, "verify-log", log, "--signer", keys["allowed"])
    assert rc == 2 and "unknown signer" in _refusal(err, "verify-log")
    assert str(keys["allowed"]) in err
    assert _qes(capsys, "sign-log", log, "--key", keys["alice"], "--overwrite")[0] == 0
    rc, _, err = _qes(capsys, "verify-log", log, "--signer", keys["allowed"], "--identity", "bob@example.org")
    assert rc == 2
    assert f"does not list for bob@example.org in namespace qes-seedlog (it lists it for {ALICE})" in err


def test_missing_signature_is_refused_when_asked_for(keys, log, run, tmp_path, capsys) -> None:
    rc, out, _ = _qes(capsys, "verify-log", log)
    assert rc == 0 and "signature" not in json.loads(out)
    rc, _, err = _qes(capsys, "verify-log", log, "--signer", keys["allowed"])
    assert rc == 2 and f"is not signed: {log / SIGNATURE} is missing" in _refusal(err, "verify-log")
    rc, _, err = _qes(capsys, "replay", "--base", run[0], "--log", log, "--out", tmp_path / "tuned",
                      "--require-signature", keys["allowed"])
    assert rc == 2 and "is not signed" in _refusal(err, "replay")
    rc, _, err = _qes(capsys, "verify-log", log, "--identity", ALICE)
    assert rc == 2 and "pass --signer FILE too" in _refusal(err, "verify-log")
    rc, _, err = _qes(capsys, "verify-log", log, "--signer", tmp_path / "none")
    assert rc == 2 and f"--signer {tmp_path / 'none'}: expected" in _refusal(err, "verify-log")


def test_missing_ssh_keygen_is_named(log, monkeypatch) -> None:
    monkeypatch.setattr("qes.signing.shutil.which", lambda name: None)
    (log / SIGNATURE).write_text("-----BEGIN SSH SIGNATURE-----\n")
    with pytest.raises(SignatureError, match="need ssh-keygen, which is not on PATH; .*apt-get install openssh-client"):
        verify_signature(SeedLog.open(log), log / "allowed_signers")


METRICS = {part: {"n": 4, "accuracy": 0.25, "format_rate": 0.5, "mean_reward": 0.3} for part in ("base", "tuned")}


def test_export_carries_the_signature(keys, log, run, tmp_path, capsys) -> None:
    tuned = tmp_path / "tuned"
    replay_checkpoint(run[0], log, tuned)
    plain = export_run(tuned, log, run[0], METRICS, tmp_path / "plain")
    card = (plain / "README.md").read_text()
    assert "Signature" not in card and "qes_seed_log" not in card and not (plain / "seed_log" / SIGNATURE).exists()
    assert _qes(capsys, "sign-log", log, "--key", keys["alice"], "--identity", ALICE)[0] == 0
    fingerprint = json.loads((log / "signature.json").read_text())["key_fingerprint"]
    out = export_run(tuned, log, run[0], METRICS, tmp_path / "signed")
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert f'qes_seed_log_signer: "{ALICE}"' in front and f'qes_seed_log_signer_key: "{fingerprint}"' in front
    assert "## Signature" in card and SeedLog.open(log).head in card
    assert (out / "seed_log" / SIGNATURE).read_bytes() == (log / SIGNATURE).read_bytes()
    rc, report, err = _qes(capsys, "verify-log", out / "seed_log", "--signer", keys["allowed"])
    assert rc == 0 and json.loads(report)["signature"]["signer"] == ALICE, err
    rewrite_step(log, 1, _add("coef", 0, 1))
    rechain(log, 1)
    with pytest.raises(SignatureError, match="does not cover the seed log"):
        export_run(tuned, log, run[0], METRICS, tmp_path / "forged")
    assert not (tmp_path / "forged").exists()
