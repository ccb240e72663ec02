"""Write arithmetic.jsonl: short arithmetic questions with numeric answers, the offline dataset example.

    python config/examples/data/make_arithmetic.py    # rewrites config/examples/data/arithmetic.jsonl

Each row: {"id", "question", "answer"}; the answer is an integer written as text. The rows come from a
fixed seed, so the file is the same on every run.
"""

import json
import random
from pathlib import Path

TEMPLATES = (
    ("What is {a} + {b}?", lambda a, b: a + b),
    ("What is {a} - {b}?", lambda a, b: a - b),
    ("What is {a} times {b}?", lambda a, b: a * b),
    ("A box holds {a} pens and you put {b} more pens in it. How many pens are in the box now?", lambda a, b: a + b),
    ("Sam had {a} stickers and gave {b} of them away. How many stickers does Sam have left?", lambda a, b: a - b),
    ("There are {a} rows of chairs with {b} chairs in each row. How many chairs are there?", lambda a, b: a * b),
    ("{c} cookies are shared equally among {b} children. How many cookies does each child get?", None),
)


def rows(count: int = 300, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out, seen = [], set()
    while len(out) < count:
        template, answer = TEMPLATES[len(out) % len(TEMPLATES)]
        a, b = rng.randint(2, 20), rng.randint(2, 12)
        if answer is None:  # division with a whole answer
            question, value = template.format(c=a * b, b=b), a
        else:
            a, b = max(a, b), min(a, b)  # no negative differences
            question, value = template.format(a=a, b=b), answer(a, b)
        if question not in seen:
            seen.add(question)
            out.append({"id": f"arith-{len(out):04d}", "question": question, "answer": str(value)})
    return out


if __name__ == "__main__":
    path = Path(__file__).with_name("arithmetic.jsonl")
    path.write_text("".join(json.dumps(row) + "\n" for row in rows()))
    print(f"wrote {path}")
