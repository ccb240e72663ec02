"""Write short arithmetic questions with numeric answers: the offline dataset example and larger sets.

    python config/examples/data/make_arithmetic.py    # rewrites config/examples/data/arithmetic.jsonl (300 rows)
    python config/examples/data/make_arithmetic.py --count 2500 --a-max 60 --b-max 20 \\
        --out train.jsonl --eval-out eval.jsonl --eval-count 500    # the last 500 rows go to eval.jsonl

Each row: {"id", "question", "answer"}; the answer is an integer written as text. The rows come from a
fixed seed, so a file is the same on every run; questions are distinct, so the two files are disjoint.
"""

import argparse
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


def rows(count: int = 300, seed: int = 0, a_max: int = 20, b_max: int = 12) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out, seen = [], set()
    tries = 0
    while len(out) < count:
        tries += 1
        if tries > 100 * count:
            raise ValueError(f"cannot find {count} distinct questions with a <= {a_max}, b <= {b_max}")
        template, answer = TEMPLATES[len(out) % len(TEMPLATES)]
        a, b = rng.randint(2, a_max), rng.randint(2, b_max)
        if answer is None:  # division with a whole answer
            question, value = template.format(c=a * b, b=b), a
        else:
            a, b = max(a, b), min(a, b)  # no negative differences
            question, value = template.format(a=a, b=b), answer(a, b)
        if question not in seen:
            seen.add(question)
            out.append({"id": f"arith-{len(out):04d}", "question": question, "answer": str(value)})
    return out


def write(path: Path, items: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in items))
    print(f"wrote {len(items)} rows to {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=300, help="distinct questions in all")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--a-max", type=int, default=20, help="largest first operand")
    parser.add_argument("--b-max", type=int, default=12, help="largest second operand")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("arithmetic.jsonl"))
    parser.add_argument("--eval-out", type=Path, default=None, help="file for the last --eval-count rows")
    parser.add_argument("--eval-count", type=int, default=0)
    args = parser.parse_args()
    if (args.eval_out is None) != (args.eval_count == 0) or not 0 <= args.eval_count < args.count:
        parser.error("--eval-out and a --eval-count below --count go together")
    items = rows(args.count, args.seed, args.a_max, args.b_max)
    split = len(items) - args.eval_count
    write(args.out, items[:split])
    if args.eval_out is not None:
        write(args.eval_out, items[split:])


if __name__ == "__main__":
    main()
