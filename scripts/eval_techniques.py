"""Static, neural-cache and dynamic-evaluation perplexity of trained models, side by side.

    .venv/bin/python scripts/eval_techniques.py runs/ptb-cpu-30min runs/ptb-cpu-60min --json evaltime.json

For each checkpoint it runs, as a user would, one after the other:
    lstm-lm eval --checkpoint RUN --batch-size 1                      # static
    lstm-lm eval --checkpoint RUN --batch-size 1 --cache --tune       # fitted on valid, then test once
    lstm-lm eval --checkpoint RUN --dynamic --tune
and prints a Markdown table: each protocol's test perplexity, its gain over the static
number, the settings chosen on the valid split, the seconds the test split took (the
JSON's `seconds`) and the whole command's wall time (the search included). Progress goes
to stderr; --json keeps every command's JSON output.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = {
    "static": ["--batch-size", "1"],
    "neural cache": ["--batch-size", "1", "--cache", "--tune"],
    "dynamic evaluation": ["--dynamic", "--tune"],
}


def run_eval(checkpoint: Path, extra: list[str], split: str) -> tuple[dict, float]:
    cmd = [sys.executable, "-m", "lstm_lm", "eval", "--checkpoint", str(checkpoint), "--split", split, *extra]
    print("$ lstm-lm " + " ".join(cmd[3:]), file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"error: `lstm-lm eval` failed on {checkpoint} ({proc.returncode})")
    return json.loads(proc.stdout), wall


def settings_text(result: dict) -> str:
    s = result.get("settings")
    if not s:
        return "-"
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoints", nargs="+", type=Path, help="run or checkpoint directories")
    p.add_argument("--split", default="test", help="the split to score (default test)")
    p.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated, from: " + ", ".join(PROTOCOLS))
    p.add_argument("--json", type=Path, help="write every result here")
    args = p.parse_args(argv)
    protocols = args.protocols.split(",")
    if unknown := [x for x in protocols if x not in PROTOCOLS]:
        p.error(f"unknown protocol(s) {unknown}")
    for checkpoint in args.checkpoints:
        if not checkpoint.exists():
            p.error(f"no checkpoint at {checkpoint}")
    records = []
    for checkpoint in args.checkpoints:
        for protocol in protocols:
            result, wall = run_eval(checkpoint, PROTOCOLS[protocol], args.split)
            records.append({"checkpoint": str(checkpoint), "command_wall_s": round(wall, 1), **result})
    split = args.split
    print(f"| model | protocol | {split} ppl | gain | settings (fitted on valid) | {split} scored in | command wall |")
    print("|---|---|---|---|---|---|---|")
    for checkpoint in args.checkpoints:
        mine = [r for r in records if r["checkpoint"] == str(checkpoint)]
        static = next((r["perplexity"] for r in mine if r["protocol"] == "static"), None)
        for r in mine:
            gain = f"{100 * (1 - r['perplexity'] / static):.1f}%" if static and r["protocol"] != "static" else "-"
            print(
                f"| {checkpoint.name} | {r['protocol']} | {r['perplexity']:.2f} | {gain} | {settings_text(r)} | "
                f"{r['seconds']:.0f} s | {r['command_wall_s']:.0f} s |"
            )
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
