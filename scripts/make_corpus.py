"""Write a seeded, generated corpus with a Zipfian vocabulary, in the PTB layout.

    .venv/bin/python scripts/make_corpus.py /tmp/zipf-10m --tokens 10_000_000 --vocab 250_000

DIR gets train.txt, valid.txt and test.txt, each line ending in a newline as PTB's
do: valid and test 4% of the tokens each, at most 250,000 (WikiText-103 has 217,646
and 245,569), and train the rest. Word k of the vocabulary (k = 0 the most
frequent) is drawn with probability proportional to 1 / (k + 2.7), the Zipf-Mandelbrot
law that fits English word counts, and the words are short made-up syllable strings
("ba", "ke", "bake", ...), all distinct. Lines are 1 + Poisson(20) words long, about
PTB's 21. The words are drawn independently of each other, so a model can learn the
word frequencies and nothing more: this corpus is for measuring speed and memory
(scripts/bench_scale.py, the tests), not perplexity. The same seed gives the same bytes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

EVAL_SHARE, EVAL_MAX = 0.04, 250_000  # of valid and of test
BLOCK = 1 << 20  # tokens drawn and written at a time
MEAN_LINE = 20  # words per line: 1 + Poisson(MEAN_LINE)
_SYLLABLES = [c + v for c in "bdfghjklmnprstvwz" for v in "aeiou"]  # 85 distinct syllables


def word(k: int) -> str:
    """The k-th word: k written in base 85 with a syllable for each digit."""
    parts = []
    while True:
        k, digit = divmod(k, len(_SYLLABLES))
        parts.append(_SYLLABLES[digit])
        if k == 0:
            return "".join(reversed(parts))
        k -= 1  # bijective numbering: "ba" and "baba" are both words


def zipf_probabilities(vocab: int, exponent: float = 1.0, offset: float = 2.7) -> np.ndarray:
    p = 1.0 / (np.arange(vocab) + offset) ** exponent
    return p / p.sum()


def write_split(path: Path, tokens: int, words: np.ndarray, cdf: np.ndarray, rng: np.random.Generator) -> None:
    """`tokens` words (the newlines not counted) drawn from the distribution, in lines."""
    lengths = 1 + rng.poisson(MEAN_LINE, size=2 * (tokens // (MEAN_LINE + 1)) + 16)
    ends = np.cumsum(lengths) - 1  # the index of each line's last word
    ends = np.append(ends[ends < tokens - 1], tokens - 1)  # the file ends with a whole line
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, tokens, BLOCK):
            n = min(BLOCK, tokens - start)
            ids = np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(words) - 1)
            seps = np.full(n, " ", dtype=object)
            here = ends[np.searchsorted(ends, start) : np.searchsorted(ends, start + n)] - start
            seps[here] = "\n"
            out = np.empty(2 * n, dtype=object)
            out[0::2], out[1::2] = words[ids], seps
            f.write("".join(out.tolist()))


def make_corpus(out: Path, tokens: int, vocab: int, seed: int = 0) -> dict[str, int]:
    """Write DIR/{train,valid,test}.txt; returns the words written per split."""
    if tokens < 3 or vocab < 1:
        raise ValueError("need at least 3 tokens and 1 word")
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    words = np.array([word(k) for k in range(vocab)], dtype=object)
    cdf = np.cumsum(zipf_probabilities(vocab))
    n_eval = min(max(1, int(tokens * EVAL_SHARE)), EVAL_MAX)
    counts = {"train": tokens - 2 * n_eval, "valid": n_eval, "test": n_eval}
    for split, n in counts.items():
        write_split(out / f"{split}.txt", n, words, cdf, rng)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="directory to write train.txt, valid.txt and test.txt into")
    p.add_argument(
        "--tokens",
        type=lambda s: int(s.replace("_", "")),
        default=1_000_000,
        help="words in all three splits together (default 1,000,000)",
    )
    p.add_argument(
        "--vocab",
        type=lambda s: int(s.replace("_", "")),
        default=10_000,
        help="distinct words to draw from (default 10,000)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        counts = make_corpus(args.out, args.tokens, args.vocab, args.seed)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: " + ", ".join(f"{s} {n:,} words" for s, n in counts.items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
