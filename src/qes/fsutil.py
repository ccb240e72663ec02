"""Small file-system helpers: atomic output folders and file hashing."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qes.claims import claimed


def _relation(target: Path, source: Path) -> str | None:
    if target == source:
        return "is"
    if source.is_relative_to(target):
        return "contains"
    if target.is_relative_to(source):
        return "lies inside"
    return None


def _linked(path: Path) -> Iterator[tuple[Path, Path]]:
    """(link, what it resolves to) for every symbolic link under the folder `path`, through linked folders too.

    A checkpoint folder may be made of links to files kept elsewhere: those files are the input's as much as
    the folder is. Each linked folder is walked once, so a link loop ends the walk.
    """
    seen: set[Path] = set()
    stack = [path]
    while stack:
        folder = stack.pop()
        for root, dirs, files in os.walk(folder):  # followlinks=False: linked folders are pushed, once
            for name in dirs + files:
                link = Path(root, name)
                if not link.is_symlink():
                    continue
                try:
                    real = link.resolve()
                except (OSError, RuntimeError):  # a link loop points at nothing that could be overwritten
                    continue
                yield link, real
                if real.is_dir() and real not in seen:
                    seen.add(real)
                    stack.append(link)


def refuse_overlap(out: str | Path, inputs: dict[str, str | Path | None], out_name: str = "--out") -> None:
    """Refuse an output folder that is, contains or lies inside one of the inputs (named by their option).

    Writing there would replace or corrupt an input (a seed log is a run's only state). Paths are compared
    after resolving symbolic links, the output's and those of every file and folder under each input.
    """
    target = Path(out).resolve()
    shown = f"{out_name} {out}" + (f" (a link to {target})" if Path(out).is_symlink() else "")
    for name, path in inputs.items():
        if path is None:
            continue
        relation = _relation(target, Path(path).resolve())
        if relation is not None:
            raise ValueError(
                f"{shown} {relation} the input {name} {path}: writing there would overwrite it; "
                f"choose an output folder outside every input"
            )
        if not Path(path).is_dir():
            continue
        for link, real in _linked(Path(path)):
            relation = _relation(target, real)
            if relation is not None:
                raise ValueError(
                    f"{shown} {relation} {real}, which {link} of the input {name} {path} links to: writing "
                    f"there would overwrite it; choose an output folder outside every input"
                )


@contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Claim ``target`` and yield a fresh temporary sibling; rename it to ``target`` when the block succeeds.

    On any exception the temporary folder is removed, and so are the parent folders this call created,
    and ``target`` is left as it was, so a failed stage never leaves a partial or empty output behind. An
    existing ``target`` is replaced only after the block succeeded (a link there is replaced, never written
    through); a ``target`` that another process created meanwhile without claiming it is left alone and
    the call fails.
    """
    target = Path(target)
    with claimed(target):
        existed = os.path.lexists(target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes the folder private; give it the usual permissions
        try:
            yield tmp
            _usual_modes(tmp, umask)
            if not existed and os.path.lexists(target):
                raise FileExistsError(f"{target} appeared while it was being written by another process; left as it is")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        _replace(tmp, target)


def _replace(new: Path, target: Path) -> None:
    """Rename `new` to `target`; an old `target` (a folder, a file or a link) is moved aside first, then removed."""
    if not os.path.lexists(target):
        os.replace(new, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, aside / "old")
    os.replace(new, target)
    shutil.rmtree(aside, ignore_errors=True)


def write_file_atomic(path: str | Path, data: bytes | str) -> None:
    """Write a whole file under a temporary name and rename it into place: a link at `path` is replaced,
    never written through, and a reader never sees half a file."""
    path = Path(path)
    payload = data.encode() if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
