"""Countdown reward: ``0.1 * format + 1.0 * correct``, with an answer checker that parses the expression
with ``ast`` into an allow-listed tree and evaluates it over exact fractions (never ``eval``).

Reward rules (the precise definitions the tests pin):

Format.  The assistant text (prompt prefix + response, surrounding whitespace ignored) is
``[preamble] <think> T </think> [ws] <answer> A </answer> [ws]`` where the preamble and ``T`` hold
none of the four tags, ``A`` holds no answer tag, and nothing but whitespace follows ``</answer>``.
A response that keeps talking after its answer does not get the format bonus.

Correct.  The content of the first ``<answer>...</answer>`` pair of the assistant text (format is
not required) is a valid expression whose value equals the target exactly.  Valid means:

* at most ``MAX_ANSWER_CHARS`` characters, made of ASCII digits, ``+ - * / ( )`` and spaces, with
  ``×``/``÷``/``−`` (U+00D7, U+00F7, U+2212) first normalised to ``*``/``/``/``-``; other
  characters -- letters, dots, unicode digits, ``**``, ``//`` -- are rejected before parsing;
* an optional trailing ``= N`` is accepted when ``N`` is the target (``3 + 5 = 8``);
* parenthesis nesting at most ``MAX_DEPTH`` (checked on the text, before ``ast.parse``);
* binary ``+ - * /`` over integer literals only: no unary plus or minus (every number enters as
  given), literals of at most ``MAX_LITERAL_DIGITS`` digits;
* the multiset of literals equals the multiset of given numbers (each used exactly once);
* evaluation over ``fractions.Fraction``; division by zero scores 0; any intermediate numerator or
  denominator above ``MAX_BITS`` bits is rejected.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from collections.abc import Sequence
from fractions import Fraction

from qes.tasks.base import RewardRecord

FORMAT_WEIGHT = 0.1
CORRECT_WEIGHT = 1.0
MAX_ANSWER_CHARS = 256
MAX_DEPTH = 32
MAX_LITERAL_DIGITS = 9
MAX_BITS = 256
#: the reward in a sentence, for the model card
DESCRIPTION = "1 for a correct equation inside `<answer>` tags, 0.1 for the right format only, 0 otherwise"

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
#: Generation stops at the end of these: the reward reads nothing after the first answer block.
STOP_STRINGS = (ANSWER_CLOSE,)
_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)


_NORMALISE = str.maketrans({"\u00d7": "*", "\u00f7": "/", "\u2212": "-"})
_ALLOWED_TEXT = re.compile(r"[0-9+\-*/() \t\r\n]*\Z")  # ASCII only: no unicode digits, names, dots
_TRAILING_EQ = re.compile(r"=[ \t\r\n]*([0-9]{1,9})[ \t\r\n]*\Z")


def format_ok(text: str) -> bool:
    """Whether ``text`` (the whole assistant turn) has the think-then-answer shape; see module doc."""
    s = text.strip()
    start = s.find(THINK_OPEN)
    if start < 0 or any(tag in s[:start] for tag in _TAGS):
        return False
    body_start = start + len(THINK_OPEN)
    end = s.find(THINK_CLOSE, body_start)
    if end < 0 or any(tag in s[body_start:end] for tag in _TAGS):
        return False
    rest = s[end + len(THINK_CLOSE) :].lstrip()
    if not (rest.startswith(ANSWER_OPEN) and rest.endswith(ANSWER_CLOSE)):
        return False
    inner = rest[len(ANSWER_OPEN) : -len(ANSWER_CLOSE)]
    return (
        len(rest) >= len(ANSWER_OPEN) + len(ANSWER_CLOSE)
        and ANSWER_OPEN not in inner
        and (ANSWER_CLOSE not in inner)
    )


def extract_answer(text: str) -> str | None:
    """Content of the first complete ``<answer>...</answer>`` pair, or None."""
    start = text.find(ANSWER_OPEN)
    if start < 0:
        return None
    start += len(ANSWER_OPEN)
    end = text.find(ANSWER_CLOSE, start)
    return None if end < 0 else text[start:end]


class AnswerError(ValueError):
    """Why an answer expression is not acceptable."""


def _nesting_depth(text: str) -> int:
    depth = best = 0
    for ch in text:
        if ch == "(":
            depth += 1
            best = max(best, depth)
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise AnswerError("unbalanced parentheses")
    if depth:
        raise AnswerError("unbalanced parentheses")
    return best


def _check_bits(value: Fraction) -> Fraction:
    if value.numerator.bit_length() > MAX_BITS or value.denominator.bit_length() > MAX_BITS:
        raise AnswerError("intermediate value too large")
    return value


_BINOPS = (ast.Add, ast.Sub, ast.Mult, ast.Div)


def _evaluate(node: ast.AST, literals: list[int], depth: int = 0) -> Fraction:
    if depth > 2 * MAX_DEPTH + MAX_ANSWER_CHARS:
        raise AnswerError("expression too deep")
    if isinstance(node, ast.Constant) and type(node.value) is int:
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, _BINOPS):
        left = _evaluate(node.left, literals, depth + 1)
        right = _evaluate(node.right, literals, depth + 1)
        if isinstance(node.op, ast.Add):
            return _check_bits(left + right)
        if isinstance(node.op, ast.Sub):
            return _check_bits(left - right)
        if isinstance(node.op, ast.Mult):
            return _check_bits(left * right)
        if right == 0:
            raise AnswerError("division by zero")
        return _check_bits(left / right)
    raise AnswerError(f"not allowed: {type(node).__name__}")


def evaluate_expression(expression: str) -> tuple[Fraction, list[int]]:
    """Value and literals of an answer expression under the allow-list; raises AnswerError."""
    text = expression.translate(_NORMALISE).strip()
    if len(text) > MAX_ANSWER_CHARS:
        raise AnswerError(f"longer than {MAX_ANSWER_CHARS} characters")
    if not text:
        raise AnswerError("empty expression")
    if not _ALLOWED_TEXT.match(text):
        raise AnswerError("characters outside digits, + - * / ( ) and spaces")
    if "**" in text or "//" in text:
        raise AnswerError("only + - * / are allowed")
    if _nesting_depth(text) > MAX_DEPTH:
        raise AnswerError(f"parentheses nested deeper than {MAX_DEPTH}")
    if any(len(run) > MAX_LITERAL_DIGITS for run in re.findall(r"[0-9]+", text)):
        raise AnswerError(f"literal longer than {MAX_LITERAL_DIGITS} digits")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise AnswerError(f"syntax error: {type(e).__name__}") from None
    literals: list[int] = []
    value = _evaluate(tree.body, literals)
    return value, literals


def check_answer(answer: str, numbers: Sequence[int], target: int) -> str:
    """'ok' if ``answer`` is a valid expression using each number once and equal to ``target``,
    otherwise the reason it is not."""
    text = answer.translate(_NORMALISE)
    if len(text) > MAX_ANSWER_CHARS + 16:
        return f"longer than {MAX_ANSWER_CHARS} characters"
    eq = _TRAILING_EQ.search(text)
    if eq is not None:
        if int(eq.group(1)) != target:
            return "stated result is not the target"
        text = text[: eq.start()]
    try:
        value, literals = evaluate_expression(text)
    except AnswerError as e:
        return str(e)
    except (RecursionError, MemoryError, OverflowError):  # defensive: bounds above should prevent
        return "expression too complex"
    if Counter(literals) != Counter(numbers):
        return "numbers not used exactly once each"
    if value != target:
        return "value differs from target"
    return "ok"


def reward(response: str, numbers: Sequence[int], target: int, prefix: str = "") -> RewardRecord:
    """Reward of one response: ``0.1 * format + 1.0 * correct``.

    ``prefix`` is the assistant prefix the prompt ended with (e.g. ``"<think>"``): the assistant
    text judged is ``prefix + response``.
    """
    text = prefix + response
    fmt = format_ok(text)
    answer = extract_answer(text)
    reason = "no <answer>...</answer> block" if answer is None else check_answer(answer, numbers, target)
    correct = reason == "ok"
    value = FORMAT_WEIGHT * fmt + CORRECT_WEIGHT * correct
    return RewardRecord(fmt, correct, value, "" if answer is None else answer[:MAX_ANSWER_CHARS], reason)
