"""The arguments the ``qes`` subcommands share: inputs that must exist, fresh output folders, the config
schema's defaults and descriptions, and the compute flags."""

from __future__ import annotations

import argparse
from pathlib import Path

from qes.config import complete, schema


def existing(path: Path, option: str, kind: str = "folder") -> Path:
    """`path` as given, after checking it exists as a folder or file; the error names the option."""
    ok = path.is_dir() if kind == "folder" else path.is_file()
    if not ok:
        found = "a file" if path.is_file() else "a folder" if path.is_dir() else "nothing"
        raise FileNotFoundError(f"{option} {path}: expected a {kind}, found {found} there")
    return path


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    """The --overwrite flag of a command that writes an output folder."""
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing, non-empty output folder (default: refuse)")


def fresh_out(out: Path, args: argparse.Namespace, inputs: dict[str, Path | None]) -> Path:
    """Refuse an output folder that overlaps an input, or one that holds files unless --overwrite.

    Claims `out` first (until the command ends), so that no other process writes it between the check and
    the write, and a second command on the same output is refused while this one runs.
    """
    from qes.claims import acquire
    from qes.fsutil import refuse_overlap

    refuse_overlap(out, {f"--{k}": v for k, v in inputs.items()})
    acquire(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a folder")
    if out.is_dir() and any(out.iterdir()) and not args.overwrite:
        raise FileExistsError(f"--out {out} already holds files; pass --overwrite to replace them")
    return out


def schema_defaults(section: str) -> dict:
    """The config schema's defaults of one block: the CLI's defaults are the workflow's."""
    return complete({}, section)


def describe(section: str, key: str) -> str:
    """The config schema's description of one key (the option's help)."""
    text = " ".join(schema()["properties"][section]["properties"][key]["description"].split())
    return text.replace("%", "%%")


def enum_choices(*path: str) -> list:
    """The allowed values of the config key at `path` (block, key), as the config schema lists them."""
    from qes.schema import allowed

    return list(allowed(path))


def add_compute_options(parser: argparse.ArgumentParser) -> None:
    """The --device, --backend and --dtype flags of the commands that run a model."""
    parser.add_argument("--device", choices=enum_choices("finetune", "device"), default=None,
                        help="where to compute (default: the config's, else auto = cuda when torch sees one)")
    parser.add_argument("--backend", choices=enum_choices("finetune", "backend"), default=None,
                        help="forward path of the quantized layers: int4pack (torch's CPU int4 matmul, INT4), "
                             "dense (dequantized weight, any device), auto (default: int4pack for INT4 on CPU)")
    parser.add_argument("--dtype", choices=enum_choices("finetune", "dtype"), default=None,
                        help="compute dtype (default auto: bf16 on CUDA, float32 on the CPU)")


def compute_options(args: argparse.Namespace) -> dict:
    """The --device/--backend/--dtype flags that were given, to override the config block."""
    return {key: getattr(args, key) for key in ("device", "backend", "dtype") if getattr(args, key) is not None}
