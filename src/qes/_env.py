"""Process environment that GPTQModel needs before it is imported.

GPTQModel reads a few environment variables at import time:

* ``GPTQMODEL_CPU_WORKERS`` -- without it GPTQModel sizes a worker pool that crashes on small machines
  (seen on 2 cores); we default it to the number of usable cores.
* ``HF_HOME`` -- when unset, GPTQModel's tokenizer helper points it at a throw-away ``/tmp`` folder, which
  hides the user's Hugging Face cache; we default it to the standard ``~/.cache/huggingface``.
* ``GPTQ_TORCH_CACHE_WEIGHTS`` / ``GPTQ_TORCH_LOOKAHEAD`` -- opt-in caches of dequantized weights in the
  torch kernel. A cache would make in-place writes to the integer codes invisible to the forward pass,
  so qes pins both off.

Every value is only a default (``setdefault``) except the two cache switches, which must stay off for the
code view in :mod:`qes.codes` to be live.
"""

from __future__ import annotations

import os
from pathlib import Path


def usable_cores() -> int:
    """Number of CPU cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def configure() -> None:
    """Set the environment GPTQModel expects; call before ``import gptqmodel``."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(usable_cores()))
    os.environ.setdefault("HF_HOME", str(Path.home() / ".cache" / "huggingface"))
    os.environ["GPTQ_TORCH_CACHE_WEIGHTS"] = "0"
    os.environ["GPTQ_TORCH_LOOKAHEAD"] = "0"
    # Keep the tokenizers library from forking a thread pool before Snakemake/pytest forks.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


configure()
