"""The built-in demo corpus: short generated biographies in which a person's home
region decides the language they speak.

    lines = demo_corpus(n=6000, seed=0)   # "My name is John, I am from Tamilnadu and I speak Tamil."
    lines = demo_corpus(n=6000, gap_min=20, gap_max=20)   # 20 words between region and language

Nothing is downloaded or copied: sentences are assembled from the word lists below
by a seeded random generator, so the corpus is the same on every machine. To
predict the language the model must remember the region across the clauses that
sit between "I am from X" and "and I speak Y", which is what an LSTM's memory cell
is for. The gap, the number of words of those clauses (punctuation not counted), is
drawn uniformly from [gap_min, gap_max] for each sentence, and met exactly.
"""

from __future__ import annotations

import random

DEMO_VERSION = 2  # bump when the generator changes, so cached encodings are not reused
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
    "John",
    "Priya",
    "Arjun",
    "Meera",
    "Ravi",
    "Anita",
    "Kumar",
    "Lakshmi",
    "Marie",
    "Pierre",
    "Yuki",
    "Hiro",
    "Anna",
    "Lukas",
    "Carlos",
    "Lucia",
    "Marco",
    "Giulia",
    "Ana",
    "Pedro",
    "Olga",
    "Ivan",
    "Wei",
    "Mei",
    "Min",
    "Sofia",
    "Nikos",
    "Elif",
    "Kasia",
    "Erik",
    "Ingrid",
    "Aino",
    "Daan",
    "Linh",
    "Somchai",
    "Sara",
    "Omar",
    "Amina",
    "David",
    "Laszlo",
    "Freja",
    "Budi",
    "Maria",
    "James",
    "Fatima",
    "Noah",
    "Emma",
    "Leo",
    "Nina",
    "Sam",
]

OCCUPATIONS = [
    "teacher",
    "doctor",
    "farmer",
    "nurse",
    "engineer",
    "painter",
    "driver",
    "cook",
    "writer",
    "singer",
    "lawyer",
    "pilot",
    "baker",
    "tailor",
    "student",
    "carpenter",
    "dentist",
    "clerk",
]

PLACES = ["a small village", "a big city", "a quiet town", "the mountains", "the coast", "the capital"]
HOBBIES = ["reading", "cooking", "running", "painting", "singing", "gardening", "cycling", "fishing"]
CITIES = ["London", "Toronto", "Sydney", "Dubai", "Singapore", "Chicago", "Berlin", "Paris"]

# Clauses that may sit between the region and "and I speak": unrelated words the model
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
# Short clauses by their number of words, to make every gap exact.
SHORT_CLAUSES = {1: ["honestly", "truly"], 2: ["I sing", "I travel"], 3: ["I love {hobby}", "I visited {city}"]}
GAP_MIN, GAP_MAX = 0, 12  # the default range of gaps, in words

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
        occ=rng.choice(OCCUPATIONS),
        place=rng.choice(PLACES),
        hobby=rng.choice(HOBBIES),
        city=rng.choice(CITIES),
        n=rng.choice(NUMBERS),
    )


def gap_clauses(rng: random.Random, words: int) -> list[str]:
    """Unrelated clauses of `words` words in all (punctuation not counted)."""
    clauses = []
    while words > 0:
        for _ in range(10):  # mostly the longer clauses; the short ones make up the rest
            clause = _fill(rng.choice(CLAUSES), rng)
            if len(clause.split()) <= words:
                break
        else:
            clause = _fill(rng.choice(SHORT_CLAUSES[min(words, 3)]), rng)
        clauses.append(clause)
        words -= len(clause.split())
    return clauses


def biography(rng: random.Random, gap_min: int = GAP_MIN, gap_max: int = GAP_MAX) -> str:
    """One line: a self-introduction whose region decides the language spoken, with
    gap_min to gap_max words of other clauses between the region and "and I speak"."""
    name = rng.choice(NAMES)
    region = rng.choice(list(REGION_LANGUAGE))
    language = REGION_LANGUAGE[region]
    middle = "".join(f", {c}" for c in gap_clauses(rng, rng.randint(gap_min, gap_max)))
    style = rng.random()
    if style < 0.6:
        first = f"My name is {name}, I am from {region}{middle} and I speak {language}."
    elif style < 0.8:
        first = f"I am {name}. I am from {region}{middle} and I speak {language}."
    else:
        first = f"Hello, I am {name} from {region}{middle}, and I speak {language}."
    if rng.random() < 0.5:
        first += " " + _fill(rng.choice(CLOSINGS), rng)
    return first


def gap_of(line: str) -> int:
    """The gap of a demo line: words between its region and "and I speak"."""
    region = next(r for r in REGION_LANGUAGE if f" {r}" in line.split(" and I speak")[0])
    between = line.split(f" {region}", 1)[1].split(" and I speak")[0]
    return len(between.replace(",", " ").split())


def demo_corpus(n: int = 6000, seed: int = 0, gap_min: int = GAP_MIN, gap_max: int = GAP_MAX) -> list[str]:
    """`n` biographies, one per line, the same for the same arguments."""
    rng = random.Random(seed)
    lines = [biography(rng, gap_min, gap_max) for _ in range(n)]
    # The seed sentence is part of the story: make sure it is seen verbatim.
    lines[0] = f"{SEED_PROMPT} {SEED_ANSWER}."
    return lines


def demo_splits(n: int = 6000, seed: int = 0, gap_min: int = GAP_MIN, gap_max: int = GAP_MAX) -> dict[str, list[str]]:
    """Train/valid/test from disjoint draws (90/5/5 of `n`), each seeded."""
    n_eval = max(1, n // 20)
    valid_rng, test_rng = random.Random(f"valid-{seed}"), random.Random(f"test-{seed}")
    return {
        "train": demo_corpus(n - 2 * n_eval, seed, gap_min, gap_max),
        "valid": [biography(valid_rng, gap_min, gap_max) for _ in range(n_eval)],
        "test": [biography(test_rng, gap_min, gap_max) for _ in range(n_eval)],
    }
