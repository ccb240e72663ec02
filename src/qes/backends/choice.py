"""Which backend runs each GPTQ layer: the first in a priority list that can run it exactly.

An explicit choice (``int4pack``, ``dense``, ``none``) is checked with the backend's own
:meth:`~qes.backends.base.Backend.can_implement` and refused with its reason. ``auto`` walks
:func:`auto_priority` and takes the first backend that can run the layer: on a CPU with INT4 layers that is
whichever of ``int4pack`` and ``dense`` is measured faster here (:func:`measure_cpu_int4_backends`,
``int4pack`` unless ``dense`` is at least 10% faster), ``dense`` for everything else. A library's automatic
kernel choice never decides what layout the codes are in.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from functools import partial

import torch

from qes.backends.base import Backend, LayerSpec
from qes.backends.codes_only import CODES_ONLY, CodesOnlyBackend
from qes.backends.dense import DenseBackend
from qes.backends.int4pack import Int4PackBackend, pack_int4
from qes.qlinear import GPTQLinear

log = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "PRIORITY",
    "assign_backends",
    "auto_priority",
    "choose_backend",
    "faster_cpu_int4_backend",
    "make_backend",
    "measure_cpu_int4_backends",
]

#: the forward paths a user may ask for (``none``, codes only, is for work on the integers alone)
BACKENDS = ("auto", "int4pack", "dense")
#: ``auto``'s order of preference (before measurement): the first that can run a layer runs it
PRIORITY = ("int4pack", "dense")
_TYPES: dict[str, type[Backend]] = {
    "int4pack": Int4PackBackend,
    "dense": DenseBackend,
    CODES_ONLY: CodesOnlyBackend,
}


def auto_priority(cpu_int4: str = "int4pack") -> tuple[str, ...]:
    """``auto``'s order: ``cpu_int4`` (see :func:`faster_cpu_int4_backend`) first, then the rest of PRIORITY."""
    if cpu_int4 not in PRIORITY:
        raise ValueError(f"cpu_int4 must be one of {', '.join(PRIORITY)}, got {cpu_int4!r}")
    return (cpu_int4, *(name for name in PRIORITY if name != cpu_int4))


def _choose(requested: str, layer: LayerSpec, cpu_int4: str, where: str) -> tuple[str, list[str]]:
    """The backend for ``layer`` and the reasons the backends ``auto`` preferred were passed over."""
    if requested not in (*BACKENDS, CODES_ONLY):
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {requested!r}")
    candidates = auto_priority(cpu_int4) if requested == "auto" else (requested,)
    passed_over = []
    for name in candidates:
        able, why = _TYPES[name].can_implement(layer)
        if able:
            return name, passed_over
        passed_over.append(why)
    if requested == "auto":
        raise ValueError(f"no backend can run {where}: {'; '.join(passed_over)}")
    raise ValueError(f"backend {requested} cannot run {where}: {passed_over[0]}")


def choose_backend(requested: str, layer: LayerSpec, cpu_int4: str = "int4pack", where: str = "this layer") -> str:
    """``auto``: the first backend of :func:`auto_priority` that can run ``layer``; an explicit choice is
    checked, not changed (a ValueError names ``where`` and why it cannot run it)."""
    return _choose(requested, layer, cpu_int4, where)[0]


def make_backend(name: str, dtype: torch.dtype) -> Backend:
    """A backend instance by its resolved name (``int4pack``, ``dense`` or ``none``)."""
    if name not in _TYPES:
        raise ValueError(f"unknown backend {name!r}")
    return _TYPES[name](dtype)


#: rows of the timed products: a decode step of a member-batched group and a prompt's prefill
MEASURE_ROWS = (64, 512)
_measured: dict[tuple, dict[str, float]] = {}


def measure_cpu_int4_backends(shapes: list[tuple[int, int, int]], dtype: torch.dtype, kernel_dtype: torch.dtype
                              ) -> dict[str, float]:
    """Milliseconds of one product through each of the layer ``shapes`` ``(out, in, group)`` at each of
    :data:`MEASURE_ROWS` rows, per CPU backend (int4pack in ``kernel_dtype``, dense in ``dtype``), best of
    five rounds after a warm-up. Synthetic codes from a counter (the values do not change the speed).
    Measured once per process and setting."""
    key = (tuple(shapes), dtype, kernel_dtype, torch.get_num_threads(), torch.backends.cpu.get_cpu_capability())
    if key in _measured:
        return _measured[key]
    calls = []
    for out_f, in_f, group in shapes:
        codes = (torch.arange(out_f * in_f, dtype=torch.int64).view(out_f, in_f) * 2654435761 >> 7) % 16
        scales_zeros = torch.stack([torch.full((in_f // group, out_f), 0.01), torch.zeros(in_f // group, out_f)],
                                   dim=2).to(kernel_dtype)
        packed = pack_int4(codes)
        weight = ((codes - 8).to(torch.float32) * 0.01).to(dtype)
        for rows in MEASURE_ROWS:
            x = torch.linspace(-1, 1, rows * in_f).view(rows, in_f)
            calls.append((
                partial(torch.ops.aten._weight_int4pack_mm_for_cpu, x.to(kernel_dtype), packed, group, scales_zeros),
                partial(torch.nn.functional.linear, x.to(dtype), weight),
            ))
    best = {"int4pack": float("inf"), "dense": float("inf")}
    for round_ in range(6):
        spent = {"int4pack": 0.0, "dense": 0.0}
        for int4, dense in calls:
            for name, fn in (("int4pack", int4), ("dense", dense)):
                start = time.perf_counter()
                fn()
                spent[name] += time.perf_counter() - start
        if round_:  # the first round warms up
            best = {k: min(best[k], 1000 * v) for k, v in spent.items()}
    _measured[key] = best
    return best


def faster_cpu_int4_backend(timings: dict[str, float]) -> str:
    """int4pack (8x less memory) unless dense measured at least 10% faster."""
    return "dense" if timings["dense"] < 0.9 * timings["int4pack"] else "int4pack"


def assign_backends(model: torch.nn.Module, requested: str, dtype: torch.dtype, kernel_dtype: torch.dtype
                    ) -> tuple[dict[str, int], dict[str, float] | None]:
    """Give every GPTQ layer of ``model`` (on its device) its backend: ``int4pack`` in ``kernel_dtype``, the
    others in ``dtype``. Returns ``({backend: layer count}, auto's CPU timings in ms or None)``."""
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, GPTQLinear)]
    specs = {name: LayerSpec.of(m) for name, m in modules}
    cpu_int4, timings = "int4pack", None
    if requested == "auto":
        runnable = sorted({(s.out_features, s.in_features, s.group_size) for s in set(specs.values())
                           if Int4PackBackend.can_implement(s)[0]})
        if runnable:
            timings = measure_cpu_int4_backends(runnable, dtype, kernel_dtype)
            cpu_int4 = faster_cpu_int4_backend(timings)
            timings = {k: round(v, 2) for k, v in timings.items()}
            log.info("INT4 on this CPU: %s ms per pass over the layer shapes; auto chooses %s", timings, cpu_int4)
    counts: dict[str, int] = {}
    passed_over: Counter[tuple[str, str]] = Counter()
    for name, module in modules:
        chosen, reasons = _choose(requested, specs[name], cpu_int4, f"layer {name}")
        passed_over.update((why, chosen) for why in reasons)
        module.use_backend(make_backend(chosen, kernel_dtype if chosen == "int4pack" else dtype))
        counts[chosen] = counts.get(chosen, 0) + 1
    for (why, chosen), count in sorted(passed_over.items()):
        log.info("auto: %d layer(s) run %s: %s", count, chosen, why)
    return counts, timings
