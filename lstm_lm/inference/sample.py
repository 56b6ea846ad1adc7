"""Continue a prompt with a trained model, or list its most likely next words.

    text = complete(model, tokenizer, "word", "My name is John, I am from Tamilnadu and I speak")
    pairs = next_words(model, tokenizer, "I am from Kerala and I speak", k=5)  # [(word, p), ...]

(`lstm_lm.LanguageModel` wraps these with the model's own tokenizer and settings.)

The prompt is read after an `<eos>`, as every line of the training text was, so
the model sees it as the start of a sentence.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from lstm_lm.arguments import check, check_all
from lstm_lm.data import EOS, UNK, detokenize
from lstm_lm.errors import PromptError
from lstm_lm.model import LSTMLanguageModel, State

MAX_PROMPT_TOKENS = 4096
SENTENCE_END = re.compile(r"[.!?]$")
SENTENCE_END_TOKENS = {".", "!", "?"}
BPE_WORD_START = "\u2581"  # "▁", the Metaspace pre-tokenizer's mark of a word's first piece


def encode_prompt(tokenizer: Tokenizer, prompt: str, kind: str = "word") -> list[int]:
    """<eos> + the prompt's ids; refuses prompts the model cannot read.

    A character or BPE model sees the prompt as given: a trailing space tells it
    that the next word starts.
    """
    if not prompt.strip():
        raise PromptError('the prompt is empty; give some words to continue, e.g. "I am from Kerala and I speak"')
    text = prompt.strip() if kind == "word" else prompt.lstrip()
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) > MAX_PROMPT_TOKENS:
        raise PromptError(f"the prompt has {len(ids)} tokens; the limit is {MAX_PROMPT_TOKENS}")
    unk = tokenizer.token_to_id(UNK)
    if ids and all(i == unk for i in ids):
        raise PromptError("none of the prompt's words are in the model's vocabulary")
    return [tokenizer.token_to_id(EOS)] + ids


@torch.no_grad()
def _read_prompt(model: LSTMLanguageModel, ids: list[int]) -> tuple[torch.Tensor, State]:
    device = model.embedding.weight.device
    x = torch.tensor(ids, device=device).unsqueeze(1)  # (T, 1)
    out, state = model.features(x)
    return model.scores(out[-1, 0]).float().cpu(), state  # (V,) scores for the next token, picked on the CPU


class WordPieces:
    """How a tokenizer's tokens make whole words, for next-word suggestions.

    A word is what the text has between two spaces. A word model's tokens are words;
    a BPE model's word is a piece that begins with the word-start marker "▁" and the
    pieces after it up to the next such piece (or `<eos>`); a character model's word
    is a space and the characters up to the next space. `<unk>` and `<eos>` are never
    part of a word.
    """

    def __init__(self, tokenizer: Tokenizer, kind: str):
        self.kind = kind
        vocab = tokenizer.get_vocab_size()
        self.text: list[str] = []  # what each token adds to a word
        starts, continues = torch.zeros(vocab, dtype=torch.bool), torch.zeros(vocab, dtype=torch.bool)
        for i in range(vocab):
            token = tokenizer.id_to_token(i)
            if token is None or token in (UNK, EOS):
                self.text.append("")
                continue
            if kind == "word":
                starts[i] = True
            elif kind == "bpe":
                (starts if token.startswith(BPE_WORD_START) else continues)[i] = True
                token = token.removeprefix(BPE_WORD_START)
            elif token.isspace():  # char: a space starts the next word
                starts[i], token = token == " ", ""
            else:
                continues[i] = True
            self.text.append(token)
        self.starts, self.continues = starts, continues


@torch.no_grad()
def words_after(
    model: LSTMLanguageModel,
    pieces: WordPieces,
    logits: torch.Tensor,
    state: State,
    k: int,
    beam: int | None = None,
    max_pieces: int = 24,
) -> list[tuple[str, float]]:
    """The k most likely next words after a prompt whose next-token scores are `logits` (V,)
    and whose memory is `state` (batch 1), with their probabilities, most likely first.

    A word's probability is the product of its pieces' probabilities and of the
    probability that the word ends there (the next token does not continue it), found
    by a small beam search over pieces: each step runs the model once on every word
    still growing. A growing word's probability bounds that of every word it can
    become, so the search stops once none can enter the top k.
    """
    probs = torch.softmax(logits.float().cpu(), dim=-1)  # (V,)
    if pieces.kind == "word":  # every token is a word: no search needed
        top = torch.topk(probs.masked_fill(~pieces.starts, -1.0), min(k, int(pieces.starts.sum())))
        return [(pieces.text[int(i)], float(p)) for p, i in zip(top.values, top.indices)]
    beam = beam or max(2 * k, 8)
    device = model.embedding.weight.device
    top = torch.topk(probs.masked_fill(~pieces.starts, -1.0), min(beam, int(pieces.starts.sum())))
    words = [pieces.text[int(i)] for i in top.indices]  # the words growing, (B,)
    word_p = top.values.double()  # (B,) the probability of each so far
    last = top.indices  # (B,) the token each read last
    state = [tuple(t.expand(len(words), -1) for t in layer) for layer in state]
    found: dict[str, float] = {}
    for _ in range(max_pieces):
        h, state = model.step_hidden(last.to(device), state)
        probs = model.log_probs(h).exp().cpu()  # (B, V)
        ends = 1.0 - (probs * pieces.continues).sum(1).double()  # P(the word ends here)
        for word, p in zip(words, (word_p * ends.clamp(min=0)).tolist()):
            if word:
                found[word] = found.get(word, 0.0) + p  # two spellings of one word: their sum
        kth = sorted(found.values(), reverse=True)[k - 1] if len(found) >= k else 0.0
        longer = word_p[:, None] * probs.masked_fill(~pieces.continues, 0.0).double()  # (B, V)
        best = torch.topk(longer.flatten(), min(beam, longer.numel()))
        keep = best.values > kth  # words that may still enter the top k
        if not keep.any():
            break
        rows, cols = best.indices[keep] // probs.size(1), best.indices[keep] % probs.size(1)
        words = [words[int(r)] + pieces.text[int(c)] for r, c in zip(rows, cols)]
        word_p, last = best.values[keep], cols
        state = [tuple(t[rows.to(t.device)] for t in layer) for layer in state]
    return sorted(found.items(), key=lambda wp: -wp[1])[:k]


def next_words(
    model: LSTMLanguageModel,
    tokenizer: Tokenizer,
    prompt: str,
    k: int = 5,
    kind: str = "word",
) -> list[tuple[str, float]]:
    """The k most likely next words after `prompt` and their probabilities, most likely first.

    Whole words whatever the tokenizer (see `WordPieces`, `words_after`); a character
    or BPE prompt's trailing space is dropped, since the next word starts after one.
    """
    check("k", k)
    model.eval()
    ids = encode_prompt(tokenizer, prompt.rstrip(), kind)
    logits, state = _read_prompt(model, ids)
    return words_after(model, WordPieces(tokenizer, kind), logits, state, k)


def _pick(
    logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator | None
) -> int:
    if temperature <= 0:
        return int(logits.argmax())
    # Scaled from the largest score down, so that no temperature overflows: at one so
    # small that every other score falls to -inf, this is greedy decoding.
    logits = (logits.double() - logits.max()) / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        # Nucleus sampling (Holtzman et al. 2020): the smallest set of tokens whose
        # probabilities add up to top_p.
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token that crosses top_p
        logits = logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def complete(
    model: LSTMLanguageModel,
    tokenizer: Tokenizer,
    kind: str,
    prompt: str,
    words: int = 20,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    precision: str = "fp32",
) -> str:
    """The continuation of `prompt` (without the prompt), up to the end of the sentence or `words` words.

    Greedy by default; with a temperature above 0 (or top-k / top-p) it samples.
    """
    check_all(words=words, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    if temperature == 0 and (top_k is not None or top_p is not None):
        temperature = 1.0  # asking for top-k / top-p means asking to sample
    generator = None
    if temperature > 0:
        generator = torch.Generator()
        generator.manual_seed(seed if seed is not None else torch.seed())
    eos = tokenizer.token_to_id(EOS)
    tokens = generate(
        model,
        encode_prompt(tokenizer, prompt, kind),
        temperature,
        top_k,
        top_p,
        generator,
        banned=[tokenizer.token_to_id(UNK)],
        precision=precision,
    )  # never says "<unk>"
    out: list[int] = []
    max_tokens = words * (40 if kind == "char" else 8)
    text = ""
    for nxt in itertools.islice(tokens, max_tokens):
        if nxt == eos:
            break
        out.append(nxt)
        text = detokenize(tokenizer, out, kind)
        n_words = len(text.split())
        # A word model's sentence ends at a "." token ("u.s." is a word in PTB); a char or
        # BPE model's when the text does.
        if kind == "word" and (n_words >= words or tokenizer.id_to_token(nxt) in SENTENCE_END_TOKENS):
            break
        if kind != "word":
            if n_words > words:  # a word beyond the limit has begun: cut it off
                text = text[: _end_of_nth_word(text, words)]
                break
            if SENTENCE_END.search(text):
                break
    return text.strip()


def generate(
    model: LSTMLanguageModel,
    ids: list[int],
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    banned: Sequence[int] = (),
    precision: str = "fp32",
) -> Iterator[int]:
    """The ids that continue `ids`, one at a time, for as long as the caller takes them.

    One step of the model per token (batch 1), carrying (h, c): the prompt is read once.
    With precision "bf16" the output layer runs on a bf16 copy of its weights: each
    token reads the whole (V, H) matrix, so half the bytes is nearly half the time of
    the step's largest part (the scores are then exact to about 3 significant digits).
    """
    model.eval()
    device = model.embedding.weight.device
    logits, state = _read_prompt(model, ids)
    scores = model.scores
    if precision == "bf16" and model.decoder is not None:  # the full softmax's weights, read once as bf16
        out_w, out_b = model.decoder.weight.detach().to(torch.bfloat16), model.decoder.bias.detach().to(torch.bfloat16)
        scores = lambda h: F.linear(h.to(torch.bfloat16), out_w, out_b)  # noqa: E731
    banned = list(banned)  # (logits[()] would be every element)
    token = torch.empty(1, dtype=torch.long, device=device)  # (B=1,), refilled each step
    while True:
        if banned:
            logits[banned] = float("-inf")
        nxt = _pick(logits, temperature, top_k, top_p, generator)
        yield nxt
        with torch.no_grad():
            h, state = model.step_hidden(token.fill_(nxt), state)
            logits = scores(h)[0].float().cpu()


def _end_of_nth_word(text: str, n: int) -> int:
    return [m.end() for m in re.finditer(r"\S+", text)][n - 1]
