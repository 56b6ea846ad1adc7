"""How fast lstm-lm trains, evaluates and generates, side by side with a textbook baseline.

    .venv/bin/python scripts/bench_speed.py --quick --json bench.json     # < 3 min on a 2-core CPU
    .venv/bin/python scripts/bench_speed.py                               # every combination
    python scripts/bench_speed.py --quick --device cuda --json gpu.json   # on a GPU

Rows, all in one process on the same machine:
- baseline: the shape of PyTorch's classic word_language_model example (embedding ->
  nn.LSTM -> linear, log_softmax + NLLLoss in float32, plain SGD written as
  `p.data.add_(-lr * grad)`, `.item()` on every evaluation batch);
- lstm-lm's own training step (`lstm_lm.training.trainer.train_step`) and evaluation
  (`lstm_lm.evaluation.evaluate.evaluate`) for each impl x precision x compile;
- every other registered cell (GRU, RNN, CIFG, Mogrifier, ...: rows `IMPL/fp32/cell=NAME`)
  at the same size, with each engine it has; with `--baseline REV`, every cell also against
  the same cell in an earlier version (scripts/bench_cells.py).
Sizes are Penn Treebank's: 10k vocabulary, batch 20, bptt 35 (evaluation batch 10),
ptb-small 2x200, ptb-medium 2x650, ptb-large 2x1500 (GPU only by default).

The rows are timed in turns (a few steps of each row, then the next row, round after
round): tokens/s is a row's median over rounds, and its ratio to the baseline the
median of the per-round ratios, so a slow spell of a shared machine hits both sides
of a ratio alike. FLOP/s count the matrix products (3x the forward for a training
step) and are given as a share of the float32 / bf16 peak measured at the start.

Against the real thing: with ../shared/peer present, the upstream word_language_model
example runs unmodified as its own process (`python main.py --data PTB --tied
--log-interval N --save TMP`, CPU), in rounds interleaved with real `lstm-lm train`
runs of the same recipe (its defaults, and --compile), each for --peer-batches
batches. A run's tokens/s is the median of its log intervals after the first (the
peer's reported ms/batch; lstm-lm's steps.jsonl tokens_per_s, each interval's own),
so start-up, data loading and compilation are left out on both sides; a row's ratio
to the peer is the median of the per-round ratios. --no-peer skips it.

Also measured: batch-1 generation (tokens/s, ptb-small, model in memory; output layer
in fp32 and in bf16, which `complete` uses where `precision: auto` means bf16) and the wall
time of `lstm-lm complete` on the demo model from the shell (torch import included).
The table goes to stderr; --json writes one record per row.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lstm_lm import cells  # noqa: E402
from lstm_lm.config import ModelConfig  # noqa: E402
from lstm_lm.evaluation.evaluate import evaluate  # noqa: E402
from lstm_lm.inference.sample import generate  # noqa: E402
from lstm_lm.model import LSTMLanguageModel  # noqa: E402
from lstm_lm.training.trainer import compile_loss, train_step  # noqa: E402
from lstm_lm.utils import keep_freed_memory, native_bf16, pick_device, pick_precision  # noqa: E402

VOCAB, BATCH, BPTT, EVAL_BATCH = 10_000, 20, 35, 10
SIZES = {  # name: (layers, units, dropout), as in configs/ptb-*.yaml
    "small": (2, 200, 0.2),
    "medium": (2, 650, 0.5),
    "large": (2, 1500, 0.65),
}
SEED_PROMPT = "My name is John, I am from Tamilnadu and I speak"


def log(msg: str = "") -> None:
    print(msg, file=sys.stderr, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- peak


PEAK_SIZES = {"cpu": (256, 1024, 2048, 3072), "cuda": (1024, 4096, 8192)}  # the first, small, sets the pace


def matmul_peak(device: torch.device, dtype: torch.dtype, seconds: float) -> float:
    """FLOP/s of large square matrix products, the machine's practical peak: the best
    of short bursts at each of several sizes (a CPU's bf16 kernels reach their peak
    only past 1024, e.g. 1.84 TFLOP/s at 2048 against 1.24 at 1024 on a 2-core AMX
    Xeon), `seconds` per size. The first size is small, so that a dtype the hardware
    only emulates (bf16 on a CPU without bf16 instructions: about 1 GFLOP/s) is timed in
    a fraction of a second; a size whose one product would take longer than a quarter of
    the budget at the best rate so far is skipped, and so are the sizes after it."""
    best = 0.0
    for n in PEAK_SIZES["cuda" if device.type == "cuda" else "cpu"]:
        if best and 2 * n**3 / best > seconds / 4:
            break
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        a @ b  # warm-up
        sync(device)
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:  # best of short bursts: the machine's peak, not its average
            start, k = time.perf_counter(), 0
            while k < 3 or time.perf_counter() - start < 0.05:
                a @ b
                k += 1
            sync(device)
            best = max(best, 2 * n**3 * k / (time.perf_counter() - start))
    return best


# ----------------------------------------------------------------------- baseline


class TextbookLSTM(nn.Module):
    """The classic example's model: embedding -> dropout -> nn.LSTM -> dropout -> linear (tied)."""

    def __init__(self, layers: int, units: int, dropout: float):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(VOCAB, units)
        self.rnn = nn.LSTM(units, units, layers, dropout=dropout)
        self.decoder = nn.Linear(units, VOCAB)
        self.decoder.weight = self.encoder.weight
        nn.init.uniform_(self.encoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def forward(self, x, hidden):
        out, hidden = self.rnn(self.drop(self.encoder(x)), hidden)
        return F.log_softmax(self.decoder(self.drop(out)).view(-1, VOCAB), dim=1), hidden


# -------------------------------------------------------------------------- rows


@dataclass
class Row:
    size: str
    name: str  # "baseline" or "impl/precision[/compile]"
    impl: str
    precision: str
    compiled: bool
    train_step: object  # callable(i) -> None, one training step on chunk i
    eval_pass: object  # callable() -> tokens evaluated
    first_step_s: float = 0.0
    train_times: list | None = None
    eval_times: list | None = None


def paired_ratio(base_times: list[float], row_times: list[float]) -> float:
    """Median over rounds of baseline time / row time, each pair measured moments apart."""
    return statistics.median(b / r for b, r in zip(base_times, row_times))


def fwd_flops_per_token(layers: int, units: int, cell: str = "lstm") -> int:
    """The matrix products of one token's forward pass: 2 flops per weight of each layer's
    matrices (W_ih x and W_hh h; the Mogrifier's Q and R too), and the output projection."""
    shapes = cells.get(cell)(units, units).shapes()
    weights = sum(math.prod(shape) for name, shape in shapes.items() if not name.startswith("bias"))
    return layers * 2 * weights + 2 * units * VOCAB


def make_baseline(size: str, device: torch.device, data: torch.Tensor, eval_data: torch.Tensor) -> Row:
    layers, units, dropout = SIZES[size]
    torch.manual_seed(0)
    model = TextbookLSTM(layers, units, dropout).to(device)
    criterion, lr, clip = nn.NLLLoss(), 1.0, 0.25
    hidden = [None]

    def fresh_state(batch):
        return (torch.zeros(layers, batch, units, device=device), torch.zeros(layers, batch, units, device=device))

    def step(i: int) -> None:
        x, y = data[i * BPTT : (i + 1) * BPTT], data[i * BPTT + 1 : (i + 1) * BPTT + 1]
        model.train()
        h = hidden[0] or fresh_state(BATCH)
        h = tuple(t.detach() for t in h)
        model.zero_grad()
        out, h = model(x, h)
        loss = criterion(out, y.reshape(-1))
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), clip)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
        hidden[0] = h

    @torch.no_grad()
    def eval_pass() -> int:
        model.eval()
        h, total, n = fresh_state(EVAL_BATCH), 0.0, 0
        for i in range(0, eval_data.size(0) - 1, BPTT):
            x, y = eval_data[i : i + BPTT], eval_data[i + 1 : i + 1 + BPTT]
            out, h = model(x, h)
            total += len(x) * criterion(out, y.reshape(-1)).item()
            n += y.numel()
        return n

    return Row(size, "baseline", "nn.LSTM", "fp32", False, step, eval_pass)


def make_project_row(
    size: str,
    impl: str,
    precision: str,
    compiled: bool,
    variant: str,
    device: torch.device,
    data: torch.Tensor,
    eval_data: torch.Tensor,
) -> Row:
    layers, units, dropout = SIZES[size]
    torch.manual_seed(0)
    cell = variant.removeprefix("cell=") if variant.startswith("cell=") else "lstm"
    cfg = ModelConfig(
        cell=cell,
        impl=impl,
        embedding_size=units,
        hidden_size=units,
        num_layers=layers,
        dropout=dropout,
        tie_weights=True,
    )
    model = LSTMLanguageModel(cfg, VOCAB).to(device)
    if variant == "plain-loss":  # train.loss_impl=plain
        model.loss_impl = "plain"
    mode = "reduce-overhead" if variant == "cudagraphs" else "default"  # train.compile_mode
    loss_fn = compile_loss(model, mode) if compiled else None
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    hidden = [model.init_state(BATCH, device)]

    def step(i: int) -> None:
        x, y = data[i * BPTT : (i + 1) * BPTT], data[i * BPTT + 1 : (i + 1) * BPTT + 1]
        model.train()
        _, hidden[0] = train_step(model, optimizer, x, y, hidden[0], clip=0.25, precision=precision, loss_fn=loss_fn)

    def eval_pass() -> int:
        return evaluate(model, eval_data, BPTT, precision)["tokens"]

    return Row(size, row_name(impl, precision, compiled, variant), impl, precision, compiled, step, eval_pass)


def row_name(impl: str, precision: str, compiled: bool, variant: str = "") -> str:
    """e.g. cudnn/bf16, custom/fp32/compile, cudnn/bf16/plain-loss, cudnn/bf16/compile/cudagraphs,
    cudnn/fp32/cell=gru."""
    return "/".join([impl, precision] + (["compile"] if compiled else []) + ([variant] if variant else []))


def plan(size: str, quick: bool, only: list[str] | None, device: str = "cpu") -> list[tuple[str, str, bool, str]]:
    """The (impl, precision, compile, variant) combinations measured at this size. Variants:
    plain-loss (train.loss_impl=plain, against the default fused loss) and, on a GPU,
    cudagraphs (train.compile_mode=reduce-overhead)."""
    combos = [
        (impl, prec, comp, "") for impl in ("cudnn", "custom") for prec in ("fp32", "bf16") for comp in (False, True)
    ]
    combos += [("cudnn", prec, False, "plain-loss") for prec in ("fp32", "bf16")]
    if device == "cuda":
        combos += [("cudnn", prec, True, "cudagraphs") for prec in ("fp32", "bf16")]
    # Every other registered cell (lstm_lm/cells/) at the same sizes, in float32: each engine it has.
    combos += [
        (impl, "fp32", False, f"cell={name}")
        for name in cells.names()
        if name != "lstm"
        for impl in (("cudnn", "custom") if cells.get(name).kernel is not None else ("custom",))
    ]
    if only is not None:
        return [c for c in combos if row_name(*c) in only]
    if not quick:
        return combos
    # the engines in both precisions, the fastest setting, the loss paths, and the compile targets' rows
    keep = {c for c in combos if c[3].startswith("cell=") and (size == "small" or c[0] == "cudnn")}
    keep |= {
        ("cudnn", "fp32", False, ""),
        ("cudnn", "bf16", False, ""),
        ("custom", "fp32", False, ""),
        ("cudnn", "bf16", True, ""),
        ("cudnn", "bf16", False, "plain-loss"),
    }
    if size == "small":
        keep |= {("custom", "bf16", False, ""), ("custom", "fp32", True, "")}
    if device == "cuda":
        keep |= {
            ("cudnn", "fp32", False, "plain-loss"),
            ("cudnn", "bf16", True, "cudagraphs"),
            ("custom", "bf16", True, ""),
        }
    return [c for c in combos if c in keep]


def measured(size: str, quick: bool, only: list[str] | None, device: torch.device) -> list[tuple]:
    """plan()'s rows, less the bf16 ones where the hardware has no bf16 (unless named in --rows)."""
    combos = plan(size, quick, only, device.type)
    if not native_bf16(device) and only is None:
        # bf16 without bf16 instructions is emulated, tens of times slower: nothing to learn
        log("bf16 rows skipped: this device has no bf16 instructions (name them in --rows to measure them)")
        combos = [c for c in combos if c[1] != "bf16"]
    return combos


def make_rows(size: str, args, device: torch.device, train_chunks: int, eval_chunks: int, quick: bool) -> list[Row]:
    """The baseline and the measured rows, on seeded random tokens: `train_chunks` bptt
    chunks to train on and `eval_chunks` to evaluate."""
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, VOCAB, (train_chunks * BPTT + 1, BATCH), generator=g).to(device)
    eval_data = torch.randint(0, VOCAB, (eval_chunks * BPTT + 1, EVAL_BATCH), generator=g).to(device)
    rows = [make_baseline(size, device, data, eval_data)]
    return rows + [
        make_project_row(size, *c, device, data, eval_data) for c in measured(size, quick, args.rows, device)
    ]


def profile_rows(size: str, args, device: torch.device) -> list[dict]:
    """Where each row's training step and evaluation pass spend their time: torch.profiler's
    self time per op over `args.steps` of each (after the warm-up), the largest shares first."""
    from torch.profiler import ProfilerActivity, profile

    steps = args.steps
    rows = make_rows(size, args, device, steps + args.warmup, 1, quick=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    records = []
    phases = {"train": lambda row, i: row.train_step(i), "eval": lambda row, i: row.eval_pass()}
    for row, (phase, run) in itertools.product(rows, phases.items()):
        for i in range(args.warmup):
            run(row, i)
        sync(device)
        with profile(activities=activities) as prof:
            for i in range(steps):
                run(row, args.warmup + i)
            sync(device)
        ops = [e for e in prof.key_averages() if e.self_device_time_total or e.self_cpu_time_total]
        total = sum(getattr(e, key) for e in ops)
        ops.sort(key=lambda e: getattr(e, key), reverse=True)
        top = [
            {
                "op": e.key,
                "share": getattr(e, key) / total,
                "calls_per_step": e.count / steps,
                "ms_per_step": getattr(e, key) / 1e3 / steps,
            }
            for e in ops[:10]
        ]
        per_step = total / 1e3 / steps
        records.append({"size": f"ptb-{size}", "row": row.name, "phase": phase, "ms_per_step": per_step, "top": top})
        what = "training step" if phase == "train" else f"evaluation of {BPTT * EVAL_BATCH} tokens"
        log(f"\nptb-{size} {row.name}: {per_step:.1f} ms of self time per {what}, by op:")
        for t in top:
            log(f"  {100 * t['share']:5.1f}%  {t['ms_per_step']:7.2f} ms  {t['calls_per_step']:6.1f} calls  {t['op']}")
    return records


def run_size(size: str, args, device: torch.device) -> list[Row]:
    steps, rounds = args.steps, args.rounds
    rows = make_rows(size, args, device, steps * rounds + args.warmup, args.eval_chunks, args.quick)
    for row in list(rows):  # warm-up; the first step carries any compilation
        start = time.perf_counter()
        try:
            row.train_step(0)
            sync(device)
            row.first_step_s = time.perf_counter() - start
            for i in range(1, args.warmup):
                row.train_step(i)
            row.eval_pass()
            sync(device)
        except Exception as e:  # e.g. torch.compile without a working compiler: measure the rest
            if row.name == "baseline":
                raise
            log(f"{row.name}: skipped, it failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            rows.remove(row)
            continue
        row.train_times, row.eval_times = [], []
    chunk = args.warmup
    for _ in range(rounds):  # in turns: each round runs `steps` consecutive steps of every row
        for row in rows:
            sync(device)
            start = time.perf_counter()
            for i in range(steps):
                row.train_step(chunk + i)
            sync(device)
            row.train_times.append((time.perf_counter() - start) / steps)
        chunk += steps
    for _ in range(rounds):  # then evaluation passes, in turns too
        for row in rows:
            sync(device)
            start = time.perf_counter()
            row.eval_pass()
            sync(device)
            row.eval_times.append(time.perf_counter() - start)
    return rows


# ---------------------------------------------------------------- generation, CLI


def generation_speed(device: torch.device, tokens: int, bursts: int = 5) -> dict:
    """Batch-1 greedy generation with a ptb-small-sized model, after it is loaded, with
    the output layer in fp32 and in bf16: tokens/s, the median of `bursts` bursts taken
    in turns. (Both engines generate with the same cell code, so one model serves.)"""
    layers, units, _ = SIZES["small"]
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_size=units, hidden_size=units, num_layers=layers)
    model = LSTMLanguageModel(cfg, VOCAB).to(device)
    prompt = torch.randint(2, VOCAB, (20,)).tolist()
    streams = {prec: generate(model, prompt, precision=prec) for prec in ("fp32", "bf16")}
    times = {prec: [] for prec in streams}
    for stream in streams.values():
        list(itertools.islice(stream, 20))  # warm-up
    per_burst = max(1, tokens // bursts)
    for _ in range(bursts):
        for prec, stream in streams.items():
            start = time.perf_counter()
            list(itertools.islice(stream, per_burst))
            times[prec].append(time.perf_counter() - start)
    return {prec: per_burst / statistics.median(t) for prec, t in times.items()}


def complete_wall(checkpoint: Path | None, repeats: int) -> dict:
    """Wall time of `python -m lstm_lm complete` on the demo model, from process start to exit."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    with tempfile.TemporaryDirectory() as tmp:
        trained = None
        if checkpoint is None:
            checkpoint, start = Path(tmp) / "demo", time.perf_counter()
            log("training the demo model for the complete-wall measurement (lstm-lm train) ...")
            subprocess.run(
                [sys.executable, "-m", "lstm_lm", "train", "--out", str(checkpoint)],
                check=True,
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            trained = time.perf_counter() - start
        cmd = [sys.executable, "-m", "lstm_lm", "complete", SEED_PROMPT, "--checkpoint", str(checkpoint)]
        walls, text = [], ""
        for _ in range(repeats):
            start = time.perf_counter()
            run = subprocess.run(cmd, check=True, cwd=ROOT, env=env, capture_output=True, text=True)
            walls.append(time.perf_counter() - start)
            text = run.stdout.strip()
    return {"wall_s": statistics.median(walls), "runs": walls, "completion": text, "demo_train_s": trained}


# ------------------------------------------------------------------------ targets


# --------------------------------------------------------------------------- the peer

PEER_DIR = ROOT.parent / "shared" / "peer" / "word_language_model"
PTB_DIR = ROOT.parent / "shared" / "data" / "ptb"
# The upstream example's options for each recipe: ptb-small is its default model, tied;
# ptb-medium is Zaremba's medium model, untied as configs/ptb-medium.yaml is.
PEER_ARGS = {
    "small": ["--tied"],
    "medium": ["--emsize", "650", "--nhid", "650", "--dropout", "0.5"],
    "large": ["--emsize", "1500", "--nhid", "1500", "--dropout", "0.65"],
}
# `lstm-lm train` rows against the peer: the recipe's defaults (bf16 where the hardware
# has it), and compiled; on a GPU also float32 and the compiled hand-written cell.
TRAIN_ROWS = {"lstm-lm train": [], "lstm-lm train --compile": ["--compile"]}
GPU_TRAIN_ROWS = TRAIN_ROWS | {
    "lstm-lm train --precision fp32": ["--precision", "fp32"],
    "lstm-lm train --impl custom --compile": ["--impl", "custom", "--compile"],
}


def _interval_rates(values: list[float]) -> float:
    """The median tokens/s of a run's log intervals after the first (which carries the start)."""
    return statistics.median(values[1:] if len(values) > 1 else values)


def run_peer(size: str, batches: int, interval: int, tmp: Path, device: str = "cpu") -> list[float]:
    """The upstream example on PTB for `batches` batches: tokens/s of each log interval
    (`--accel` puts it on the GPU)."""
    cmd = [
        sys.executable,
        "-u",
        "main.py",
        "--data",
        str(PTB_DIR),
        *PEER_ARGS[size],
        "--epochs",
        "1",
        "--log-interval",
        str(interval),
        "--save",
        str(tmp / "peer.pt"),
        *(["--accel"] if device != "cpu" else []),
    ]
    proc = subprocess.Popen(cmd, cwd=PEER_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rates, lines = [], []
    try:
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"ms/batch\s+([\d.]+)", line)
            if m:
                rates.append(BATCH * BPTT / (float(m.group(1)) / 1000))
                if len(rates) * interval >= batches:
                    break
    finally:
        proc.kill()
        proc.wait()
    if not rates:
        raise RuntimeError("the peer printed no ms/batch line:\n" + "".join(lines[-20:]))
    return rates


def run_lstm_lm(
    size: str, extra: list[str], batches: int, interval: int, tmp: Path, device: str = "cpu"
) -> list[float]:
    """`lstm-lm train --config ptb-SIZE` on PTB for `batches` steps: steps.jsonl's tokens/s per interval."""
    out = tmp / "lstm-lm-run"
    cmd = [
        sys.executable,
        "-m",
        "lstm_lm",
        "train",
        "--config",
        f"ptb-{size}",
        "--data",
        str(PTB_DIR),
        "--out",
        str(out),
        "--overwrite",
        "--device",
        device,
        "--set",
        f"train.log_interval={interval}",
        *extra,
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    steps = out / "steps.jsonl"
    try:
        while proc.poll() is None:
            if steps.is_file() and len(steps.read_text().splitlines()) * interval >= batches:
                break
            time.sleep(0.5)
    finally:
        proc.kill()
        _, err = proc.communicate()
    rates = [json.loads(line)["tokens_per_s"] for line in steps.read_text().splitlines()] if steps.is_file() else []
    if not rates:
        raise RuntimeError(f"lstm-lm train wrote no steps.jsonl line:\n{err[-2000:]}")
    return rates


def peer_comparison(sizes: list[str], batches: int, interval: int, rounds: int, device: str = "cpu") -> list[dict]:
    """Each size: the peer and lstm-lm's train rows, in turns, `rounds` times; one record per row."""
    records = []
    for size in sizes:
        log(f"\nptb-{size} against the upstream example on {device}, {rounds} rounds of {batches} batches per run ...")
        runs = {"peer (pytorch/examples)": lambda tmp: run_peer(size, batches, interval, tmp, device)}
        runs |= {
            name: (lambda tmp, extra=extra: run_lstm_lm(size, extra, batches, interval, tmp, device))
            for name, extra in (TRAIN_ROWS if device == "cpu" else GPU_TRAIN_ROWS).items()
        }
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for r in range(rounds):
            for name, run in runs.items():
                with tempfile.TemporaryDirectory() as tmp:
                    rates[name].append(_interval_rates(run(Path(tmp))))
                log(f"  round {r + 1}: {name}: {rates[name][-1]:,.0f} tok/s")
        peer = rates["peer (pytorch/examples)"]
        log(f"ptb-{size}, real training runs, median tok/s of the log intervals after the first")
        log(f"{'row':<28}{'train tok/s':>12}{'x peer':>8}   per round")
        for name, values in rates.items():
            ratios = [v / p for v, p in zip(values, peer)]
            rec = {
                "size": f"ptb-{size}",
                "row": name,
                "tokens_per_s": statistics.median(values),
                "ratio_vs_peer": statistics.median(ratios),
                "rounds_tokens_per_s": [round(v) for v in values],
                "rounds_ratio_vs_peer": [round(x, 3) for x in ratios],
                "batches": batches,
                "interval": interval,
            }
            records.append(rec)
            log(
                f"{name:<28}{rec['tokens_per_s']:>12,.0f}{rec['ratio_vs_peer']:>8.2f}   "
                + ", ".join(f"{x:.2f}" for x in ratios)
            )
    return records


def check_targets(records: list[dict], extra: dict, device: torch.device) -> list[dict]:
    """The issue's speed targets, computed from this run's rows (those it measured)."""

    def tok_s(size: str, row: str) -> float | None:
        return next((r["tokens_per_s"] for r in records if r["size"] == size and r["row"] == row), None)

    out = []

    def target(name: str, value: float | None, op: str, threshold: float) -> None:
        if value is not None:
            out.append(
                {
                    "target": name,
                    "value": value,
                    "op": op,
                    "threshold": threshold,
                    "met": value >= threshold if op == ">=" else value < threshold,
                }
            )

    def lstm_rows(size: str) -> list[dict]:  # the targets are the LSTM's; the other cells' rows compare
        return [
            r
            for r in records
            if r["size"] == size and "ratio_vs_baseline" in r and r["row"] != "baseline" and "cell=" not in r["row"]
        ]

    if device.type == "cpu":
        if project := lstm_rows("ptb-small"):
            best = max(project, key=lambda r: r["eval_ratio_vs_baseline"])
            target(
                f"ptb-small evaluation: best setting ({best['row']}) vs the fp32 baseline",
                best["eval_ratio_vs_baseline"],
                ">=",
                2.0,
            )
        if native_bf16(device) and (project := [r for r in lstm_rows("ptb-medium") if r["precision"] == "bf16"]):
            best = max(project, key=lambda r: r["peak_share"])
            target(
                f"ptb-medium training: best bf16 row ({best['row']}), share of the bf16 peak",
                best["peak_share"],
                ">=",
                0.45,
            )
    # Real `lstm-lm train` runs against the upstream example, same machine, same run.
    for size, need_best, need_default in (("ptb-small", 3.0, 2.5), ("ptb-medium", 2.5, None)):
        mine = [r for r in records if r["size"] == size and "ratio_vs_peer" in r and r["row"].startswith("lstm-lm")]
        if mine:
            best = max(mine, key=lambda r: r["ratio_vs_peer"])
            target(
                f"{size}: best setting ({best['row']}) vs the upstream example", best["ratio_vs_peer"], ">=", need_best
            )
            default = next((r for r in mine if r["row"] == "lstm-lm train"), None)
            if need_default and default:
                target(
                    f"{size}: the recipe's defaults vs the upstream example",
                    default["ratio_vs_peer"],
                    ">=",
                    need_default,
                )
    fp32 = tok_s("ptb-small", "cudnn/fp32")
    for row, need in (("custom/fp32/compile", 0.9), ("custom/fp32", 0.7)):
        if fp32 and (mine := tok_s("ptb-small", row)):
            target(f"ptb-small: {row} vs cudnn/fp32", mine / fp32, ">=", need)
    if device.type == "cuda":
        slow = tok_s("ptb-medium", "custom/fp32")
        fast = tok_s("ptb-medium", "cudnn/bf16")
        if slow and fast:
            target("ptb-medium: cudnn/bf16 vs custom/fp32 (eager), same GPU", fast / slow, ">=", 20)
        for size in ("ptb-small", "ptb-medium", "ptb-large"):
            peer_rows = {r["row"]: r for r in records if r["size"] == size and "ratio_vs_peer" in r}
            for row, label in (("lstm-lm train", "cuDNN, bf16"), ("lstm-lm train --precision fp32", "cuDNN, fp32")):
                if row in peer_rows:
                    target(
                        f"{size}: {label} vs the upstream example, same GPU", peer_rows[row]["ratio_vs_peer"], ">=", 1.3
                    )
            custom, cudnn = peer_rows.get("lstm-lm train --impl custom --compile"), peer_rows.get("lstm-lm train")
            if custom and cudnn:
                target(
                    f"{size}: compiled hand-written cell vs cuDNN (lstm-lm train)",
                    custom["tokens_per_s"] / cudnn["tokens_per_s"],
                    ">=",
                    0.5,
                )
    if device.type == "cpu":
        gen = extra.get("generation_tokens_per_s", {})
        if gen:  # what `lstm-lm complete` does here by default: precision auto
            prec = pick_precision("auto", device)
            target(f"generation, batch 1, ptb-small, {prec} (tok/s)", gen[prec], ">=", 1000)
        if "complete" in extra:
            target("`lstm-lm complete` on the demo model (s wall)", extra["complete"]["wall_s"], "<", 3)
    return out


# --------------------------------------------------------------------------- main


def machine(device: torch.device) -> dict:
    info = {
        "torch": torch.__version__,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "native_bf16": native_bf16(device),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
    else:
        model = (
            next(
                (
                    line.split(":", 1)[1].strip()
                    for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")
                ),
                platform.processor(),
            )
            if Path("/proc/cpuinfo").exists()
            else platform.processor()
        )
        info["name"] = f"{model}, {os.cpu_count()} cores"
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="fewer rows and steps: under 3 minutes on a 2-core CPU")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--json", type=Path, help="write one JSON record per row to this file")
    p.add_argument("--sizes", help="comma-separated from small,medium,large (default small,medium; +large on CUDA)")
    p.add_argument(
        "--rows",
        help="comma-separated rows to measure besides the baseline, e.g. cudnn/bf16,custom/fp32/compile "
        "(default: all; with --quick a subset)",
    )
    p.add_argument("--steps", type=int, help="training steps per row per round")
    p.add_argument("--rounds", type=int, help="rounds of turns")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per row (the first carries compilation)")
    p.add_argument("--eval-chunks", type=int, default=4, help="bptt chunks per evaluation pass")
    p.add_argument("--gen-tokens", type=int, default=500, help="tokens for the generation measurement (0: skip)")
    p.add_argument(
        "--demo-checkpoint",
        type=Path,
        help="demo model for the complete-wall measurement (default: train one first, about 30 s)",
    )
    p.add_argument("--skip-complete", action="store_true", help="skip the `lstm-lm complete` wall measurement")
    p.add_argument("--no-peer", action="store_true", help="skip the runs against the upstream example (../shared/peer)")
    p.add_argument("--peer-batches", type=int, help="batches per run against the peer (default 300; 200 with --quick)")
    p.add_argument(
        "--peer-interval", type=int, default=100, help="log interval of those runs, in batches (default 100)"
    )
    p.add_argument("--peer-rounds", type=int, default=2, help="rounds of those runs (default 2)")
    p.add_argument(
        "--peak-seconds",
        type=float,
        help="seconds per matrix size for the peak (default 2; 1 with --quick)",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="instead of timing: profile --steps training steps and evaluation passes of the baseline and each row "
        "(default: the --quick rows) with torch.profiler and print each one's largest ops",
    )
    p.add_argument(
        "--baseline",
        metavar="REV",
        help="also time every cell against the same cell in git revision REV (scripts/bench_cells.py: "
        "alternating processes, this version and a worktree of REV)",
    )
    args = p.parse_args(argv)
    keep_freed_memory()  # as every lstm-lm process does; the baseline rows, in this process, share it
    device = pick_device(args.device)
    if args.sizes is None:
        args.sizes = "small,medium" + (",large" if device.type == "cuda" else "")
    sizes = args.sizes.split(",")
    args.rows = args.rows.split(",") if args.rows else None
    known = {row_name(*c) for c in plan("small", quick=False, only=None, device="cuda")}
    if args.rows and (unknown := [r for r in args.rows if r not in known]):
        p.error(f"unknown row(s) {unknown}; choose from {sorted(known)}")
    if unknown := [s for s in sizes if s not in SIZES]:
        p.error(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    if args.peak_seconds is not None and args.peak_seconds <= 0:
        p.error(f"--peak-seconds: above 0, got {args.peak_seconds:g}")
    args.steps = args.steps or (4 if args.quick else 6)
    args.rounds = args.rounds or (3 if args.quick else 5)
    started = time.perf_counter()

    info = machine(device)
    log(
        f"machine: {info['name']}; torch {info['torch']}, {info['threads']} threads, native bf16: {info['native_bf16']}"
    )
    if args.profile:
        records = [r for size in sizes for r in profile_rows(size, args, device)]
        if args.json:
            args.json.write_text("".join(json.dumps(r) + "\n" for r in records))
        return 0
    seconds = args.peak_seconds if args.peak_seconds is not None else (1.0 if args.quick else 2.0)
    peak = {"fp32": matmul_peak(device, torch.float32, seconds), "bf16": matmul_peak(device, torch.bfloat16, seconds)}
    log(
        f"matrix-product peak: fp32 {peak['fp32'] / 1e12:.3f} TFLOP/s, bf16 {peak['bf16'] / 1e12:.3f} TFLOP/s "
        f"({peak['bf16'] / peak['fp32']:.1f}x)"
    )

    records = []
    results = []
    for size in sizes:
        layers, units, _ = SIZES[size]
        log(f"\nptb-{size} ({layers}x{units}, vocab {VOCAB:,}, batch {BATCH}, bptt {BPTT}): measuring ...")
        results.append((size, run_size(size, args, device)))
    # The peak again, keeping the higher: a shared machine's slow spell at the start
    # would otherwise understate it and overstate every row's share of it.
    for dtype, key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        peak[key] = max(peak[key], matmul_peak(device, dtype, seconds))
    log(
        f"\nmatrix-product peak, the higher of two measurements: fp32 {peak['fp32'] / 1e12:.3f}, "
        f"bf16 {peak['bf16'] / 1e12:.3f} TFLOP/s"
    )
    for size, rows in results:
        layers, units, _ = SIZES[size]
        log(f"\nptb-{size} ({layers}x{units}, vocab {VOCAB:,}, batch {BATCH}, bptt {BPTT}, eval batch {EVAL_BATCH})")
        base = rows[0]
        eval_tokens = args.eval_chunks * BPTT * EVAL_BATCH
        log(
            f"{'row':<22}{'train tok/s':>12}{'x base':>8}{'eval tok/s':>12}{'x base':>8}"
            f"{'TFLOP/s':>9}{'% peak':>8}{'1st step s':>11}"
        )
        for row in rows:
            t, e = statistics.median(row.train_times), statistics.median(row.eval_times)
            cell = row.name.split("cell=")[1] if "cell=" in row.name else "lstm"
            flops = 3 * fwd_flops_per_token(layers, units, cell) * BATCH * BPTT / t
            rec = {
                "size": f"ptb-{size}",
                "row": row.name,
                "impl": row.impl,
                "precision": row.precision,
                "compile": row.compiled,
                "layers": layers,
                "units": units,
                "tokens_per_s": BATCH * BPTT / t,
                "ratio_vs_baseline": paired_ratio(base.train_times, row.train_times),
                "step_ms": 1000 * t,
                "step_ms_all": [round(1000 * x, 2) for x in row.train_times],
                "eval_tokens_per_s": eval_tokens / e,
                "eval_ratio_vs_baseline": paired_ratio(base.eval_times, row.eval_times),
                "tflops": flops / 1e12,
                "peak_share": flops / peak[row.precision],
                "first_step_s": row.first_step_s,
            }
            records.append(rec)
            log(
                f"{row.name:<22}{rec['tokens_per_s']:>12,.0f}{rec['ratio_vs_baseline']:>8.2f}"
                f"{rec['eval_tokens_per_s']:>12,.0f}{rec['eval_ratio_vs_baseline']:>8.2f}"
                f"{rec['tflops']:>9.3f}{100 * rec['peak_share']:>7.1f}%{row.first_step_s:>11.1f}"
            )

    extra = {}
    if args.gen_tokens > 0:
        gen = generation_speed(device, args.gen_tokens)
        extra["generation_tokens_per_s"] = gen
        log(
            "\ngeneration, batch 1, ptb-small model in memory, output layer in "
            + ", ".join(f"{k}: {v:,.0f} tok/s" for k, v in gen.items())
        )
        records += [
            {"size": "ptb-small", "row": f"generate/{k}", "precision": k, "tokens_per_s": v} for k, v in gen.items()
        ]
    if not args.skip_complete and device.type == "cpu":
        wall = complete_wall(args.demo_checkpoint, repeats=3)
        extra["complete"] = wall
        log(
            f"`lstm-lm complete` on the demo model: {wall['wall_s']:.2f} s wall (median of 3) -> {wall['completion']!r}"
        )
        records.append(
            {
                "size": "demo",
                "row": "complete-wall",
                "wall_s": wall["wall_s"],
                "runs_s": wall["runs"],
                "completion": wall["completion"],
            }
        )

    peer_ready = PEER_DIR.is_dir() and (PTB_DIR / "train.txt").is_file()
    if not args.no_peer and peer_ready:
        batches = args.peer_batches or (200 if args.quick else 300)
        quick_sizes = ["small"] if device.type == "cpu" else sizes  # a GPU runs every size in seconds
        records += peer_comparison(
            quick_sizes if args.quick else sizes, batches, args.peer_interval, args.peer_rounds, device.type
        )
    elif not args.no_peer:
        log(f"\nno runs against the upstream example: {PEER_DIR} or {PTB_DIR} is missing")

    targets = check_targets(records, extra, device)
    if targets:
        log("\ntargets:")
        for t in targets:
            mark = "met   " if t["met"] else "MISSED"
            log(f"  {mark} {t['target']}: {t['value']:.2f} (needs {t['op']} {t['threshold']})")

    if args.baseline:  # each cell against an earlier version of lstm-lm: no regression beyond noise
        log(f"\nevery cell against {args.baseline} (scripts/bench_cells.py) ...")
        command = [sys.executable, str(ROOT / "scripts" / "bench_cells.py"), "--baseline", args.baseline]
        log(subprocess.run(command, capture_output=True, text=True, check=True).stdout)

    total = time.perf_counter() - started
    log(f"\nbenchmark wall time {total:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps(
                {
                    "machine": info,
                    "peak_flops": peak,
                    "quick": args.quick,
                    "wall_s": total,
                    "rows": records,
                    "targets": targets,
                },
                indent=1,
            )
            + "\n"
        )
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
