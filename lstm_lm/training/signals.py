"""Stopping a run cleanly: Ctrl-C or SIGTERM saves a resumable checkpoint first.

with StopSignals() as stop:
    while not stop.signum: ...   # train a step
"""

from __future__ import annotations

import signal
import threading
from typing import Any

from lstm_lm.utils import log


class StopSignals:
    """While active, a first SIGINT (Ctrl-C) or SIGTERM asks the run to stop after the
    current step and save; a second one quits at once (saved checkpoints stay whole)."""

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # Python allows handlers only there
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            raise SystemExit(128 + signum)
        self.signum = signum
        log(
            f"\n{signal.Signals(signum).name}: stopping after this step to save a checkpoint "
            "(press Ctrl-C again to quit at once)"
        )
