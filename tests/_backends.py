"""What a test may assert about ``auto``'s backend for INT4 layers on a CPU."""

from __future__ import annotations

from typing import Any

from qes.backends.choice import faster_cpu_int4_backend


def assert_auto_int4_choice(compute: dict[str, Any], layers: int) -> str:
    """Every layer got the one backend ``auto`` measured faster (int4pack unless dense is >= 10% faster);
    returns it. The timings are recorded rounded to 0.01 ms, so a choice at the threshold may go either way."""
    (chosen,) = compute["backends"]
    assert compute["backends"] == {chosen: layers} and chosen in ("int4pack", "dense"), compute
    timings = compute["backend_ms"]
    if abs(timings["dense"] - 0.9 * timings["int4pack"]) > 0.02:
        assert chosen == faster_cpu_int4_backend(timings), timings
    return chosen
