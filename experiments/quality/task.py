"""The experiment's task: multi-digit addition, one column at a time, with the carry
written into the output.

Numbers are written least-significant digit first (as a column-by-column algorithm
reads them). Prompt ``"47281093+90564122"`` holds two ``DIGITS``-digit numbers; the
answer has one character per column, the column's sum digit, written as a letter
``a``..``j`` (for 0..9) when the column carries one into the next, then the final
carry (``0`` or ``1``):

    4+9+0=13 -> "d"   7+0+1=8 -> "8"   2+5+0=7 -> "7"   ...   -> "d87..." + "0"

So every answer character depends on the two input digits of its column *and on the
previous answer character* (its carry): a chain of dependent steps in which one
wrong carry corrupts the rest of the answer, the setting in which a student's own
mistakes matter (on-policy distillation). Each column's inputs sit at a fixed
distance from its output, so a small transformer learns the task quickly.

The answer is a deterministic function of the prompt; :func:`is_correct` decodes
the completion to a number and compares it with the true sum.
"""

from __future__ import annotations

import random
from typing import Iterable

DIGITS = 8
CARRY_LETTERS = "abcdefghij"


def max_answer_chars(digits: int = DIGITS) -> int:
    return digits + 1


def max_new_tokens(digits: int = DIGITS) -> int:
    """Greedy-decoding budget: one token per character (both tokenizers split these
    characters), the end-of-turn token and a few spare."""
    return max_answer_chars(digits) + 3


def solve_digits(da: str, db: str) -> str:
    """The answer for two numbers given as least-significant-first digit strings."""
    carry, out = 0, []
    for x, y in zip(da, db):
        s = int(x) + int(y) + carry
        carry = s // 10
        out.append(CARRY_LETTERS[s % 10] if carry else str(s % 10))
    return "".join(out) + str(carry)


def make_example(rng: random.Random, digits: int = DIGITS) -> tuple[str, str]:
    da = "".join(rng.choice("0123456789") for _ in range(digits))
    db = "".join(rng.choice("0123456789") for _ in range(digits))
    return f"{da}+{db}", solve_digits(da, db)


def true_sum(prompt: str) -> int:
    da, db = prompt.strip().split("+")
    return int(da[::-1]) + int(db[::-1])


def decode_answer(text: str) -> int | None:
    """The number an answer spells (``None`` if it is malformed)."""
    text = (text or "").strip()
    if len(text) < 2 or text[-1] not in "01":
        return None
    digits = []
    for ch in text[:-1]:
        if ch.isdigit():
            digits.append(ch)
        elif ch in CARRY_LETTERS:
            digits.append(str(CARRY_LETTERS.index(ch)))
        else:
            return None
    return int((text[-1] + "".join(digits)[::-1]))


def is_correct(prompt: str, completion: str) -> bool:
    """The completion spells the true sum *and* marks every carry right: exact match of
    the whole answer (a wrong carry letter is a wrong step even where the sum survives)."""
    return (completion or "").strip() == solve_digits(*prompt.strip().split("+"))


def make_split(n: int, seed: int, exclude: Iterable[str] = (), digits: int = DIGITS) -> list[tuple[str, str]]:
    """``n`` distinct ``(prompt, answer)`` pairs, none of whose prompts is in ``exclude``."""
    rng = random.Random(seed)
    seen = set(exclude)
    out = []
    while len(out) < n:
        p, a = make_example(rng, digits)
        if p not in seen:
            seen.add(p)
            out.append((p, a))
    return out


def sampler(seed: int, exclude: set[str], digits: int = DIGITS):
    """An endless stream of fresh training examples whose prompts avoid ``exclude``."""
    rng = random.Random(seed)
    while True:
        p, a = make_example(rng, digits)
        if p not in exclude:
            yield p, a
