"""The form of a seed log's files: every value the reader uses, checked before it is used.

The hash chain proves that run.json and final.json are the ones the records were chained to, not that
they hold sensible values: a log rewritten with a consistent chain can carry a NaN or a string where an
integer is meant. Each such value is refused here with the file and the key named, instead of failing
later inside a conversion ("cannot convert float NaN to integer"). Files that cannot be read at all (a
folder, a link loop, a dangling link, no permission) are refused naming the file.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

HEX64 = re.compile(r"[0-9a-f]{64}")


class SeedLogError(RuntimeError):
    """A seed log that cannot be trusted; the message says which file (and key) and why."""


def read_bytes(path: Path, what: str) -> bytes:
    """The bytes of `path`; every way it can be unreadable is an error that names the file."""
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        if path.is_symlink():
            raise SeedLogError(f"{path} is a link to {os.readlink(path)}, which does not exist ({what})") from err
        raise SeedLogError(f"{path} is missing ({what})") from err
    except IsADirectoryError as err:
        raise SeedLogError(f"{path} is a folder, not a file ({what})") from err
    except OSError as err:
        raise SeedLogError(f"{path} cannot be read ({what}): {err.strerror}") from err


def read_object(path: Path, what: str) -> dict:
    """A JSON object from `path`, refusing an unreadable, empty or non-object file by name."""
    raw = read_bytes(path, what)
    if not raw.strip():
        raise SeedLogError(f"{path} is empty; expected the {what} as a JSON object")
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise SeedLogError(f"{path} is not valid JSON ({what}): {err}") from err
    if not isinstance(data, dict):
        raise SeedLogError(f"{path}: expected the {what} as a JSON object, found {type(data).__name__}")
    return data


def _integer(low: int | None = None) -> Callable[[Any], str | None]:
    wanted = "an integer" if low is None else f"an integer >= {low}"

    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, int) or (low is not None and value < low):
            return wanted
        return None

    return check


def _number(positive: bool = False) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (positive and value <= 0):
            return "a finite number" + (" > 0" if positive else "")
        return None

    return check


def _even_population(value: Any) -> str | None:
    return None if _integer(2)(value) is None and value % 2 == 0 else "an even integer >= 2"


def _string(value: Any) -> str | None:
    return None if isinstance(value, str) else "a string"


def _sha256(value: Any) -> str | None:
    return None if isinstance(value, str) and HEX64.fullmatch(value) else "a sha256 (64 lowercase hex digits)"


def _integers(value: Any) -> str | None:
    ok = isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in value)
    return None if ok else "a list of integers"


def _of(kind: type, name: str) -> Callable[[Any], str | None]:
    return lambda value: None if isinstance(value, kind) else name


def _layers(value: Any) -> str | None:
    fields = {"name": _string, "out": _integer(1), "in": _integer(1), "bits": _integer(1)}
    if isinstance(value, list) and all(
        isinstance(x, dict) and all(check(x.get(k)) is None for k, check in fields.items()) for x in value
    ):
        return None
    return "a list of layers, each with a name and integer out, in and bits"


#: every run.json value a reader uses (dotted key: check)
RUN_KEYS: dict[str, Callable[[Any], str | None]] = {
    "base_codes_sha256": _sha256,
    "base": _of(dict, "an object"),
    "base.sha256": _sha256,
    "base.parts": _of(dict, "an object"),
    "layers": _layers,
    "population": _even_population,
    "global_seed": _integer(0),
    "noise": _of(dict, "an object"),
    "noise.sigma": _number(positive=True),
    "noise.count_thresholds": _integers,
    "noise.magnitude_thresholds": _integers,
    "update": _of(dict, "an object"),
    "update.mode": _string,
    "update.gamma": _number(),
    "update.window": _integer(0),
    "update.residual_clamp": _number(),
    "update.chunk_codes": _integer(1),
    "train": _of(dict, "an object"),
    "train.iterations": _integer(1),
    "train.sigma": _number(positive=True),
    "train.alpha": _number(),
    "train.alpha_warmup": _integer(0),
    "train.alpha_decay": _string,
}

#: every final.json value a reader uses
FINAL_KEYS: dict[str, Callable[[Any], str | None]] = {
    "iterations": _integer(1),
    "codes_sha256": _sha256,
    "run_sha256": _sha256,
    "last_record_sha256": _sha256,
}


def _lookup(data: dict, dotted: str) -> tuple[bool, Any]:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def check_form(data: dict, where: Path, keys: dict[str, Callable[[Any], str | None]]) -> None:
    """Refuse the first key of `keys` that is missing from `data` or holds a value of the wrong form."""
    for key, check in keys.items():
        found, value = _lookup(data, key)
        if not found:
            raise SeedLogError(f"{where}: {key} is missing")
        wanted = check(value)
        if wanted is not None:
            raise SeedLogError(f"{where}: {key} is {json.dumps(value, allow_nan=True)[:80]}, expected {wanted}")


def check_checkpoint(value: str, where: Path, key: str) -> None:
    """Refuse a hash checkpoint that is not a sha256 in the form the log writes."""
    if not HEX64.fullmatch(value):
        raise SeedLogError(f"{where}: {key} is {value[:80]!r}, expected a sha256 (64 lowercase hex digits)")
