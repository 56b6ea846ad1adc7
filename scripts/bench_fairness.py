"""How long a light request waits behind a heavy one on `lstm-lm serve`.

    python scripts/bench_fairness.py --checkpoint runs/demo --rounds 10

Starts `lstm-lm serve --port 0` as its own process. Each round sends the heaviest
/v1/score the server takes (as many texts as fit its 20,000 tokens) on one connection, and 50 ms
later a /v1/next on another, and records the /v1/next's latency and the score's; a
round of /v1/next alone gives the baseline. Prints a table (stdout) of the medians
and maxima. The clients run on the same machine as the server.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench_serve import start_server  # noqa: E402

HEAVY_TEXT = " ".join(["My name is John, I am from Tamilnadu and I speak Tamil ."] * 2)  # 20 words
LIGHT = {"prompt": "My name is John, I am from Tamilnadu and I speak", "k": 5}


def post(host: str, port: int, path: str, body: dict, answer: list | None = None) -> float:
    conn = http.client.HTTPConnection(host, port, timeout=120)
    started = time.perf_counter()
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    data = response.read()
    if response.status != 200:
        raise SystemExit(f"{path}: HTTP {response.status} {data[:200]!r}")
    conn.close()
    if answer is not None:
        answer.append(json.loads(data))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/demo")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    proc, host, port = start_server(args.checkpoint)
    try:
        probe: list = []
        post(host, port, "/v1/score", {"texts": [HEAVY_TEXT]}, probe)
        per_text = probe[0]["results"][0]["tokens"]
        heavy = {"texts": [HEAVY_TEXT] * min(1000, 20_000 // per_text)}  # as many tokens as one request may hold
        post(host, port, "/v1/score", heavy)  # warm up
        alone = [post(host, port, "/v1/next", LIGHT) for _ in range(args.rounds)]
        behind, scores = [], []
        for _ in range(args.rounds):
            t = threading.Thread(target=lambda: scores.append(post(host, port, "/v1/score", heavy)))
            t.start()
            time.sleep(0.05)
            behind.append(post(host, port, "/v1/next", LIGHT))
            t.join()
    finally:
        proc.terminate()
        proc.wait()
    ms = lambda xs: f"{1000 * statistics.median(xs):.1f} ms (max {1000 * max(xs):.1f})"  # noqa: E731
    print("| request | latency, median (max) |")
    print("|---|---|")
    print(f"| /v1/next alone | {ms(alone)} |")
    tokens = len(heavy["texts"]) * per_text
    print(f"| /v1/next sent 50 ms into a /v1/score of {len(heavy['texts'])} texts, {tokens:,} tokens | {ms(behind)} |")
    print(f"| that /v1/score | {ms(scores)} |")


if __name__ == "__main__":
    main()
