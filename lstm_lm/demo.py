"""The built-in demo corpus: short generated biographies in which a person's home
region decides the language they speak.

    lines = demo_corpus(n=6000, seed=0)   # "My name is John, I am from Tamilnadu and I speak Tamil."

Nothing is downloaded or copied: sentences are assembled from the word lists below
by a seeded random generator, so the corpus is the same on every machine. To
predict the language the model must remember the region across the clauses that
sit between "I am from X" and "I speak Y", which is what an LSTM's memory cell is for.
"""

from __future__ import annotations

import random

DEMO_VERSION = 1  # bump when the generator changes, so cached encodings are not reused
SEED_PROMPT = "My name is John, I am from Tamilnadu and I speak"
SEED_ANSWER = "Tamil"

# region -> language. Several regions can share a language; a region never has two.
REGION_LANGUAGE = {
    "Tamilnadu": "Tamil",
    "Kerala": "Malayalam",
    "Karnataka": "Kannada",
    "Telangana": "Telugu",
    "Maharashtra": "Marathi",
    "Gujarat": "Gujarati",
    "Punjab": "Punjabi",
    "Bengal": "Bengali",
    "Odisha": "Odia",
    "Assam": "Assamese",
    "France": "French",
    "Japan": "Japanese",
    "Germany": "German",
    "Spain": "Spanish",
    "Mexico": "Spanish",
    "Italy": "Italian",
    "Portugal": "Portuguese",
    "Brazil": "Portuguese",
    "Russia": "Russian",
    "China": "Mandarin",
    "Korea": "Korean",
    "Greece": "Greek",
    "Turkey": "Turkish",
    "Poland": "Polish",
    "Sweden": "Swedish",
    "Norway": "Norwegian",
    "Finland": "Finnish",
    "Netherlands": "Dutch",
    "Vietnam": "Vietnamese",
    "Thailand": "Thai",
    "Iran": "Persian",
    "Israel": "Hebrew",
    "Egypt": "Arabic",
    "Kenya": "Swahili",
    "Hungary": "Hungarian",
    "Denmark": "Danish",
    "Indonesia": "Indonesian",
}

NAMES = [
    "John", "Priya", "Arjun", "Meera", "Ravi", "Anita", "Kumar", "Lakshmi", "Marie", "Pierre",
    "Yuki", "Hiro", "Anna", "Lukas", "Carlos", "Lucia", "Marco", "Giulia", "Ana", "Pedro",
    "Olga", "Ivan", "Wei", "Mei", "Min", "Sofia", "Nikos", "Elif", "Kasia", "Erik", "Ingrid",
    "Aino", "Daan", "Linh", "Somchai", "Sara", "Omar", "Amina", "David", "Laszlo", "Freja",
    "Budi", "Maria", "James", "Fatima", "Noah", "Emma", "Leo", "Nina", "Sam",
]

OCCUPATIONS = [
    "teacher", "doctor", "farmer", "nurse", "engineer", "painter", "driver", "cook", "writer",
    "singer", "lawyer", "pilot", "baker", "tailor", "student", "carpenter", "dentist", "clerk",
]

PLACES = ["a small village", "a big city", "a quiet town", "the mountains", "the coast", "the capital"]
HOBBIES = ["reading", "cooking", "running", "painting", "singing", "gardening", "cycling", "fishing"]
CITIES = ["London", "Toronto", "Sydney", "Dubai", "Singapore", "Chicago", "Berlin", "Paris"]

# Clauses that may sit between the region and "I speak": unrelated words the model
# has to carry the region across. {occ}, {place}, {hobby}, {city}, {n} are filled in.
CLAUSES = [
    "I work as a {occ}",
    "I grew up in {place}",
    "I like {hobby} on weekends",
    "I now live in {city}",
    "my family has {n} children",
    "I have been a {occ} for {n} years",
    "my friends say I love {hobby}",
    "I moved to {city} last year",
]

NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "ten"]

# Sentences that end a biography, so that the corpus is not only about languages.
CLOSINGS = [
    "I love {hobby}.",
    "I work as a {occ}.",
    "My favourite city is {city}.",
    "I have {n} brothers.",
    "Every weekend I enjoy {hobby}.",
]


def _fill(template: str, rng: random.Random) -> str:
    return template.format(
        occ=rng.choice(OCCUPATIONS), place=rng.choice(PLACES), hobby=rng.choice(HOBBIES),
        city=rng.choice(CITIES), n=rng.choice(NUMBERS),
    )


def biography(rng: random.Random, max_clauses: int = 2) -> str:
    """One line: a self-introduction whose region decides the language spoken."""
    name = rng.choice(NAMES)
    region = rng.choice(list(REGION_LANGUAGE))
    language = REGION_LANGUAGE[region]
    clauses = [_fill(c, rng) for c in rng.sample(CLAUSES, rng.randint(0, max_clauses))]
    style = rng.random()
    if style < 0.6:
        middle = "".join(f", {c}" for c in clauses)
        first = f"My name is {name}, I am from {region}{middle} and I speak {language}."
    elif style < 0.8:
        middle = "".join(f" {c} and" for c in clauses)
        first = f"I am {name}. I am from {region} and{middle} I speak {language}."
    else:
        middle = "".join(f", {c}" for c in clauses)
        first = f"Hello, I am {name} from {region}{middle}, and I speak {language}."
    if rng.random() < 0.5:
        first += " " + _fill(rng.choice(CLOSINGS), rng)
    return first


def demo_corpus(n: int = 6000, seed: int = 0) -> list[str]:
    """`n` biographies, one per line, the same for the same (n, seed)."""
    rng = random.Random(seed)
    lines = [biography(rng) for _ in range(n)]
    # The seed sentence is part of the story: make sure it is seen verbatim.
    lines[0] = f"{SEED_PROMPT} {SEED_ANSWER}."
    return lines


def demo_splits(n: int = 6000, seed: int = 0) -> dict[str, list[str]]:
    """Train/valid/test from disjoint draws (90/5/5 of `n`), each seeded."""
    n_eval = max(1, n // 20)
    valid_rng, test_rng = random.Random(f"valid-{seed}"), random.Random(f"test-{seed}")
    return {
        "train": demo_corpus(n - 2 * n_eval, seed),
        "valid": [biography(valid_rng) for _ in range(n_eval)],
        "test": [biography(test_rng) for _ in range(n_eval)],
    }
