"""Shared fixtures.

``tiny_gptq(bits, group_size=32) -> Path`` builds (once per session and setting) a tiny random llama with a
small BPE tokenizer and GPTQ-quantizes it through :func:`qes.quantize.quantize_model`. The folder is a real
GPTQ checkpoint: load it with :func:`qes.codes.load_quantized`. ``tiny_float_dir`` is the float model it
came from. Treat both folders as read-only (copy them before changing anything).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(1, len(os.sched_getaffinity(0)))))
os.environ.setdefault("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

sys.path.insert(0, str(Path(__file__).parent))

from _tiny_llama import build_float_model

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The checkout's root folder."""
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_float_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random float32 llama (2 layers, hidden 64, intermediate 128) with tokenizer and chat template."""
    return build_float_model(tmp_path_factory.mktemp("tiny-float") / "model")


@pytest.fixture(scope="session")
def tiny_gptq(tiny_float_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory ``tiny_gptq(bits, group_size=32) -> Path`` of GPTQ checkpoints of the tiny llama, cached per session."""
    from qes.quantize import QuantizeConfig, quantize_model

    cache: dict[tuple[int, int], Path] = {}

    def make(bits: int = 4, group_size: int = 32) -> Path:
        key = (bits, group_size)
        if key not in cache:
            cfg = QuantizeConfig(bits=bits, group_size=group_size, calibration_samples=32, batch_size=8, eval_prompts=4)
            out = tmp_path_factory.mktemp(f"tiny-gptq-w{bits}g{group_size}") / "model"
            quantize_model(tiny_float_dir, out, cfg)
            cache[key] = out
        return cache[key]

    return make


@pytest.fixture(scope="session", params=[4, 8], ids=["int4", "int8"])
def tiny_gptq_dir(request: pytest.FixtureRequest, tiny_gptq: Callable[..., Path]) -> Path:
    """The tiny GPTQ checkpoint, parametrised over 4 and 8 bits (group size 32)."""
    return tiny_gptq(request.param)
