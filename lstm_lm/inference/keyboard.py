"""A keyboard's predictor without Python: the one-step ONNX graph, its int8 form, the
static web folder of `lstm-lm export --format web`, and what a suggestion costs.

    export_step(lm, Path("step.onnx"), int8=True)     # one token in, scores out, state carried
    export_web(lm, Path("site"))                      # index.html, model.onnx, vocab.json, ort/
    latency(lm, texts, k=3)                           # ms per suggestion: PyTorch, ONNX fp32, ONNX int8

The step graph (inputs `input_ids` (B,) int64 and the state, per layer `h{k}` (and
`c{k}`), (B, size) float32; outputs `scores` (B, V) and `h{k}_out` ...) is the model's
`step_hidden` and `scores`, traced: the textbook cell of every kind, with no loop over
time, so that a page pays one step per word it reads.

Its int8 form stores each weight matrix as int8 with a float32 scale per 16 entries of
a row and turns it back into float32 in the graph (Cast, Reshape, Mul on constants):
about a quarter of the bytes, and a tied embedding and output layer stay one matrix.
onnxruntime folds those nodes into float32 weights when it loads the file, so the arithmetic is
float32: int8 weights, not int8 products (at batch 1 the products are not what a step
waits for). Not ONNX's DequantizeLinear: onnxruntime reads DequantizeLinear before a
MatMul or Gemm as a quantized product and quantizes the activations too, which moved
the suggestions far more than the int8 weights do.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from lstm_lm.data import EOS, UNK
from lstm_lm.errors import ArgumentError, DataError, LSTMLMError
from lstm_lm.inference.export import OPSET, ort_session, state_names, state_sizes
from lstm_lm.inference.keystrokes import CharKeyboard
from lstm_lm.utils import log
from lstm_lm.writing import write_atomically

if TYPE_CHECKING:
    from lstm_lm.inference.api import LanguageModel

PAGE = Path(__file__).parent / "keyboard_page"  # index.html, keyboard.js, style.css
ORT_FILES = ("ort.wasm.min.js", "ort-wasm-simd-threaded.mjs", "ort-wasm-simd-threaded.wasm")
QUANTIZED_MIN = 1024  # weight matrices with at least this many entries are stored as int8
GROUP = 16  # entries of a row that share one int8 scale


class OnnxStep(nn.Module):
    """One step of the model for the exporter: input_ids (B,) and the flat state ->
    scores (B, V) and the new flat state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.per_layer = len(model.rnn.cells[0].state_names)
        self.eval()  # the exporter restores this module's mode, and so its model's, when it is done

    def forward(self, input_ids: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        n = self.per_layer
        layers = [tuple(state[k * n : (k + 1) * n]) for k in range(len(state) // n)]
        h, new = self.model.step_hidden(input_ids, layers)
        return (self.model.scores(h), *[t for layer in new for t in layer])


def export_step(lm: LanguageModel, path: Path, int8: bool = False) -> dict[str, Any]:
    """Write the one-step graph of `lm` to `path` (int8 weights with `int8`); its size and
    the largest score difference from PyTorch over 12 steps in 2 streams."""
    import warnings

    import onnx

    model = lm.model.float().cpu().eval()
    names = state_names(model)
    outputs = [f"{n}_out" for n in names]
    ids = torch.zeros(2, dtype=torch.long)
    state = [torch.zeros(2, size) for size in state_sizes(model)]
    axes = {"input_ids": {0: "B"}, "scores": {0: "B"}} | {n: {0: "B"} for n in names + outputs}

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                OnnxStep(model),
                (ids, *state),
                str(tmp),
                input_names=["input_ids", *names],
                output_names=["scores", *outputs],
                opset_version=OPSET,
                dynamic_axes=axes,
                do_constant_folding=False,  # keeps a tied matrix one initializer, used twice
                dynamo=False,
            )
        proto = onnx.load(str(tmp))
        if int8:
            quantize_weights(proto)
        onnx.save(proto, str(tmp))

    write_atomically(path, write)
    return {"bytes": path.stat().st_size, "max_abs_diff": step_difference(model, ort_session(path), names)}


def quantize_weights(proto) -> None:
    """Store every float32 weight matrix of `proto` (in place) as int8 with a scale per
    group of `GROUP` entries of a row (a whole row where GROUP does not divide it;
    symmetric: the group's largest |w| maps to 127), turned back into float32 by a Cast,
    a Reshape to (rows, groups, GROUP), a Mul by the scales and a Reshape back, which give
    the original name, so every node that read the matrix reads it unchanged.

    Groups rather than rows: on the keyboard recipe a scale per row changed the order of
    the three suggestions for 8 of 200 held-out prompts, groups of 16 for fewer (docs/keyboard.md)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    kept, nodes = [], []
    for init in graph.initializer:
        w = numpy_helper.to_array(init)
        if init.data_type != TensorProto.FLOAT or w.ndim != 2 or w.size < QUANTIZED_MIN:
            kept.append(init)
            continue
        rows, cols = w.shape
        group = GROUP if cols % GROUP == 0 else cols
        grouped = w.reshape(rows, cols // group, group)
        scale = np.abs(grouped).max(axis=2, keepdims=True) / 127.0  # (rows, groups, 1)
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(grouped / scale), -127, 127).astype(np.int8).reshape(rows, cols)
        name = init.name
        kept += [
            numpy_helper.from_array(q, f"{name}_int8"),
            numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"),
            numpy_helper.from_array(np.array([rows, cols // group, group], np.int64), f"{name}_grouped"),
            numpy_helper.from_array(np.array([rows, cols], np.int64), f"{name}_shape"),
        ]
        nodes += [
            helper.make_node("Cast", [f"{name}_int8"], [f"{name}_cast"], to=TensorProto.FLOAT),
            helper.make_node("Reshape", [f"{name}_cast", f"{name}_grouped"], [f"{name}_groups"]),
            helper.make_node("Mul", [f"{name}_groups", f"{name}_scale"], [f"{name}_scaled"]),
            helper.make_node("Reshape", [f"{name}_scaled", f"{name}_shape"], [name]),
        ]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for node in reversed(nodes):
        graph.node.insert(0, node)


def run_step(session, names: list[str], ids: np.ndarray, state: list[np.ndarray]):
    scores, *new = session.run(None, {"input_ids": ids.astype(np.int64), **dict(zip(names, state))})
    return scores, new


@torch.no_grad()
def step_difference(model: nn.Module, session, names: list[str], steps: int = 12, seed: int = 0) -> float:
    """The largest |score| difference between PyTorch and the step graph over `steps` steps in 2 streams."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.vocab_size, (steps, 2), generator=g)
    state = model.init_state(2, torch.device("cpu"))
    ort_state = [np.zeros((2, size), np.float32) for size in state_sizes(model)]
    worst = 0.0
    for t in range(steps):
        h, state = model.step_hidden(ids[t], state)
        got, ort_state = run_step(session, names, ids[t].numpy(), ort_state)
        worst = max(worst, float((torch.from_numpy(got) - model.scores(h)).abs().max()))
    return worst


# -- the web folder -----------------------------------------------------------------------


def ort_web_dir() -> Path:
    """Where onnxruntime-web's files are: $LSTM_LM_ORT_WEB, or js/node_modules of this
    repository as `bash scripts/setup.sh --web` installs it."""
    import os

    if env := os.environ.get("LSTM_LM_ORT_WEB"):
        return Path(env)
    return Path(__file__).resolve().parents[2] / "js" / "node_modules" / "onnxruntime-web" / "dist"


def check_web_model(lm: LanguageModel) -> None:
    """Refuse what the page cannot run: it cuts the text into words at spaces (and
    punctuation, where the model's tokenizer does), or into characters."""
    if lm.kind not in ("word", "char"):
        raise ArgumentError(
            f"the web page reads word and character models; this is a {lm.kind} model, whose tokenizer the "
            "page does not have (train with data.tokenizer word or char)"
        )


def export_web(lm: LanguageModel, out: Path, overwrite: bool = False, k: int = 3, int8: bool = True) -> dict[str, Any]:
    """Write the static folder: index.html, keyboard.js, style.css, model.onnx (int8
    weights, or float32 without `int8`), vocab.json and ort/ (onnxruntime-web). Nothing is
    written when `out` holds files and `overwrite` is off, or when a check fails."""
    check_web_model(lm)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out} is a file; give a folder to write the page into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DataError(f"{out} is not empty; pass --overwrite to replace the page in it, or give a new folder")
    ort_dir = ort_web_dir()
    missing = [name for name in ORT_FILES if not (ort_dir / name).is_file()]
    if missing:
        raise LSTMLMError(
            f"onnxruntime-web is not installed ({ort_dir} has no {', '.join(missing)}): run "
            "bash scripts/setup.sh --web (npm ci in js/), or set LSTM_LM_ORT_WEB to its dist folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    log(f"exporting {lm.checkpoint} as a web page into {out} ...")
    summary: dict[str, Any] = {"out": str(out), "format": "web", "tokenizer": lm.kind, "int8": int8}
    step = export_step(lm, out / "model.onnx", int8=int8)
    summary |= {"model_bytes": step["bytes"], "max_abs_diff": step["max_abs_diff"]}
    keyboard = lm.keyboard
    vocab = {
        "kind": lm.kind,
        "tokens": [lm.tokenizer.id_to_token(i) for i in range(lm.vocab_size)],
        "eos": lm.tokenizer.token_to_id(EOS),
        "unk": lm.tokenizer.token_to_id(UNK),
        **(
            {  # the search for a word's endings: CharKeyboard's
                "ends": keyboard.ends.nonzero().flatten().tolist(),
                "grows": keyboard.grows.nonzero().flatten().tolist(),
                "beam": CharKeyboard.BEAM,
                "max_chars": CharKeyboard.MAX_CHARS,
            }
            if lm.kind == "char"
            else {"offered": keyboard.offered.nonzero().flatten().tolist()}  # the words a suggestion may be
        ),
        "lowercase": lm.config.data.lowercase,
        "split_punctuation": lm.config.data.split_punctuation,  # "John," -> "John" ","
        "states": [{"name": n, "size": s} for n, s in zip(state_names(lm.model), state_sizes(lm.model))],
        "suggestions": k,
        "cell": lm.cell,
        "parameters": lm.model.num_parameters(),
    }
    write_atomically(out / "vocab.json", lambda tmp: tmp.write_text(json.dumps(vocab), encoding="utf-8"))
    for name in ("index.html", "keyboard.js", "style.css"):
        write_atomically(out / name, lambda tmp, name=name: shutil.copyfile(PAGE / name, tmp))
    for name in ORT_FILES:
        write_atomically(out / "ort" / name, lambda tmp, name=name: shutil.copyfile(ort_dir / name, tmp))
    summary["bytes"] = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return summary


# -- what a suggestion costs --------------------------------------------------------------


def latency(lm: LanguageModel, lines: list[str], k: int = 3, steps: int = 300, onnx: bool = True) -> dict[str, Any]:
    """Per-suggestion latency in ms (p50, p95) at batch 1 on one CPU thread: one step of the
    model on the word just typed and the k best words, the words of `lines` read in turn.
    PyTorch (fp32, the textbook cell), and the ONNX step graph in fp32 and int8 where
    onnxruntime is installed; with each form's size on disk."""
    import tempfile

    kb = lm.keyboard
    words = [w for line in lines for w in kb.split(line)][: steps + 20]
    if len(words) < 21:
        raise DataError("the text has too few words to time suggestions (at least 21)")
    ids = [kb.ids.get(w, kb.ids.get(UNK, 0)) for w in words]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = lm.model.float().cpu().eval()
    out: dict[str, Any] = {"threads": 1, "steps": len(ids) - 20}
    try:
        with torch.no_grad():
            state = model.init_state(1, torch.device("cpu"))

            def torch_step(i: int):
                nonlocal state
                h, state = model.step_hidden(torch.tensor([i]), state)
                return kb.suggest(model.scores(h)[0], "", k)

            out["pytorch"] = _percentiles(torch_step, ids)
        weights = lm.checkpoint / "model.safetensors" if lm.checkpoint else None
        out["pytorch"]["bytes"] = weights.stat().st_size if weights and weights.is_file() else None
        if onnx:
            names = state_names(model)
            with tempfile.TemporaryDirectory() as tmp:
                for form, int8 in (("onnx_fp32", False), ("onnx_int8", True)):
                    path = Path(tmp) / f"{form}.onnx"
                    size = export_step(lm, path, int8=int8)["bytes"]
                    session = ort_session(path, threads=1)
                    ort_state = [np.zeros((1, s), np.float32) for s in state_sizes(model)]

                    def ort_step(i: int, session=session):
                        nonlocal ort_state
                        scores, ort_state = run_step(session, names, np.array([i]), ort_state)
                        return kb.suggest(torch.from_numpy(scores[0]), "", k)

                    out[form] = _percentiles(ort_step, ids) | {"bytes": size}
    finally:
        torch.set_num_threads(threads)
    return out


def _percentiles(step, ids: list[int], warmup: int = 20) -> dict[str, float]:
    times = []
    for n, i in enumerate(ids):
        started = time.perf_counter()
        step(i)
        if n >= warmup:
            times.append((time.perf_counter() - started) * 1000)
    q = statistics.quantiles(times, n=100)
    return {"p50_ms": round(statistics.median(times), 3), "p95_ms": round(q[94], 3)}
