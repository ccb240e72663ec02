"""The config schema: every key's type, default and description (``config.schema.yaml`` next to this file; the
workflow's ``workflow/schemas/config.schema.yaml`` links to it), a validator that fills in the defaults, and the
strict types (an integer is no float, numbers are finite) that Snakemake's own validation does not apply."""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).with_name("config.schema.yaml")


class ConfigError(ValueError):
    """Settings that cannot run; the message names every offending key, what was expected and what was found."""


@functools.cache
def schema() -> dict:
    """The config schema (every key with a type, a default and a description)."""
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _with_defaults(base: type) -> type:
    """A validator class that also fills in the defaults of missing properties (jsonschema does not by itself)."""
    check_properties = base.VALIDATORS["properties"]

    def fill_then_check(validator: Any, properties: dict, instance: Any, sub: dict) -> Iterator[Any]:
        if isinstance(instance, dict):
            for key, spec in properties.items():
                if key not in instance and "default" in spec:
                    instance[key] = copy.deepcopy(spec["default"])
        yield from check_properties(validator, properties, instance, sub)

    return jsonschema.validators.extend(base, {"properties": fill_then_check})


def _strict_types(base: type) -> type:
    """JSON Schema counts 8.0 as an integer and NaN or infinity as numbers; settings do not: an integer is
    written as one, and a number is finite."""

    def is_integer(_checker: Any, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    def is_number(_checker: Any, value: Any) -> bool:
        return is_integer(_checker, value) or (isinstance(value, float) and math.isfinite(value))

    checker = base.TYPE_CHECKER.redefine_many({"integer": is_integer, "number": is_number})
    return jsonschema.validators.extend(base, type_checker=checker)


_STRICT = _strict_types(jsonschema.Draft202012Validator)
_FILLING = _with_defaults(_STRICT)


def _subschema(path: Sequence[str]) -> dict:
    node = schema()
    for key in path:
        node = node["properties"][key]
    return node


def allowed(path: Sequence[str]) -> tuple:
    """The values the schema allows for the key at ``path`` (its ``enum``), e.g. ``("quantize", "bits")``."""
    return tuple(_subschema(path)["enum"])


def _describe(error: jsonschema.ValidationError, prefix: Sequence[str]) -> str:
    key = ".".join(str(p) for p in [*prefix, *error.absolute_path]) or "(top level)"
    return f"{key}: {error.message}"


def complete(values: Any, section: str | Sequence[str] = (), *, source: str = "config") -> Any:
    """Validate `values` (the whole config, or the block at `section`) and return a copy with defaults filled.

    Raises :class:`ConfigError` naming each bad key as its dotted path (``finetune.residual.window``).
    """
    path = [section] if isinstance(section, str) else list(section)
    sub = _subschema(path)
    data = {} if values is None and sub.get("type") == "object" else copy.deepcopy(values)
    errors = sorted(_FILLING(sub).iter_errors(data), key=lambda e: [str(p) for p in e.absolute_path])
    if errors:
        lines = [_describe(error, path) for error in errors[:8]]
        more = f"\n  ... and {len(errors) - 8} more" if len(errors) > 8 else ""
        raise ConfigError(f"invalid {source}:\n  " + "\n  ".join(lines) + more)
    return data


def check_values(section: str | Sequence[str], values: Any, *, source: str = "settings") -> None:
    """Validate a partial block (keys left out are fine) without keeping the filled copy."""
    complete(values, section, source=source)


def strict_problems(config: dict) -> list[str]:
    """The first eight violations of the schema's strict types in a complete workflow config, as ``key: why``."""
    errors = sorted(_STRICT(schema()).iter_errors(config), key=lambda e: [str(p) for p in e.absolute_path])
    return [_describe(error, ()) for error in errors[:8]]
