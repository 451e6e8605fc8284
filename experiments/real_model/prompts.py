"""Short instruction prompts, generated locally (no downloads): templates x fillers,
deduplicated, shuffled with a fixed seed, split into train and held-out."""

from __future__ import annotations

import random

COUNTRIES = ["France", "Japan", "Italy", "Spain", "Germany", "Canada", "Brazil", "Egypt", "India", "China",
             "Mexico", "Kenya", "Norway", "Greece", "Peru", "Australia", "Russia", "Portugal", "Turkey", "Chile"]
ANIMALS = ["cat", "dog", "horse", "elephant", "penguin", "dolphin", "owl", "bee", "shark", "frog", "lion",
           "rabbit", "eagle", "whale", "ant", "snake"]
THINGS = ["a bicycle", "a computer", "the sun", "a rainbow", "a volcano", "a library", "a bridge", "a clock",
          "a refrigerator", "a telescope", "an umbrella", "a piano", "a candle", "a map", "a battery", "a tree"]
TOPICS = ["exercise", "sleep", "reading", "drinking water", "learning a language", "saving money",
          "cooking at home", "recycling", "walking", "music", "friendship", "gardening", "travel", "math",
          "history", "the ocean"]
WORDS = ["hot", "big", "happy", "fast", "light", "old", "open", "early", "strong", "rich", "up", "full",
         "soft", "loud", "wet", "young"]
COLORS = ["red", "blue", "green", "yellow", "orange", "purple", "white", "black"]
JOBS = ["doctor", "teacher", "farmer", "pilot", "chef", "firefighter", "nurse", "engineer", "artist", "baker"]


def _arith(rng: random.Random, n: int) -> list[str]:
    out = []
    for _ in range(n):
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        op = rng.choice(["plus", "minus", "times"])
        out.append(f"What is {a} {op} {b}?")
    return out


def all_prompts(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    p: list[str] = []
    p += [f"What is the capital of {c}?" for c in COUNTRIES]
    p += [f"What language is spoken in {c}?" for c in COUNTRIES]
    p += [f"Tell me one fact about {c}." for c in COUNTRIES]
    p += [f"What does a {a} eat?" for a in ANIMALS]
    p += [f"Where does a {a} live?" for a in ANIMALS]
    p += [f"Describe a {a} in one sentence." for a in ANIMALS]
    p += [f"What sound does a {a} make?" for a in ANIMALS[:8]]
    p += [f"What is {t}?" for t in THINGS]
    p += [f"How does {t} work?" for t in THINGS]
    p += [f"What is {t} used for?" for t in THINGS]
    p += [f"Why is {t} good for you?" for t in TOPICS]
    p += [f"Give me one tip about {t}." for t in TOPICS]
    p += [f"Write a short sentence about {t}." for t in TOPICS]
    p += [f"What is the opposite of {w}?" for w in WORDS]
    p += [f"Use the word '{w}' in a sentence." for w in WORDS]
    p += [f"Name something that is {c}." for c in COLORS]
    p += [f"What does a {j} do?" for j in JOBS]
    p += [f"What tools does a {j} use?" for j in JOBS]
    p += [f"Write a one-line poem about {c} things." for c in COLORS]
    p += _arith(rng, 40)
    p += ["How many days are in a week?", "How many months are in a year?", "What is the largest ocean?",
          "What is the tallest animal?", "Why is the sky blue?", "What is water made of?",
          "How many legs does a spider have?", "What is the boiling point of water?",
          "Who wrote Romeo and Juliet?", "What is the largest planet?", "What do plants need to grow?",
          "What is the freezing point of water?", "How many hours are in a day?", "What is gravity?",
          "What is photosynthesis?", "Name three primary colors.", "What is the speed of light?",
          "Say hello in Spanish.", "What is a noun?", "What is a verb?"]
    seen, out = set(), []
    for q in p:
        if q not in seen:
            seen.add(q)
            out.append(q)
    rng.shuffle(out)
    return out


def split(n_eval: int = 120, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held_out): the first ``n_eval`` shuffled prompts are held out."""
    prompts = all_prompts(seed)
    return prompts[n_eval:], prompts[:n_eval]
