"""Load test of `lstm-lm serve` on loopback: N concurrent clients, requests/s and p50/p99 latency per endpoint.

    python scripts/bench_serve.py --checkpoint runs/demo --checkpoint runs/ptb-small
    python scripts/bench_serve.py --checkpoint runs/demo --clients 8 --requests 10000 --endpoints next

Starts `lstm-lm serve --port 0` as its own process for each checkpoint, then for each
endpoint runs `--clients` client threads, each with one keep-alive HTTP/1.1
connection, sending requests back to back until `--requests` are done or `--seconds`
have passed (the bounds). Every answer is checked: a status other than 200 or a body
without the expected field counts as an error. The table goes to stdout, `--json`
writes the rows too. The clients run on the same machine as the server, so the
figures include their cost.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPTS = {  # a few prompts per model, cycled through
    "demo": [
        "My name is John, I am from Tamilnadu and I speak",
        "I am from Kerala and I speak",
        "My name is Maria, I am from France and I speak",
        "My name is",
    ],
    "ptb": ["the company said", "the stock market", "in new york", "the president of the"],
}
BODIES = {
    "next": lambda p: ("/v1/next", {"prompt": p, "k": 5}, "words"),
    "complete": lambda p: ("/v1/complete", {"prompt": p, "words": 10}, "completion"),
    "score": lambda p: ("/v1/score", {"texts": [p, p + " ."]}, "results"),
    "trace": lambda p: ("/v1/trace", {"prompt": p}, "gates"),
}


def start_server(checkpoint: str) -> tuple[subprocess.Popen, str, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "lstm_lm", "serve", "--checkpoint", checkpoint, "--port", "0"],
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stderr.readline()
    m = re.search(r"at http://([\d.]+):(\d+)", line)
    if not m:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stderr.read()}")
    return proc, m.group(1), int(m.group(2))


def run_endpoint(
    host: str, port: int, endpoint: str, prompts: list[str], clients: int, requests: int, seconds: float
) -> dict:
    latencies: list[float] = []
    errors = [0]
    sent = [0]
    lock = threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(i: int) -> None:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        j = i
        while time.perf_counter() < deadline:
            with lock:
                if sent[0] >= requests:
                    break
                sent[0] += 1
            path, body, field = BODIES[endpoint](prompts[j % len(prompts)])
            j += 1
            data = json.dumps(body).encode()
            start = time.perf_counter()
            try:
                conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = response.read()
                ok = response.status == 200 and field in json.loads(payload)
            except (OSError, http.client.HTTPException, ValueError):
                ok = False
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=30)
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                errors[0] += not ok
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies.sort()
    pick = lambda q: 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {
        "endpoint": f"/v1/{endpoint}",
        "clients": clients,
        "requests": len(latencies),
        "errors": errors[0],
        "seconds": round(wall, 2),
        "requests_per_s": round(len(latencies) / wall, 1),
        "p50_ms": round(pick(0.50), 2),
        "p99_ms": round(pick(0.99), 2),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", required=True, help="A checkpoint or run directory (repeatable).")
    ap.add_argument("--clients", type=int, default=8, help="Concurrent clients (default 8).")
    ap.add_argument("--requests", type=int, default=10_000, help="Requests per endpoint at most (default 10000).")
    ap.add_argument("--seconds", type=float, default=60.0, help="Seconds per endpoint at most (default 60).")
    ap.add_argument("--endpoints", default="next,complete,score,trace", help="Which endpoints, comma-separated.")
    ap.add_argument("--json", type=Path, help="Also write the rows to this file.")
    args = ap.parse_args()
    rows = []
    for checkpoint in args.checkpoint:
        proc, host, port = start_server(checkpoint)
        try:
            prompts = PROMPTS["ptb" if "ptb" in checkpoint else "demo"]
            for endpoint in args.endpoints.split(","):
                run_endpoint(host, port, endpoint, prompts, args.clients, 50, 10)  # warm-up
                row = {"checkpoint": checkpoint} | run_endpoint(
                    host, port, endpoint, prompts, args.clients, args.requests, args.seconds
                )
                rows.append(row)
                print(
                    f"{checkpoint:<22} {row['endpoint']:<13} {row['clients']:>3} clients {row['requests']:>6} requests "
                    f"{row['errors']:>3} errors {row['requests_per_s']:>8.1f} req/s  p50 {row['p50_ms']:>7.2f} ms  "
                    f"p99 {row['p99_ms']:>7.2f} ms",
                    flush=True,
                )
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
