"""Hostile answers: no exception escapes the reward, and every call stays fast.

Over 10,000 generated examples (about 19,500 reward calls) in total.  The speed bound is on the
calling thread's CPU time with the garbage collector paused (a busy machine can pause a process, and a
full collection of the test process' objects can take 300 ms; neither is the checker's cost); the
wall-clock maximum is printed too (``pytest -s``).
"""

from __future__ import annotations

import gc
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qes.tasks.countdown import RewardRecord, check_answer, reward

BOUND_S = 0.05
NUMBERS = (3, 5, 2, 25)
TARGET = 16
_max = {"cpu": 0.0, "wall": 0.0, "calls": 0}

# fmt: off
PIECES = [
    "1", "2", "3", "5", "25", "0", "007", "99999999999", "9" * 400, "1_000", "1e9", "0x1f", "1j", "2.5",
    "١", "٣", "۵", "३", "৫", "𝟑", "²", "½", "Ⅻ", "０", "\u00d7", "\u00f7", "\u2212",
    "+", "-", "*", "/", "**", "//", "%", "@", "<<", ">>", "&", "|", "^", "~", "==", "<", "not ", " and ",
    "(", ")", "[", "]", "{", "}", ",", ":", ";", ".", "=", ":=", " ", "\t", "\n", "\\", "#", "'", '"',
    "x", "__import__('os')", "().__class__", ".__subclasses__()", "lambda x: x", "lambda: 1",
    "f'{1+1}'", "f\"{__import__('os').system('true')}\"", "(y:=3)", "[i for i in range(9)]",
    "{i: i for i in ()}", "(i for i in ())", "*a", "**k", "if 1 else 2", "yield 1", "await x",
    "<answer>", "</answer>", "<think>", "</think>", "\x00", "\ud800", "\U0010ffff", "\u202e",
]
# fmt: on


def _timed(text: str) -> RewardRecord:
    gc.disable()  # a full collection of the test process' objects can take 300 ms; it is not the checker's cost
    try:
        wall, cpu = time.perf_counter(), time.thread_time()
        rec = reward(text, NUMBERS, TARGET)
        check_answer(text, NUMBERS, TARGET)
        cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    finally:
        gc.enable()
    _max["cpu"], _max["wall"] = max(_max["cpu"], cpu), max(_max["wall"], wall)
    _max["calls"] += 1
    assert cpu < BOUND_S, (cpu, text[:200])
    assert isinstance(rec, RewardRecord)
    assert rec.reward in (0.0, 0.1, 1.0, 1.1)
    return rec


@pytest.fixture(scope="module", autouse=True)
def report_max():
    yield
    print(
        f"\nfuzz: {_max['calls']} reward calls, max cpu {_max['cpu'] * 1e3:.2f} ms, "
        f"max wall {_max['wall'] * 1e3:.2f} ms"
    )


FUZZ = settings(
    max_examples=3000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@FUZZ
@given(st.text(max_size=400))
def test_random_unicode(text):
    _timed(text)
    _timed(f"<think></think><answer>{text}</answer>")


@FUZZ
@given(st.lists(st.sampled_from(PIECES), max_size=60))
def test_token_soup(pieces):
    expr = "".join(pieces)
    _timed(expr)
    _timed(f"<think>{expr}</think>\n<answer>{expr}</answer>")


@settings(FUZZ, max_examples=2500)
@given(
    st.integers(0, 20_000),
    st.sampled_from(["(", "-", "+", "~", "not ", "[", "((", "-("]),
    st.sampled_from(["1", "3", "9" * 5000, "", "x"]),
    st.booleans(),
)
def test_deep_nesting(depth, opener, core, closed):
    closer = {"(": ")", "[": "]", "((": "))", "-(": ")"}.get(opener, "")
    expr = opener * depth + core + (closer * depth if closed else "")
    assert _timed(f"<think>a</think><answer>{expr}</answer>").correct is False


@settings(FUZZ, max_examples=2500)
@given(
    st.lists(st.integers(0, 10**30), min_size=1, max_size=40),
    st.lists(st.sampled_from(["+", "-", "*", "/", "**", "//"]), min_size=39, max_size=39),
)
def test_huge_literals_and_operators(values, ops):
    expr = str(values[0]) + "".join(f"{op}{v}" for op, v in zip(ops, values[1:], strict=False))
    _timed(f"<think>a</think><answer>{expr}</answer>")
    _timed(f"<think>a</think><answer>({expr})**({expr})</answer>")


def test_named_hostile_inputs():
    for text in [
        "9**9**9",
        "99999999999**99999999999**9",
        "(" * 10_000 + "1" + ")" * 10_000,
        "2" + "*2" * 127,
        "1/" * 120 + "1",
        "(" * 32 + "3*5*2*25" + ")" * 32,
    ]:
        _timed(f"<think>a</think><answer>{text}</answer>")
