"""GPTQ in a child process whose kernels and thread count are pinned, so the codes do not depend on the
caller's thread count, on torch's instruction-set choice or on a GPU, and (by MKL's documentation) not on
the CPU's vendor.

:func:`run_gptq` starts the child under :func:`gptq_environment`; the child (:func:`main`) loads the float
model, quantizes it with GPTQModel (instrumented: the dtypes it computes in are recorded) and saves the
checkpoint with the float model's own dtype for what stays float.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from qes import _env  # noqa: F401  (sets GPTQModel's environment before gptqmodel is imported)
from qes.quantize.settings import QuantizeConfig

#: Kernel settings of the process that runs GPTQ (see :func:`run_gptq`). GPTQ is chaotic in the last bits
#: of its inputs: one different rounding anywhere in the calibration forward passes or Hessians changes
#: about one code in eight of the whole model. So GPTQ runs with the same kernels wherever the libraries
#: allow it: torch's AVX2 kernels (also on AVX-512 CPUs, whose own kernels round differently), MKL's
#: ``COMPATIBLE`` code branch in reproducibility mode, one thread. ``COMPATIBLE`` (SSE2 without the
#: approximate reciprocal instructions, whose results differ between vendors) is the one branch MKL
#: honours on Intel and AMD CPUs alike; a vendor-specific branch such as ``AVX2`` is taken on Intel CPUs
#: only, and elsewhere MKL silently falls back to its automatic choice, so the codes would follow the CPU's
#: vendor (docs/BENCHMARKS.md, "GPTQ codes across CPU vendors"). MKL's thread-count invariant ("strict")
#: mode exists for its AVX2 and AVX-512 branches only: under ``COMPATIBLE`` the codes differ between 2 and
#: 4 threads, so the child computes on one thread (GPTQModel's worker threads still quantize modules side
#: by side).
#: The child never sees a GPU (``CUDA_VISIBLE_DEVICES`` empty): GPTQModel would quantize on it and give codes
#: that depend on the GPU (a seed log from such a base replays nowhere else), and would try to build CUDA
#: kernels, for which the environments bring no compiler.
GPTQ_NUMERICS_ENV: dict[str, str] = {
    "CUDA_VISIBLE_DEVICES": "",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE,STRICT",
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}


@contextlib.contextmanager
def _gptq_stats_dir() -> Iterator[None]:
    """Send GPTQModel's per-module statistics files to a temporary folder.

    GPTQModel writes them to ``./logs`` relative to the working directory, which would litter whatever folder
    the caller runs in.
    """
    from gptqmodel.looper import loop_processor

    previous = loop_processor._PROJECT_LOG_DIR
    with tempfile.TemporaryDirectory(prefix="qes-gptq-stats-") as folder:
        loop_processor._PROJECT_LOG_DIR = Path(folder)
        try:
            yield
        finally:
            loop_processor._PROJECT_LOG_DIR = previous


def stored_float_dtype(model_dir: str | Path) -> torch.dtype:
    """The dtype the float model's weights are stored in (its config's ``dtype``; float32 when unset)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"{model_dir}/config.json: unknown dtype {name!r}")
    return dtype


def restore_stored_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Put the tensors GPTQ leaves in float (embeddings, norms, an untied ``lm_head``) back in ``dtype``.

    GPTQ computed in :data:`qes.quantize.COMPUTE_DTYPE`; the checkpoint keeps the float model's own precision for
    what it did not quantize (upcasting and casting back is exact). The quantized layers' tensors are buffers
    (int32 codes, fp16 scales) and are left alone; tied parameters stay tied.
    """
    from gptqmodel.utils.hf import set_hf_config_dtype

    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    set_hf_config_dtype(model.config, dtype)


@contextlib.contextmanager
def _instrumented_gptq() -> Iterator[dict[str, set[str]]]:
    """Patch GPTQModel's GPTQ for the duration of the block to record the dtypes it computes in.

    Yields ``{"activations": ..., "weights": ..., "solve": ..., "hessians": ...}``: the dtypes GPTQModel
    really computes in -- the layer inputs fed to the Hessian accumulation, the layer weights during
    calibration, the weight copy GPTQ updates in its solve and the Hessians it factorizes.
    """
    from gptqmodel.quantization.gptq import GPTQ

    seen: dict[str, set[str]] = {"activations": set(), "weights": set(), "solve": set(), "hessians": set()}
    add_batch, clone_module, hessian_inverse = GPTQ.add_batch, GPTQ.clone_module, GPTQ.hessian_inverse

    def observed_add_batch(self: Any, inp: torch.Tensor, out: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen["activations"].add(dtype_name(inp.dtype))
        weight = getattr(self.module, "weight", None)
        if weight is not None:
            seen["weights"].add(dtype_name(weight.dtype))
        return add_batch(self, inp, out, *args, **kwargs)

    def observed_clone_module(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        clone = clone_module(self, *args, **kwargs)
        seen["solve"].add(dtype_name(clone.dtype))
        return clone

    def observed_hessian_inverse(self: Any, hessian: torch.Tensor) -> Any:
        seen["hessians"].add(dtype_name(hessian.dtype))
        return hessian_inverse(self, hessian)

    GPTQ.add_batch, GPTQ.clone_module, GPTQ.hessian_inverse = (
        observed_add_batch,
        observed_clone_module,
        observed_hessian_inverse,
    )
    try:
        yield seen
    finally:
        GPTQ.add_batch, GPTQ.clone_module, GPTQ.hessian_inverse = add_batch, clone_module, hessian_inverse


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def gptq_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the process that runs GPTQ: ``base`` (default ``os.environ``) with
    :data:`GPTQ_NUMERICS_ENV` on top and this ``qes`` first on ``PYTHONPATH``."""
    env = dict(os.environ if base is None else base)
    env.update(GPTQ_NUMERICS_ENV)
    source = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH", "")) if p)
    return env


def run_gptq(
    model_dir: Path, out_dir: Path, cfg: QuantizeConfig, calibration_texts: Sequence[str], dtype: torch.dtype
) -> dict[str, Any]:
    """Run GPTQ in ``dtype`` in a child process under :func:`gptq_environment`; returns what
    :func:`_gptq_pass` returns.

    Kernel choices are fixed when a process starts (torch reads ``ATEN_CPU_CAPABILITY`` at its first
    vectorised operation, MKL reads ``MKL_CBWR`` at its first call), so they cannot be pinned inside a
    process that already computed something. The child's output goes to this process's stdout/stderr.
    """
    with tempfile.TemporaryDirectory(prefix="qes-gptq-job-") as folder:
        job = Path(folder) / "job.json"
        result = Path(folder) / "result.json"
        job.write_text(
            json.dumps(
                {
                    "model_dir": str(model_dir),
                    "out_dir": str(out_dir),
                    "config": asdict(cfg),
                    "dtype": dtype_name(dtype),
                    "calibration": list(calibration_texts),
                    "result": str(result),
                }
            )
        )
        command = [sys.executable, "-c", "import sys; from qes.quantize.gptq import main; main(sys.argv[1])"]
        process = subprocess.run([*command, str(job)], env=gptq_environment(), check=False)
        if process.returncode != 0 or not result.is_file():
            raise RuntimeError(f"GPTQ failed in its child process (exit status {process.returncode}); see its output")
        return json.loads(result.read_text())


def main(job_file: str) -> None:
    """Entry point of the child process started by :func:`run_gptq`."""
    job = json.loads(Path(job_file).read_text())
    outcome = _gptq_pass(
        Path(job["model_dir"]),
        Path(job["out_dir"]),
        QuantizeConfig(**job["config"]),
        job["calibration"],
        getattr(torch, job["dtype"]),
    )
    Path(job["result"]).write_text(json.dumps(outcome))


def _gptq_pass(
    model_dir: Path, out_dir: Path, cfg: QuantizeConfig, calibration_texts: Sequence[str], dtype: torch.dtype
) -> dict[str, Any]:
    """Load the float model in ``dtype``, GPTQ-quantize it and save the checkpoint to ``out_dir``.

    Returns ``{"timings": ..., "gptq_dtypes": ..., "numerics": ...}``; ``numerics`` records the kernel
    settings GPTQ ran under.
    """
    from gptqmodel import GPTQModel
    from gptqmodel import QuantizeConfig as GPTQQuantizeConfig
    from transformers import AutoTokenizer

    timings: dict[str, float] = {}
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    with _gptq_stats_dir():
        t0 = time.perf_counter()
        gptq_cfg = GPTQQuantizeConfig(
            bits=cfg.bits,
            group_size=cfg.group_size,
            sym=True,
            desc_act=False,
            damp_percent=cfg.damp_percent,
            offload_to_disk=cfg.offload_to_disk,
        )
        gptq_model = GPTQModel.load(str(model_dir), gptq_cfg, dtype=dtype)
        timings["load_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        with _instrumented_gptq() as seen:
            gptq_model.quantize(list(calibration_texts), batch_size=cfg.batch_size, tokenizer=tokenizer)
        timings["quantize_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        restore_stored_dtype(gptq_model.model, stored_float_dtype(model_dir))
        gptq_model.save(str(out_dir))
        for leftover in ("quant_log.csv",):
            (out_dir / leftover).unlink(missing_ok=True)
        timings["save_s"] = time.perf_counter() - t0
    return {
        "timings": timings,
        "gptq_dtypes": {key: sorted(values) for key, values in seen.items()},
        "numerics": _numerics(),
    }


def _numerics() -> dict[str, Any]:
    """The kernel settings this process runs under, and the CPU they ran on."""
    from qes.checkpoint import cpu_model

    return {
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "cuda_devices_visible": torch.cuda.device_count(),
        **{key: os.environ.get(key, "") for key in GPTQ_NUMERICS_ENV},
    }
