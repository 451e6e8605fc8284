"""The demo's synthetic task: encode a five-letter word with a fixed substitution cipher.

``"encode: hello"`` -> ``"nwddz"`` (each letter replaced through :data:`CIPHER`,
a fixed derangement of ``a..z``). The answer is a deterministic function of the
prompt, so greedy decoding is scored by exact match.

Why this task: with a fixed word length every answer character sits at a
constant distance from the letter it encodes, so the "circuit" is trivial and
the hard part is *knowledge* (the 26-entry cipher table), which is exactly what
logit distillation transfers well. The demo's teacher sees all 26 letters and
learns the table perfectly in ~100 steps. The student is pre-trained only on
words over :data:`STUDENT_LETTERS` (``a..r``): it knows the output format and
18 of 26 cipher entries, so it gets a word right only when all five letters are
among those 18, about (18/26)^5 = 16% of the time. That weakness is stable (it
does not depend on stopping a training run at the right step) and on-policy
distillation from the teacher repairs it in ~100-150 small steps, while nothing
but the teacher tells the student what ``s..z`` encode to.

(Briefly-trained students on algorithmic tasks such as string reversal barely
move in 150 steps of micro batch 8, and students on this task trained on all
letters jump from 0% to 100% within ~10 steps, which makes "weak" fragile.)
"""

from __future__ import annotations

import random
import string
from typing import Iterable, Sequence

ALPHABET = string.ascii_lowercase
WORD_LEN = 5
PREFIX = "encode: "
STUDENT_LETTERS = ALPHABET[:18]  # a..r
CIPHER_SEED = 1234
# longest answer in characters; every tokenizer used by the demo spends at most
# one token per character, plus one for the end-of-turn token (and one spare).
MAX_ANSWER_CHARS = WORD_LEN
MAX_NEW_TOKENS = MAX_ANSWER_CHARS + 2


def _make_cipher(seed: int) -> dict[str, str]:
    rng = random.Random(seed)
    while True:
        perm = list(ALPHABET)
        rng.shuffle(perm)
        if all(a != b for a, b in zip(ALPHABET, perm)):  # a derangement: no letter maps to itself
            return dict(zip(ALPHABET, perm))


CIPHER: dict[str, str] = _make_cipher(CIPHER_SEED)

TASK_SPEC = {
    "name": "cipher",
    "alphabet": ALPHABET,
    "word_len": WORD_LEN,
    "prefix": PREFIX,
    "cipher": "".join(CIPHER[c] for c in ALPHABET),
    "student_letters": STUDENT_LETTERS,
}


def solve(word: str) -> str:
    """The ground-truth answer for a word."""
    return "".join(CIPHER[c] for c in word)


def make_word(rng: random.Random, alphabet: Sequence[str] = ALPHABET) -> str:
    return "".join(rng.choice(alphabet) for _ in range(WORD_LEN))


def make_example(rng: random.Random, alphabet: Sequence[str] = ALPHABET) -> tuple[str, str]:
    """One ``(prompt_text, answer_text)`` pair drawn from ``rng`` (letters from ``alphabet``)."""
    word = make_word(rng, alphabet)
    return PREFIX + word, solve(word)


def parse_prompt(prompt: str) -> str:
    """The word inside a prompt (inverse of :func:`make_example`'s formatting)."""
    prompt = prompt.strip()
    if prompt.startswith(PREFIX.strip()):
        prompt = prompt[len(PREFIX.strip()) :]
    return prompt.strip()


def make_split(
    n: int, seed: int, exclude: Iterable[str] = (), alphabet: Sequence[str] = ALPHABET
) -> list[tuple[str, str]]:
    """``n`` distinct examples from ``random.Random(seed)``.

    Prompts listed in ``exclude`` are skipped, which keeps held-out splits
    disjoint from training ones.
    """
    rng = random.Random(seed)
    seen = set(exclude)
    out: list[tuple[str, str]] = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 1000:
            raise RuntimeError(f"could not draw {n} distinct examples")
        prompt, answer = make_example(rng, alphabet)
        if prompt in seen:
            continue
        seen.add(prompt)
        out.append((prompt, answer))
    return out


def score(answer_pred: str, answer_true: str) -> bool:
    """Exact match after stripping surrounding whitespace."""
    return (answer_pred or "").strip() == (answer_true or "").strip()


def to_messages(prompt: str, answer: str | None = None) -> list[dict]:
    """Chat ``messages`` for one example (assistant turn only if ``answer`` given)."""
    msgs = [{"role": "user", "content": prompt}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def corpus(n: int = 2000, seed: int = 12345) -> list[str]:
    """Plain-text task lines, used to train the demo's BPE tokenizer."""
    return [p + " " + a for p, a in make_split(n, seed)]
