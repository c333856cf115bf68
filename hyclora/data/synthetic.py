"""Synthetic arithmetic word problems in GSM8K format, generated with a fixed seed.

The embedded default dataset: it needs no download and no file, so a demo or a test runs on a
fresh machine. Each record is ``{"question": ..., "answer": ...}`` with GSM8K's answer layout
(reasoning with ``<<a+b=c>>`` calculator annotations, then ``#### c``), so every GSM8K builder,
prompt and metric applies unchanged.

Train and test are disjoint by construction: one seeded stream of problems is routed to a split
by a stable hash (CRC32) of the question text, and duplicates are skipped.
"""

from __future__ import annotations

import random
import zlib
from typing import Callable, Dict, List, Tuple

_PEOPLE = [
    ("Ava", "she"), ("Ben", "he"), ("Chloe", "she"), ("Dan", "he"), ("Emma", "she"),
    ("Finn", "he"), ("Grace", "she"), ("Hugo", "he"), ("Isla", "she"), ("Jack", "he"),
    ("Lena", "she"), ("Max", "he"), ("Nora", "she"), ("Omar", "he"), ("Priya", "she"),
    ("Sam", "he"), ("Tara", "she"), ("Victor", "he"), ("Wendy", "she"), ("Zoe", "she"),
]
_ITEMS = [
    "apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "stamps",
    "cards", "eggs", "flowers", "balloons", "coins", "toy cars", "cupcakes", "beads",
]
_CONTAINERS = ["boxes", "bags", "packs", "jars", "baskets", "crates"]

Record = Dict[str, str]


def _calc(a: int, op: str, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if a % b:
        raise AssertionError("generator bug: inexact division")
    return a // b


def _step(a: int, op: str, b: int) -> Tuple[str, int]:
    """One reasoning step in GSM8K's notation: ``a + b = <<a+b=c>>c``."""
    c = _calc(a, op, b)
    shown = {"*": "x"}.get(op, op)  # GSM8K writes multiplication as 'x' in prose
    return f"{a} {shown} {b} = <<{a}{op}{b}={c}>>{c}", c


def _add(r: random.Random) -> Tuple[str, str, int]:
    (name, he), item = r.choice(_PEOPLE), r.choice(_ITEMS)
    a, b = r.randint(2, 60), r.randint(2, 60)
    step, c = _step(a, "+", b)
    q = f"{name} has {a} {item}. {he.capitalize()} gets {b} more {item}. How many {item} does {name} have now?"
    return q, f"{name} now has {step} {item}.", c


def _sub(r: random.Random) -> Tuple[str, str, int]:
    (name, he), (friend, _), item = r.choice(_PEOPLE), r.choice(_PEOPLE), r.choice(_ITEMS)
    a = r.randint(10, 90)
    b = r.randint(1, a - 1)
    step, c = _step(a, "-", b)
    q = f"{name} had {a} {item} and gave {b} of them to {friend}. How many {item} does {name} have left?"
    return q, f"{name} has {step} {item} left.", c


def _mul(r: random.Random) -> Tuple[str, str, int]:
    (name, he), item, box = r.choice(_PEOPLE), r.choice(_ITEMS), r.choice(_CONTAINERS)
    a, b = r.randint(2, 12), r.randint(2, 15)
    step, c = _step(a, "*", b)
    q = f"{name} buys {a} {box} of {item}. Each of the {box} holds {b} {item}. How many {item} does {name} buy?"
    return q, f"{name} buys {step} {item}.", c


def _div(r: random.Random) -> Tuple[str, str, int]:
    (name, he), item = r.choice(_PEOPLE), r.choice(_ITEMS)
    b, c0 = r.randint(2, 9), r.randint(2, 12)
    a = b * c0
    step, c = _step(a, "/", b)
    q = f"{name} shares {a} {item} equally among {b} friends. How many {item} does each friend get?"
    return q, f"Each friend gets {step} {item}.", c


def _two_step(r: random.Random) -> Tuple[str, str, int]:
    (name, he), item, box = r.choice(_PEOPLE), r.choice(_ITEMS), r.choice(_CONTAINERS)
    a, b = r.randint(2, 9), r.randint(3, 12)
    total = a * b
    give = r.randint(1, total - 1)
    s1, t = _step(a, "*", b)
    s2, c = _step(t, "-", give)
    q = (
        f"{name} has {a} {box} with {b} {item} in each. {he.capitalize()} gives away {give} {item}. "
        f"How many {item} does {name} have left?"
    )
    return q, f"{name} starts with {s1} {item}.\nAfter giving some away, {he} has {s2} {item}.", c


def _money(r: random.Random) -> Tuple[str, str, int]:
    (name, he), item = r.choice(_PEOPLE), r.choice(_ITEMS)
    n, price = r.randint(2, 8), r.randint(2, 9)
    cost = n * price
    bill = next(v for v in (10, 20, 50, 100) if v > cost)
    s1, t = _step(n, "*", price)
    s2, c = _step(bill, "-", t)
    q = (
        f"{name} buys {n} {item} that cost ${price} each and pays with a ${bill} bill. "
        f"How much change, in dollars, does {he} get?"
    )
    return q, f"The {item} cost {s1} dollars.\nThe change is {s2} dollars.", c


_KINDS: List[Callable[[random.Random], Tuple[str, str, int]]] = [
    _add, _sub, _mul, _div, _two_step, _money,
]


def arithmetic_word_problems(
    split: str = "train", n: int = 2000, *, seed: int = 0, test_fraction: float = 0.1
) -> List[Record]:
    """``n`` distinct GSM8K-format problems of ``split`` ("train" or "test").

    Deterministic for a given ``seed`` (Python's ``random.Random`` is stable across versions for
    ``randint``/``choice``). A question belongs to "test" when CRC32(question) falls in the
    lowest ``test_fraction`` of the 32-bit range, so the two splits never share a question, and
    a smaller ``n`` is a prefix of a larger one.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split={split!r}: expected 'train' or 'test'")
    if n <= 0:
        raise ValueError(f"n={n}: expected a positive number of problems")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction}: expected a number in (0, 1)")
    r = random.Random(seed)
    cutoff = int(test_fraction * 2**32)
    seen: set = set()
    out: List[Record] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 200 * n + 10_000:
            raise RuntimeError(
                f"could only generate {len(out)} distinct {split} problems; ask for fewer"
            )
        question, reasoning, result = r.choice(_KINDS)(r)
        in_test = zlib.crc32(question.encode("utf-8")) < cutoff
        if in_test != (split == "test") or question in seen:
            continue
        seen.add(question)
        out.append({"question": question, "answer": f"{reasoning}\n#### {result}"})
    return out


__all__ = ["arithmetic_word_problems"]
