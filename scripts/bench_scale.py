"""Scale: preparing corpora of 1M to 100M tokens, and the full against the adaptive softmax.

    .venv/bin/python scripts/bench_scale.py --quick --json scale.json   # under 5 minutes on a 2-core CPU
    .venv/bin/python scripts/bench_scale.py --json scale.json           # with the 100M-token corpus too

Data rows. For each corpus size (1M, 10M and 100M tokens; --quick leaves 100M out), a
generated Zipfian corpus of 250,000 words (scripts/make_corpus.py, written once into
--work and kept) is prepared as `lstm-lm train` prepares it: in a fresh process,
`load_corpus` and the first training batch, first with an empty token cache (cold:
counting, tokenizing and writing the id files) and then again with that cache (warm).
Each row gives the process's wall time (interpreter and imports included) and its peak
memory (VmHWM), and the cold seconds per million tokens, which show whether the
cost grows linearly with the corpus. Below 100M a third row prepares the corpus cold
again with its words counted and encoded by `tokenizers` instead of in Python (the
path every tokenizer but the plain word one takes), for comparison.

Softmax rows. For vocabularies of 10k, 50k and 250k words, a 2x256 tied LSTM (batch
20, bptt 35, plain SGD, clip 0.25, precision auto, eager) with the full and with the
adaptive softmax (default cutoffs: 1/12 and 1/4 of the vocabulary) is timed in this
process on token ids drawn from the same Zipfian law: --steps steps of
`lstm_lm.training.trainer.train_step` (after 2 untimed ones) and one `lstm_lm.evaluation.evaluate.evaluate`
pass over 7,000 tokens, the two models taking turns for --rounds rounds. A row's
tokens/s is its median over rounds, and the adaptive row's ratio the median of the
per-round ratios, so a slow spell of a shared machine falls on both sides. Without
--quick, a real `lstm-lm train` of the adaptive model on the 100M-token corpus (a few
steps, the token cache warm) reports how long after its launch the first training step
is logged and the peak memory of training at that scale.

The table goes to stderr, --json writes every record.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]  # lstm_lm and make_corpus, from any directory
SIZES = {"1M": 1_000_000, "10M": 10_000_000, "100M": 100_000_000}
VOCABS = {"10k": 10_000, "50k": 50_000, "250k": 250_000}
DATA_VOCAB = 250_000
EVAL_TOKENS = 7_000  # per evaluation pass of the softmax and recipe rows
# The WikiText recipes (configs/NAME.yaml): the dataset's vocabulary and train tokens.
RECIPES = {"wikitext-2": (33_278, 2_088_628), "wikitext-103": (267_735, 103_227_021)}
# The softmax rows' model: a 2x256 tied LSTM, eager, plain SGD, as `--set` overrides.
MODEL = [
    "model.embedding_size=256",
    "model.hidden_size=256",
    "model.num_layers=2",
    "model.dropout=0.2",
    "train.batch_size=20",
    "train.bptt=35",
    "train.optimizer=sgd",
    "train.lr=20",
    "train.clip=0.25",
    "train.eval_batch_size=10",
    "train.precision=auto",
]
# The peak memory of the process that runs this, in KB: the high-water mark of its own
# memory since it began (/proc/self/status's VmHWM). Not ru_maxrss, which on Linux also
# counts the RSS of the parent that started it (a child made with vfork inherits its
# parent's mark): this script itself holds models of gigabytes by the time it starts
# the training run.
PEAK_KB = """\
def peak_kb():
    import resource
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""
# Runs a command of lstm-lm's CLI in this process, then prints the process's peak memory.
CLI_WITH_PEAK = (
    PEAK_KB
    + """\
import runpy, sys
sys.argv = ["lstm-lm", *sys.argv[1:]]
try:
    runpy.run_module("lstm_lm", run_name="__main__")
    code = 0
except SystemExit as e:
    code = e.code
print(f"peak_rss_kb {peak_kb()}", file=sys.stderr)
sys.exit(code)
"""
)
# Prepares a corpus as training does, to its first batch, and reports what it found.
PREPARE = (
    PEAK_KB
    + """\
import json, sys
from lstm_lm import data
from lstm_lm.config import DataConfig
from lstm_lm.data import Streams, get_batch, load_corpus
data.PLAIN_WORDS_IN_PYTHON = sys.argv[3] == "python"
corpus = load_corpus(DataConfig(source=sys.argv[1], cache_dir=sys.argv[2]))
x, y = get_batch(Streams(corpus.splits["train"], 20), 0, 35)
print(json.dumps({"train_tokens": len(corpus.splits["train"]), "vocab": corpus.vocab_size,
                  "peak_rss_mb": peak_kb() / 1024}))
"""
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def corpus(work: Path, tokens: int, vocab: int) -> Path:
    """The generated corpus of this size, made once."""
    out = work / f"zipf-{tokens}-{vocab}"
    if not (out / "test.txt").is_file():
        log(f"generating {out.name} ...")
        subprocess.run(
            [
                sys.executable,
                str(ROOT / "scripts" / "make_corpus.py"),
                str(out),
                "--tokens",
                str(tokens),
                "--vocab",
                str(vocab),
            ],
            check=True,
        )
    return out


def prepare(data: Path, cache: Path, words_in: str = "python") -> dict:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", PREPARE, str(data), str(cache), words_in], cwd=ROOT, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"error: preparing {data} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout) | {"seconds": round(wall, 2)}


def data_rows(work: Path, sizes: list[str]) -> list[dict]:
    """Cold then warm; below 100M also cold with the words counted and encoded by
    `tokenizers` rather than in Python (data.PLAIN_WORDS_IN_PYTHON), the path the
    other tokenizers take."""
    rows = []
    for name in sizes:
        data = corpus(work, SIZES[name], DATA_VOCAB)
        cache = work / f"cache-{name}"
        runs = [("cold", "python"), ("warm", "python")] + ([("cold", "tokenizers")] if name != "100M" else [])
        for kind, words_in in runs:
            if kind == "cold":
                shutil.rmtree(cache, ignore_errors=True)
            r = prepare(data, cache, words_in) | {
                "kind": "data",
                "size": name,
                "tokens": SIZES[name],
                "cache": kind,
                "words_in": words_in,
            }
            r["seconds_per_million"] = round(r["seconds"] / (SIZES[name] / 1e6), 3)
            log(f"  {name} {kind}, words in {words_in}: {r['seconds']:.1f} s, peak {r['peak_rss_mb']:.0f} MB")
            rows.append(r)
    return rows


def cli(
    args: list[str], cache: Path, first_line_of: Path | None = None
) -> tuple[subprocess.CompletedProcess, float, float | None]:
    """`lstm-lm ARGS` in a fresh process with its own token cache: the finished process,
    its peak RSS in MB and, with `first_line_of`, how many seconds after the launch that
    file had its first line (polled every 20 ms)."""
    env = os.environ | {"LSTM_LM_CACHE": str(cache)}
    started, first = time.perf_counter(), None
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:  # pipes could fill and block it
        popen = subprocess.Popen(
            [sys.executable, "-c", CLI_WITH_PEAK, *args], cwd=ROOT, env=env, stdout=out, stderr=err, text=True
        )
        while first_line_of is not None and first is None and popen.poll() is None:
            if first_line_of.is_file() and first_line_of.read_text().count("\n") >= 1:
                first = time.perf_counter() - started
            time.sleep(0.02)
        popen.wait()
        out.seek(0), err.seek(0)
        proc = subprocess.CompletedProcess(popen.args, popen.returncode, out.read(), err.read())
    if proc.returncode != 0:
        raise SystemExit(f"error: lstm-lm {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    peak = re.search(r"peak_rss_kb (\d+)", proc.stderr)
    return proc, int(peak.group(1)) / 1024 if peak else float("nan"), first


def softmax_rows(vocabs: list[str], steps: int, rounds: int, device: str) -> list[dict]:
    """Training and evaluation tokens/s of the full and the adaptive softmax, in this process."""
    import torch

    from lstm_lm.config import load_config
    from lstm_lm.model import LSTMLanguageModel
    from lstm_lm.training.optim import make_optimizer
    from lstm_lm.utils import keep_freed_memory, pick_device, pick_precision

    keep_freed_memory()
    cfg = load_config(None, MODEL)
    t = cfg.train
    dev = pick_device(device)
    precision = pick_precision(t.precision, dev)
    rng, rows = np.random.default_rng(0), []
    for name in vocabs:
        V = VOCABS[name]
        train, valid = zipf_streams(V, steps, t, dev, rng)
        models = {}
        for softmax in ("full", "adaptive"):
            torch.manual_seed(t.seed)
            cfg.model.softmax = softmax
            model = LSTMLanguageModel(cfg.model, V).to(dev)
            models[softmax] = (model, make_optimizer(cfg, model))
        speeds: dict[str, dict[str, list[float]]] = {s: {"train": [], "eval": []} for s in models}
        for r in range(rounds):
            for softmax in ("full", "adaptive") if r % 2 == 0 else ("adaptive", "full"):
                model, opt = models[softmax]
                speeds[softmax]["train"].append(training_speed(model, opt, train, t, precision, steps))
                speeds[softmax]["eval"].append(evaluation_speed(model, valid, t, precision))
                log(
                    f"  {name} words, {softmax} softmax, round {r + 1}: train {speeds[softmax]['train'][-1]:,.0f} "
                    f"tokens/s, eval {speeds[softmax]['eval'][-1]:,.0f} tokens/s"
                )
        for what in ("train", "eval"):
            ratios = [a / f for a, f in zip(speeds["adaptive"][what], speeds["full"][what])]
            for softmax, (model, _) in models.items():
                rows.append(
                    {
                        "kind": "softmax",
                        "vocab": name,
                        "what": what,
                        "softmax": softmax,
                        "tokens_per_s": statistics.median(speeds[softmax][what]),
                        "parameters": model.num_parameters(),
                        "ratio_to_full": statistics.median(ratios) if softmax == "adaptive" else 1.0,
                        "rounds": [round(v) for v in speeds[softmax][what]],
                    }
                )
        del models
    return rows


def recipe_rows(names: list[str], steps: int, device: str) -> list[dict]:
    """Each WikiText recipe as its config file gives it (model, optimizer, batch, bptt,
    precision, torch.compile), trained on Zipfian ids over the dataset's vocabulary in
    this process: tokens/s over `steps` steps after the untimed warm-up ones (which take
    the compilation), one evaluation pass, and what one epoch of the dataset's train
    split takes at that rate."""
    import torch

    from lstm_lm.config import load_config
    from lstm_lm.model import LSTMLanguageModel
    from lstm_lm.training.optim import make_optimizer
    from lstm_lm.training.trainer import compile_loss
    from lstm_lm.utils import pick_device, pick_precision

    rng, rows = np.random.default_rng(0), []
    for name in names:
        V, epoch_tokens = RECIPES[name]
        cfg = load_config(name)
        t = cfg.train
        dev = pick_device(device)
        precision = pick_precision(t.precision, dev)
        train, valid = zipf_streams(V, steps, t, dev, rng)
        torch.manual_seed(t.seed)
        model = LSTMLanguageModel(cfg.model, V).to(dev)
        opt = make_optimizer(cfg, model)
        loss_fn = compile_loss(model, t.compile_mode) if t.compile else None
        log(f"  {name}: {model.num_parameters():,} parameters, {precision}{', compiled' if t.compile else ''} ...")
        train_rate = training_speed(model, opt, train, t, precision, steps, loss_fn)
        eval_rate = evaluation_speed(model, valid, t, precision)
        hours = epoch_tokens / train_rate / 3600
        log(
            f"  {name}: train {train_rate:,.0f} tokens/s, eval {eval_rate:,.0f} tokens/s: an epoch of "
            f"{epoch_tokens:,} tokens takes {hours:.2f} h"
        )
        rows.append(
            {
                "kind": "recipe",
                "recipe": name,
                "device": str(dev),
                "vocab": V,
                "precision": precision,
                "compile": t.compile,
                "parameters": model.num_parameters(),
                "train_tokens_per_s": round(train_rate),
                "eval_tokens_per_s": round(eval_rate),
                "epoch_tokens": epoch_tokens,
                "epoch_hours": round(hours, 3),
            }
        )
        del model, opt, loss_fn
    return rows


WARMUP = 2  # untimed training steps before the timed ones (the first compiles, where compiling)


def zipf_streams(vocab: int, steps: int, t, device, rng: np.random.Generator):
    """Training streams for WARMUP + `steps` steps and validation streams of EVAL_TOKENS,
    token ids drawn from the Zipf-Mandelbrot law of scripts/make_corpus.py."""
    from make_corpus import zipf_probabilities

    from lstm_lm.data import Streams

    cdf = np.cumsum(zipf_probabilities(vocab))

    def draw(n: int) -> np.ndarray:
        return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), vocab - 1)

    return (
        Streams(draw((WARMUP + steps) * t.batch_size * t.bptt + t.batch_size), t.batch_size, device),
        Streams(draw(EVAL_TOKENS + t.eval_batch_size), t.eval_batch_size, device),
    )


def training_speed(model, opt, train, t, precision: str, steps: int, loss_fn=None) -> float:
    """Tokens/s of `steps` steps of lstm_lm.training.trainer.train_step after WARMUP untimed ones."""
    from lstm_lm.data import get_batch
    from lstm_lm.training.trainer import train_step

    model.train()
    hidden = model.init_state(t.batch_size)
    for i in range(WARMUP + steps):
        if i == WARMUP:
            started = _now(train.device)
        x, y = get_batch(train, i * t.bptt, t.bptt)
        _, hidden = train_step(model, opt, x, y, hidden, t.clip, precision, loss_fn=loss_fn)
    return steps * t.batch_size * t.bptt / (_now(train.device) - started)


def evaluation_speed(model, valid, t, precision: str) -> float:
    """Tokens/s of one lstm_lm.evaluation.evaluate.evaluate pass."""
    from lstm_lm.evaluation.evaluate import evaluate

    started = _now(valid.device)
    n = evaluate(model, valid, t.bptt, precision)["tokens"]
    return n / (_now(valid.device) - started)


def _now(device) -> float:
    """The time, once the device has finished what it was given."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)
    return time.perf_counter()


def train_memory_row(work: Path, steps: int) -> dict:
    """A real `lstm-lm train` of the adaptive model on the 100M-token corpus, its token
    cache warm (the data rows' cache): how long after the launch its first training step
    was logged, and its peak memory."""
    data = corpus(work, SIZES["100M"], DATA_VOCAB)
    run = work / "runs" / "100M-adaptive"
    shutil.rmtree(run, ignore_errors=True)
    args = ["train", "--data", str(data), "--out", str(run)]
    for item in [
        *MODEL,
        "train.device=cpu",
        "model.softmax=adaptive",
        f"train.max_steps={steps}",
        "train.log_interval=1",
    ]:
        args += ["--set", item]
    cache = work / "cache-100M"
    if not cache.is_dir():
        prepare(data, cache)
    proc, peak, first_step = cli(args, cache, first_line_of=run / "steps.jsonl")
    params = int(re.search(r"([\d,]+) parameters", proc.stderr).group(1).replace(",", ""))
    model_mb = params * 4 * 2 / 2**20  # float32 weights and their gradients (plain SGD keeps nothing more)
    log(
        f"  100M adaptive training: first step logged {first_step:.1f} s after the launch; peak {peak:,.0f} MB, "
        f"of which the model's weights and gradients {model_mb:,.0f} MB"
    )
    return {
        "kind": "train-memory",
        "size": "100M",
        "vocab": "250k",
        "first_step_s": round(first_step, 2),
        "peak_rss_mb": round(peak),
        "model_mb": round(model_mb),
        "peak_minus_model_mb": round(peak - model_mb),
        "parameters": params,
    }


def print_table(records: list[dict]) -> None:
    _table(
        ["corpus", "cache", "words counted and encoded by", "wall", "per 1M tokens", "peak memory"],
        [
            [
                f"{r['size']} tokens, {r['vocab']:,} words",
                r["cache"],
                r["words_in"],
                f"{r['seconds']:.1f} s",
                f"{r['seconds_per_million']:.2f} s",
                f"{r['peak_rss_mb']:,.0f} MB",
            ]
            for r in records
            if r["kind"] == "data"
        ],
    )
    soft = {(r["vocab"], r["softmax"], r["what"]): r for r in records if r["kind"] == "softmax"}
    rows = []
    for vocab in dict.fromkeys(v for v, _, _ in soft):
        for softmax in ("full", "adaptive"):
            t, e = soft[vocab, softmax, "train"], soft[vocab, softmax, "eval"]
            rows.append(
                [
                    vocab,
                    softmax,
                    f"{t['tokens_per_s']:,.0f}",
                    f"{e['tokens_per_s']:,.0f}",
                    f"{t['ratio_to_full']:.2f}x",
                    f"{e['ratio_to_full']:.2f}x",
                ]
            )
    _table(["vocabulary", "softmax", "train tokens/s", "eval tokens/s", "train ratio", "eval ratio"], rows)
    _table(
        ["recipe", "device", "vocabulary", "train tokens/s", "eval tokens/s", "one epoch"],
        [
            [
                r["recipe"],
                f"{r['device']}, {r['precision']}{', compiled' if r['compile'] else ''}",
                f"{r['vocab']:,}",
                f"{r['train_tokens_per_s']:,}",
                f"{r['eval_tokens_per_s']:,}",
                f"{r['epoch_tokens'] / 1e6:.1f}M tokens: {r['epoch_hours']:.2f} h",
            ]
            for r in records
            if r["kind"] == "recipe"
        ],
    )
    for r in records:
        if r["kind"] == "train-memory":
            log(
                f"\ntraining on 100M tokens (adaptive, 250k words), warm cache: first step {r['first_step_s']:.1f} s "
                f"after the launch; peak {r['peak_rss_mb']:,.0f} MB, {r['peak_minus_model_mb']:,} MB beyond the "
                f"model's weights and gradients ({r['model_mb']:,} MB)"
            )


def _table(header: list[str], rows: list[list[str]]) -> None:
    """A markdown table on stderr, after a blank line; nothing when there are no rows."""
    if rows:
        log("\n| " + " | ".join(header) + " |")
        log("|" + "---|" * len(header))
        for row in rows:
            log("| " + " | ".join(row) + " |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="1M and 10M tokens only, one round: under 5 minutes")
    p.add_argument(
        "--work",
        type=Path,
        default=Path("/tmp/lstm-lm-bench-scale"),
        help="where the generated corpora (kept between runs), caches and runs go",
    )
    p.add_argument("--sizes", help="comma-separated from 1M,10M,100M, or none (default all; --quick 1M,10M)")
    p.add_argument("--device", default="cpu", help="where the softmax rows run: cpu, cuda or auto (default cpu)")
    p.add_argument("--vocabs", help="comma-separated from 10k,50k,250k (default all)")
    p.add_argument("--steps", type=int, help="timed training steps per softmax row per round (default 20; --quick 8)")
    p.add_argument(
        "--rounds", type=int, help="rounds of the full and adaptive rows, interleaved (default 3; --quick 2)"
    )
    p.add_argument(
        "--recipes", help="comma-separated from wikitext-2,wikitext-103, or none (default both; --quick none)"
    )
    p.add_argument("--json", type=Path, help="write every record here")
    args = p.parse_args(argv)
    sizes = (args.sizes or ("1M,10M" if args.quick else "1M,10M,100M")).split(",")
    sizes = [] if sizes == ["none"] else sizes
    vocabs = (args.vocabs or ",".join(VOCABS)).split(",")
    recipes = (args.recipes or ("none" if args.quick else ",".join(RECIPES))).split(",")
    recipes = [] if recipes == ["none"] else recipes
    if (
        bad := [s for s in sizes if s not in SIZES]
        + [v for v in vocabs if v not in VOCABS]
        + [r for r in recipes if r not in RECIPES]
    ):
        p.error(f"unknown size, vocabulary or recipe {bad}")
    steps, rounds = args.steps or (8 if args.quick else 20), args.rounds or (2 if args.quick else 3)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    log(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; work dir {args.work}")
    log("preparing corpora (cold, then warm cache):")
    records = data_rows(args.work, sizes)
    log("full against adaptive softmax:")
    records += softmax_rows(vocabs, steps, rounds, args.device)
    if recipes:
        log("the WikiText recipes as their configs give them:")
        records += recipe_rows(recipes, max(2, steps // 4), args.device)
    if "100M" in sizes:
        log("training memory at 100M tokens:")
        records.append(train_memory_row(args.work, steps))
    print_table(records)
    log(f"\n{time.perf_counter() - started:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
