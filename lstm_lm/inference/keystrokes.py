"""What a keyboard's next-word suggestions save: `lstm-lm eval --keystrokes`.

    report = simulate(lm, ["the company said it would", ...], k=3)
    report.savings, report.top1, report.topk

The simulation (docs/keyboard.md has the definitions beside presage's) types a text
word by word, as a phone keyboard with a row of k suggestions would:

- Before each character of a word, the first included, the keyboard offers the k
  words the model finds likeliest next among the words of its vocabulary that start
  with what has been typed of the word so far.
- Choosing the word when it is offered costs one keystroke, which also enters the space
  after it; otherwise the word is typed to its end and a space after it.
- Without suggestions a word of n characters costs n + 1 keystrokes (its space).

The keystroke savings rate is 1 - (keystrokes with suggestions) / (keystrokes without).
Top-1 and top-k recall are how often the word is the first, or among the k, suggestions
offered before its first character.

The words counted are the text's words made of letters and digits only (`str.isalnum`):
punctuation, PTB's "'s" and "n't", "u.s." and the like, `<unk>` (a word the corpus
itself has hidden) and the line ends are read by the model as context but neither
typed nor suggested. A counted word outside the model's vocabulary can never be
offered: it costs its full length, and counts as a miss for recall. Only word models
can be simulated: their tokens are the words that the keyboard offers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from lstm_lm.data import EOS, UNK
from lstm_lm.errors import ArgumentError, DataError
from lstm_lm.utils import autocast

if TYPE_CHECKING:
    from lstm_lm.inference.api import LanguageModel

MAX_PREFIX = 32  # characters of a word compared: a word longer than 33 is offered by its first 32 or never
CHUNK = 512  # tokens the model reads at once
POSITIONS = 64  # word positions ranked at once


@dataclass
class KeystrokeReport:
    k: int  # suggestions offered
    words: int  # words typed (counted)
    out_of_vocabulary: int  # counted words the model cannot offer
    keystrokes_without: int  # every character and a space per word
    keystrokes_with: int  # with the suggestions taken when offered
    savings: float  # 1 - with / without
    top1: float  # the word was the first suggestion before its first character
    topk: float  # ... one of the k suggestions
    tokens: int  # tokens the model read, context included

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        for key in ("savings", "top1", "topk"):
            out[key] = round(out[key], 4)
        return out


def is_typed(word: str) -> bool:
    """Whether the simulation types this word (and a keyboard may suggest it)."""
    return word.isalnum()


class Keyboard:
    """A word model's vocabulary as a keyboard's dictionary: which tokens may be
    suggested, and their spellings as a (V, width) tensor of code points for
    comparing prefixes."""

    def __init__(self, lm: LanguageModel):
        tok = lm.tokenizer
        self.lm = lm
        self.words = [tok.id_to_token(i) or "" for i in range(tok.get_vocab_size())]
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.offered = torch.tensor([is_typed(w) and w not in (UNK, EOS) for w in self.words])  # (V,)
        self.width = min(MAX_PREFIX, max(len(w) for w in self.words))
        codes = torch.full((len(self.words), self.width), -1, dtype=torch.int32)
        for i, w in enumerate(self.words):
            w = w[: self.width]
            codes[i, : len(w)] = torch.tensor([ord(c) for c in w], dtype=torch.int32)
        self.codes = codes  # (V, width), -1 past a word's end
        self.normalize = tok.normalizer.normalize_str if tok.normalizer is not None else (lambda s: s)
        self.pre = tok.pre_tokenizer

    def split(self, line: str) -> list[str]:
        """A line's words as the model's tokenizer cuts them."""
        line = self.normalize(line)
        return [w for w, _ in self.pre.pre_tokenize_str(line)] if self.pre is not None else line.split()

    @torch.no_grad()
    def scores_after(self, words: list[str]) -> Tensor:
        """(V,) the scores of the next token after `words`, read after an `<eos>`."""
        lm = self.lm
        unk = self.ids.get(UNK, self.ids[EOS])
        ids = [self.ids[EOS]] + [self.ids.get(w, unk) for w in words]
        with autocast(lm.device, lm.precision):
            out, _ = lm.model.features(torch.tensor(ids, device=lm.device)[:, None])
            return lm.model.scores(out[-1, 0]).float().cpu()

    def suggest_after(self, text: str, k: int = 3) -> list[str]:
        """The k suggestions as `text` is typed: the words before its last space are the
        context, the text after it the start of the word."""
        last_space = re.search(r"\s\S*$", text)
        context, typed = (text[: last_space.start()], text[last_space.start() + 1 :]) if last_space else ("", text)
        return self.suggest(self.scores_after(self.split(context)), self.normalize(typed), k)

    def suggest(self, scores: Tensor, typed: str = "", k: int = 3) -> list[str]:
        """The k words with the highest `scores` (V,) that start with `typed`, best first
        (ties: the lower token id first, as `torch.sort` with stable ordering gives)."""
        mask = self.offered.clone()
        if typed:
            if len(typed) > self.width:  # longer than every word but maybe one cut at MAX_PREFIX
                mask &= torch.tensor([w.startswith(typed) for w in self.words])
            prefix = torch.tensor([ord(c) for c in typed[: self.width]], dtype=torch.int32)
            mask &= (self.codes[:, : len(prefix)] == prefix).all(1)
        ranked = torch.sort(scores.float().masked_fill(~mask, -math.inf), descending=True, stable=True).indices
        return [self.words[int(i)] for i in ranked[: min(k, int(mask.sum()))]]

    def first_offered(self, scores: Tensor, targets: Tensor, lengths: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """For P word positions: `scores` (P, V), the word typed `targets` (P,) (in the
        vocabulary) and its length `lengths` (P,). Returns how many characters are typed
        before the word is among the k suggestions (0 to length - 1, or `lengths` where it
        is never offered), and its rank before the first character (0: the first
        suggestion). A rival word outranks the target if it scores higher, or as high
        with a lower id."""
        scores = scores.float().masked_fill(~self.offered, -math.inf)
        own = scores.gather(1, targets[:, None])  # (P, 1)
        ids = torch.arange(scores.shape[1])
        better = (scores > own) | ((scores == own) & (ids[None, :] < targets[:, None]))  # (P, V)
        equal = self.codes[None, :, :] == self.codes[targets][:, None, :]  # (P, V, L)
        same = equal.to(torch.uint8).cummin(2).values.float()  # (P, V, L): the first j + 1 characters equal
        rivals = torch.empty(len(targets), self.width + 1)
        rivals[:, 0] = better.sum(1)  # before the first character: every better word
        rivals[:, 1:] = torch.bmm(better.float()[:, None, :], same)[:, 0]  # after j characters typed
        offered = rivals < k  # (P, L + 1): offered after j characters typed
        j = torch.arange(self.width + 1)
        offered &= j[None, :] < lengths[:, None]  # a word fully typed needs no suggestion
        first = torch.where(offered.any(1), offered.float().argmax(1), lengths)
        return first, rivals[:, 0].long()


def make_keyboard(lm: LanguageModel) -> Keyboard | CharKeyboard:
    """A word model's Keyboard or a character model's CharKeyboard; a BPE model has none."""
    if lm.kind == "bpe":
        raise ArgumentError(
            "a keyboard's suggestions need a word or character model; a BPE model's words are pieces "
            "that this keyboard does not join (train with data.tokenizer word or char)"
        )
    return CharKeyboard(lm) if lm.kind == "char" else Keyboard(lm)


def require_word_model(lm: LanguageModel) -> None:
    if lm.kind != "word":
        raise ArgumentError(
            f"keystroke simulation needs a word model (data.tokenizer word); this one is a {lm.kind} model"
        )


class CharKeyboard:
    """A character model's suggestions: the k likeliest ways to finish the word being
    typed, found by a beam search over characters.

    The text so far, the letters typed of the word included, is read one character at a
    time. The search then grows `BEAM` endings of the word at once (one step of the model
    for all of them), the most likely first; an ending's word is scored by the
    probability of its characters and of a word end after them (a whitespace character
    or `<eos>`). Growing a word only lowers its probability, so the search stops when no
    ending still growing can enter the top k, or after `MAX_CHARS` characters. The page
    of `export --format web` runs the same search (keyboard.js).
    """

    BEAM = 8
    MAX_CHARS = 24

    def __init__(self, lm: LanguageModel):
        tok = lm.tokenizer
        self.lm = lm
        self.chars = [tok.id_to_token(i) or "" for i in range(tok.get_vocab_size())]
        self.ids = {c: i for i, c in enumerate(self.chars)}
        special = [c in (UNK, EOS) for c in self.chars]
        self.ends = torch.tensor([c.isspace() or c == EOS for c in self.chars])  # (V,) a word ends here
        self.grows = torch.tensor([not (c.isspace() or s) for c, s in zip(self.chars, special)])  # (V,)

    @torch.no_grad()
    def suggest_after(self, text: str, k: int = 3) -> list[str]:
        """The k likeliest words that finish the word being typed at the end of `text`."""
        lm, model = self.lm, self.lm.model
        if lm.tokenizer.normalizer is not None:
            text = lm.tokenizer.normalizer.normalize_str(text)
        typed = re.split(r"\s", text)[-1]
        unk = self.ids.get(UNK, self.ids[EOS])
        ids = [self.ids[EOS]] + [self.ids.get(c, unk) for c in text]
        with autocast(lm.device, lm.precision):
            out, state = model.features(torch.tensor(ids, device=lm.device)[:, None])
            logp = torch.log_softmax(model.scores(out[-1]).float(), dim=-1).cpu()  # (1, V)
        return self.search(logp, state, typed, k, self._step)

    def _step(self, chars: Tensor, state):
        lm = self.lm
        with autocast(lm.device, lm.precision):
            h, state = lm.model.step_hidden(chars.to(lm.device), state)
            return torch.log_softmax(lm.model.scores(h).float(), dim=-1).cpu(), state

    def search(self, logp: Tensor, state, typed: str, k: int, step) -> list[str]:
        """The beam search from the scores `logp` (1, V) and `state` (batch 1) after the
        text; `step(chars (B,), state) -> (logp (B, V), state)` runs the model."""
        endings, so_far = [""], torch.zeros(1, dtype=torch.float64)  # the endings growing, their log p
        found: dict[str, float] = {}
        for n in range(self.MAX_CHARS + 1):
            logp = logp.double()
            end = torch.logsumexp(logp.masked_fill(~self.ends, -math.inf), dim=1)  # (B,)
            for ending, p in zip(endings, (so_far + end).tolist()):
                if typed + ending:
                    found[typed + ending] = p
            if n == self.MAX_CHARS:
                break
            kth = sorted(found.values(), reverse=True)[k - 1] if len(found) >= k else -math.inf
            longer = (so_far[:, None] + logp).masked_fill(~self.grows, -math.inf).flatten()  # (B * V,)
            best = torch.sort(longer, descending=True, stable=True)
            keep = best.values[: self.BEAM] > kth
            if not keep.any():
                break
            chosen = best.indices[: self.BEAM][keep]
            beam, chars = chosen // logp.shape[1], chosen % logp.shape[1]
            endings = [endings[b] + self.chars[c] for b, c in zip(beam.tolist(), chars.tolist())]
            so_far = best.values[: self.BEAM][keep]
            state = [tuple(t[beam.to(t.device)] for t in layer) for layer in state]
            logp, state = step(chars, state)
        ranked = sorted(found.items(), key=lambda wp: -wp[1])
        return [word for word, _ in ranked[:k]]


def simulate(lm: LanguageModel, lines: Iterable[str], k: int = 3, progress=None) -> KeystrokeReport:
    """Type `lines` with the model's k suggestions (see the module's docstring). The text
    is read as one stream, each line after an `<eos>` as in training, in `CHUNK`-token
    pieces that carry the memory. `progress(n)` is told each batch of tokens read."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ArgumentError(f"k: the number of suggestions must be at least 1, got {k!r}")
    require_word_model(lm)
    kb = lm.keyboard
    ids, typed = _read_words(kb, lines)
    model = lm.model
    scores_at = {p: i for i, (p, _) in enumerate(typed)}  # positions whose scores are needed
    firsts = torch.empty(len(typed), dtype=torch.long)  # characters typed before the word is offered
    ranks = torch.empty(len(typed), dtype=torch.long)  # its rank before its first character
    pending: list[tuple[int, Tensor]] = []  # (index into typed, scores (V,))

    def rank(pending: list[tuple[int, Tensor]]) -> None:
        index = torch.tensor([i for i, _ in pending])
        words = [typed[i][1] for i in index.tolist()]
        known = torch.tensor([w in kb.ids for w in words])
        lengths = torch.tensor([len(w) for w in words])
        firsts[index], ranks[index] = lengths, len(kb.words)  # out of the vocabulary: never offered
        if known.any():
            scores = torch.stack([s for s, ok in zip((s for _, s in pending), known.tolist()) if ok])
            targets = torch.tensor([kb.ids[w] for w, ok in zip(words, known.tolist()) if ok])
            firsts[index[known]], ranks[index[known]] = kb.first_offered(scores, targets, lengths[known], k)

    state = model.init_state(1, lm.device)
    with torch.no_grad(), autocast(lm.device, lm.precision):
        for start in range(0, len(ids), CHUNK):
            chunk = ids[start : start + CHUNK]
            out, state = model.features(torch.tensor(chunk, device=lm.device)[:, None], state)
            wanted = [t for t in range(len(chunk)) if start + t in scores_at]
            if wanted:
                scores = model.scores(out[wanted, 0]).float().cpu()  # (W, V)
                pending += [(scores_at[start + t], s) for t, s in zip(wanted, scores)]
            while len(pending) >= POSITIONS:
                rank(pending[:POSITIONS])
                pending = pending[POSITIONS:]
            if progress is not None:
                progress(len(chunk))
        if pending:
            rank(pending)

    lengths = torch.tensor([len(w) for _, w in typed])
    without = int((lengths + 1).sum())
    with_ = int(torch.where(firsts < lengths, firsts + 1, lengths + 1).sum())
    oov = sum(w not in kb.ids for _, w in typed)
    top1, topk = float((ranks == 0).float().mean()), float((ranks < k).float().mean())
    return KeystrokeReport(k, len(typed), oov, without, with_, 1 - with_ / without, top1, topk, len(ids))


def _read_words(kb: Keyboard, lines: Iterable[str]) -> tuple[list[int], list[tuple[int, str]]]:
    """The token ids of the text (an `<eos>` first and after each line), and each word
    typed with the position of the token before it."""
    unk, eos = kb.ids.get(UNK), kb.ids[EOS]
    ids: list[int] = [eos]
    typed: list[tuple[int, str]] = []
    for line in lines:
        for word in kb.split(line):
            if is_typed(word):
                typed.append((len(ids) - 1, word))
            ids.append(kb.ids.get(word, unk if unk is not None else eos))
        ids.append(eos)
    if not typed:
        raise DataError("the text has no words to type (words of letters and digits)")
    return ids, typed


def split_lines(lm: LanguageModel, split: str = "test", data: str | None = None) -> list[str]:
    """The raw lines of a split of the model's corpus (or of `data`), as `lstm-lm train` reads them."""
    from lstm_lm.data import read_source, resolve_source

    source = resolve_source(data or lm.config.data.source)
    splits = read_source(source, lm.config.data)
    if split not in splits:
        raise ArgumentError(f"split: must be one of {', '.join(s for s in splits if s != 'train')}, got {split!r}")
    return [line for block in splits[split]() for line in block]


def run_keystrokes(
    lm: LanguageModel, split: str = "test", data: str | None = None, k: int = 3, latency: bool = True
) -> dict[str, Any]:
    """What `lstm-lm eval --keystrokes` prints: the simulation on a split, and (with
    `latency`) the time and size of a suggestion in each form (keyboard.latency)."""
    import importlib.util

    from lstm_lm.inference.keyboard import latency as time_suggestions
    from lstm_lm.utils import log, progress_bar

    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ArgumentError(f"--suggestions: must be at least 1, got {k!r}")
    require_word_model(lm)  # before any work
    lines = split_lines(lm, split, data)
    with progress_bar(sum(len(line.split()) + 1 for line in lines), f"typing {split}", unit="tok") as bar:
        report = simulate(lm, lines, k, progress=bar)
    out = {"protocol": "keystrokes", "split": split} | report.as_dict()
    if latency:
        onnx = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime"))
        if not onnx:
            log("timing PyTorch only: ONNX needs the export extra (pip install 'lstm-lm[export]')")
        log("timing suggestions at batch 1 on one thread ...")
        out["latency"] = time_suggestions(lm, lines, k, onnx=onnx)
    return out


def held_out_prompts(lines: list[str], n: int, seed: int = 0) -> list[str]:
    """`n` prompts cut from `lines` (a held-out text) for comparing suggestions: the first
    words of a line of two words or more, then a space and 0 to 2 letters of the next word."""
    import random

    rng = random.Random(seed)
    lines = [line for line in lines if len(line.split()) >= 2]
    if not lines:
        raise DataError("no line of two words or more to cut prompts from")
    prompts = []
    while len(prompts) < n:
        words = rng.choice(lines).split()
        cut = rng.randrange(1, len(words))
        prompts.append(" ".join(words[:cut]) + " " + words[cut][: rng.randrange(0, min(3, len(words[cut])))])
    return prompts
