"""The evaluation protocols behind one interface: what `lstm-lm eval` and `LanguageModel.evaluate` read.

    protocol, settings = choose(cache=True, options={"--theta": 0.5})   # ("neural cache", NeuralCache(...))
    lm.evaluate("test", cache=settings)

Three protocols: static (the default), the neural cache (`--cache`, settings
NeuralCache) and dynamic evaluation (`--dynamic`, settings DynamicEval). Each setting
is declared once, as a field of its protocol's settings class made with `setting`: its
flag, help, default and bounds. From that declaration come the command line's options
and their help (`setting_flags`), the check of a value (`check_settings`, the same
message from the CLI and the API) and docs/reference.md. The rules across protocols
(one at a time, an option only with its protocol, --tune only where there is something
to fit, dynamic evaluation on one stream) are `exclusions`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field
from typing import Any

from lstm_lm.arguments import Arg
from lstm_lm.errors import ArgumentError, ConfigError

STATIC, CACHE, DYNAMIC = "static", "neural cache", "dynamic evaluation"
RULES = ("sgd", "rms")  # dynamic evaluation's update rules
DEFAULT_LR = {"rms": 2e-4, "sgd": 1.0}  # each rule's step size where none is given


def setting(
    default: Any,
    flag: str,
    help: str,
    *,
    ge: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: tuple[str, ...] | None = None,
):
    """A protocol's setting: its default, the option that sets it, its help and its bounds."""
    meta = {"flag": flag, "help": help, "ge": ge, "le": le, "lt": lt, "choices": choices}
    return field(default=default, metadata=meta)


def settings_fields(kind: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(kind) if "flag" in f.metadata]


def setting_arg(kind: type, f: dataclasses.Field) -> Arg:
    """The setting `f` of settings class `kind` as an argument (arguments.py): its checks and messages."""
    m = f.metadata
    typ = setting_type(kind, f.name)
    return Arg(
        f.name, m["flag"], typ, ge=m["ge"], le=m["le"], lt=m["lt"], optional=f.default is None, choices=m["choices"]
    )


def check_settings(obj: Any) -> None:
    """Every setting of `obj` valid and within its declared bounds; else the ArgumentError
    that `arguments.Arg.check` raises, naming the flag."""
    for f in settings_fields(type(obj)):
        setting_arg(type(obj), f).check(getattr(obj, f.name))


def setting_type(kind: type, name: str) -> type:
    """The setting's type, None left out: int, float or str."""
    hint = typing.get_type_hints(kind)[name]
    return next((t for t in typing.get_args(hint) if t is not type(None)), hint)


def setting_help(kind: type, name: str) -> str:
    """The option's help: the declaration's, with its default and bounds."""
    f = next(f for f in settings_fields(kind) if f.name == name)
    m, arg = f.metadata, setting_arg(kind, f)
    bounds = f"one of {', '.join(m['choices'])}" if m["choices"] else arg.bounds()
    default = "" if f.default is None else f"; default {f.default}"
    return f"{m['help']} [{bounds}{default}]"


@dataclass(frozen=True)
class NeuralCache:
    """The cache's settings: how many past positions it holds, how sharply it matches
    hidden states (theta) and how much of the mixture it gets (lam, "lambda")."""

    window: int = setting(2000, "--window", "Past positions the cache holds, per stream.", ge=1)
    theta: float = setting(0.3, "--theta", "How sharply the cache matches hidden states.", ge=0)
    lam: float = setting(0.1, "--lambda", "The cache's share of the mixture.", ge=0, le=1)

    def __post_init__(self):
        check_settings(self)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lambda"] = d.pop("lam")
        return d


@dataclass(frozen=True)
class DynamicEval:
    """Dynamic evaluation's settings: the step size, the pull back to the trained
    weights, the tokens per step and the update rule."""

    lr: float | None = setting(None, "--lr", "Step size (none given: 2e-4 for rms, 1.0 for sgd).", ge=0)
    decay: float = setting(0.0, "--decay", "Pull back towards the trained weights per step.", ge=0, lt=1)
    segment: int = setting(20, "--segment", "Tokens per step.", ge=1)
    rule: str = setting(
        "rms", "--rule", "Update rule: rms (steps scaled by the training text's gradient RMS) or sgd.", choices=RULES
    )

    def __post_init__(self):
        check_settings(self)
        if self.lr is None:  # the rule's own step size
            object.__setattr__(self, "lr", DEFAULT_LR[self.rule])

    def to_dict(self) -> dict:
        return asdict(self)


class Protocol(typing.NamedTuple):
    flag: str  # the option that picks it ("" for the default)
    settings: type | None  # its settings class
    help: str


def protocols() -> dict[str, Protocol]:
    """Each protocol by name, the static one (the default) first."""
    return {
        STATIC: Protocol("", None, "The model's own probabilities, read in bptt chunks with the state carried."),
        CACHE: Protocol(
            "--cache",
            NeuralCache,
            "Mix in the neural cache (Grave et al. 2017): the words that "
            "followed the most similar recent hidden states.",
        ),
        DYNAMIC: Protocol(
            "--dynamic",
            DynamicEval,
            "Dynamic evaluation (Krause et al. 2018): score each segment, "
            "then take a gradient step on it. One stream (batch 1).",
        ),
    }


def exclusions(cache: bool, dynamic: bool, tune: bool, given: dict[str, Any], batch_size: int | None) -> list[str]:
    """What the protocols do not allow together; `given` holds the setting flags given a value."""
    chosen = {CACHE: cache, DYNAMIC: dynamic}
    problems = []
    for protocol, (flag, kind, _) in protocols().items():
        if kind is None or chosen[protocol]:
            continue
        problems += [
            f"{f.metadata['flag']} needs {flag}"
            for f in settings_fields(kind)
            if given.get(f.metadata["flag"]) is not None
        ]
    if cache and dynamic:
        problems.append("--cache and --dynamic: measure one at a time")
    if tune and not (cache or dynamic):
        problems.append("--tune needs --cache or --dynamic (the static protocol has nothing to fit)")
    if dynamic and batch_size not in (None, 1):
        problems.append(
            f"--batch-size: dynamic evaluation reads one stream (batch 1), got {batch_size}: "
            "streams sharing the adapted weights would each learn from later text"
        )
    return problems


def choose(options: dict[str, Any], tune: bool = False, batch_size: int | None = None) -> tuple[str, Any]:
    """The protocol the options pick ({"--cache": True, "--theta": 0.5, ...}: the command
    line's) and its settings (the defaults where none is given); every problem together
    in one ConfigError."""
    cache, dynamic = bool(options.get("--cache")), bool(options.get("--dynamic"))
    problems = exclusions(cache, dynamic, tune, options, batch_size)
    if problems:
        raise ConfigError(problems, "command line")
    protocol = CACHE if cache else DYNAMIC if dynamic else STATIC
    kind = protocols()[protocol][1]
    if kind is None:
        return protocol, None
    given = {
        f.name: options[f.metadata["flag"]]
        for f in settings_fields(kind)
        if options.get(f.metadata["flag"]) is not None
    }
    try:
        return protocol, kind(**given)
    except ArgumentError as e:
        raise ConfigError([str(e)], "command line") from None
