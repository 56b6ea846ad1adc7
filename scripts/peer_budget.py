"""Run the upstream PyTorch word-language-model example for a wall-clock budget, as a
user would stop it: Ctrl-C (SIGINT) at the budget, after which it evaluates its best
model (the one with the lowest validation loss so far) on the test split.

    .venv/bin/python scripts/peer_budget.py --data ../shared/data/wikitext-2 --minutes 30
    .venv/bin/python scripts/peer_budget.py --data ../shared/data/ptb --minutes 30 -- --emsize 300 --nhid 300

Prints one JSON line on stdout: the budget, the epochs it finished, the validation
perplexity of its best epoch, its test perplexity, and the wall time of its training
and of the whole run (the test evaluation after the budget included). Its own log
goes to stderr. The example runs unmodified from ../shared/peer/word_language_model
(`main.py --data DIR --tied`, CPU, plus any options after `--`); it is never copied here.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEER = ROOT.parent / "shared" / "peer" / "word_language_model"
VALID = re.compile(r"end of epoch\s+(\d+).*valid ppl\s+([\d.]+)")
TEST = re.compile(r"End of training.*test ppl\s+([\d.]+)")


def run(data: Path, minutes: float, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-u", "main.py", "--data", str(data.resolve()), "--tied", "--save", f"{tmp}/peer.pt"]
        started = time.perf_counter()
        proc = subprocess.Popen(
            cmd + extra,
            cwd=PEER,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
            # A job started in the background (`cmd &`, nohup) inherits SIGINT ignored, and
            # Python then never turns Ctrl-C into KeyboardInterrupt: give the example the default.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        lines: list[str] = []

        def read() -> None:
            for line in proc.stdout:
                lines.append(line)
                print(line, end="", file=sys.stderr, flush=True)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            proc.wait(timeout=minutes * 60)
            stopped = None  # it finished its epochs within the budget
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)  # Ctrl-C: it stops training and tests its best model
            stopped = time.perf_counter() - started
            proc.wait()
        reader.join()
        ended = time.perf_counter() - started
    text = "".join(lines)
    epochs = [(int(e), float(v)) for e, v in VALID.findall(text)]
    test = TEST.findall(text)
    if not test:
        raise SystemExit(
            "error: the example reported no test perplexity (did it finish an epoch within the budget?)\n"
            + "".join(lines[-10:])
        )
    return {
        "peer": "pytorch/examples word_language_model main.py --tied " + " ".join(extra),
        "data": str(data),
        "budget_min": minutes,
        "epochs": len(epochs),
        "best_valid_ppl": min((v for _, v in epochs), default=None),
        "test_ppl": float(test[-1]),
        "training_s": round(stopped if stopped is not None else ended, 1),
        "wall_s": round(ended, 1),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True, help="a folder with train.txt, valid.txt and test.txt")
    p.add_argument("--minutes", type=float, required=True, help="the wall-clock budget of its training")
    p.add_argument("extra", nargs="*", help="further options of main.py, after --")
    args = p.parse_args(argv)
    if not all((args.data / f"{split}.txt").is_file() for split in ("train", "valid", "test")):
        print(f"error: {args.data} needs train.txt, valid.txt and test.txt", file=sys.stderr)
        return 1
    if not (PEER / "main.py").is_file():
        print(f"error: no upstream example at {PEER}", file=sys.stderr)
        return 1
    print(json.dumps(run(args.data, args.minutes, args.extra)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
