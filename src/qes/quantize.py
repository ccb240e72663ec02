"""Stage ``quantize``: GPTQ-quantize a float model with GPTQModel and measure what quantization cost.

The output folder is a standard GPTQ checkpoint (format ``gptq``, int32 packing, symmetric, no act-order)
that plain ``transformers.AutoModelForCausalLM.from_pretrained`` loads when GPTQModel is installed, plus
``quant_report.json``:

* ``codes_sha256`` -- identity of the integer codes (see :func:`qes.codes.codes_sha256`);
* ``size_bytes`` -- size of the folder on disk;
* ``quality`` -- relative logit error ``||L_q - L_f||_F / ||L_f||_F`` and next-token (argmax) agreement of the
  quantized model against the float model, over every position of held-out prompts that differ from the
  calibration prompts (both models in float32);
* ``compute_dtype`` -- the dtype GPTQ computed in (:data:`COMPUTE_DTYPE`, float32 whatever the float model's
  ``float_model_dtype``), ``gptq_dtypes`` -- the dtypes GPTQModel was seen computing in, ``numerics`` -- the
  kernel settings of the GPTQ process (:data:`GPTQ_NUMERICS_ENV`);
* ``bits``, ``group_size``, calibration size, library versions and timings per step.

GPTQ runs in a child process whose kernels are pinned (:func:`run_gptq`), so the codes do not depend on the
caller's thread count or on torch's instruction-set choice. Calibration uses a small deterministic built-in
list of Countdown-style chat prompts (:func:`builtin_calibration_prompts`), rendered with the tokenizer's chat
template.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from qes import _env  # noqa: F401  (sets GPTQModel's environment before gptqmodel is imported)
from qes import codes as qcodes
from qes.fsutil import atomic_dir, directory_size

log = logging.getLogger(__name__)

SUPPORTED_BITS = (4, 8)
REPORT_NAME = "quant_report.json"

#: The one dtype GPTQ computes in -- calibration model load, forward passes, Hessian accumulation and the
#: solve -- whatever dtype the float model is stored in. bf16 is emulated (slowly) on CPUs without AVX-512
#: BF16 support, and one fixed dtype keeps the codes the same on every machine.
COMPUTE_DTYPE = torch.float32

#: Kernel settings of the process that runs GPTQ (see :func:`run_gptq`). GPTQ is chaotic in the last bits
#: of its inputs: one different rounding anywhere in the calibration forward passes or Hessians changes
#: about one code in eight of the whole model. So GPTQ runs with the same kernels wherever the libraries
#: allow it: torch's AVX2 kernels (also on AVX-512 CPUs, whose own kernels round differently), MKL's AVX2
#: code branch in strict reproducibility mode (bitwise the same matrix products for any thread count on
#: Intel CPUs with AVX2 or AVX-512), no dynamic thread counts. MKL honours a code branch on Intel CPUs
#: only; elsewhere it picks its own kernels, so codes computed on an Intel and on an AMD CPU may differ
#: (``MKL_CBWR=COMPATIBLE``, MKL's vendor-independent branch, would close that gap at about 2.7 times
#: the GPTQ time). The Hessian factorization runs on one thread (:func:`_instrumented_gptq`).
#: The child never sees a GPU (``CUDA_VISIBLE_DEVICES`` empty): GPTQModel would quantize on it and give codes
#: that depend on the GPU (a seed log from such a base replays nowhere else), and would try to build CUDA
#: kernels, for which the environments bring no compiler.
GPTQ_NUMERICS_ENV: dict[str, str] = {
    "CUDA_VISIBLE_DEVICES": "",
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "AVX2,STRICT",
    "MKL_DYNAMIC": "FALSE",
    "OMP_DYNAMIC": "FALSE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}


@dataclass(frozen=True)
class QuantizeConfig:
    """Settings of the quantize stage (the ``quantize`` block of the workflow config)."""

    bits: int = 4
    group_size: int = 64
    calibration_samples: int = 128
    batch_size: int = 8
    damp_percent: float = 0.05
    eval_prompts: int = 16
    offload_to_disk: bool = False

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"quantize.bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size < 1:
            raise ValueError(f"quantize.group_size must be a positive integer, got {self.group_size}")
        if self.calibration_samples < 1:
            raise ValueError(f"quantize.calibration_samples must be >= 1, got {self.calibration_samples}")
        if self.batch_size < 1:
            raise ValueError(f"quantize.batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.damp_percent < 1.0:
            raise ValueError(f"quantize.damp_percent must lie in (0, 1), got {self.damp_percent}")
        if self.eval_prompts < 0:
            raise ValueError(f"quantize.eval_prompts must be >= 0, got {self.eval_prompts}")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> QuantizeConfig:
        """Build from the ``quantize`` block of the config, validated by the config schema (defaults fill gaps)."""
        from qes.config import complete

        return cls(**complete(dict(values), "quantize", source="quantize settings"))

    @property
    def tag(self) -> str:
        """Suffix naming the quantized model, e.g. ``w4g64``."""
        return f"w{self.bits}g{self.group_size}"


# --------------------------------------------------------------------------------------------------------------
# Prompts

_INSTRUCTION = (
    "Using the numbers {numbers}, create an equation that equals {target}. You can use basic arithmetic "
    "operations (+, -, *, /) and each number can only be used once. Show your work in <think> </think> tags. "
    "And return the final answer in <answer> </answer> tags, for example <answer> (1 + 2) / 3 </answer>."
)


def _countdown_problem(namespace: str, index: int) -> tuple[list[int], int]:
    """A solvable Countdown problem derived from a hash of (namespace, index): 3 or 4 numbers and a target."""
    digest = hashlib.sha256(f"{namespace}:{index}".encode()).digest()
    count = 3 + digest[0] % 2
    numbers = [1 + digest[1 + j] % 99 for j in range(count)]
    ops = [digest[8 + j] % 3 for j in range(count - 1)]
    value = numbers[0]
    for op, number in zip(ops, numbers[1:], strict=True):
        if op == 0:
            value += number
        elif op == 1:
            value = abs(value - number)
        else:
            value = value * number if value * number <= 999 else value + number
    return numbers, value


def _countdown_messages(namespace: str, count: int) -> list[list[dict[str, str]]]:
    conversations = []
    for index in range(count):
        numbers, target = _countdown_problem(namespace, index)
        text = _INSTRUCTION.format(numbers=numbers, target=target)
        conversations.append([{"role": "user", "content": text}])
    return conversations


def builtin_calibration_prompts(count: int) -> list[list[dict[str, str]]]:
    """``count`` deterministic Countdown-style chat conversations used to calibrate GPTQ."""
    return _countdown_messages("qes-calibration", count)


_HELDOUT_GENERAL = (
    "Explain in two sentences why the sky is blue.",
    "Write a short poem about a lighthouse at night.",
    "What is the capital of France, and what river runs through it?",
    "List three uses of a paper clip.",
    "Translate 'good morning, my friend' into Spanish.",
    "Give a one-line definition of an integer.",
    "How many legs does a spider have? Answer briefly.",
    "Summarise the rules of tic-tac-toe.",
)


def builtin_heldout_prompts(count: int) -> list[list[dict[str, str]]]:
    """Evaluation conversations disjoint from the calibration set: Countdown problems from another seed
    namespace interleaved with general instructions."""
    countdown = _countdown_messages("qes-heldout", count)
    general = [[{"role": "user", "content": text}] for text in _HELDOUT_GENERAL]
    mixed: list[list[dict[str, str]]] = []
    for index in range(count):
        if index % 4 == 3:
            mixed.append(general[(index // 4) % len(general)])
        else:
            mixed.append(countdown[index])
    return mixed


def render_prompts(tokenizer: Any, conversations: Sequence[Sequence[Mapping[str, str]]]) -> list[str]:
    """Render conversations with the tokenizer's chat template (with the assistant generation prompt)."""
    if not getattr(tokenizer, "chat_template", None):
        return ["\n".join(message["content"] for message in conversation) for conversation in conversations]
    return [
        tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True)
        for conversation in conversations
    ]


# --------------------------------------------------------------------------------------------------------------
# Checks before quantizing


def linear_in_features(model_dir: str | Path) -> dict[str, tuple[int, int]]:
    """``{module name: (in_features, out_features)}`` of every linear layer GPTQ will quantize.

    The model is instantiated on the meta device from its config, so no weights are read. ``lm_head`` is
    skipped (GPTQModel leaves it in float by default).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    widths = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            widths[name] = (int(module.in_features), int(module.out_features))
    return widths


def check_group_size(widths: Mapping[str, tuple[int, int]], cfg: QuantizeConfig) -> None:
    """Fail before quantizing when the group size or packing does not fit some layer, naming it."""
    if not widths:
        raise ValueError("the model has no linear layers to quantize")
    per_word = 32 // cfg.bits
    gcd = 0
    for in_features, _ in widths.values():
        gcd = math.gcd(gcd, in_features)
    fitting = [g for g in (16, 32, 64, 128, 256) if gcd % g == 0]
    for name, (in_features, out_features) in sorted(widths.items()):
        if in_features % cfg.group_size:
            all_widths = sorted({w for w, _ in widths.values()})
            hint = f"; group sizes that fit every layer: {', '.join(map(str, fitting))}" if fitting else ""
            raise ValueError(
                f"quantize.group_size={cfg.group_size} does not divide the input width of layer {name} "
                f"({in_features} in_features); every quantized layer's in_features "
                f"({', '.join(map(str, all_widths))}) must be a multiple of the group size{hint}"
            )
        if in_features % per_word or out_features % per_word:
            raise ValueError(
                f"layer {name} ({in_features} -> {out_features}) cannot be packed as {cfg.bits}-bit codes: "
                f"both widths must be multiples of {per_word}"
            )


# --------------------------------------------------------------------------------------------------------------
# Quality


@torch.no_grad()
def compare_logits(float_model: Any, quant_model: Any, tokenizer: Any, prompts: Sequence[str]) -> dict[str, float]:
    """Relative logit error and next-token agreement of ``quant_model`` against ``float_model``.

    Every position of every prompt counts; prompts are run one at a time (no padding effects).
    """
    diff_sq = 0.0
    ref_sq = 0.0
    agree = 0
    positions = 0
    last_agree = 0
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        ref = float_model(ids.to(float_model.device)).logits[0].float().cpu()
        got = quant_model(ids.to(quant_model.device)).logits[0].float().cpu()
        diff_sq += float(((got - ref) ** 2).sum())
        ref_sq += float((ref**2).sum())
        same = ref.argmax(-1) == got.argmax(-1)
        agree += int(same.sum())
        positions += int(same.numel())
        last_agree += int(same[-1])
    if not positions:
        return {"prompts": 0, "positions": 0}
    return {
        "prompts": len(prompts),
        "positions": positions,
        "relative_logit_error": math.sqrt(diff_sq / ref_sq),
        "next_token_agreement": agree / positions,
        "last_position_agreement": last_agree / len(prompts),
    }


# --------------------------------------------------------------------------------------------------------------
# The stage


def _library_versions() -> dict[str, str]:
    import gptqmodel
    import transformers

    import qes

    return {
        "qes": qes.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "gptqmodel": gptqmodel.__version__,
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


def _restore_stored_dtype(model: torch.nn.Module, dtype: torch.dtype) -> None:
    """Put the tensors GPTQ leaves in float (embeddings, norms, an untied ``lm_head``) back in ``dtype``.

    GPTQ computed in :data:`COMPUTE_DTYPE`; the checkpoint keeps the float model's own precision for what
    it did not quantize (upcasting and casting back is exact). The quantized layers' tensors are buffers
    (int32 codes, fp16 scales) and are left alone; tied parameters stay tied.
    """
    from gptqmodel.utils.hf import set_hf_config_dtype

    for param in model.parameters():
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    set_hf_config_dtype(model.config, dtype)


@contextlib.contextmanager
def _instrumented_gptq() -> Iterator[dict[str, set[str]]]:
    """Patch GPTQModel's GPTQ for the duration of the block: record dtypes, factorize on one thread.

    Yields ``{"activations": ..., "weights": ..., "solve": ..., "hessians": ...}``: the dtypes GPTQModel
    really computes in -- the layer inputs fed to the Hessian accumulation, the layer weights during
    calibration, the weight copy GPTQ updates in its solve and the Hessians it factorizes.

    The Hessian's Cholesky factorization and inverse (LAPACK ``potrf``/``potri``) give thread-count dependent
    roundings, so they run on one thread (well under a second per layer), one module at a time. Worker
    threads of GPTQModel keep their thread count for everything else.
    """
    from gptqmodel.quantization.gptq import GPTQ

    seen: dict[str, set[str]] = {"activations": set(), "weights": set(), "solve": set(), "hessians": set()}
    add_batch, clone_module, hessian_inverse = GPTQ.add_batch, GPTQ.clone_module, GPTQ.hessian_inverse
    factorization = threading.Lock()

    def observed_add_batch(self: Any, inp: torch.Tensor, out: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen["activations"].add(_dtype_name(inp.dtype))
        weight = getattr(self.module, "weight", None)
        if weight is not None:
            seen["weights"].add(_dtype_name(weight.dtype))
        return add_batch(self, inp, out, *args, **kwargs)

    def observed_clone_module(self: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        clone = clone_module(self, *args, **kwargs)
        seen["solve"].add(_dtype_name(clone.dtype))
        return clone

    def single_threaded_hessian_inverse(self: Any, hessian: torch.Tensor) -> Any:
        seen["hessians"].add(_dtype_name(hessian.dtype))
        with factorization:
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                return hessian_inverse(self, hessian)
            finally:
                torch.set_num_threads(threads)

    GPTQ.add_batch, GPTQ.clone_module, GPTQ.hessian_inverse = (
        observed_add_batch,
        observed_clone_module,
        single_threaded_hessian_inverse,
    )
    try:
        yield seen
    finally:
        GPTQ.add_batch, GPTQ.clone_module, GPTQ.hessian_inverse = add_batch, clone_module, hessian_inverse


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def gptq_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of the process that runs GPTQ: ``base`` (default ``os.environ``) with
    :data:`GPTQ_NUMERICS_ENV` on top, the caller's thread count and this ``qes`` first on ``PYTHONPATH``."""
    env = dict(os.environ if base is None else base)
    env.update(GPTQ_NUMERICS_ENV)
    threads = str(torch.get_num_threads())
    env.setdefault("OMP_NUM_THREADS", threads)
    env.setdefault("MKL_NUM_THREADS", env["OMP_NUM_THREADS"])
    source = str(Path(__file__).resolve().parents[1])
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
                    "dtype": _dtype_name(dtype),
                    "calibration": list(calibration_texts),
                    "result": str(result),
                }
            )
        )
        command = [sys.executable, "-c", "import sys; from qes.quantize import _gptq_main; _gptq_main(sys.argv[1])"]
        process = subprocess.run([*command, str(job)], env=gptq_environment(), check=False)
        if process.returncode != 0 or not result.is_file():
            raise RuntimeError(f"GPTQ failed in its child process (exit status {process.returncode}); see its output")
        return json.loads(result.read_text())


def _gptq_main(job_file: str) -> None:
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
        _restore_stored_dtype(gptq_model.model, stored_float_dtype(model_dir))
        gptq_model.save(str(out_dir))
        for leftover in ("quant_log.csv",):
            (out_dir / leftover).unlink(missing_ok=True)
        timings["save_s"] = time.perf_counter() - t0
    numerics = {
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "hessian_factorization_threads": 1,
        "cuda_devices_visible": torch.cuda.device_count(),
        **{key: os.environ.get(key, "") for key in GPTQ_NUMERICS_ENV},
    }
    return {
        "timings": timings,
        "gptq_dtypes": {key: sorted(values) for key, values in seen.items()},
        "numerics": numerics,
    }


def keep_generation_settings(model_dir: Path, out_dir: Path) -> None:
    """Give the checkpoint the float model's generation settings.

    GPTQModel writes a generation_config.json with ``do_sample: true`` of its own, so a plain ``generate()``
    on the quantized model would sample where the float model decodes greedily.
    """
    source, target = model_dir / "generation_config.json", out_dir / "generation_config.json"
    if source.is_file():
        shutil.copyfile(source, target)
    elif target.is_file():
        settings = json.loads(target.read_text())
        settings.pop("do_sample", None)
        target.write_text(json.dumps(settings, indent=2) + "\n")


def float_model_origin(model_dir: Path) -> dict[str, Any]:
    """Where the float model came from, as its fetch manifest says (source, revision, source file hash)."""
    manifest = model_dir / "manifest.json"
    if not manifest.is_file():
        return {"source": f"local:{model_dir}", "revision": None}
    fetched = json.loads(manifest.read_text())
    keys = ("name", "source", "revision", "source_file", "dtype", "parameters")
    return {key: fetched[key] for key in keys if key in fetched}


def quantize_model(
    model_dir: str | Path,
    out_dir: str | Path,
    cfg: QuantizeConfig,
    calibration: Sequence[Sequence[Mapping[str, str]]] | None = None,
) -> dict[str, Any]:
    """GPTQ-quantize the float model in ``model_dir`` into ``out_dir``; returns the quantization report.

    ``calibration`` defaults to :func:`builtin_calibration_prompts` (``cfg.calibration_samples`` of them).
    The output folder appears only when everything succeeded (it is built in a temporary sibling folder).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir} holds no config.json; run fetch_model first")
    timings: dict[str, float] = {}
    start = time.perf_counter()

    widths = linear_in_features(model_dir)
    check_group_size(widths, cfg)
    from qes.fsutil import refuse_overlap

    refuse_overlap(out_dir, {"float model": model_dir}, "output folder")
    stored_dtype = stored_float_dtype(model_dir)
    compute_dtype = COMPUTE_DTYPE

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    conversations = calibration if calibration is not None else builtin_calibration_prompts(cfg.calibration_samples)
    calibration_texts = render_prompts(tokenizer, conversations)
    heldout_texts = render_prompts(tokenizer, builtin_heldout_prompts(cfg.eval_prompts))
    overlap = set(calibration_texts) & set(heldout_texts)
    if overlap:
        raise ValueError(f"{len(overlap)} evaluation prompt(s) also appear in the calibration set")

    with atomic_dir(out_dir) as tmp:
        t0 = time.perf_counter()
        gptq = run_gptq(model_dir, tmp, cfg, calibration_texts, compute_dtype)
        timings.update(gptq["timings"])
        timings["gptq_process_s"] = time.perf_counter() - t0
        tokenizer.save_pretrained(str(tmp))
        keep_generation_settings(model_dir, tmp)

        t0 = time.perf_counter()
        quant_model, _ = qcodes.load_quantized(tmp, device="cpu", dtype=torch.float32, backend="dense")
        layers = qcodes.quantized_linears(quant_model)
        missing = sorted(set(widths) - {layer.name for layer in layers})
        if missing:
            raise RuntimeError(f"GPTQ left {len(missing)} layer(s) unquantized, e.g. {missing[0]}")
        codes_sha = qcodes.codes_sha256(layers)
        quality: dict[str, Any] = {"prompts": 0}
        if heldout_texts:
            float_model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
            quality = compare_logits(float_model, quant_model, tokenizer, heldout_texts)
            del float_model
        timings["evaluate_s"] = time.perf_counter() - t0
        timings["total_s"] = time.perf_counter() - start

        report = {
            "model": str(model_dir),
            "float_model": float_model_origin(model_dir),
            "format": "gptq",
            "bits": cfg.bits,
            "group_size": cfg.group_size,
            "sym": True,
            "desc_act": False,
            "config": asdict(cfg),
            "compute_dtype": _dtype_name(compute_dtype),
            "float_model_dtype": _dtype_name(stored_dtype),
            "gptq_dtypes": gptq["gptq_dtypes"],
            "numerics": gptq["numerics"],
            "calibration_prompts": len(calibration_texts),
            "codes_sha256": codes_sha,
            "quantized_layers": len(layers),
            "num_codes": sum(layer.num_codes for layer in layers),
            "size_bytes": directory_size(tmp),
            "quality": quality,
            "timings": {key: round(value, 3) for key, value in timings.items()},
            "versions": _library_versions(),
        }
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
        log.info("quantized %s -> %s: %s", model_dir, out_dir, json.dumps(quality))
    return report


def read_report(quant_dir: str | Path) -> dict[str, Any]:
    """The ``quant_report.json`` of a quantized model folder."""
    return json.loads((Path(quant_dir) / REPORT_NAME).read_text())
