"""`lstm-lm export --format onnx`: the model as an ONNX graph that reads a chunk of text.

    summary = export_onnx(LanguageModel.load("runs/demo"), Path("demo.onnx"))

The graph (docs/export.md shows how to run it with onnxruntime):
    inputs   input_ids (T, B) int64, and per layer k: h{k} (B, H_k) float32 (and c{k} for the LSTM family)
    outputs  logits (T, B, V) float32 (log-probabilities with model.softmax adaptive: the
             same softmax), and per layer k: h{k}_out (and c{k}_out): the state
             after the chunk, to feed into the next one
T and B are dynamic. Each cell says how its layers export (its `export_layer`): ONNX's
own LSTM / GRU / RNN operators where they compute the cell (the CIFG is an LSTM whose
input gate is its forget gate negated), else the cell's step loop as an ONNX Loop over
time (LSTMP, the Mogrifier). One per layer, so that layers may differ in size;
exported in eval mode (no dropout). The file also carries, in its metadata, the tokenizer (tokenizer.json's
text), the cell, the layer sizes and the id of `<eos>`: it needs nothing beside it.

Exported with torch.onnx's TorchScript-based exporter (see `_export` for why not
the torch.export-based one). `--int8` applies onnxruntime's dynamic
quantization (int8 weights for MatMul, LSTM and GRU; activations quantized on the
fly) and measures what it costs in validation perplexity.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lstm_lm.data import EOS, get_batch
from lstm_lm.errors import DataError, LSTMLMError
from lstm_lm.inference.api import LanguageModel
from lstm_lm.utils import log
from lstm_lm.writing import write_atomically

OPSET = 18


class OnnxChunk(nn.Module):
    """The language model reading one chunk, each layer as its cell exports it (torch.nn's
    recurrent modules, which the exporter turns into ONNX's LSTM / GRU / RNN operators,
    or a scripted step loop), its weights copied from `model`: input_ids (T, B) and the
    flat per-layer state -> logits and the new state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.embedding = nn.Embedding.from_pretrained(model.embedding.weight.detach().clone())
        self.per_layer = len(model.rnn.cells[0].state_names)
        self.layers = nn.ModuleList()
        with torch.no_grad():
            for k, cell in enumerate(model.rnn.cells):
                layer = cell.export_layer({name: w.detach() for name, w in model.rnn.params(k).items()})
                if layer is None:
                    raise LSTMLMError(f"the {model.cell} cell has no ONNX export")
                self.layers.append(layer)
        self.decoder, self.adaptive, self.tied = None, None, model.cfg.tie_weights
        if model.adaptive is not None:  # its log-probabilities are the output's scores
            self.adaptive = copy.deepcopy(model.adaptive).float()
        else:
            self.decoder = nn.Linear(model.decoder.in_features, model.decoder.out_features)
            with torch.no_grad():
                self.decoder.weight.copy_(model.decoder.weight)
                self.decoder.bias.copy_(model.decoder.bias)
        self.eval()

    def forward(self, input_ids: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        x = self.embedding(input_ids)  # (T, B, E)
        n = self.per_layer
        new_state: list[Tensor] = []
        for k, layer in enumerate(self.layers):
            x, *out = layer(x, *state[k * n : (k + 1) * n])  # (B, size) each
            new_state += out
        if self.adaptive is not None:
            scores = self.adaptive.log_probs(x, self.embedding.weight if self.tied else None)
        else:
            scores = self.decoder(x)
        return (scores, *new_state)  # (T, B, V), then (B, H_k) per state tensor


def state_names(model: nn.Module) -> list[str]:
    """['h0', 'c0', 'h1', 'c1'] for a 2-layer LSTM; ['h0', 'h1'] for a GRU or RNN."""
    return [f"{name}{k}" for k, cell in enumerate(model.rnn.cells) for name in cell.state_names]


def state_sizes(model: nn.Module) -> list[int]:
    """The size of each state input, in `state_names`' order."""
    return [size for cell in model.rnn.cells for size in cell.state_sizes()]


def export_onnx(lm: LanguageModel, out: Path, int8: bool = False, data: str | None = None) -> dict[str, Any]:
    """Write `lm` as ONNX to `out` (int8-quantized with `int8`), check it against PyTorch
    and return what was measured: file size, the largest logit difference over a prompt
    fed in pieces, and (where the corpus can be read) the validation perplexity."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise LSTMLMError(
            "lstm-lm export needs onnx and onnxruntime, which the export extra installs: pip install 'lstm-lm[export]'"
        ) from None
    if out.exists() and out.is_dir():
        raise DataError(f"{out} is a directory; give a file name such as model.onnx")
    model = lm.model.float().cpu().eval()
    chunk = OnnxChunk(model)
    names = state_names(model)
    fp32 = out.with_name(f".{out.name}.fp32.tmp") if int8 else out
    log(f"exporting {lm.checkpoint} to ONNX (opset {OPSET}) ...")
    write_atomically(fp32, lambda tmp: _export(chunk, names, tmp, lm))
    summary: dict[str, Any] = {
        "out": str(out),
        "format": "onnx",
        "opset": OPSET,
        "int8": int8,
        "inputs": ["input_ids", *names],
        "outputs": ["logits", *[f"{n}_out" for n in names]],
    }
    try:
        if int8:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            summary["fp32_bytes"] = fp32.stat().st_size
            write_atomically(out, lambda tmp: quantize_dynamic(str(fp32), str(tmp), weight_type=QuantType.QInt8))
        summary["bytes"] = out.stat().st_size
        session = ort_session(out)
        summary["max_abs_diff"] = max_logit_difference(model, session, names)
        summary |= _perplexities(lm, session, names, data)
    finally:
        if int8:
            fp32.unlink(missing_ok=True)
    return summary


def _export(chunk: OnnxChunk, names: list[str], path: Path, lm: LanguageModel) -> None:
    import warnings

    import onnx

    ids = torch.zeros(5, 2, dtype=torch.long)
    state = [torch.zeros(2, size) for size in state_sizes(lm.model)]
    outputs = [f"{n}_out" for n in names]
    axes = {"input_ids": {0: "T", 1: "B"}, "logits": {0: "T", 1: "B"}} | {n: {0: "B"} for n in names + outputs}
    with warnings.catch_warnings():
        # The TorchScript exporter: in torch 2.13 the torch.export-based one writes the
        # example's sequence length into a Reshape after nn.LSTM, so that any other T fails
        # in onnxruntime. Its warning about LSTM batch sizes is about graphs without state
        # inputs; this one has them.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            chunk,
            (ids, *state),
            str(path),
            input_names=["input_ids", *names],
            output_names=["logits", *outputs],
            opset_version=OPSET,
            dynamic_axes=axes,
            dynamo=False,
        )
    proto = onnx.load(str(path))
    meta = {
        "tokenizer": lm.tokenizer.to_str(),
        "cell": lm.cell,
        "hidden_sizes": json.dumps(lm.model.rnn.sizes),
        "state_sizes": json.dumps(state_sizes(lm.model)),
        "eos_id": str(lm.tokenizer.token_to_id(EOS)),
        "tokenizer_kind": lm.kind,
        "state_inputs": json.dumps(names),
        "lstm_lm_checkpoint": str(lm.checkpoint),
    }
    onnx.helper.set_model_props(proto, meta)
    onnx.save(proto, str(path))


def ort_session(path: Path, threads: int | None = None):
    """An onnxruntime CPU session of the file; `threads` caps its threads (None: onnxruntime's choice)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads is not None:
        options.intra_op_num_threads = options.inter_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_chunk(
    session, names: list[str], ids: np.ndarray, state: list[np.ndarray]
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One chunk through the ONNX model: ids (T, B) -> logits (T, B, V) and the new state."""
    logits, *new = session.run(None, {"input_ids": ids.astype(np.int64), **dict(zip(names, state))})
    return logits, new


@torch.no_grad()
def max_logit_difference(model: nn.Module, session, names: list[str], seed: int = 0) -> float:
    """The largest |logit| difference between PyTorch and the ONNX model over a 48-token
    text in 2 streams, fed in pieces of 7, 1, 16 and 24 tokens with the state carried."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.vocab_size, (48, 2), generator=g)
    want, _ = model(ids)  # (T, B, V) read whole
    state = [np.zeros((2, size), np.float32) for size in state_sizes(model)]
    got, start = [], 0
    for size in (7, 1, 16, 24):
        logits, state = run_chunk(session, names, ids[start : start + size].numpy(), state)
        got.append(torch.from_numpy(logits))
        start += size
    return float((torch.cat(got) - want).abs().max())


def onnx_evaluate(session, names: list[str], sizes: list[int], data: Tensor, bptt: int) -> dict[str, float]:
    """The evaluation protocol (evaluate.py) on the ONNX model: data (N, B) read `bptt` rows
    at a time with the state carried, `sizes` the state inputs' (see `state_sizes`); mean
    loss and perplexity."""
    B = data.size(1)
    state = [np.zeros((B, size), np.float32) for size in sizes]
    total, tokens = 0.0, 0
    for i in range(0, data.size(0) - 1, bptt):
        x, y = get_batch(data, i, bptt)
        logits, state = run_chunk(session, names, x.numpy(), state)
        logp = torch.log_softmax(torch.from_numpy(logits).double(), dim=-1)
        total -= float(logp.gather(-1, y[..., None]).sum())
        tokens += y.numel()
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": tokens}


def _perplexities(lm: LanguageModel, session, names: list[str], data: str | None) -> dict[str, Any]:
    """Validation perplexity of the PyTorch model (fp32) and of the exported one."""
    from lstm_lm.data import Streams, load_corpus

    try:
        corpus = load_corpus(lm.config.data, tokenizer=lm.tokenizer, source=data)
    except DataError as e:
        log(f"not measuring the validation perplexity: {e} (pass --data to give the corpus)")
        return {"valid_perplexity": None}
    bsz, bptt = lm.config.train.eval_batch_size, lm.config.train.bptt
    valid = Streams(corpus.splits["valid"], bsz)
    log(f"measuring the validation perplexity ({valid.numel():,} tokens) in PyTorch and onnxruntime ...")
    reference = LanguageModel(lm.model, lm.tokenizer, lm.config, lm.checkpoint, "fp32").evaluate("valid", data)
    exported = onnx_evaluate(session, names, state_sizes(lm.model), valid, bptt)
    return {
        "valid_perplexity": {
            "pytorch_fp32": reference["perplexity"],
            "onnx": exported["perplexity"],
            "change": exported["perplexity"] - reference["perplexity"],
            "tokens": exported["tokens"],
        }
    }
