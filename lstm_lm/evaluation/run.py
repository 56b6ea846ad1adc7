"""Running an evaluation protocol on a loaded model: what `LanguageModel.evaluate`,
`tune_cache` and `tune_dynamic` (and so `lstm-lm eval`) do.

    result = evaluate(lm, "test", cache=NeuralCache(theta=0.5))
    tuned = tune_dynamic(lm, rule="rms")          # settings fitted on valid

The protocols themselves, their settings and the rules between them are in protocols.py;
the static one in evaluate.py, the neural cache in neural_cache.py, dynamic evaluation
in dynamic_eval.py.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from lstm_lm.arguments import check_all
from lstm_lm.errors import ConfigError, DataError
from lstm_lm.evaluation.evaluate import perplexity_of
from lstm_lm.evaluation.protocols import CACHE, DYNAMIC, STATIC, DynamicEval, NeuralCache, exclusions
from lstm_lm.utils import log, progress_bar

if TYPE_CHECKING:
    from lstm_lm.inference.api import LanguageModel


def evaluate(
    lm: LanguageModel,
    split: str = "test",
    data: str | None = None,
    batch_size: int | None = None,
    cache: NeuralCache | None = None,
    dynamic: DynamicEval | None = None,
    progress: bool = False,
    tune: bool = False,
) -> dict[str, Any]:
    """The evaluation protocol (docs/reference.md) on a split of the corpus the model was
    trained on (or of `data`): what `lstm-lm eval` prints. `protocol` in the result
    names what was measured: "static" (the default), "neural cache" with `cache`, or
    "dynamic evaluation" with `dynamic` (one stream: batch_size is 1), each with its
    settings. With `tune`, the settings are first fitted on the valid split (`tune_cache`,
    `tune_dynamic`; `tuned` in the result says how). `progress` shows a progress bar on stderr."""
    import time

    from lstm_lm.data import Streams
    from lstm_lm.evaluation.evaluate import evaluate

    check_all(split=split, data=data, batch_size=batch_size, progress=progress)
    if problems := exclusions(cache is not None, dynamic is not None, tune, {}, batch_size):
        raise ConfigError(problems, "command line")
    tuned = _tune(lm, cache, dynamic, data, batch_size, progress) if tune else None
    if tuned:
        cache, dynamic = (tuned["settings"], None) if cache is not None else (None, tuned["settings"])
    corpus = lm.corpus(data)
    ids = corpus.splits[split]
    bsz = 1 if dynamic is not None else batch_size if batch_size is not None else lm.config.train.eval_batch_size
    if len(ids) < 2 * bsz:
        raise DataError(f"the {split} split has {len(ids)} tokens, too few for batch size {bsz}")
    bptt = lm.config.train.bptt
    stream = Streams(ids, bsz, lm.device)
    started = time.perf_counter()
    out: dict[str, Any] = {"split": split}
    if cache is not None:
        out |= _with_cache(lm, stream, bptt, cache, f"neural cache on {split}", progress)
    elif dynamic is not None:
        out |= _dynamic(lm, corpus, stream, dynamic, f"dynamic evaluation on {split}", progress)
    else:
        result = evaluate(lm.model, stream, bptt, lm.precision)
        keys = ("perplexity", "loss", "tokens", "top1_accuracy", "top5_accuracy")
        out |= {"protocol": STATIC} | {key: result[key] for key in keys}
    if lm.kind == "char":
        out["bits_per_char"] = out["loss"] / math.log(2)
    if tuned:
        best = min(tuned["trials"], key=lambda t: t["loss"])
        out["tuned"] = tuned["search"] | {"valid_perplexity": best["perplexity"]}
    return out | {
        "batch_size": bsz,
        "bptt": dynamic.segment if dynamic else bptt,
        "precision": lm.precision,
        "data": corpus.source.spec,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _with_cache(lm: LanguageModel, stream, bptt: int, cache: NeuralCache, what: str, progress: bool) -> dict:
    """The neural cache's perplexity, and the static one of the same pass."""
    from lstm_lm.evaluation.neural_cache import cache_log_probs, collect

    with progress_bar(stream.numel(), what, progress) as bar:
        chunks = collect(lm.model, stream, bptt, lm.precision, bar)
    static = perplexity_of(torch.cat([logp for _, logp, _ in chunks]))
    result = perplexity_of(cache_log_probs(chunks, cache)[0])
    return {"protocol": CACHE, "settings": cache.to_dict()} | result | {"static_perplexity": static["perplexity"]}


def _dynamic(lm: LanguageModel, corpus, stream, dynamic: DynamicEval, what: str, progress: bool) -> dict:
    """Dynamic evaluation's perplexity on the one stream, with what its statistics were drawn from."""
    from lstm_lm.evaluation.dynamic_eval import dynamic_log_probs

    stats, stats_info = _gradient_statistics(lm, corpus, dynamic, progress)
    with progress_bar(stream.size(0) - 1, what, progress) as bar:
        log_probs = dynamic_log_probs(lm.model, stream[0 : stream.size(0)], dynamic, stats, lm.precision, bar)
    out = {"protocol": DYNAMIC, "settings": dynamic.to_dict()} | perplexity_of(log_probs)
    return out | ({"gradient_statistics": stats_info} if stats_info else {})


def _tune(lm: LanguageModel, cache, dynamic, data, batch_size, progress) -> dict[str, Any]:
    """The settings fitted on valid for the protocol `cache` or `dynamic` picks, logged."""
    if cache is not None:
        tuned = tune_cache(lm, data, batch_size, progress=progress)
    else:
        tuned = tune_dynamic(lm, data, dynamic.rule, dynamic.segment, progress=progress)
    best = min(tuned["trials"], key=lambda t: t["loss"])
    log(
        f"tuned on valid ({tuned['search']['trials']} trials, {tuned['search']['tokens']:,} tokens): "
        + ", ".join(f"{k}={v}" for k, v in tuned["settings"].to_dict().items())
        + f" (valid perplexity {best['perplexity']:.2f})"
    )
    return tuned


def _gradient_statistics(lm: LanguageModel, corpus, dynamic: DynamicEval, progress: bool):
    """The rms rule's mean squared gradients, over the first STATS_TOKENS of the training split."""
    from lstm_lm.data import to_tensor
    from lstm_lm.evaluation.dynamic_eval import STATS_TOKENS, gradient_statistics

    if dynamic.rule != "rms":
        return None, None
    train_ids = corpus.splits["train"][: STATS_TOKENS + 1]
    if len(train_ids) < 2:
        raise DataError("the rms rule needs training text for its gradient statistics; the train split is empty")
    info = {"split": "train", "tokens": len(train_ids) - 1}
    key = (corpus.source.spec, dynamic.segment, info["tokens"], lm.precision)
    if key not in lm.kept_statistics:  # kept: --tune and the evaluation after it share them
        stream = to_tensor(train_ids, lm.device)[:, None]
        with progress_bar(info["tokens"], "gradient statistics on train", progress) as bar:
            lm.kept_statistics = {key: gradient_statistics(lm.model, stream, dynamic.segment, lm.precision, bar)}
    return lm.kept_statistics[key], info


def tune_cache(
    lm: LanguageModel, data: str | None = None, batch_size: int | None = None, progress: bool = False
) -> dict[str, Any]:
    """Fit the neural cache's settings on the validation split: one static pass, then
    every (window, theta, lambda) of neural_cache's grid over the stored states.
    Returns {"settings": NeuralCache, "search": what was tried, "trials": each result}."""
    from lstm_lm.data import Streams
    from lstm_lm.evaluation.neural_cache import TUNE_LAMBDAS, TUNE_THETAS, TUNE_WINDOWS, collect, tune

    check_all(data=data, batch_size=batch_size, progress=progress)
    corpus = lm.corpus(data)
    bsz = batch_size if batch_size is not None else lm.config.train.eval_batch_size
    stream = Streams(corpus.splits["valid"], bsz, lm.device)
    with progress_bar(stream.numel(), "tuning the cache on valid: states", progress) as bar:
        chunks = collect(lm.model, stream, lm.config.train.bptt, lm.precision, bar)
    with progress_bar(len(TUNE_WINDOWS) * len(TUNE_THETAS), "tuning the cache on valid: settings", progress) as bar:
        best, trials = tune(chunks, progress=bar)
    search = {
        "split": "valid",
        "tokens": stream.numel() - stream.size(1),
        "batch_size": bsz,
        "windows": list(TUNE_WINDOWS),
        "thetas": list(TUNE_THETAS),
        "lambdas": list(TUNE_LAMBDAS),
        "trials": len(trials),
    }
    return {"settings": best, "search": search, "trials": trials}


def tune_dynamic(
    lm: LanguageModel,
    data: str | None = None,
    rule: str = "rms",
    segment: int = 20,
    tokens: int | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Fit dynamic evaluation's step size, then its decay, on the first `tokens`
    (default TUNE_TOKENS) of the validation split. Returns {"settings": DynamicEval,
    "search": what was tried, "trials": each result}."""
    from lstm_lm.data import to_tensor
    from lstm_lm.evaluation.dynamic_eval import TUNE_DECAYS, TUNE_LRS, TUNE_TOKENS, DynamicEval, tune

    check_all(data=data, segment=segment, tokens=tokens, progress=progress)
    corpus = lm.corpus(data)
    probe = DynamicEval(segment=segment, rule=rule)
    stats, _ = _gradient_statistics(lm, corpus, probe, progress)
    ids = corpus.splits["valid"][: (tokens or TUNE_TOKENS) + 1]
    if len(ids) < 2:
        raise DataError("the valid split is empty: nothing to tune on")
    stream = to_tensor(ids, lm.device)[:, None]
    passes = len(TUNE_LRS[rule]) + len(TUNE_DECAYS)
    with progress_bar(passes, "tuning dynamic evaluation on valid", progress) as bar:
        best, trials = tune(lm.model, stream, segment, rule, stats, lm.precision, bar)
    search = {
        "split": "valid",
        "tokens": stream.size(0) - 1,
        "lrs": list(TUNE_LRS[rule]),
        "decays": [0.0, *TUNE_DECAYS],
        "trials": len(trials),
    }
    return {"settings": best, "search": search, "trials": trials}
