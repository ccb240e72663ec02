"""Countdown: reach a target with + - * / using each given number exactly once.

Three parts, each usable on its own:

* problems -- a seeded generator (every problem solvable by construction, with a reference
  solution; its own splitmix64 counter RNG, so the sets are identical on every Python version) and a
  loader for JSON files holding a list of ``{"numbers": [...], "target": n}``;
* prompts  -- chat-template prompts asking for reasoning in ``<think>`` tags and the final
  expression in ``<answer>`` tags;
* reward   -- ``0.1 * format + 1.0 * correct`` with an answer checker that parses the expression
  with ``ast`` into an allow-listed tree and evaluates it over exact fractions (never ``eval``).

Prompt.  The default was calibrated on SmolLM2-135M-Instruct (greedy, 64 new tokens): zero-shot it
almost never writes answer tags (format rate 0); an assistant prefix of ``<think>`` alone makes it
stop after ``</think>``.  Two worked examples as earlier chat turns, the assistant turn opened with
``Let me solve this step by step.\n<think>`` (the QES paper's opening), and answers written as
``expression = target`` bring the format rate to ~95% and the accuracy on easy problems above zero.

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
import json
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

FORMAT_WEIGHT = 0.1
CORRECT_WEIGHT = 1.0
MAX_ANSWER_CHARS = 256
MAX_DEPTH = 32
MAX_LITERAL_DIGITS = 9
MAX_BITS = 256

_MASK64 = (1 << 64) - 1
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"
_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
#: Generation stops at the end of these: the reward reads nothing after the first answer block.
STOP_STRINGS = (_ANSWER_CLOSE,)
_TAGS = (_THINK_OPEN, _THINK_CLOSE, _ANSWER_OPEN, _ANSWER_CLOSE)


# --------------------------------------------------------------------------------------------
# problems


@dataclass(frozen=True)
class CountdownConfig:
    """Difficulty and sizes of a generated Countdown data set (all bounds inclusive).

    The defaults are the workflow's: 2-3 numbers in 1..10, targets in 1..20, the easiest setting that is
    still a real task.  The QES paper's setting is ``num_count_min=3, num_count_max=4, number_max=100,
    target_max=100``.
    """

    num_count_min: int = 2
    num_count_max: int = 3
    number_min: int = 1
    number_max: int = 10
    target_min: int = 1
    target_max: int = 20
    train_size: int = 200
    eval_size: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.num_count_min <= self.num_count_max <= 8:
            raise ValueError("need 2 <= num_count_min <= num_count_max <= 8")
        if not 1 <= self.number_min <= self.number_max:
            raise ValueError("need 1 <= number_min <= number_max")
        if not 1 <= self.target_min <= self.target_max:
            raise ValueError("need 1 <= target_min <= target_max")
        if self.train_size < 0 or self.eval_size < 0:
            raise ValueError("train_size and eval_size must be >= 0")


@dataclass(frozen=True)
class Problem:
    """One Countdown problem; ``solution`` is a reference expression ('' when unknown)."""

    id: str
    numbers: tuple[int, ...]
    target: int
    solution: str = ""

    @property
    def key(self) -> tuple[tuple[int, ...], int]:
        """Canonical identity: sorted numbers and target (what train/eval disjointness uses)."""
        return tuple(sorted(self.numbers)), self.target


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _hash_ints(*values: int) -> int:
    h = 0x243F6A8885A308D3
    for v in values:
        h = _splitmix64(h ^ (v & _MASK64))
    return h


class _Rng:
    """Tiny counter-based integer RNG: identical draws on every Python version and platform."""

    def __init__(self, *key: int) -> None:
        self._key = _hash_ints(*key)
        self._counter = 0

    def _next(self) -> int:
        self._counter += 1
        return _splitmix64(self._key ^ _splitmix64(self._counter))

    def below(self, n: int) -> int:
        """Uniform integer in [0, n) by rejection (no modulo bias)."""
        limit = (1 << 64) - ((1 << 64) % n)
        while True:
            x = self._next()
            if x < limit:
                return x % n

    def between(self, lo: int, hi: int) -> int:
        return lo + self.below(hi - lo + 1)


_OPS = ("+", "-", "*", "/")


def _random_solution(rng: _Rng, numbers: Sequence[int], lo: int, hi: int) -> tuple[int, str] | None:
    """Combine the numbers pairwise in random order into one value in [lo, hi].

    Intermediate values stay positive integers (larger minus smaller, exact division only), as in
    the card game.  Returns (value, expression) or None when this draw does not land in range.
    """
    items = [(n, str(n)) for n in numbers]
    while len(items) > 1:
        i = rng.below(len(items))
        a = items.pop(i)
        b = items.pop(rng.below(len(items)))
        op = _OPS[rng.below(4)]
        if op == "-" and a[0] == b[0]:
            op = "+"
        if op == "/" and not (b[0] != 0 and a[0] % b[0] == 0):
            a, b = b, a
            if not (b[0] != 0 and a[0] % b[0] == 0):
                op = "*"
        if op == "-" and a[0] < b[0]:
            a, b = b, a
        value = {"+": a[0] + b[0], "-": a[0] - b[0], "*": a[0] * b[0]}.get(op)
        if value is None:
            value = a[0] // b[0]
        items.append((value, f"({a[1]} {op} {b[1]})" if items else f"{a[1]} {op} {b[1]}"))
    value, expr = items[0]
    return (value, expr) if lo <= value <= hi else None


def _generate_one(cfg: CountdownConfig, stream: int, index: int) -> tuple[tuple[int, ...], int, str]:
    rng = _Rng(cfg.seed, stream, index)
    for _ in range(10_000):
        count = rng.between(cfg.num_count_min, cfg.num_count_max)
        numbers = tuple(rng.between(cfg.number_min, cfg.number_max) for _ in range(count))
        for _ in range(20):
            found = _random_solution(rng, numbers, cfg.target_min, cfg.target_max)
            if found is not None:
                return numbers, found[0], found[1]
    raise ValueError(f"no solvable problem found for {cfg}: widen the target range")


def _split_of(key: tuple[tuple[int, ...], int], seed: int) -> str:
    """Each canonical key belongs to exactly one split (a hash of the key): disjoint by design."""
    return "eval" if _hash_ints(seed, key[1], *key[0]) & 1 else "train"


def generate_split(
    cfg: CountdownConfig, split: str, exclude: frozenset[tuple[tuple[int, ...], int]] = frozenset()
) -> list[Problem]:
    """The ``split`` ('train' or 'eval') problems of ``cfg``: deterministic, unique keys.

    Keys are partitioned between the splits by a hash, so each split depends only on the difficulty,
    the seed and its own size, and train and eval never share a key.  The first ``k`` problems of a
    split are the same for every size >= k.  The few-shot demonstrations' problems never occur, nor do
    the canonical keys in ``exclude`` (e.g. those of a user-given file for the other split).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    size = cfg.train_size if split == "train" else cfg.eval_size
    stream = 0 if split == "train" else 1
    out: list[Problem] = []
    seen: set[tuple[tuple[int, ...], int]] = set()
    index = 0
    max_draws = 200 * size + 10_000
    while len(out) < size:
        if index >= max_draws:
            raise ValueError(
                f"only {len(out)} distinct {split} problems after {index} draws (asked for {size}):"
                " the difficulty settings allow too few problems"
            )
        numbers, target, solution = _generate_one(cfg, stream, index)
        index += 1
        problem = Problem(f"{split}-{len(out):06d}", numbers, target, solution)
        if problem.key in seen or problem.key in _RESERVED or problem.key in exclude:
            continue
        if _split_of(problem.key, cfg.seed) != split:
            continue
        seen.add(problem.key)
        out.append(problem)
    return out


class TaskDataError(ValueError):
    """A task data file that does not have the expected layout."""


def _int_field(entry: dict[str, Any], field: str, where: str) -> int:
    value = entry[field]
    if isinstance(value, bool) or not isinstance(value, int):
        raise TaskDataError(f"{where}: field '{field}' must be an integer, got {value!r}")
    return value


def load_problems_json(path: str | Path, split: str = "file", limit: int | None = None) -> list[Problem]:
    """Problems from a JSON file holding a list of ``{"numbers": [ints], "target": int}``.

    ``nums`` is accepted for ``numbers``; an optional string ``solution`` is kept.  Every error
    names the entry index and the field.  ``limit`` keeps the first entries (error if fewer).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TaskDataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise TaskDataError(f"{path}: expected a JSON list of problems, got {type(data).__name__}")
    if limit is not None:
        if len(data) < limit:
            raise TaskDataError(f"{path}: {len(data)} problems, but {limit} were asked for")
        data = data[:limit]
    out = []
    for i, entry in enumerate(data):
        where = f"{path}: entry {i}"
        if not isinstance(entry, dict):
            raise TaskDataError(f"{where}: expected an object, got {type(entry).__name__}")
        if "numbers" not in entry and "nums" in entry:
            entry = {**entry, "numbers": entry["nums"]}
        for field in ("numbers", "target"):
            if field not in entry:
                raise TaskDataError(f"{where}: missing field '{field}'")
        numbers = entry["numbers"]
        if not isinstance(numbers, list) or not numbers:
            raise TaskDataError(f"{where}: field 'numbers' must be a non-empty list, got {numbers!r}")
        for j, n in enumerate(numbers):
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise TaskDataError(f"{where}: field 'numbers'[{j}] must be a non-negative integer, got {n!r}")
        target = _int_field(entry, "target", where)
        solution = entry.get("solution", "")
        if not isinstance(solution, str):
            raise TaskDataError(f"{where}: field 'solution' must be a string, got {solution!r}")
        out.append(Problem(f"{split}-{i:06d}", tuple(numbers), target, solution))
    return out


def check_disjoint(train: Sequence[Problem], held_out: Sequence[Problem]) -> None:
    """Raise if a held-out problem's canonical key also occurs in the training problems."""
    train_keys = {p.key for p in train}
    for p in held_out:
        if p.key in train_keys:
            raise ValueError(f"held-out problem {p.id} {p.key} also occurs in the training set")


# --------------------------------------------------------------------------------------------
# prompts

SYSTEM_PROMPT = (
    "You are a careful assistant who is good at arithmetic puzzles. Think the problem through "
    "first, then give a short final answer."
)
USER_TEMPLATE = (
    "Make the number {target} from the numbers {numbers_text}. Combine them with +, -, * and /, "
    "using every number exactly once, and use parentheses if you need them. Write your reasoning "
    "between <think> and </think>, then write only the final expression between <answer> and "
    "</answer>."
)
ASSISTANT_PREFIX = "Let me solve this step by step.\n<think>"


@dataclass(frozen=True)
class Demonstration:
    """A worked example shown as an earlier chat turn: the reasoning and the answer of a problem."""

    problem: Problem
    think: str
    answer: str


#: Worked examples for few-shot prompts. Each reasoning tries a wrong combination first, and each answer
#: ends with ``= target``: small models copy that shape, and it keeps their answer next to the arithmetic
#: they just did (the checker accepts a trailing ``= target``).
DEMONSTRATIONS: tuple[Demonstration, ...] = (
    Demonstration(Problem("demo-0", (7, 4), 3), "7 + 4 = 11, not 3. 7 - 4 = 3, that is the target.", "7 - 4 = 3"),
    Demonstration(
        Problem("demo-1", (6, 3, 5), 7),
        "6 + 3 + 5 = 14, not 7. 6 / 3 = 2 and 2 + 5 = 7, that is the target.",
        "6 / 3 + 5 = 7",
    ),
)


_RESERVED = frozenset(d.problem.key for d in DEMONSTRATIONS)


@dataclass(frozen=True)
class PromptStyle:
    """How a problem becomes chat messages.

    ``examples`` are shown as earlier user/assistant turns. ``assistant_prefix`` is appended after the
    template's generation prompt, so the model continues it; it counts as part of the assistant text when
    the format is checked, and the examples' assistant turns start with it too.
    """

    system: str = SYSTEM_PROMPT
    user_template: str = USER_TEMPLATE
    assistant_prefix: str = ASSISTANT_PREFIX
    examples: tuple[Demonstration, ...] = DEMONSTRATIONS


def _numbers_text(numbers: Sequence[int]) -> str:
    if len(numbers) == 1:
        return str(numbers[0])
    return ", ".join(str(n) for n in numbers[:-1]) + f" and {numbers[-1]}"


def _user_message(style: PromptStyle, problem: Problem) -> str:
    return style.user_template.format(
        target=problem.target, numbers=list(problem.numbers), numbers_text=_numbers_text(problem.numbers)
    )


def _assistant_message(style: PromptStyle, demo: Demonstration) -> str:
    opener = "" if style.assistant_prefix.endswith(_THINK_OPEN) else _THINK_OPEN
    return f"{style.assistant_prefix}{opener}{demo.think}{_THINK_CLOSE}\n{_ANSWER_OPEN}{demo.answer}{_ANSWER_CLOSE}"


def build_prompt(tokenizer: Any, problem: Problem, style: PromptStyle | None = None) -> str:
    """The full prompt text: the tokenizer's chat template (system, examples, user; generation prompt
    on) followed by the assistant prefix."""
    style = style or PromptStyle()
    messages = [{"role": "system", "content": style.system}]
    for demo in style.examples:
        messages.append({"role": "user", "content": _user_message(style, demo.problem)})
        messages.append({"role": "assistant", "content": _assistant_message(style, demo)})
    messages.append({"role": "user", "content": _user_message(style, problem)})
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return text + style.assistant_prefix


# --------------------------------------------------------------------------------------------
# reward


@dataclass(frozen=True)
class RewardRecord:
    """Both parts of one example's reward; ``reason`` says why it is not correct ('ok' if it is)."""

    format_ok: bool
    correct: bool
    reward: float
    answer: str
    reason: str


_NORMALISE = str.maketrans({"\u00d7": "*", "\u00f7": "/", "\u2212": "-"})
_ALLOWED_TEXT = re.compile(r"[0-9+\-*/() \t\r\n]*\Z")  # ASCII only: no unicode digits, names, dots
_TRAILING_EQ = re.compile(r"=[ \t\r\n]*([0-9]{1,9})[ \t\r\n]*\Z")


def format_ok(text: str) -> bool:
    """Whether ``text`` (the whole assistant turn) has the think-then-answer shape; see module doc."""
    s = text.strip()
    start = s.find(_THINK_OPEN)
    if start < 0 or any(tag in s[:start] for tag in _TAGS):
        return False
    body_start = start + len(_THINK_OPEN)
    end = s.find(_THINK_CLOSE, body_start)
    if end < 0 or any(tag in s[body_start:end] for tag in _TAGS):
        return False
    rest = s[end + len(_THINK_CLOSE) :].lstrip()
    if not (rest.startswith(_ANSWER_OPEN) and rest.endswith(_ANSWER_CLOSE)):
        return False
    inner = rest[len(_ANSWER_OPEN) : -len(_ANSWER_CLOSE)]
    return (
        len(rest) >= len(_ANSWER_OPEN) + len(_ANSWER_CLOSE)
        and _ANSWER_OPEN not in inner
        and (_ANSWER_CLOSE not in inner)
    )


def extract_answer(text: str) -> str | None:
    """Content of the first complete ``<answer>...</answer>`` pair, or None."""
    start = text.find(_ANSWER_OPEN)
    if start < 0:
        return None
    start += len(_ANSWER_OPEN)
    end = text.find(_ANSWER_CLOSE, start)
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


# --------------------------------------------------------------------------------------------
# task files

TASK_COLUMNS = ("id", "numbers", "target", "solution", "prompt", "assistant_prefix")


def write_task_parquet(problems: Sequence[Problem], prompts: Sequence[str], prefix: str, path: str | Path) -> None:
    """Write problems and their prompts (columns ``TASK_COLUMNS``) to a Parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if len(problems) != len(prompts):
        raise ValueError("problems and prompts differ in length")
    table = pa.table(
        {
            "id": pa.array([p.id for p in problems], pa.string()),
            "numbers": pa.array([list(p.numbers) for p in problems], pa.list_(pa.int64())),
            "target": pa.array([p.target for p in problems], pa.int64()),
            "solution": pa.array([p.solution for p in problems], pa.string()),
            "prompt": pa.array(list(prompts), pa.string()),
            "assistant_prefix": pa.array([prefix] * len(problems), pa.string()),
        }
    )
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def read_task_parquet(path: str | Path, limit: int | None = None) -> tuple[list[Problem], list[str], list[str]]:
    """Problems, prompt texts and assistant prefixes from a task Parquet file (first ``limit``)."""
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    missing = [c for c in TASK_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    rows = table.slice(0, limit).to_pylist() if limit is not None else table.to_pylist()
    problems = [Problem(r["id"], tuple(r["numbers"]), r["target"], r["solution"]) for r in rows]
    return problems, [r["prompt"] for r in rows], [r["assistant_prefix"] for r in rows]


# --------------------------------------------------------------------------------------------
# the task stage


@dataclass(frozen=True)
class TaskSettings:
    """The ``task`` block of the workflow config: which problems, and how they are prompted.

    ``train_file`` / ``eval_file`` (JSON, see :func:`load_problems_json`) replace the generated split
    of the same name; the first ``train_size`` / ``eval_size`` entries are used.
    """

    name: str = "countdown"
    generator: CountdownConfig = CountdownConfig()
    prompt: PromptStyle = PromptStyle()
    train_file: str | None = None
    eval_file: str | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TaskSettings:
        """Build from the config's ``task`` block, validated by the config schema (its defaults fill the gaps)."""
        from qes.config import ConfigError, complete, task_conflicts

        values = complete(dict(values), "task", source="task settings")
        conflicts = task_conflicts(values)
        if conflicts:
            raise ConfigError("invalid task settings:\n  " + "\n  ".join(conflicts))
        gen_keys = set(CountdownConfig.__dataclass_fields__)
        top_keys = {"name", "train_file", "eval_file", "prompt"}
        unknown = sorted(set(values) - gen_keys - top_keys)
        if unknown:
            raise ValueError(f"unknown task setting(s): {', '.join(unknown)}")
        prompt = {k: v for k, v in (values.get("prompt") or {}).items() if v is not None}  # null: built-in
        unknown = sorted(set(prompt) - {"system", "user_template", "assistant_prefix", "few_shot"})
        if unknown:
            raise ValueError(f"unknown task.prompt setting(s): {', '.join(unknown)}")
        few_shot = int(prompt.pop("few_shot", len(DEMONSTRATIONS)))
        if not 0 <= few_shot <= len(DEMONSTRATIONS):
            raise ValueError(f"task.prompt.few_shot must lie in [0, {len(DEMONSTRATIONS)}], got {few_shot}")
        style = PromptStyle(**prompt, examples=DEMONSTRATIONS[:few_shot])
        try:
            _user_message(style, DEMONSTRATIONS[0].problem)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(
                "task.prompt.user_template may only use the fields {target}, {numbers} and {numbers_text}"
                f" ({type(e).__name__}: {e})"
            ) from None
        name = values.get("name", "countdown")
        if name != "countdown":
            raise ValueError(f"unknown task {name!r} (known: countdown)")
        return cls(
            name=name,
            generator=CountdownConfig(**{k: values[k] for k in gen_keys if k in values}),
            prompt=style,
            train_file=values.get("train_file"),
            eval_file=values.get("eval_file"),
        )


def task_problems(settings: TaskSettings) -> tuple[list[Problem], list[Problem]]:
    """Train and held-out problems of ``settings``, checked disjoint.

    A split read from a file is used as given; a generated split skips every problem of the other split's
    file, so a user-given set never collides with a generated one.
    """
    gen = settings.generator
    files = {"train": settings.train_file, "eval": settings.eval_file}
    sizes = {"train": gen.train_size, "eval": gen.eval_size}
    loaded = {split: load_problems_json(f, split=split, limit=sizes[split]) for split, f in files.items() if f}
    out = {}
    for split, other in (("train", "eval"), ("eval", "train")):
        if split in loaded:
            out[split] = loaded[split]
        else:
            exclude = frozenset(p.key for p in loaded.get(other, ()))
            out[split] = generate_split(gen, split, exclude)
    check_disjoint(out["train"], out["eval"])
    return out["train"], out["eval"]


def make_task_data(
    settings: TaskSettings, tokenizer: Any, train_path: str | Path, eval_path: str | Path
) -> dict[str, Any]:
    """Write the train and held-out Parquet files of the task stage; returns a short summary."""
    summary: dict[str, Any] = {}
    for split, problems, path in zip(("train", "eval"), task_problems(settings), (train_path, eval_path), strict=True):
        prompts = [build_prompt(tokenizer, p, settings.prompt) for p in problems]
        write_task_parquet(problems, prompts, settings.prompt.assistant_prefix, path)
        summary[split] = {
            "n": len(problems),
            "path": str(path),
            "prompt_chars_max": max((len(p) for p in prompts), default=0),
        }
    return summary
