"""Small file-system helpers: atomic output folders and file hashing."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def refuse_overlap(out: str | Path, inputs: dict[str, str | Path | None], out_name: str = "--out") -> None:
    """Refuse an output folder that is, contains or lies inside one of the inputs (named by their option).

    Writing there would replace or corrupt an input (a seed log is a run's only state). Paths are compared
    after resolving symbolic links.
    """
    target = Path(out).resolve()
    for name, path in inputs.items():
        if path is None:
            continue
        source = Path(path).resolve()
        if target == source:
            relation = "is"
        elif source.is_relative_to(target):
            relation = "contains"
        elif target.is_relative_to(source):
            relation = "lies inside"
        else:
            continue
        raise ValueError(
            f"{out_name} {out} {relation} the input {name} {path}: writing there would overwrite it; "
            f"choose an output folder outside every input"
        )


def _missing_parents(path: Path) -> list[Path]:
    missing = []
    for parent in path.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``target``; rename it to ``target`` when the block succeeds.

    On any exception the temporary folder is removed, and so are the parent folders this call created,
    and ``target`` is left as it was, so a failed stage never leaves a partial or empty output behind. An
    existing ``target`` is replaced only after the block succeeded.
    """
    target = Path(target)
    created = _missing_parents(target.absolute())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes the folder private; give it the usual permissions
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for parent in created:  # innermost first
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    _usual_modes(tmp, umask)
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)


def _usual_modes(folder: Path, umask: int) -> None:
    """Give every file the mode a plain `open()` would (0644 under the usual umask), keeping execute bits.

    Some writers (safetensors, tempfile, copies of private sources) leave files 0600, and a shared output
    then fails for every other user with "Permission denied".
    """
    for path in folder.rglob("*"):
        if path.is_symlink():
            continue
        if path.is_dir():
            path.chmod(0o777 & ~umask)
        else:
            executable = path.stat().st_mode & 0o111
            path.chmod((0o777 if executable else 0o666) & ~umask)


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def file_hashes(folder: str | Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """``{relative path: sha256}`` for every file under ``folder`` (sorted), skipping names in ``exclude``."""
    folder = Path(folder)
    return {
        path.relative_to(folder).as_posix(): sha256_file(path)
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name not in exclude
    }


def directory_size(path: str | Path) -> int:
    """Total size in bytes of the files under ``path``."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
