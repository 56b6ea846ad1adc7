"""Run configuration: three dataclasses, loaded from defaults < YAML < command line.

    cfg = load_config("configs/ptb-small.yaml", overrides=["model.dropout=0.5"])

Every field carries a comment saying what it does. Unknown keys and bad values
are errors, and all problems of one config are reported together in a single
`ConfigError` that names the offending keys.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lstm_lm.errors import ConfigError

FORMAT_VERSION = 1  # bumped when config.json / the checkpoint layout changes


@dataclass
class DataConfig:
    # Where the text comes from: "demo" (built-in corpus), a directory with
    # train.txt/valid.txt/test.txt, one text file (split by the fractions below),
    # or a Hugging Face hub dataset "NAME:CONFIG" / "hf:NAME" (needs network).
    source: str = "demo"
    # "word" (whitespace-separated words), "char" (characters) or "bpe" (byte-pair encoding).
    tokenizer: str = "word"
    # Lowercase the text before tokenizing (case is kept by default).
    lowercase: bool = False
    # Word tokenizer only: split punctuation off words ("John," -> "John" ","). Off for
    # pre-tokenized corpora such as PTB, whose tokens ("u.s.", "<unk>") must stay whole.
    split_punctuation: bool = False
    # Word/char tokenizer: keep only tokens seen at least this often in the train split.
    min_freq: int = 1
    # Word/char tokenizer: keep at most this many of the most frequent tokens (null: all).
    max_size: int | None = None
    # BPE tokenizer: size of the vocabulary to learn, special tokens included.
    vocab_size: int = 8000
    # Single-file sources: fractions of the lines used for validation and test
    # (contiguous blocks at the end of the file, in that order).
    valid_fraction: float = 0.05
    test_fraction: float = 0.05
    # Demo corpus: number of generated biographies and the generator's seed.
    demo_size: int = 6000
    demo_seed: int = 0
    # Demo corpus: the number of words of unrelated clauses between "I am from X" and
    # "and I speak Y", drawn uniformly from [gap_min, gap_max] for each biography.
    gap_min: int = 0
    gap_max: int = 12
    # Where encoded token ids are cached (null: $LSTM_LM_CACHE or ~/.cache/lstm-lm).
    cache_dir: str | None = None


@dataclass
class ModelConfig:
    # Recurrent cell: "lstm" (long short-term memory), "gru" (gated recurrent unit) or
    # "rnn" (the simple tanh RNN, which forgets over long gaps; see `lstm-lm experiment`).
    cell: str = "lstm"
    # Engine: "custom" (the hand-written cell), "cudnn" (the kernel behind torch.nn.LSTM,
    # GRU or RNN: cuDNN on a GPU) or "auto" (cudnn; every feature below works with either).
    impl: str = "auto"
    # Size of the word vectors.
    embedding_size: int = 200
    # Units in each recurrent layer.
    hidden_size: int = 200
    # Number of stacked recurrent layers.
    num_layers: int = 2
    # Units of each layer, one entry per layer, overriding hidden_size (null: all
    # hidden_size). AWD-LSTM uses [1150, 1150, 400]: the last layer matches the
    # embedding so that the weights can be tied.
    hidden_sizes: list[int] | None = None
    # Dropout on the embeddings, between layers and on the last layer's output; the
    # three fields after it set each of those on its own (null: this value).
    dropout: float = 0.2
    # Dropout on the embedding output, the first layer's input (AWD-LSTM's dropouti).
    dropout_input: float | None = None
    # Dropout between stacked layers (AWD-LSTM's dropouth).
    dropout_hidden: float | None = None
    # Dropout on the last layer's output, the decoder's input (AWD-LSTM's dropout).
    dropout_output: float | None = None
    # The three dropouts above as locked (variational) dropout: one mask per sequence,
    # the same at every time step (Gal & Ghahramani 2016), instead of a new one per step.
    locked_dropout: bool = False
    # Embedding dropout: drop whole words, the same words everywhere in a batch
    # (Gal & Ghahramani 2016; AWD-LSTM's dropoute).
    dropout_embedding: float = 0.0
    # Weight drop: DropConnect (Wan et al. 2013) on the hidden-to-hidden matrices, one
    # mask per batch shared by every time step (AWD-LSTM's wdrop).
    weight_drop: float = 0.0
    # Share the input embedding with the output projection (Press & Wolf 2017,
    # Inan et al. 2017); needs embedding_size == the last layer's size.
    tie_weights: bool = True

    @property
    def layer_sizes(self) -> list[int]:
        """Units of each layer."""
        return list(self.hidden_sizes) if self.hidden_sizes else [self.hidden_size] * self.num_layers

    def dropouts(self) -> dict[str, float]:
        """The rate of each dropout site, the null ones filled in from `dropout`."""
        pick = lambda v: self.dropout if v is None else v  # noqa: E731
        return {"input": pick(self.dropout_input), "hidden": pick(self.dropout_hidden),
                "output": pick(self.dropout_output), "embedding": self.dropout_embedding,
                "weight": self.weight_drop}


@dataclass
class TrainConfig:
    # Passes over the training split.
    epochs: int = 6
    # Stop after this many optimizer steps (null: run all epochs).
    max_steps: int | None = None
    # Parallel token streams per batch (the B of the truncated-BPTT layout).
    batch_size: int = 20
    # Time steps per chunk; gradients flow back at most this far.
    bptt: int = 35
    # "sgd" or "adamw".
    optimizer: str = "sgd"
    # Learning rate (20 is the classic value for plain SGD on PTB; ~1e-3 for AdamW).
    lr: float = 20.0
    # Weight decay: decoupled for AdamW (Loshchilov & Hutter 2019), an L2 penalty for
    # SGD (AWD-LSTM uses 1.2e-6).
    weight_decay: float = 0.0
    # Learning-rate schedule: "plateau" (divide by lr_decay when validation stops
    # improving), "exponential" (divide by lr_decay after every epoch from
    # decay_start on, as Zaremba et al. 2014), "cosine" (after the warm-up, follow a
    # cosine from lr down to min_lr over the run: its epochs, max_steps or
    # time_budget) or "constant".
    schedule: str = "plateau"
    # plateau / exponential: the divisor (1: never decay).
    lr_decay: float = 4.0
    # exponential: the first epoch after which the learning rate is divided.
    decay_start: int = 1
    # Raise the learning rate linearly from 0 over the first this many steps (0: no warm-up).
    warmup_steps: int = 0
    # cosine: the learning rate at the end of the run.
    min_lr: float = 0.0
    # Non-monotonically triggered averaged SGD (Merity et al. 2017; needs optimizer sgd):
    # once validation loss is worse than the best of all but the last `nonmono` epochs,
    # keep a running average of the weights from then on; validation, the saved model
    # and the test use the averaged weights.
    nt_asgd: bool = False
    nonmono: int = 5
    # Activation regularization: add ar * mean(h^2) of the last layer's (dropped-out)
    # output to the loss, and temporal activation regularization: tar * mean((h_t -
    # h_{t-1})^2) of its raw output (Merity et al. 2017; AWD-LSTM uses 2 and 1).
    ar: float = 0.0
    tar: float = 0.0
    # Variable-length BPTT (Merity et al. 2017): each chunk's length is drawn around
    # bptt (N(bptt, 5), or N(bptt/2, 5) one time in 20, at least 5) and the learning
    # rate scaled by length / bptt, so that every token starts a chunk in some epoch.
    variable_bptt: bool = False
    # Stop after this many minutes of wall time, evaluation included (null: no limit).
    # The cosine schedule is planned against this budget rather than the epoch count,
    # and the run ends with a full validation and a test evaluation inside it.
    time_budget: float | None = None
    # Clip the global gradient norm to this (0: no clipping).
    clip: float = 0.25
    # Streams used for validation and test (the classic value is 10).
    eval_batch_size: int = 10
    # "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "cuda:1", "mps".
    device: str = "auto"
    # Arithmetic: "fp32", "bf16" (matrix products in bfloat16 under torch.autocast, the
    # loss and the weights in float32) or "auto" (bf16 where the hardware does it
    # natively: a CUDA GPU with bf16, a CPU with AMX or AVX-512 BF16; else fp32).
    precision: str = "auto"
    # torch.compile the training step (for the hand-written cell, its time loop with
    # it). Compiling takes 20 s to 1.5 min once per run (reported); see README "Speed".
    compile: bool = False
    # Seed for weights, dropout and sampling.
    seed: int = 1111
    # Update the progress bar's loss, and write a line to steps.jsonl, every this many
    # steps (each update syncs the device).
    log_interval: int = 50
    # Every log_interval steps, also record how far back the gradient reaches: the norm of
    # the chunk's last-step loss's gradient with respect to each earlier hidden state, in
    # grad_flow.jsonl (`lstm-lm plot` draws it). Costs one step-by-step pass per record.
    log_grad_flow: bool = False
    # Besides the one after each validation, save a resumable checkpoint
    # (checkpoints/step-N/) every this many steps and every this many minutes (null: not).
    checkpoint_every: int | None = None
    checkpoint_minutes: float | None = 10.0
    # Keep the newest this many step checkpoints; the best one is always kept as well.
    keep_last: int = 2
    # A step whose loss or gradient is not a finite number: stop with a message (false),
    # or skip its update and count it (true; costs one device sync per step).
    skip_nonfinite: bool = False


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}
CHOICES = {
    "data.tokenizer": ("word", "char", "bpe"),
    "model.cell": ("lstm", "gru", "rnn"),
    "model.impl": ("auto", "custom", "cudnn"),
    "train.optimizer": ("sgd", "adamw"),
    "train.schedule": ("plateau", "exponential", "cosine", "constant"),
    "train.precision": ("auto", "fp32", "bf16"),
}

# `lstm-lm train` with no --config and no --data trains this: a small model on the
# demo corpus that finishes in about a minute on a laptop CPU. configs/demo.yaml
# holds the same values (a test checks that they agree).
DEMO_PRESET: dict[str, dict[str, Any]] = {
    "data": {"source": "demo", "tokenizer": "word", "split_punctuation": True, "gap_min": 0, "gap_max": 12},
    "model": {"embedding_size": 128, "hidden_size": 128, "num_layers": 1, "dropout": 0.1},
    "train": {"epochs": 30, "batch_size": 32, "bptt": 35, "optimizer": "adamw", "lr": 0.01,
              "lr_decay": 4.0, "clip": 1.0},
}


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, typ: Any, key: str, from_string: bool) -> Any:
    """Check `value` against a field type; strings from the command line are parsed as YAML."""
    if from_string and isinstance(value, str):
        try:
            value = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            pass
    optional = False
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        optional = len(args) < len(typing.get_args(typ))
        typ = args[0]
    if value is None:
        if optional:
            return None
        raise ValueError(f"{key}: must not be null")
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if typing.get_origin(typ) is list:
        item = typing.get_args(typ)[0]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item, f"{key}[{i}]", from_string=False) for i, v in enumerate(value)]
    if typ in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" as a string
            value = float(value.strip())
        except ValueError:
            pass
    if typ is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{key}: expected an integer, got {value!r}")
    if typ is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ValueError(f"{key}: expected a number, got {value!r}")
    if typ is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{key}: expected a string, got {value!r}")
    return value


def _apply(cfg: Config, section: str, key: str, value: Any, problems: list[str], from_string: bool):
    cls = SECTIONS[section]
    types_ = _field_types(cls)
    if key not in types_:
        problems.append(f"{section}.{key}: unknown key (known: {', '.join(types_)})")
        return
    try:
        setattr(getattr(cfg, section), key, _coerce(value, types_[key], f"{section}.{key}", from_string))
    except ValueError as e:
        problems.append(str(e))


def _resolve_key(key: str) -> tuple[str, str] | None:
    """'model.hidden_size' -> ('model', 'hidden_size'); a bare 'hidden_size' if it is unique."""
    if "." in key:
        section, _, name = key.partition(".")
        return (section, name) if section in SECTIONS else None
    owners = [s for s, cls in SECTIONS.items() if key in _field_types(cls)]
    return (owners[0], key) if len(owners) == 1 else None


def validate(cfg: Config) -> list[str]:
    """Range and consistency checks; returns every problem found."""
    p: list[str] = []
    for dotted, allowed in CHOICES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            p.append(f"{dotted}: must be one of {', '.join(allowed)}, got {value!r}")
    d, m, t = cfg.data, cfg.model, cfg.train
    positive = {
        "data.min_freq": d.min_freq, "data.vocab_size": d.vocab_size, "data.demo_size": d.demo_size,
        "model.embedding_size": m.embedding_size, "model.hidden_size": m.hidden_size,
        "model.num_layers": m.num_layers, "train.epochs": t.epochs, "train.batch_size": t.batch_size,
        "train.bptt": t.bptt, "train.eval_batch_size": t.eval_batch_size,
        "train.log_interval": t.log_interval, "train.keep_last": t.keep_last,
    }
    for key, value in positive.items():
        if value < 1:
            p.append(f"{key}: must be at least 1, got {value}")
    if not 0 <= d.gap_min <= d.gap_max <= 500:
        p.append(f"data.gap_min, data.gap_max: need 0 <= gap_min <= gap_max <= 500, got {d.gap_min} and {d.gap_max}")
    if d.max_size is not None and d.max_size < 3:
        p.append(f"data.max_size: must be at least 3 (room for <unk>, <eos> and a word), got {d.max_size}")
    if t.max_steps is not None and t.max_steps < 1:
        p.append(f"train.max_steps: must be at least 1 or null, got {t.max_steps}")
    if d.tokenizer == "bpe" and d.vocab_size < 3:
        p.append(f"data.vocab_size: must be at least 3 for bpe, got {d.vocab_size}")
    for key, value in {"data.valid_fraction": d.valid_fraction, "data.test_fraction": d.test_fraction}.items():
        if not 0.0 < value < 0.5:
            p.append(f"{key}: must be between 0 and 0.5 (exclusive), got {value}")
    rates = {"model.dropout": m.dropout, "model.dropout_input": m.dropout_input,
             "model.dropout_hidden": m.dropout_hidden, "model.dropout_output": m.dropout_output,
             "model.dropout_embedding": m.dropout_embedding, "model.weight_drop": m.weight_drop}
    for key, value in rates.items():
        if value is not None and not 0.0 <= value < 1.0:
            p.append(f"{key}: must be in [0, 1), got {value}")
    if m.hidden_sizes is not None:
        if len(m.hidden_sizes) != m.num_layers:
            p.append(f"model.hidden_sizes: has {len(m.hidden_sizes)} entries but model.num_layers is "
                     f"{m.num_layers}; give one size per layer")
        if any(size < 1 for size in m.hidden_sizes):
            p.append(f"model.hidden_sizes: every size must be at least 1, got {m.hidden_sizes}")
    if m.tie_weights and m.num_layers >= 1 and m.layer_sizes and m.embedding_size != m.layer_sizes[-1]:
        p.append(
            f"model.tie_weights: tied weights need embedding_size == the last layer's size, got "
            f"{m.embedding_size} and {m.layer_sizes[-1]} (set model.tie_weights=false or make them equal)"
        )
    if not 0 < t.lr < float("inf"):
        p.append(f"train.lr: must be a positive number, got {t.lr}")
    if t.lr_decay < 1.0:
        p.append(f"train.lr_decay: must be at least 1 (1 turns the decay off), got {t.lr_decay}")
    if t.clip < 0:
        p.append(f"train.clip: must be 0 (off) or positive, got {t.clip}")
    if t.warmup_steps < 0:
        p.append(f"train.warmup_steps: must not be negative, got {t.warmup_steps}")
    if t.lr > 0 and not 0.0 <= t.min_lr < t.lr:
        p.append(f"train.min_lr: must be at least 0 and below train.lr ({t.lr}), got {t.min_lr}")
    if t.decay_start < 1:
        p.append(f"train.decay_start: must be at least 1, got {t.decay_start}")
    if t.nonmono < 1:
        p.append(f"train.nonmono: must be at least 1, got {t.nonmono}")
    if t.nt_asgd and t.optimizer != "sgd":
        p.append(f"train.nt_asgd: averages SGD's iterates; needs train.optimizer=sgd, got {t.optimizer}")
    for key, value in {"train.ar": t.ar, "train.tar": t.tar}.items():
        if value < 0:
            p.append(f"{key}: must not be negative, got {value}")
    if t.time_budget is not None and not 0 < t.time_budget < float("inf"):
        p.append(f"train.time_budget: must be a positive number of minutes or null, got {t.time_budget}")
    if t.variable_bptt and t.compile:
        p.append("train.variable_bptt: does not combine with train.compile (every new chunk length would "
                 "compile anew); turn one of them off")
    if t.checkpoint_every is not None and t.checkpoint_every < 1:
        p.append(f"train.checkpoint_every: must be at least 1 step or null, got {t.checkpoint_every}")
    if t.checkpoint_minutes is not None and not 0 < t.checkpoint_minutes < float("inf"):
        p.append(f"train.checkpoint_minutes: must be a positive number of minutes or null, got {t.checkpoint_minutes}")
    if t.weight_decay < 0:
        p.append(f"train.weight_decay: must not be negative, got {t.weight_decay}")
    if not is_device_name(t.device):
        p.append(f"train.device: must be auto, cpu, cuda, cuda:N or mps, got {t.device!r}")
    return p


def is_device_name(name: str) -> bool:
    """auto, cpu, cuda, cuda:N or mps."""
    return name in ("auto", "cpu", "cuda", "mps") or (name.startswith("cuda:") and name[5:].isdigit())


def config_from_dict(raw: dict[str, Any], base: Config | None = None, origin: str = "config") -> Config:
    """Apply a nested {section: {key: value}} dict onto `base` (defaults if None)."""
    cfg = base if base is not None else Config()
    problems: list[str] = []
    _merge(cfg, raw, problems, origin, from_string=False)
    problems += validate(cfg)
    if problems:
        raise ConfigError(problems, origin)
    return cfg


def _merge(cfg: Config, raw: Any, problems: list[str], origin: str, from_string: bool) -> None:
    if not isinstance(raw, dict):
        problems.append(f"{origin}: expected a mapping with sections {', '.join(SECTIONS)}")
        return
    for section, values in raw.items():
        if section not in SECTIONS:
            problems.append(f"{section}: unknown section (known: {', '.join(SECTIONS)})")
            continue
        if values is None:
            continue
        if not isinstance(values, dict):
            problems.append(f"{section}: expected a mapping of keys to values")
            continue
        for key, value in values.items():
            _apply(cfg, section, str(key), value, problems, from_string)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    preset: dict[str, Any] | None = None,
) -> Config:
    """Defaults < `preset` < YAML file < `overrides` ("section.key=value" or a unique "key=value")."""
    cfg = Config()
    problems: list[str] = []
    if preset:
        _merge(cfg, preset, problems, "preset", from_string=False)
    origin = "command line"
    if path is not None:
        origin = str(path)
        path = Path(path)
        if not path.is_file():
            raise ConfigError([f"config file {path} does not exist"], origin)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError([f"{path} is not valid YAML: {str(e).splitlines()[0]}"], origin) from None
        _merge(cfg, raw or {}, problems, origin, from_string=False)
    for item in overrides or []:
        key, sep, value = item.partition("=")
        resolved = _resolve_key(key.strip()) if sep else None
        if resolved is None:
            problems.append(
                f"--set {item!r}: expected section.key=value or a unique key=value "
                f"(sections: {', '.join(SECTIONS)})"
            )
            continue
        _apply(cfg, *resolved, value.strip(), problems, from_string=True)
    problems += validate(cfg)
    if problems:
        raise ConfigError(problems, origin)
    return cfg
