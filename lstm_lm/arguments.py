"""The arguments of everything that uses a trained model, declared once.

    check("k", 3)             # 3
    check("k", 2.5)           # ArgumentError: k (--top-k): must be an integer, got 2.5
    check("temperature", float("nan"))   # ArgumentError: ... must be a finite number ...

The Python API (`LanguageModel`) checks its arguments here, so every command that
goes through it (complete, eval, score, inspect, serve) refuses the same values with
the same error class and message; the CLI shows the same bounds in its help, and the
server's request schema takes them from here too (with tighter caps of its own, which
bound the work and the size of one answer).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lstm_lm.errors import ArgumentError


@dataclass(frozen=True)
class Arg:
    """One argument: its API name, its CLI option, its type and bounds."""

    name: str
    flag: str
    type: type
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    optional: bool = False  # None allowed (the default applies)
    choices: tuple[str, ...] | None = None

    @property
    def label(self) -> str:
        return self.name if self.flag == self.name else f"{self.name} ({self.flag})"

    def bounds(self) -> str:
        """'at least 1', 'in (0, 1]' ..."""
        g = lambda v: str(v) if isinstance(v, int) else f"{v:g}"  # noqa: E731
        low = f"[{g(self.ge)}" if self.ge is not None else f"({g(self.gt)}" if self.gt is not None else None
        high = f"{g(self.le)}]" if self.le is not None else f"{g(self.lt)})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"at least {low[1:]}" if low[0] == "[" else f"above {low[1:]}"
        if high:
            return f"at most {high[:-1]}" if high[-1] == "]" else f"below {high[:-1]}"
        return "a finite number"

    def check(self, value: Any) -> Any:
        """`value` if it is valid (ints widen to float), else an ArgumentError that names the
        argument, its option, what it must be and what it got."""
        if value is None:
            if self.optional:
                return None
            raise ArgumentError(f"{self.label}: required, got None")
        shown = repr(value) if not isinstance(value, str) else repr(value[:40] + ("..." if len(value) > 40 else ""))
        if self.type is bool:
            if not isinstance(value, bool):
                raise ArgumentError(f"{self.label}: must be true or false, got {shown}")
            return value
        if self.type is str:
            if not isinstance(value, str):
                raise ArgumentError(f"{self.label}: must be a string, got {type(value).__name__} {shown[:60]}")
            if self.choices and value not in self.choices:
                raise ArgumentError(f"{self.label}: must be one of {', '.join(self.choices)}, got {shown}")
            return value
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (self.type is int and not isinstance(value, int))
        ):
            kind = "an integer" if self.type is int else "a number"
            raise ArgumentError(f"{self.label}: must be {kind}, got {type(value).__name__} {shown[:60]}")
        if not math.isfinite(value):
            raise ArgumentError(f"{self.label}: must be a finite number, got {value}")
        ok = (
            (self.ge is None or value >= self.ge)
            and (self.gt is None or value > self.gt)
            and (self.le is None or value <= self.le)
            and (self.lt is None or value < self.lt)
        )
        if not ok:
            raise ArgumentError(f"{self.label}: must be {self.bounds()}, got {value}")
        return float(value) if self.type is float else value


MAX_WORDS = 1000  # words of one completion
MAX_K = 1000  # next words listed

ARGS: dict[str, Arg] = {
    a.name: a
    for a in [
        Arg("prompt", "PROMPT", str),
        Arg("text", "text", str),
        Arg("k", "--top-k", int, ge=1, le=MAX_K),
        Arg("words", "--words", int, ge=1, le=MAX_WORDS),
        Arg("temperature", "--temperature", float, ge=0.0),
        Arg("top_k", "--top-k", int, ge=1, optional=True),
        Arg("top_p", "--top-p", float, gt=0.0, le=1.0, optional=True),
        Arg("seed", "--seed", int, ge=0, lt=2**63, optional=True),
        Arg("split", "--split", str, choices=("test", "valid")),
        Arg("batch_size", "--batch-size", int, ge=1, optional=True),
        Arg("data", "--data", str, optional=True),
        Arg("layer", "--layer", int, ge=1, optional=True),
        Arg("per_token", "--per-token", bool),
        Arg("progress", "progress", bool),
        Arg("segment", "--segment", int, ge=1),
        Arg("tokens", "tokens", int, ge=1, optional=True),
    ]
}


def check(name: str, value: Any) -> Any:
    """`value` if it is a valid `name` (ints widen to float), else an ArgumentError that
    names the argument, its option, what it must be and what it got."""
    return ARGS[name].check(value)


def check_all(**values: Any) -> None:
    """check() each keyword argument: check_all(split=split, batch_size=batch_size)."""
    for name, value in values.items():
        check(name, value)


def check_texts(texts: Any) -> list[str]:
    """A string or a list (or tuple) of strings, as a list."""
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)):
        raise ArgumentError(f"texts: must be a string or a list of strings, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ArgumentError(f"texts[{i}]: must be a string, got {type(t).__name__}")
    return list(texts)


def field(name: str, default: Any, description: str, **caps: float):
    """The pydantic Field of a request to the server: this argument's bounds, tightened by `caps`."""
    from pydantic import Field

    a = ARGS[name]
    bounds = {k: getattr(a, k) for k in ("ge", "gt", "le", "lt") if getattr(a, k) is not None}
    for k, v in caps.items():  # a cap replaces the table's bound where it is tighter
        bounds[k] = v if k not in bounds else (min(v, bounds[k]) if k in ("le", "lt") else max(v, bounds[k]))
    extra = {"allow_inf_nan": False} if a.type is float else {}
    return Field(default, description=description, **bounds, **extra)
