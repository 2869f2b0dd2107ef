"""Write the multiple-choice task files shipped in minillama/task_data/ (deterministic; nothing is downloaded).

    python tools/make_eval_tasks.py [--shakespeare ../shared/data/tinyshakespeare.txt] [--out minillama/task_data]
    python tools/make_eval_tasks.py --check      # exit 1 if the shipped files differ from what this writes

- arithmetic.jsonl: "Question: What is 47 + 38?\\nAnswer:" -> the sum among near misses (+-1, +-10, ...).
- python_expressions.jsonl: "In Python, sorted([3, 1, 2]) evaluates to" -> the repr Python gives, among the
  mistakes a reader might make (reversed order, off-by-one lengths, float division, ...).
- shakespeare_names.jsonl: a character's name cut from a line of the validation tail (last 10%) of tinyshakespeare
  (The Taming of the Shrew and The Tempest), to be told apart from three other characters of the same play; the
  context is the text before the name (up to ~400 characters, from a line start). Models trained by the
  Shakespeare recipe have not seen this text (it holds out the same tail).

Every item has 4 choices (chance 0.25); the gold position is drawn with a seeded generator.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import re
import sys
from pathlib import Path

from minillama.data.prepare import split_tail  # the validation tail (last 10%) the Shakespeare recipe holds out

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # karpathy/char-rnn's file
N_CHOICES = 4


def _item(task: str, index: int, context: str, gold: str, distractors: list[str], rnd: random.Random) -> dict:
    assert gold not in distractors and len(set(distractors)) == N_CHOICES - 1, (context, gold, distractors)
    choices = distractors[:]
    position = rnd.randrange(N_CHOICES)
    choices.insert(position, gold)
    return {"id": f"{task}-{index:03d}", "context": context, "choices": choices, "gold": position}


def _pick_distractors(gold: str, candidates: list[str], rnd: random.Random) -> list[str]:
    unique = [c for c in dict.fromkeys(candidates) if c != gold]
    return rnd.sample(unique, N_CHOICES - 1)


# --------------------------------------------------------------------------------------------------------------
def arithmetic_items(n: int = 100, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    items, seen = [], set()
    while len(items) < n:
        op = rnd.choice("+-*")
        if op == "+":
            a, b = rnd.randint(10, 99), rnd.randint(10, 99)
            answer = a + b
        elif op == "-":
            a = rnd.randint(20, 99)
            b = rnd.randint(10, a)
            answer = a - b
        else:
            a, b = rnd.randint(2, 9), rnd.randint(11, 29)
            answer = a * b
        context = f"Question: What is {a} {op} {b}?\nAnswer:"
        if context in seen:
            continue
        seen.add(context)
        near = [answer + d for d in (1, -1, 10, -10, 2, -2, 11, -9)]
        swapped = int(str(answer)[::-1]) if answer >= 10 else answer + 3
        candidates = [str(v) for v in [*near, swapped] if v >= 0]
        items.append(_item("arithmetic", len(items), context, str(answer),
                           _pick_distractors(str(answer), candidates, rnd), rnd))
    return items


# --------------------------------------------------------------------------------------------------------------
# Each template draws an expression and returns (its text, wrong values a reader might give); the right value is
# what Python itself gives for the text.
_WORDS = ["python", "banana", "module", "string", "lambda", "import", "object", "return", "yield", "tuple"]


def _digits(r: random.Random, k: int) -> list[int]:
    return [r.randint(0, 9) for _ in range(k)]


def _len_list(r):
    xs = _digits(r, r.randint(2, 6))
    return f"len({xs})", [len(xs) - 1, len(xs) + 1, len(xs) + 2, sum(xs)]


def _index(r):
    xs, i = r.sample(range(10, 60), 5), r.randint(1, 3)
    return f"{xs}[{i}]", [xs[i - 1], xs[i + 1], i, len(xs)]


def _last(r):
    xs = r.sample(range(10, 60), 4)
    return f"{xs}[-1]", [xs[0], xs[-2], -1, len(xs)]


def _slice(r):
    w, i = r.choice(_WORDS), r.randint(1, 2)
    return f"{w!r}[{i}:{i + 3}]", [w[i:i + 2], w[i + 1:i + 4], w[i - 1:i + 3], w[i:i + 4]]


def _upper(r):
    w = r.choice(_WORDS)
    return f"{w!r}.upper()", [w, w.capitalize(), w.title() + "!", w[::-1].upper()]


def _title(r):
    a, b = r.sample(_WORDS, 2)
    return f"'{a} {b}'.title()", [f"{a.capitalize()} {b}", f"{a} {b}".upper(), f"{a} {b}", a.title() + b.title()]


def _split(r):
    ws = r.sample(_WORDS, 3)
    return f"{','.join(ws)!r}.split(',')", [[",".join(ws)], [ws[0], ",".join(ws[1:])], "".join(ws), ws[::-1]]


def _join(r):
    ws, sep = r.sample(["x", "y", "z", "a", "b", "c"], 3), r.choice(["-", "+", "/"])
    return f"{sep!r}.join({ws})", ["".join(ws), " ".join(ws), sep + sep.join(ws), ws]


def _floordiv(r):
    a, b = r.randint(11, 49), r.randint(2, 9)
    return f"{a} // {b}", [a / b, a // b + 1, a % b, a // b - 1]


def _mod(r):
    a, b = r.randint(11, 49), r.randint(3, 9)
    return f"{a} % {b}", [a // b, a % b + 1, b, (a % b or b) - 1]


def _power(r):
    a, b = r.randint(2, 5), r.randint(2, 4)
    return f"{a} ** {b}", [a * b, a ** (b - 1), a ** (b + 1), b ** a]


def _sorted(r):
    xs = r.sample(range(1, 10), 4)
    return f"sorted({xs})", [sorted(xs, reverse=True), xs, sorted(xs)[1:], min(xs)]


def _max(r):
    xs = r.sample(range(1, 30), 4)
    return f"max({xs})", [min(xs), xs[0], xs[-1], len(xs)]


def _sum(r):
    xs = r.sample(range(1, 20), 4)
    return f"sum({xs})", [sum(xs) + 1, sum(xs) - 1, len(xs), max(xs)]


def _range(r):
    a, b = r.randint(0, 4), r.randint(6, 9)
    return f"list(range({a}, {b}))", [list(range(a, b + 1)), list(range(a + 1, b)), list(range(a + 1, b + 1)),
                                      list(range(b - a))]


def _repeat(r):
    w, k = r.choice(["ab", "xy", "no", "ha"]), r.randint(2, 4)
    return f"{w!r} * {k}", [w + str(k), " ".join([w] * k), w * (k + 1), "".join(c * k for c in w)]


def _len_str(r):
    w = r.choice(_WORDS)
    return f"len({w!r})", [len(w) - 1, len(w) + 1, 1, len(set(w))]


def _count(r):
    w = r.choice(_WORDS)
    c = r.choice(sorted(set(w)))
    return f"{w!r}.count({c!r})", [w.count(c) + 1, w.count(c) - 1 or 2, w.find(c), len(w)]


def _find(r):
    w = r.choice(_WORDS)
    c = r.choice(sorted(set(w)))
    return f"{w!r}.find({c!r})", [w.find(c) + 1, -1, w.rfind(c) + 1, len(w)]


def _round(r):
    x = r.randint(10, 99) + r.choice([0.2, 0.7])
    return f"round({x})", [int(x), x, int(x) + 2, float(round(x))]


def _abs(r):
    a = r.randint(2, 99)
    return f"abs({-a})", [-a, a - 1, a + 1, 0]


def _reversed(r):
    xs = r.sample(range(1, 10), 3)
    return f"list(reversed({xs}))", [xs, sorted(xs), xs[1:], xs[::-1][1:]]


def _bool(r):
    s = r.choice(["", "0", " ", "False"])
    return f"bool({s!r})", [not bool(s), None, s, int(bool(s)) ^ 1]


def _int(r):
    a = r.randint(10, 99)
    return f"int('{a}') + 1", [f"{a}1", a, float(a + 1), a + 10]


def _type(r):
    v = r.choice([3, 3.0, "3", [3], True, (3,)])
    names = ["int", "float", "str", "list", "bool", "tuple"]
    return f"type({v!r}).__name__", [n for n in names if n != type(v).__name__]


_TEMPLATES = [_len_list, _index, _last, _slice, _upper, _title, _split, _join, _floordiv, _mod, _power, _sorted,
              _max, _sum, _range, _repeat, _len_str, _count, _find, _round, _abs, _reversed, _bool, _int, _type]


def python_expression_items(n: int = 100, seed: int = 0) -> list[dict]:
    rnd = random.Random(seed)
    items, seen = [], set()
    while len(items) < n:
        expression, wrong = rnd.choice(_TEMPLATES)(rnd)
        if expression in seen:
            continue
        # The expression is our own template text; evaluating it makes the answer what Python says it is.
        answer = repr(eval(expression, {"__builtins__": {}}, dict(len=len, sorted=sorted, max=max, sum=sum,
                                                                   list=list, range=range, round=round, abs=abs,
                                                                   reversed=reversed, bool=bool, int=int,
                                                                   type=type)))
        candidates = [repr(w) for w in wrong]
        if len({c for c in candidates if c != answer}) < N_CHOICES - 1:
            continue  # this draw's mistakes coincide with the answer or each other: draw another
        seen.add(expression)
        items.append(_item("python_expressions", len(items), f"In Python, {expression} evaluates to", answer,
                           _pick_distractors(answer, candidates, rnd), rnd))
    return items


# --------------------------------------------------------------------------------------------------------------
CASTS = {  # speakers of the validation tail, by play
    "The Taming of the Shrew": ["Petruchio", "Katharina", "Tranio", "Baptista", "Grumio", "Hortensio", "Lucentio",
                                "Bianca", "Gremio", "Biondello", "Vincentio", "Curtis"],
    "The Tempest": ["Prospero", "Sebastian", "Antonio", "Gonzalo", "Miranda", "Ariel", "Alonso", "Ferdinand",
                    "Adrian", "Caliban"],
}


def shakespeare_items(text: str, n: int = 120, seed: int = 0, context_chars: int = 400) -> list[dict]:
    _, tail = split_tail(text, 0.1)
    play_of = {name: play for play, cast in CASTS.items() for name in cast}
    # A name inside a spoken line, after a word and a space: the context ends with that word, the choice is " Name".
    pattern = re.compile(r"(?<=\S )(" + "|".join(play_of) + r")\b")
    found = []
    for match in pattern.finditer(tail):
        start = tail.find("\n", max(0, match.start() - context_chars)) + 1
        if match.start() - start < 40:
            continue  # too little context
        found.append((tail[start:match.start() - 1], match.group(1)))
    rnd = random.Random(seed)
    chosen = sorted(rnd.sample(range(len(found)), min(n, len(found))))
    items = []
    for index in chosen:
        context, name = found[index]
        others = [c for c in CASTS[play_of[name]] if c != name]
        items.append(_item("shakespeare_names", len(items), context, name, rnd.sample(others, N_CHOICES - 1), rnd))
    return items


# --------------------------------------------------------------------------------------------------------------
def render(items: list[dict]) -> str:
    return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)


def build_all(shakespeare_path: Path) -> dict[str, str]:
    """File name -> content of every shipped task file."""
    data = shakespeare_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != SHAKESPEARE_SHA256:
        raise SystemExit(f"{shakespeare_path}: not the tinyshakespeare.txt these tasks were made from "
                         f"(sha256 {SHAKESPEARE_SHA256})")
    return {
        "arithmetic.jsonl": render(arithmetic_items()),
        "python_expressions.jsonl": render(python_expression_items()),
        "shakespeare_names.jsonl": render(shakespeare_items(data.decode("utf-8"))),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shakespeare", default=str(DEFAULT_SHAKESPEARE), help="tinyshakespeare.txt")
    parser.add_argument("--out", default=str(ROOT / "minillama" / "task_data"))
    parser.add_argument("--check", action="store_true", help="compare with the files in --out; write nothing")
    args = parser.parse_args()
    out = Path(args.out)
    files = build_all(Path(args.shakespeare))
    if args.check:
        stale = [name for name, content in files.items()
                 if not (out / name).is_file() or (out / name).read_text(encoding="utf-8") != content]
        print("up to date" if not stale else f"differ: {', '.join(stale)}")
        sys.exit(1 if stale else 0)
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(content, encoding="utf-8")
        tmp.replace(out / name)
        print(f"{out / name}: {content.count(chr(10))} items")


if __name__ == "__main__":
    main()
