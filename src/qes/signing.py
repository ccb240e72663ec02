"""Signed seed logs: an SSH signature that says who wrote a log, made and checked by OpenSSH's ssh-keygen.

The hash chain proves that a log is intact, not who made it: whoever rewrites a log and recomputes every
hash makes a consistent one. A signature binds a small statement about the log to a key::

    {"format": "qes-seedlog-signature", "version": 1, "iterations": ..., "last_record_sha256": ...,
     "run_sha256": ..., "base_sha256": ..., "base_codes_sha256": ..., "finished": ..., "codes_sha256": ...}

(canonical JSON, the values `qes verify-log` prints) with `ssh-keygen -Y sign -n qes-seedlog`. The log
folder then holds

    signature.sig       the SSH signature (armored text)
    signature.json      what was signed, the name the signer gave and the key's fingerprint, for people

Verification recomputes the statement from the log itself, never from signature.json, and checks the
signature against an allowed-signers file (`ssh-keygen -Y verify`), so a log that grew or was altered
after signing, or one signed by a key the file does not list, is refused.

The module imports only the standard library at load time, as the `qes` command's parser needs its
options and commands (at the end) before any seed log is read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from qes.seedlog import SeedLog

NAMESPACE = "qes-seedlog"
SIGNATURE = "signature.sig"
DESCRIPTION = "signature.json"
STATEMENT_FORMAT = "qes-seedlog-signature"
STATEMENT_VERSION = 1
INSTALL_HINT = (
    "install OpenSSH's client: `apt-get install openssh-client` (Debian, Ubuntu), "
    "`dnf install openssh-clients` (Fedora, RHEL) or `brew install openssh` (macOS)"
)


class SignatureError(RuntimeError):
    """A signature that is missing, does not cover the log, or comes from a signer the caller does not trust."""


def ssh_keygen() -> str:
    """The path of ssh-keygen; its absence is an error that says how to install it."""
    found = shutil.which("ssh-keygen")
    if found is None:
        raise SignatureError(f"signed seed logs need ssh-keygen, which is not on PATH; {INSTALL_HINT}")
    return found


def _ssh_keygen(*args: str, data: bytes) -> subprocess.CompletedProcess:
    return subprocess.run([ssh_keygen(), "-Y", *args], input=data, capture_output=True, timeout=120)


def _said(result: subprocess.CompletedProcess) -> str:
    """ssh-keygen's own explanation (its first line on stderr), for error messages."""
    lines = result.stderr.decode(errors="replace").strip().splitlines()
    return lines[0] if lines else f"exit status {result.returncode}"


def statement(seedlog: SeedLog) -> dict[str, Any]:
    """What a signature covers, computed from the log: its last record, run, base and (if finished) result."""
    finished = seedlog.finished
    return {
        "format": STATEMENT_FORMAT,
        "version": STATEMENT_VERSION,
        "iterations": seedlog.iterations,
        "last_record_sha256": seedlog.head,
        "run_sha256": seedlog.run_sha256,
        "base_sha256": seedlog.meta["base"]["sha256"],
        "base_codes_sha256": seedlog.meta["base_codes_sha256"],
        "finished": finished is not None,
        "codes_sha256": finished["codes_sha256"] if finished else None,
    }


def message(fields: dict[str, Any]) -> bytes:
    """The bytes that are signed: the statement as canonical JSON."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _state(fields: dict[str, Any]) -> str:
    return f"iteration {fields.get('iterations')}, {'finished' if fields.get('finished') else 'unfinished'}"


def _difference(signed: dict[str, Any] | None, fields: dict[str, Any]) -> str:
    """How the statement signature.json says was signed differs from the log's, in words."""
    if signed is None:
        return f"{DESCRIPTION} does not say what was signed"
    differ = [key for key in fields if signed.get(key) != fields[key]]
    if not differ:
        return f"{DESCRIPTION} describes the log as it is, so {SIGNATURE} was replaced or damaged"
    return f"signed at {_state(signed)}, the log is at {_state(fields)}; {', '.join(differ)} differ"


def _description(log_dir: Path) -> dict[str, Any]:
    """signature.json, or {} where it cannot be read: it only informs people, verification never reads it."""
    from qes.seedlog import SeedLogError, read_json

    try:
        return read_json(log_dir / DESCRIPTION, "description of the log's signature")
    except SeedLogError:
        return {}


def _signed_statement(log_dir: Path) -> dict[str, Any] | None:
    """The statement signature.json says was signed, if it says."""
    signed = _description(log_dir).get("statement")
    return signed if isinstance(signed, dict) else None


def _key_of(signature: Path, data: bytes) -> tuple[str | None, str]:
    """The fingerprint of the key that made `signature` over `data` (None if it did not), and ssh-keygen's reason."""
    result = _ssh_keygen("check-novalidate", "-n", NAMESPACE, "-s", str(signature), data=data)
    if result.returncode != 0:
        return None, _said(result)
    return result.stdout.decode().strip().rsplit(" ", 1)[-1], ""


def sign_log(log_dir: str | Path, key: str | Path, identity: str | None = None, overwrite: bool = False) -> dict:
    """Sign the log in `log_dir` with the SSH key `key` (a private key, or a public one held by ssh-agent).

    An existing signature is replaced only when `overwrite`; both files are written atomically.
    """
    from qes.logchain import write_atomic
    from qes.seedlog import SeedLog

    log_dir = Path(log_dir)
    seedlog = SeedLog.open(log_dir)
    seedlog.require_complete(partial=True)
    if (log_dir / SIGNATURE).exists() and not overwrite:
        old, now = _signed_statement(log_dir), statement(seedlog)
        covers = "" if old is None else f" (it covers {_state(old)}; the log is at {_state(now)})"
        covers = " (it covers the log as it is)" if old == now else covers
        raise SignatureError(
            f"{log_dir / SIGNATURE} already exists{covers}; pass --overwrite to replace it with a new signature"
        )
    fields = statement(seedlog)
    data = message(fields)
    result = _ssh_keygen("sign", "-n", NAMESPACE, "-f", str(key), data=data)
    if result.returncode != 0 or not result.stdout.startswith(b"-----BEGIN SSH SIGNATURE-----"):
        raise SignatureError(f"ssh-keygen could not sign {log_dir} with the key {key}: {_said(result)}")
    with tempfile.TemporaryDirectory() as tmp:
        made = Path(tmp) / SIGNATURE
        made.write_bytes(result.stdout)
        fingerprint, said = _key_of(made, data)
    if fingerprint is None:
        raise SignatureError(f"ssh-keygen signed with the key {key}, but the signature does not check: {said}")
    description = {
        "namespace": NAMESPACE,
        "statement": fields,
        "identity": identity,
        "key_fingerprint": fingerprint,
        "signature_sha256": hashlib.sha256(result.stdout).hexdigest(),
    }
    text = json.dumps(description, indent=2, sort_keys=True) + "\n"
    write_atomic(log_dir / DESCRIPTION, lambda tmp: tmp.write_text(text))
    write_atomic(log_dir / SIGNATURE, lambda tmp: tmp.write_bytes(result.stdout))
    return {"seed_log": str(log_dir), "signature": str(log_dir / SIGNATURE), **description}


def _covering_key(seedlog: SeedLog) -> tuple[Path, bytes, str]:
    """The signature file, the statement recomputed from the log, and the key that signed that statement."""
    signature = seedlog.path / SIGNATURE
    if not signature.is_file():
        raise SignatureError(
            f"the seed log {seedlog.path} is not signed: {signature} is missing "
            f"(sign it with `qes sign-log {seedlog.path} --key KEY`)"
        )
    fields = statement(seedlog)
    data = message(fields)
    fingerprint, said = _key_of(signature, data)
    if fingerprint is None and "incorrect signature" not in said:
        raise SignatureError(f"the signature {signature} cannot be read as an SSH signature: {said}")
    if fingerprint is None:
        raise SignatureError(
            f"the signature {signature} does not cover the seed log {seedlog.path}: it was made over other hashes "
            f"({_difference(_signed_statement(seedlog.path), fields)}); the log grew or was altered after it was "
            f"signed (if you wrote the new records, sign it again: `qes sign-log {seedlog.path} --key KEY --overwrite`)"
        )
    return signature, data, fingerprint


def signature_summary(seedlog: SeedLog) -> dict | None:
    """For a signed log, the key and the name its signer gave, after checking it covers the log; else None.

    This checks the signature against the log, not whether the key is trusted (that needs an allowed-signers file).
    """
    if not (seedlog.path / SIGNATURE).exists():
        return None
    _, _, fingerprint = _covering_key(seedlog)
    return {"key_fingerprint": fingerprint, "identity": _description(seedlog.path).get("identity"),
            "last_record_sha256": seedlog.head}


def _principals(signature: Path, allowed_signers: Path) -> list[str]:
    result = _ssh_keygen("find-principals", "-s", str(signature), "-f", str(allowed_signers), data=b"")
    return result.stdout.decode().splitlines() if result.returncode == 0 else []


def verify_signature(seedlog: SeedLog, allowed_signers: str | Path, identity: str | None = None) -> dict:
    """Check the log's signature over the statement recomputed from the log, by a signer `allowed_signers` lists.

    With `identity`, the signer must be listed under that name; without, under any name.
    """
    allowed_signers = Path(allowed_signers)
    signature, data, fingerprint = _covering_key(seedlog)
    listed = _principals(signature, allowed_signers)
    said = ""
    for principal in [identity] if identity else listed:
        result = _ssh_keygen("verify", "-f", str(allowed_signers), "-I", principal, "-n", NAMESPACE,
                             "-s", str(signature), data=data)
        if result.returncode == 0:
            return {"ok": True, "signer": principal, "key_fingerprint": fingerprint, "signature": str(signature)}
        said = f"; ssh-keygen: {_said(result)}"
    wanted = f" for {identity}" if identity else ""
    other = f" (it lists it for {', '.join(listed)})" if identity and listed else ""
    raise SignatureError(
        f"unknown signer: the seed log {seedlog.path} was signed by the key {fingerprint}, which the allowed "
        f"signers file {allowed_signers} does not list{wanted} in namespace {NAMESPACE}{other}{said}"
    )


# --- command line --------------------------------------------------------------------------------------


def add_signer_options(parser: argparse.ArgumentParser, option: str, what: str) -> None:
    """`option ALLOWED_SIGNERS` and `--identity NAME`, for the commands that check a signature."""
    parser.add_argument(option, type=Path, default=None, metavar="ALLOWED_SIGNERS",
                        help=f"{what} this allowed-signers file (OpenSSH format; see `qes sign-log`)")
    parser.add_argument("--identity", default=None, metavar="NAME",
                        help=f"the signer must be listed under NAME in the {option} file (default: any name)")


def signature_report(log: Path | SeedLog, allowed_signers: Path | None, identity: str | None, option: str) -> dict:
    """{"signature": ...} once the log's signature verifies against `allowed_signers`; {} when none is given."""
    from qes.seedlog import SeedLog

    if allowed_signers is None:
        if identity is not None:
            raise ValueError(f"--identity names a signer in an allowed-signers file; pass {option} FILE too")
        return {}
    if not allowed_signers.is_file():
        raise FileNotFoundError(f"{option} {allowed_signers}: expected an allowed-signers file, found none there")
    seedlog = log if isinstance(log, SeedLog) else SeedLog.open(log)
    return {"signature": verify_signature(seedlog, allowed_signers, identity)}


def add_sign_log(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log", type=Path, help="the run's seed log folder (holds run.json, steps/)")
    parser.add_argument("--key", type=Path, required=True,
                        help="SSH private key to sign with (or its public key, when ssh-agent holds the private one)")
    parser.add_argument("--identity", default=None, metavar="NAME",
                        help="the name you sign as, recorded in signature.json (verifiers list it in allowed_signers)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing signature (default: refuse)")


def cmd_sign_log(args: argparse.Namespace) -> int:
    """`qes sign-log`: sign, then print what was signed as JSON."""
    if not args.key.is_file():
        raise FileNotFoundError(f"--key {args.key}: expected an SSH key file, found none there")
    signed = sign_log(args.log, args.key, args.identity, args.overwrite)
    if not signed["statement"]["finished"]:
        print(f"qes sign-log: signed an unfinished run (iteration {signed['statement']['iterations']}); "
              f"the signature says so", file=sys.stderr)
    print(json.dumps(signed))
    return 0
