"""Run configuration: three dataclasses, loaded from defaults < YAML < command line.

    cfg = load_config("configs/ptb-small.yaml", overrides=["model.dropout=0.5"])
    cfg = load_config("ptb-small", values={"train.epochs": 3})   # a built-in recipe by name

Each field is declared once, with its help, its choices and its bounds (`param`):
that one declaration drives validation, the `--help` of `lstm-lm train` and the
field table of docs/reference.md. Unknown keys and bad values are errors, and
all problems of one config are reported together in a single `ConfigError` that
names the offending keys. Values typed on the command line stay typed; `--set`
strings are parsed against the field's declared type, so a path is a path whatever
YAML would make of it (`--data yes`, a directory named `null`).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lstm_lm import cells
from lstm_lm.errors import ConfigError

FORMAT_VERSION = 3  # bumped when config.json / the checkpoint layout changes
DEMO_RECIPE = "demo"
# Bounds on a model's sizes, far above any model a CPU or GPU here could train, so that a
# hostile config.json cannot ask for a model of astronomical size before its weights are read.
MAX_UNITS, MAX_LAYERS = 1 << 20, 256  # what `lstm-lm train` trains with no --config and no --data


def param(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    lt: float | None = None,
    le: float | None = None,
    kind: str | None = None,
):
    """A config field: its default, help, allowed choices and bounds (a null value passes the bounds)."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "lt": lt, "le": le, "kind": kind}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    source: str = param(
        "demo",
        "Where the text comes from: demo (the built-in corpus), a directory with "
        "train.txt/valid.txt/test.txt, one text file (split by valid_fraction and test_fraction), "
        "or a Hugging Face hub dataset NAME:CONFIG / hf:NAME (needs network).",
    )
    tokenizer: str = param(
        "word",
        "word (whitespace-separated words), char (characters) or bpe (byte-pair encoding).",
        choices=("word", "char", "bpe"),
    )
    lowercase: bool = param(False, "Lowercase the text before tokenizing (case is kept by default).")
    split_punctuation: bool = param(
        False,
        'Word tokenizer only: split punctuation off words ("John," -> "John" '
        '","). Off for pre-tokenized corpora such as PTB, whose tokens ("u.s.", '
        '"<unk>") must stay whole.',
    )
    min_freq: int = param(1, "Word/char tokenizer: keep only tokens seen at least this often in the train split.", ge=1)
    max_size: int | None = param(
        None,
        "Word/char tokenizer: keep at most this many of the most frequent tokens "
        "(null: all; at least 3, room for <unk>, <eos> and a word).",
        ge=3,
    )
    vocab_size: int = param(8000, "BPE tokenizer: size of the vocabulary to learn, special tokens included.", ge=3)
    valid_fraction: float = param(
        0.05,
        "Single-file sources: the fraction of the lines used for validation "
        "(a contiguous block before the test block at the end of the file).",
        gt=0,
        lt=0.5,
    )
    test_fraction: float = param(
        0.05,
        "Single-file sources: the fraction of the lines used for test (the contiguous block at the end of the file).",
        gt=0,
        lt=0.5,
    )
    demo_size: int = param(6000, "Demo corpus: the number of generated biographies.", ge=1)
    demo_seed: int = param(0, "Demo corpus: the generator's seed.")
    gap_min: int = param(
        0,
        'Demo corpus: the fewest words of unrelated clauses between "I am from X" and '
        '"and I speak Y" (each biography\'s gap is drawn uniformly from [gap_min, gap_max]).',
        ge=0,
        le=500,
    )
    gap_max: int = param(
        12, "Demo corpus: the most words of unrelated clauses between the region and the language.", ge=0, le=500
    )
    cache_dir: str | None = param(
        None, "Where encoded token ids are cached (null: $LSTM_LM_CACHE or ~/.cache/lstm-lm)."
    )


@dataclass
class ModelConfig:
    cell: str = param(
        "lstm",
        f"Recurrent cell: {', '.join(cells.module_names())} (the modules of lstm_lm/cells/; "
        "the table of cells in docs/reference.md says what each is and which paper it comes from).",
        choices=cells.module_names(),
    )
    impl: str = param(
        "auto",
        "Engine: custom (the hand-written cell), cudnn (the kernel behind torch.nn.LSTM, GRU "
        "or RNN: cuDNN on a GPU; for the cells that have one) or auto (cudnn where the cell has it, "
        "else custom; every feature works with either).",
        choices=("auto", "custom", "cudnn"),
    )
    proj_size: int | None = param(
        None,
        "Cells lstm and cifg: project h to this many units (< each layer's size) "
        "after the output gate, the LSTMP of Sak et al. 2014 (null: no projection). The "
        "state each step multiplies shrinks; c keeps the layer's size.",
        ge=1,
        le=MAX_UNITS,
    )
    mogrify_rounds: int | None = param(
        None,
        "Cell mogrifier: rounds in which x and h gate each other before each "
        "LSTM step (null: the paper's 5; 0: a plain LSTM).",
        ge=0,
        le=64,
    )
    mogrify_rank: int | None = param(
        None,
        "Cell mogrifier: the rank of its Q and R matrices, each the product of two thin ones (null: full rank).",
        ge=1,
        le=MAX_UNITS,
    )
    num_heads: int | None = param(
        None,
        "Cells slstm and mlstm: heads per layer, each with its own block of the recurrence "
        "(sLSTM) or its own matrix memory (mLSTM); must divide every layer's size (null: 4).",
        ge=1,
        le=MAX_UNITS,
    )
    embedding_size: int = param(200, "Size of the word vectors.", ge=1, le=MAX_UNITS)
    hidden_size: int = param(200, "Units in each recurrent layer.", ge=1, le=MAX_UNITS)
    num_layers: int = param(2, "Number of stacked recurrent layers.", ge=1, le=MAX_LAYERS)
    hidden_sizes: list[int] | None = param(
        None,
        "Units of each layer, one entry per layer, overriding hidden_size "
        "(null: all hidden_size). AWD-LSTM uses [1150, 1150, 400]: the last "
        "layer matches the embedding so that the weights can be tied.",
    )
    dropout: float = param(
        0.2,
        "Dropout on the embeddings, between layers and on the last layer's output; "
        "dropout_input, dropout_hidden and dropout_output set each of those on its own.",
        ge=0,
        lt=1,
    )
    dropout_input: float | None = param(
        None,
        "Dropout on the embedding output, the first layer's input (AWD-LSTM's dropouti; null: dropout).",
        ge=0,
        lt=1,
    )
    dropout_hidden: float | None = param(
        None, "Dropout between stacked layers (AWD-LSTM's dropouth; null: dropout).", ge=0, lt=1
    )
    dropout_output: float | None = param(
        None, "Dropout on the last layer's output, the decoder's input (AWD-LSTM's dropout; null: dropout).", ge=0, lt=1
    )
    locked_dropout: bool = param(
        False,
        "The three dropouts above as locked (variational) dropout: one mask per "
        "sequence, the same at every time step (Gal & Ghahramani 2016).",
    )
    dropout_embedding: float = param(
        0.0,
        "Embedding dropout: drop whole words, the same words everywhere in a "
        "batch (Gal & Ghahramani 2016; AWD-LSTM's dropoute).",
        ge=0,
        lt=1,
    )
    weight_drop: float = param(
        0.0,
        "Weight drop: DropConnect (Wan et al. 2013) on the hidden-to-hidden matrices, "
        "one mask per batch shared by every time step (AWD-LSTM's wdrop).",
        ge=0,
        lt=1,
    )
    tie_weights: bool = param(
        True,
        "Share the input embedding with the output projection (Press & Wolf 2017, "
        "Inan et al. 2017; with softmax adaptive, with the head's word rows); needs "
        "embedding_size == the last layer's size.",
    )
    softmax: str = param(
        "full",
        "Output layer: full (one softmax over the vocabulary) or adaptive (Grave et al. "
        "2017: the frequent words in a head, the rest in clusters behind smaller projections; "
        "an exact distribution, several times faster for vocabularies of 50k words and more).",
        choices=("full", "adaptive"),
    )
    cutoffs: list[int] | None = param(
        None,
        "softmax adaptive: where the head ends and each cluster begins, in "
        "word ids by frequency, e.g. [20000, 60000] for WikiText-103 (null: 1/12 "
        "and 1/4 of the vocabulary).",
    )
    div_value: float = param(
        4.0, "softmax adaptive: cluster i projects the last layer's output down to size / div_value^(i+1) units.", ge=1
    )

    @property
    def layer_sizes(self) -> list[int]:
        """Units of each layer."""
        return list(self.hidden_sizes) if self.hidden_sizes else [self.hidden_size] * self.num_layers

    def dropouts(self) -> dict[str, float]:
        """The rate of each dropout site, the null ones filled in from `dropout`."""
        pick = lambda v: self.dropout if v is None else v  # noqa: E731
        return {
            "input": pick(self.dropout_input),
            "hidden": pick(self.dropout_hidden),
            "output": pick(self.dropout_output),
            "embedding": self.dropout_embedding,
            "weight": self.weight_drop,
        }


@dataclass
class TrainConfig:
    epochs: int = param(6, "Passes over the training split.", ge=1)
    max_steps: int | None = param(None, "Stop after this many optimizer steps (null: run all epochs).", ge=1)
    batch_size: int = param(20, "Parallel token streams per batch (the B of the truncated-BPTT layout).", ge=1)
    bptt: int = param(35, "Time steps per truncated-BPTT chunk; gradients flow back at most this far.", ge=1)
    optimizer: str = param("sgd", "sgd or adamw.", choices=("sgd", "adamw"))
    lr: float = param(20.0, "Learning rate (20 is the classic value for plain SGD on PTB; about 1e-3 for AdamW).", gt=0)
    weight_decay: float = param(
        0.0,
        "Weight decay: decoupled for AdamW (Loshchilov & Hutter 2019), an L2 penalty for SGD (AWD-LSTM uses 1.2e-6).",
        ge=0,
    )
    schedule: str = param(
        "plateau",
        "Learning-rate schedule: plateau (divide by lr_decay when validation stops "
        "improving), exponential (divide by lr_decay after every epoch from decay_start on, as "
        "Zaremba et al. 2014), cosine (after the warm-up, from lr down to min_lr over the run: "
        "its epochs, max_steps or time_budget) or constant.",
        choices=("plateau", "exponential", "cosine", "constant"),
    )
    lr_decay: float = param(4.0, "plateau / exponential: the divisor (1: never decay).", ge=1)
    decay_start: int = param(1, "exponential: the first epoch after which the learning rate is divided.", ge=1)
    stop_lr: float | None = param(
        None,
        "plateau / exponential: end the run once the decays have taken the learning rate below "
        "this, when little is left to learn (as fairseq's --stop-min-lr; null: run all epochs).",
        gt=0,
    )
    warmup_steps: int = param(
        0, "Raise the learning rate linearly from 0 over the first this many steps (0: no warm-up).", ge=0
    )
    min_lr: float = param(0.0, "cosine: the learning rate at the end of the run (below lr).", ge=0)
    nt_asgd: bool = param(
        False,
        "Non-monotonically triggered averaged SGD (Merity et al. 2017; needs optimizer "
        "sgd): once validation loss is worse than the best of all but the last nonmono epochs, "
        "average the weights from then on; validation, the saved model and the test use the "
        "average.",
    )
    nonmono: int = param(5, "NT-ASGD: the epochs of patience of its trigger.", ge=1)
    ar: float = param(
        0.0,
        "Activation regularization: add ar * mean(h^2) of the last layer's (dropped-out) output "
        "to the loss (Merity et al. 2017; AWD-LSTM uses 2).",
        ge=0,
    )
    tar: float = param(
        0.0,
        "Temporal activation regularization: add tar * mean((h_t - h_{t-1})^2) of the last "
        "layer's raw output to the loss (Merity et al. 2017; AWD-LSTM uses 1).",
        ge=0,
    )
    variable_bptt: bool = param(
        False,
        "Variable-length BPTT (Merity et al. 2017): each chunk's length is drawn "
        "around bptt (N(bptt, 5), or N(bptt/2, 5) one time in 20, at least 5) and the "
        "learning rate scaled by length / bptt.",
    )
    eval_every: int | None = param(
        None,
        "Also validate (and save a checkpoint) every this many steps inside an epoch, for a curve "
        "of validation perplexity over a long epoch (null: at epoch ends only). The learning rate "
        "still moves at epoch ends only.",
        ge=1,
    )
    time_budget: float | None = param(
        None,
        "Stop after this many minutes of wall time, final validation and test "
        "included (null: no limit); the cosine schedule is planned against it.",
        gt=0,
    )
    clip: float = param(0.25, "Clip the global gradient norm to this (0: no clipping).", ge=0)
    eval_batch_size: int = param(10, "Streams used for validation and test (the classic value is 10).", ge=1)
    device: str = param("auto", "auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.", kind="device")
    precision: str = param(
        "auto",
        "Arithmetic: fp32, bf16 (matrix products in bfloat16 under torch.autocast, the "
        "loss and the weights in float32) or auto (bf16 where the hardware does it natively: a "
        "CUDA GPU with bf16, a CPU with AMX or AVX-512 BF16; else fp32).",
        choices=("auto", "fp32", "bf16"),
    )
    compile: bool = param(
        False,
        "torch.compile the training step (for the hand-written cell, its time loop "
        "with it); compiling takes 20 s to 1.5 min once per run.",
    )
    compile_mode: str = param(
        "default",
        "torch.compile's mode with train.compile: default, reduce-overhead "
        "(on a GPU it replays the step's kernels as CUDA graphs) or max-autotune (it also "
        "times kernel variants; compiling takes much longer).",
        choices=("default", "reduce-overhead", "max-autotune"),
    )
    loss_impl: str = param(
        "auto",
        "How the output layer and its cross-entropy are computed in training: fused "
        "(block by block, the gradient computed at once and no logits kept: see loss.py), "
        "plain (F.linear then F.cross_entropy, the logits kept for backward) or auto (fused; "
        "measured faster on a CPU, see docs/speed.md).",
        choices=("auto", "fused", "plain"),
    )
    seed: int = param(1111, "Seed for weights, dropout and sampling.")
    log_interval: int = param(
        50,
        "Update the progress bar and write a line to steps.jsonl every this many steps (each update syncs the device).",
        ge=1,
    )
    log_grad_flow: bool = param(
        False,
        "Every log_interval steps, also record how far back the gradient reaches "
        "(grad_flow.jsonl; drawn by lstm-lm plot). Costs one step-by-step pass per record.",
    )
    logger: str = param(
        "jsonl",
        "Where the step and validation records go besides the JSONL logs, which are always "
        "written: jsonl (nowhere else) or tensorboard (RUN/tensorboard; pip install "
        "'lstm-lm[tensorboard]').",
        choices=("jsonl", "tensorboard"),
    )
    checkpoint_every: int | None = param(
        None,
        "Besides the one after each validation, save a resumable checkpoint every this many steps (null: not).",
        ge=1,
    )
    checkpoint_minutes: float | None = param(
        10.0,
        "Besides the one after each validation, save a resumable checkpoint every this many minutes (null: not).",
        gt=0,
    )
    keep_last: int = param(2, "Keep the newest this many step checkpoints; the best one is always kept as well.", ge=1)
    skip_nonfinite: bool = param(
        False,
        "A step whose loss or gradient is not a finite number: stop with a message "
        "(false), or skip its update and count it (true; one device sync per step).",
    )
    stop_diverged: bool = param(
        True,
        "End the run at an epoch's validation whose perplexity is more than twice the vocabulary's "
        "size (twice a uniform guess's: training has diverged) and test the best checkpoint; where "
        "no validation was better than that, exit with an error (false: warn and train on).",
    )


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


SECTIONS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig}


@dataclass(frozen=True)
class FieldSpec:
    """One config field as declared: its dotted key, type, default and `param` metadata."""

    key: str
    type: Any
    default: Any
    help: str
    choices: tuple[str, ...] | None
    bounds: dict[str, float]
    kind: str | None

    @property
    def base_type(self) -> Any:
        """The type without its `| None`."""
        return _strip_optional(self.type)[0]

    @property
    def optional(self) -> bool:
        return _strip_optional(self.type)[1]


def _strip_optional(typ: Any) -> tuple[Any, bool]:
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(typ))
    return typ, False


def _specs() -> dict[str, FieldSpec]:
    specs = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            m = f.metadata
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            bounds = {k: m[k] for k in ("ge", "gt", "lt", "le") if m.get(k) is not None}
            specs[f"{section}.{f.name}"] = FieldSpec(
                f"{section}.{f.name}", hints[f.name], default, m["help"], m.get("choices"), bounds, m.get("kind")
            )
    return specs


FIELDS: dict[str, FieldSpec] = _specs()


def field_help(key: str) -> str:
    """A field's help for the command-line option that sets it: 'Passes over ... (train.epochs)'."""
    return f"{FIELDS[key].help} ({key})"


def choices(key: str) -> tuple[str, ...]:
    return FIELDS[key].choices or ()


# -- values --------------------------------------------------------------------------------

_TRUE, _FALSE, _NULL = ("true", "yes", "on", "1"), ("false", "no", "off", "0"), ("null", "none", "~", "")


def parse_text(text: str, spec: FieldSpec) -> Any:
    """A `--set` string read as the field's declared type: 'yes' is a path for a string field,
    true for a boolean one; 'null' is None only where the field may be null."""
    typ, optional = spec.base_type, spec.optional
    stripped = text.strip()
    if optional and stripped.lower() in _NULL:
        return None
    if typ is str:
        return text
    if typ is bool:
        if stripped.lower() in _TRUE:
            return True
        if stripped.lower() in _FALSE:
            return False
        raise ValueError(f"{spec.key}: expected true or false, got {text!r}")
    if typ in (int, float):
        try:
            return float(stripped) if typ is float else _to_int(stripped)
        except ValueError:
            kind = "an integer" if typ is int else "a number"
            raise ValueError(f"{spec.key}: expected {kind}, got {text!r}") from None
    if typing.get_origin(typ) is list:  # [1150, 1150, 400] or 1150,1150,400
        try:
            value = yaml.safe_load(stripped if stripped.startswith("[") else f"[{stripped}]")
        except yaml.YAMLError:
            raise ValueError(f"{spec.key}: expected a list such as [200, 200], got {text!r}") from None
        return value
    return text


def _to_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        value = float(text)  # 1e3
        if not value.is_integer():
            raise
        return int(value)


def check_type(value: Any, typ: Any, key: str) -> Any:
    """`value` (from YAML, JSON or a typed option) checked against a field type; ints widen to float."""
    typ, optional = _strip_optional(typ)
    if value is None:
        if optional:
            return None
        raise ValueError(f"{key}: must not be null")
    if typ is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key}: expected true or false, got {value!r}")
    if typing.get_origin(typ) is list:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        return [check_type(v, typing.get_args(typ)[0], f"{key}[{i}]") for i, v in enumerate(value)]
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
        raise ValueError(f"{key}: expected a string, got {value!r} (in YAML, quote it: '{value}')")
    return value


def _check_bounds(spec: FieldSpec, value: Any) -> str | None:
    """The problem with `value` by the field's choices and bounds, or None."""
    if value is None:
        return None
    if spec.choices and value not in spec.choices:
        return f"{spec.key}: must be one of {', '.join(spec.choices)}, got {value!r}"
    if spec.kind == "device" and not is_device_name(value):
        return f"{spec.key}: must be auto, cpu, cuda, cuda:N or mps, got {value!r}"
    if not spec.bounds or not isinstance(value, (int, float)):
        return None
    b = spec.bounds
    ok = (
        math.isfinite(value)
        and ("ge" not in b or value >= b["ge"])
        and ("gt" not in b or value > b["gt"])
        and ("lt" not in b or value < b["lt"])
        and ("le" not in b or value <= b["le"])
    )
    if ok:
        return None
    return f"{spec.key}: must be {describe_bounds(spec)}, got {value}"


def describe_bounds(spec: FieldSpec) -> str:
    """'at least 1', 'in [0, 1)', 'a positive number' ... (with 'or null' where null is allowed)."""
    b = spec.bounds
    low = ("[", b["ge"]) if "ge" in b else ("(", b["gt"]) if "gt" in b else None
    high = ("]", b["le"]) if "le" in b else (")", b["lt"]) if "lt" in b else None
    g = lambda v: str(v) if isinstance(v, int) else f"{v:g}"  # noqa: E731
    if low and high:
        text = f"in {low[0]}{g(low[1])}, {g(high[1])}{high[0]}"
    elif low:
        text = (
            f"at least {g(low[1])}" if low[0] == "[" else "a positive number" if low[1] == 0 else f"above {g(low[1])}"
        )
    elif high:
        text = f"at most {g(high[1])}" if high[0] == "]" else f"below {g(high[1])}"
    else:
        text = "a finite number"
    return text + (" or null" if spec.optional else "")


def _cell_problems(m: ModelConfig) -> list[str]:
    """The options a cell reads (lstm_lm/cells/) set only for a cell that reads them, and fitting its sizes."""
    if m.cell not in cells.module_names():
        return []  # its choices already said so
    spec, p = cells.get(m.cell), []
    readers = {}  # each cell option (a model.* field) -> the cells that read it
    for cell in cells.names():
        for name in cells.get(cell).options:
            readers.setdefault(name, []).append(cell)
    for name, cells_reading in readers.items():
        if getattr(m, name) is not None and name not in spec.options:
            p.append(
                f"model.{name}: the {m.cell} cell does not read it (cells that do: {', '.join(cells_reading)}); "
                "leave it null"
            )
    if m.proj_size is not None and _sizes_ok(m) and any(m.proj_size >= size for size in m.layer_sizes):
        p.append(f"model.proj_size: must be smaller than every layer's size ({min(m.layer_sizes)}), got {m.proj_size}")
    if m.impl == "cudnn" and spec.kernel is None:
        p.append(f"model.impl: the {m.cell} cell has no fused kernel; use custom or auto")
    if isinstance(m.weight_drop, (int, float)) and m.weight_drop > 0 and not spec.dropped:
        p.append(f"model.weight_drop: the {m.cell} cell has no recurrent matrix for weight drop to mask; set it to 0")
    if not p and _sizes_ok(m):  # what only the cell itself can say about its sizes (heads that do not divide them)
        options = {name: getattr(m, name) for name in spec.options if getattr(m, name) is not None}
        for size in sorted(set(m.layer_sizes)):
            try:
                spec(m.embedding_size, size, **options)
            except ValueError as e:
                p.append(str(e))
                break
    return p


def _sizes_ok(m: ModelConfig) -> bool:
    """Whether the layer sizes are sane enough to compare against."""
    return 1 <= m.num_layers <= MAX_LAYERS and bool(m.layer_sizes) and all(isinstance(s, int) for s in m.layer_sizes)


def validate(cfg: Config) -> list[str]:
    """Every field's choices and bounds, then the checks that involve several fields; every problem found."""
    p = [
        problem
        for key, spec in FIELDS.items()
        if (problem := _check_bounds(spec, getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1])))
    ]
    d, m, t = cfg.data, cfg.model, cfg.train
    if d.gap_min > d.gap_max:
        p.append(f"data.gap_min, data.gap_max: need gap_min <= gap_max, got {d.gap_min} and {d.gap_max}")
    if m.hidden_sizes is not None:
        if len(m.hidden_sizes) != m.num_layers:
            p.append(
                f"model.hidden_sizes: has {len(m.hidden_sizes)} entries but model.num_layers is "
                f"{m.num_layers}; give one size per layer"
            )
        if any(not 1 <= size <= MAX_UNITS for size in m.hidden_sizes):
            p.append(f"model.hidden_sizes: every size must be in [1, {MAX_UNITS}], got {m.hidden_sizes[:8]}")
    p += _cell_problems(m)
    last = m.proj_size or (m.layer_sizes[-1] if 1 <= m.num_layers <= MAX_LAYERS and m.layer_sizes else None)
    if m.tie_weights and last is not None and m.embedding_size != last:
        what = "model.proj_size" if m.proj_size else "the last layer's size"
        p.append(
            f"model.tie_weights: tied weights need embedding_size == {what}, got "
            f"{m.embedding_size} and {last} (set model.tie_weights=false or make them equal)"
        )
    if m.cutoffs is not None and (
        not m.cutoffs or any(b <= a for a, b in zip(m.cutoffs, m.cutoffs[1:])) or m.cutoffs[0] < 1
    ):
        p.append(f"model.cutoffs: need one or more increasing sizes of at least 1, got {m.cutoffs}")
    if t.lr > 0 and not t.min_lr < t.lr:
        p.append(f"train.min_lr: must be below train.lr ({t.lr}), got {t.min_lr}")
    if t.stop_lr is not None and t.lr > 0 and not t.stop_lr < t.lr:
        p.append(f"train.stop_lr: must be below train.lr ({t.lr}), or the run would end before it began")
    if t.stop_lr is not None and t.schedule not in ("plateau", "exponential"):
        p.append(f"train.stop_lr: ends a plateau or exponential schedule's run; train.schedule is {t.schedule}")
    if t.nt_asgd and t.optimizer != "sgd":
        p.append(f"train.nt_asgd: averages SGD's iterates; needs train.optimizer=sgd, got {t.optimizer}")
    if t.compile_mode != "default" and not t.compile:
        p.append(f"train.compile_mode: {t.compile_mode} needs train.compile=true")
    if t.variable_bptt and t.compile:
        p.append(
            "train.variable_bptt: does not combine with train.compile (every new chunk length would "
            "compile anew); turn one of them off"
        )
    return p


def is_device_name(name: str) -> bool:
    """auto, cpu, cuda, cuda:N or mps."""
    return isinstance(name, str) and (
        name in ("auto", "cpu", "cuda", "mps") or (name.startswith("cuda:") and name[5:].isdigit())
    )


# -- loading -------------------------------------------------------------------------------


def _unknown_key(key: str) -> str:
    section = key.partition(".")[0]
    known = [k.split(".")[1] for k in FIELDS if k.startswith(f"{section}.")]
    return f"{key}: unknown key (known: {', '.join(known)})"


def _set(cfg: Config, key: str, value: Any, problems: list[str]) -> None:
    spec = FIELDS.get(key)
    if spec is None:
        problems.append(_unknown_key(key))
        return
    try:
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, check_type(value, spec.type, key))
    except ValueError as e:
        problems.append(str(e))


def _merge(cfg: Config, raw: Any, problems: list[str], origin: str) -> None:
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
            _set(cfg, f"{section}.{key}", value, problems)


def resolve_key(key: str) -> str | None:
    """'model.hidden_size' -> itself; a bare 'hidden_size' -> 'model.hidden_size' if it is unique."""
    if "." in key:
        return key if key.split(".")[0] in SECTIONS else None
    owners = [k for k in FIELDS if k.split(".")[1] == key]
    return owners[0] if len(owners) == 1 else None


def config_from_dict(raw: dict[str, Any], base: Config | None = None, origin: str = "config") -> Config:
    """Apply a nested {section: {key: value}} dict onto `base` (defaults if None)."""
    cfg = base if base is not None else Config()
    problems: list[str] = []
    _merge(cfg, raw, problems, origin)
    problems += validate(cfg)
    if problems:
        raise ConfigError(problems, origin)
    return cfg


def _recipes_dir() -> Path:
    return Path(str(resources.files("lstm_lm") / "configs"))


def recipe_path(name: str) -> Path | None:
    """The built-in recipe `name` (ptb-small, demo ...), shipped in lstm_lm/configs/, or None."""
    if not name.replace("-", "").replace("_", "").isalnum():
        return None
    path = _recipes_dir() / f"{name}.yaml"
    return path if path.is_file() else None


def recipes() -> list[str]:
    return sorted(p.stem for p in _recipes_dir().glob("*.yaml"))


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A recipe file, or a built-in recipe by name, as a dict."""
    path = Path(path)
    if not path.is_file():
        builtin = recipe_path(str(path)) if path.suffix == "" and len(path.parts) == 1 else None
        if builtin is None:
            raise ConfigError(
                [f"config file {path} does not exist (built-in recipes: {', '.join(recipes())})"], str(path)
            )
        path = builtin
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError([f"{path} is not valid YAML: {str(e).splitlines()[0]}"], str(path)) from None
    except OSError as e:
        raise ConfigError([f"cannot read {path}: {e.strerror}"], str(path)) from None
    return raw if raw is not None else {}


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | None = None,
    preset: dict[str, Any] | None = None,
    values: dict[str, Any] | None = None,
) -> Config:
    """Defaults < `preset` < YAML file (a path, or a built-in recipe's name) < `overrides`
    ("section.key=value" strings, or a unique "key=value", parsed by the field's type) <
    `values` ({"section.key": typed value}, e.g. a command line's typed options)."""
    cfg = Config()
    problems: list[str] = []
    if preset:
        _merge(cfg, preset, problems, "preset")
    origin = "command line"
    if path is not None:
        origin = str(path)
        _merge(cfg, read_yaml(path), problems, origin)
    for item in overrides or []:
        key, sep, text = item.partition("=")
        resolved = resolve_key(key.strip()) if sep else None
        if resolved is None:
            problems.append(
                f"--set {item!r}: expected section.key=value or a unique key=value (sections: {', '.join(SECTIONS)})"
            )
        elif resolved not in FIELDS:
            problems.append(_unknown_key(resolved))
        else:
            try:
                _set(cfg, resolved, parse_text(text, FIELDS[resolved]), problems)
            except ValueError as e:
                problems.append(str(e))
    for key, value in (values or {}).items():
        _set(cfg, key, value, problems)
    problems += validate(cfg)
    if problems:
        raise ConfigError(problems, origin)
    return cfg


def demo_config(overrides: list[str] | None = None, values: dict[str, Any] | None = None) -> Config:
    """The demo recipe (lstm_lm/configs/demo.yaml, its one source) with any changes."""
    return load_config(DEMO_RECIPE, overrides, values=values)


def reference_table() -> str:
    """The Markdown table of every field, for docs/reference.md (a test checks that they agree)."""
    rows = ["| field | type | default | allowed | what it does |", "|---|---|---|---|---|"]
    for key, spec in FIELDS.items():
        typ = spec.base_type
        name = "list of int" if typing.get_origin(typ) is list else typ.__name__
        allowed = (
            ", ".join(spec.choices)
            if spec.choices
            else describe_bounds(spec)
            if spec.bounds
            else "auto, cpu, cuda, cuda:N, mps"
            if spec.kind == "device"
            else ""
        )
        if spec.optional and not spec.bounds and not spec.choices:
            allowed = "or null"
        default = (
            "null"
            if spec.default is None
            else str(spec.default).lower()
            if isinstance(spec.default, bool)
            else spec.default
        )
        rows.append(f"| `{key}` | {name} | `{default}` | {allowed} | {spec.help.replace('|', '/')} |")
    return "\n".join(rows) + "\n"
