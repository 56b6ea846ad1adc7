"""The Python API: a trained model, its tokenizer and its settings in one object.

    from lstm_lm import LanguageModel

    lm = LanguageModel.load("runs/demo")                     # a run, or a checkpoint directory
    lm.next_words("I am from Kerala and I speak", k=3)       # [("Malayalam", 0.98), ...]
    lm.complete("My name is John, I am from Tamilnadu and I speak")   # "Tamil."
    lm.score(["I am from Kerala and I speak Malayalam."])   # [{"logprob": ..., "perplexity": ...}]
    lm.perplexity(["...", "..."])                            # one number for all the texts
    lm.trace("I am from Kerala and I speak")                 # gates, |h|, |c|, guesses per token
    s = lm.session("I am from Kerala"); s.feed("and I speak"); s.next_words()   # one step per new token
    lm.suggest("I am from Kerala and I speak Mal", k=3)      # a keyboard's suggestions: ["Malayalam"]
    lm.keystrokes(open("my.txt").read().splitlines())      # what those suggestions save on a text

`lstm-lm complete`, `eval`, `inspect`, `score`, `serve` and `export` all go through
this class. Every method reads with dropout off and without gradients; `precision`
("fp32", the default, or "bf16") is the precision of the matrix products.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from lstm_lm.arguments import check, check_all, check_texts
from lstm_lm.config import Config, choices
from lstm_lm.data import EOS
from lstm_lm.errors import ArgumentError, ConfigError, DataError, PromptError
from lstm_lm.evaluation.protocols import DynamicEval, NeuralCache
from lstm_lm.inference.keystrokes import make_keyboard, simulate
from lstm_lm.inference.sample import MAX_PROMPT_TOKENS, WordPieces, encode_prompt, words_after
from lstm_lm.model import LSTMLanguageModel, State
from lstm_lm.utils import autocast, pick_device, pick_precision


class LanguageModel:
    """A trained model ready to use: `LanguageModel.load(path)`, then call its methods."""

    def __init__(
        self,
        model: LSTMLanguageModel,
        tokenizer: Tokenizer,
        config: Config,
        checkpoint: Path | None = None,
        precision: str = "fp32",
        measured: dict[str, Any] | None = None,
    ):
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, config
        self.checkpoint = checkpoint
        self.measured = dict(measured or {})  # the validation of these weights when they were saved
        self.precision = precision
        self.kind = config.data.tokenizer  # word, char or bpe
        self._pieces: WordPieces | None = None
        self.kept_statistics: dict = {}  # dynamic evaluation's gradient statistics, kept for one setting

    @classmethod
    def load(
        cls, path: str | Path = "runs/latest", device: str | torch.device = "cpu", precision: str | None = "fp32"
    ) -> LanguageModel:
        """Load a checkpoint directory, or a run directory's best checkpoint (`runs/latest`
        is the run trained last). `device`: auto, cpu, cuda, cuda:N or mps. `precision`:
        fp32, bf16, auto (bf16 where the device runs it natively) or None (the run's own
        train.precision, as `lstm-lm eval` uses)."""
        from lstm_lm.checkpoint import load_checkpoint_dir

        if not isinstance(path, (str, Path)):
            raise ArgumentError(f"path: must be a string or a Path, got {type(path).__name__}")
        if not isinstance(device, (str, torch.device)):
            raise ArgumentError(f"device: must be a string such as 'cpu', got {type(device).__name__}")
        if precision is not None and precision not in choices("train.precision"):
            raise ConfigError(
                [f"precision: must be one of {', '.join(choices('train.precision'))}, got {precision!r}"],
                "command line",
            )
        dev = pick_device(str(device))
        model, tokenizer, config, directory, measured = load_checkpoint_dir(path, dev)
        precision = pick_precision(precision or config.train.precision, dev)
        return cls(model, tokenizer, config, directory, precision, measured)

    # -- what it is ---------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.model.embedding.weight.device

    @property
    def cell(self) -> str:
        return self.model.cell

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    def describe(self, paths: bool = True) -> dict[str, Any]:
        """The model's facts: cell, sizes, vocabulary, training corpus and measured perplexity.
        `paths=False` (what the server answers) leaves out the checkpoint's path and names
        the corpus without its directory."""
        m = self.config.model
        corpus = self.config.data.source if paths else Path(self.config.data.source).name
        return {
            **({"checkpoint": str(self.checkpoint) if self.checkpoint else None} if paths else {}),
            "cell": self.cell,
            "cell_title": self.model.rnn.cells[-1].title,
            "gates": list(self.model.rnn.cells[-1].gate_names),
            "layers": len(m.layer_sizes),
            "hidden_sizes": list(m.layer_sizes),
            "proj_size": m.proj_size,
            "embedding_size": m.embedding_size,
            "tied": m.tie_weights,
            "parameters": self.model.num_parameters(),
            "vocab_size": self.vocab_size,
            "tokenizer": self.kind,
            "corpus": corpus,
            "valid_perplexity": self.measured.get("valid_perplexity"),
            "step": self.measured.get("step"),
            "precision": self.precision,
            "device": str(self.device),
        }

    # -- next words and completions ---------------------------------------------------

    @property
    def pieces(self) -> WordPieces:
        """How the tokenizer's tokens make words (built once, on first use)."""
        if self._pieces is None:
            self._pieces = WordPieces(self.tokenizer, self.kind)
        return self._pieces

    def next_words(self, prompt: str, k: int = 5) -> list[tuple[str, float]]:
        """The k most likely next words after `prompt`, with their probabilities, most likely
        first: whole words whatever the tokenizer (a BPE or character model's pieces are
        searched to the end of the word; `<eos>` and `<unk>` are not words)."""
        check("k", k)
        return Session(self).feed(check("prompt", prompt)).next_words(k)

    def complete(
        self,
        prompt: str,
        words: int = 20,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> str:
        """The continuation of `prompt`, up to the end of the sentence or `words` words.
        Greedy at temperature 0; above it (or with top_k / top_p) sampled, repeatably
        with `seed`. An empty string means the model ended the sentence at once."""
        from lstm_lm.inference.sample import complete

        check("prompt", prompt)
        return complete(
            self.model,
            self.tokenizer,
            self.kind,
            prompt,
            words=words,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            precision=self.precision,
        )

    def session(self, prompt: str = "") -> Session:
        """A reader that keeps the memory: feed it text and ask for the next words; each
        new token costs one step of the model, not a re-read of what came before."""
        session = Session(self)
        return session.feed(prompt) if check("prompt", prompt).strip() else session

    def suggest(self, text: str, k: int = 3) -> list[str]:
        """A keyboard's k suggestions as `text` is typed: the likeliest words that start with
        what follows its last space (inference/keystrokes.py: Keyboard, CharKeyboard)."""
        check_all(text=text, k=k)
        return self.keyboard.suggest_after(text, k)

    @functools.cached_property
    def keyboard(self):
        """The vocabulary as a keyboard's dictionary (keystrokes.make_keyboard; built once)."""
        return make_keyboard(self)

    def keystrokes(self, lines: list[str] | str, k: int = 3) -> dict[str, Any]:
        """Keystroke savings and recall of `suggest` on a text (keystrokes.simulate)."""
        return simulate(self, (line for text in check_texts(lines) for line in text.splitlines()), k).as_dict()

    # -- scores -------------------------------------------------------------------------

    def score(self, texts: list[str] | str, per_token: bool = False) -> list[dict[str, Any]]:
        """For each text, scored as a sentence of its own (after an `<eos>`, up to and
        including the `<eos>` that ends it): `text`, `tokens`, `logprob` (nats),
        `perplexity`, `unknown` (tokens read as `<unk>`) and with `per_token` the
        [token, logprob] pairs. See scoring.py."""
        from lstm_lm.inference.scoring import score_texts

        texts = check_texts(texts)
        check("per_token", per_token)
        with autocast(self.device, self.precision):
            return score_texts(self.model, self.tokenizer, texts, per_token=per_token)

    def score_stream(self, pieces, per_token: bool = False) -> dict[str, Any]:
        """Score one text of any length given as an iterable of pieces cut at spaces (a
        file read a piece at a time, say), as `score` scores it whole, in memory that does
        not grow with it: `tokens`, `logprob`, `perplexity`, `unknown` (and `token_logprobs`)."""
        from lstm_lm.inference.scoring import score_stream

        check("per_token", per_token)
        with autocast(self.device, self.precision):
            return score_stream(self.model, self.tokenizer, (check("text", p) for p in pieces), per_token)

    def perplexity(self, texts: list[str] | str) -> float:
        """exp of the mean negative log-probability per token over all `texts` together."""
        scores = self.score(texts)
        tokens = sum(s["tokens"] for s in scores)
        if tokens == 0:
            raise PromptError("no texts to score")
        return math.exp(min(-sum(s["logprob"] for s in scores) / tokens, 700.0))

    def corpus(self, data: str | None = None):
        """The corpus the model was trained on, or `data` (a path or hub name) read with its tokenizer."""
        from lstm_lm.data import load_corpus

        try:
            return load_corpus(self.config.data, tokenizer=self.tokenizer, source=data)
        except DataError as e:
            if data is not None:
                raise
            raise DataError(f"{e} (the corpus this model was trained on; pass --data to use another copy)") from None

    def evaluate(
        self,
        split: str = "test",
        data: str | None = None,
        batch_size: int | None = None,
        cache: NeuralCache | None = None,
        dynamic: DynamicEval | None = None,
        progress: bool = False,
        tune: bool = False,
    ) -> dict[str, Any]:
        """The evaluation protocol (docs/reference.md) on a split of the corpus the model was
        trained on (or of `data`): what `lstm-lm eval` prints. `protocol` in the result
        names what was measured: "static" (the default), "neural cache" with `cache`, or
        "dynamic evaluation" with `dynamic` (one stream: batch_size is 1), each with its
        settings. With `tune`, the settings are first fitted on the valid split (`tuned` in
        the result says how). `progress` shows a progress bar on stderr."""
        from lstm_lm.evaluation import run

        return run.evaluate(self, split, data, batch_size, cache, dynamic, progress, tune)

    def tune_cache(self, data: str | None = None, batch_size: int | None = None, progress: bool = False) -> dict:
        """Fit the neural cache's settings on the validation split (evaluation/run.py:
        {"settings": NeuralCache, "search": what was tried, "trials": each result})."""
        from lstm_lm.evaluation import run

        return run.tune_cache(self, data, batch_size, progress)

    def tune_dynamic(
        self,
        data: str | None = None,
        rule: str = "rms",
        segment: int = 20,
        tokens: int | None = None,
        progress: bool = False,
    ) -> dict:
        """Fit dynamic evaluation's step size, then its decay, on the start of the validation
        split (evaluation/run.py: {"settings": DynamicEval, "search", "trials"})."""
        from lstm_lm.evaluation import run

        return run.tune_dynamic(self, data, rule, segment, tokens, progress)

    # -- inside the model ---------------------------------------------------------------

    def trace(
        self, prompt: str, layer: int | None = None, top_k: int = 3, swap: tuple[str, str] | None = None
    ) -> dict[str, Any]:
        """What `lstm-lm inspect` shows: after each token of `prompt`, layer `layer`'s gates
        (per unit), its state (h, and c for an LSTM) and the top_k next-token guesses.
        See inspection.trace_prompt."""
        from lstm_lm.inference.inspection import trace_prompt

        check_all(prompt=prompt, layer=layer, k=top_k)
        if swap is not None and not (
            isinstance(swap, (tuple, list)) and len(swap) == 2 and all(isinstance(w, str) for w in swap)
        ):
            raise ArgumentError(f"swap: must be a pair of words (WORD, OTHER), got {swap!r:.60}")
        return trace_prompt(self.model, self.tokenizer, prompt, self.kind, layer, top_k, swap)


class Session:
    """The memory of a text read so far: `feed` more text, ask for `next_words` or
    `probabilities`. Made by `LanguageModel.session()`.

        s = lm.session("I am from Kerala")
        s.feed("and I speak")        # reads 3 tokens, from the memory of the first 4
        s.next_words(3)

    A word model is fed words; a BPE or character model is fed text that continues
    the text so far (a BPE piece of text starts a new word).
    """

    def __init__(self, lm: LanguageModel):
        self.lm = lm
        self.tokens: list[int] = []  # every token read, the opening <eos> first
        self.state: State = lm.model.init_state(1, lm.device)
        self._logits: torch.Tensor | None = None
        self._read([lm.tokenizer.token_to_id(EOS)])  # every text is read after an <eos>, as in training

    def feed(self, text: str) -> Session:
        """Read `text`: one step of the model per token. The first text fed is checked as a
        prompt is (not empty, not all unknown words); later ones may be anything."""
        tok, kind = self.lm.tokenizer, self.lm.kind
        check("text", text)
        if len(self.tokens) == 1:
            ids = encode_prompt(tok, text.rstrip(), kind)[1:]
        else:  # a word model reads words; a BPE or char model the text exactly as it continues
            ids = tok.encode(text.strip() if kind == "word" else text.rstrip(), add_special_tokens=False).ids
        if len(self.tokens) - 1 + len(ids) > MAX_PROMPT_TOKENS:
            raise PromptError(f"the text read would have more than {MAX_PROMPT_TOKENS} tokens, the limit")
        if ids:
            self._read(ids)
        return self

    @torch.no_grad()
    def _read(self, ids: list[int]) -> None:
        model = self.lm.model
        x = torch.tensor(ids, device=self.lm.device).unsqueeze(1)  # (T, 1)
        with autocast(self.lm.device, self.lm.precision):
            out, self.state = model.features(x, self.state)
            self._logits = model.scores(out[-1, 0]).float().cpu()  # (V,) (see LSTMLanguageModel.scores)
        self.tokens.extend(ids)

    def probabilities(self) -> torch.Tensor:
        """(V,) the probability of each token coming next."""
        return torch.softmax(self._logits, dim=-1)

    def next_words(self, k: int = 5) -> list[tuple[str, float]]:
        """The k most likely next words and their probabilities (see LanguageModel.next_words)."""
        check("k", k)
        with autocast(self.lm.device, self.lm.precision):
            return words_after(self.lm.model, self.lm.pieces, self._logits, self.state, k)
