"""The inference checkpoint: everything `complete`, `eval` and `score` need, nothing pickled.

    save_checkpoint("runs/demo/checkpoints/step-00000120", model, tokenizer, cfg)
    model, tokenizer, cfg = load_checkpoint("runs/demo", device="cpu")

A checkpoint directory holds config.json (all settings, the vocabulary size and a
format version), model.safetensors (the weights: the averaged ones once NT-ASGD has
begun) and tokenizer.json; a run's step checkpoints also hold the training state
for --resume (training_state.py). rundir.py lays them out in a run directory.
Weights are safetensors and everything else JSON: nothing is ever unpickled, and a
directory holding a pickle is refused.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from lstm_lm import __version__
from lstm_lm.config import FORMAT_VERSION, Config, config_from_dict
from lstm_lm.errors import CheckpointError, ConfigError
from lstm_lm.model import LSTMLanguageModel
from lstm_lm.rundir import BEST, CONFIG, TOKENIZER, WEIGHTS, follow
from lstm_lm.utils import write_atomically, write_json

CHECKPOINT_FILES = (CONFIG, WEIGHTS, TOKENIZER)
# What torch.save, pickle and joblib files are called. None is ever loaded: unpickling
# runs whatever code the file names.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib")


def weights_to_save(model: LSTMLanguageModel) -> dict[str, torch.Tensor]:
    """The state dict as separate CPU tensors, the tied decoder weight left out.

    Copies are needed: on a GPU nn.LSTM keeps its weights as views of one flat cuDNN
    buffer, and safetensors refuses tensors that share storage.
    """
    return {
        name: t.detach().to("cpu", copy=True).contiguous()
        for name, t in model.state_dict().items()
        if not (name == "decoder.weight" and model.cfg.tie_weights)
    }


def load_weights(model: LSTMLanguageModel, weights: dict[str, torch.Tensor]) -> None:
    if model.cfg.tie_weights and model.decoder is not None and "embedding.weight" in weights:
        weights = weights | {"decoder.weight": weights["embedding.weight"]}
    model.load_state_dict(weights, strict=True)  # copies in place: the tying survives


def save_checkpoint(run_dir: str | Path, model: LSTMLanguageModel, tokenizer: Tokenizer, cfg: Config,
                    measured: dict[str, Any] | None = None) -> None:
    """Write config.json, model.safetensors and tokenizer.json into `run_dir`. `measured`
    (the validation of these very weights: step, valid_loss, valid_perplexity) is kept
    in config.json, for `lstm-lm serve` and the API to report."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    weights = weights_to_save(model)
    write_atomically(run_dir / WEIGHTS, lambda tmp: save_file(weights, str(tmp)))
    write_atomically(run_dir / TOKENIZER, lambda tmp: tokenizer.save(str(tmp)))
    meta = {"format_version": FORMAT_VERSION, "lstm_lm_version": __version__, "vocab_size": model.vocab_size}
    if measured:
        meta["measured"] = measured
    write_json(run_dir / CONFIG, meta | cfg.to_dict())


def check_checkpoint_dir(path: str | Path) -> Path:
    """Fail with a message that lists what is missing and how to make a checkpoint."""
    path = Path(path)
    hint = "train one with: lstm-lm train (or pass --checkpoint DIR)"
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}; {hint}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory; {hint}")
    refuse_pickles(path)
    missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing {', '.join(missing)}; {hint}")
    return path


def refuse_pickles(path: Path) -> None:
    """Refuse a directory that holds a pickle (by its name, or by pickle's first byte
    and a protocol number): lstm-lm never writes one and never loads one."""
    for f in sorted(path.iterdir()):
        if not f.is_file():
            continue
        with open(f, "rb") as fh:
            head = fh.read(9)
        looks_pickled = len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5
        if f.suffix.lower() in PICKLE_SUFFIXES or (looks_pickled and not _is_safetensors(head, f.stat().st_size)):
            raise CheckpointError(
                f"{f} looks like a pickle (torch.save) file; lstm-lm does not load pickles, since loading "
                "one can run any code. Remove it, or convert trusted weights to safetensors"
            )


def _is_safetensors(head: bytes, size: int) -> bool:
    """Whether a file opens as safetensors does: an 8-byte little-endian header length
    that fits the file, then the JSON header's '{'. (A header of 896 bytes starts
    with 0x80 0x03, as a protocol-3 pickle does.)"""
    return len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory that `path` means: `runs/latest` and a run directory
    lead to the run's best checkpoint; a checkpoint directory is itself."""
    path = follow(Path(path))
    if path.is_dir() and (path / BEST).exists():
        path = follow(path / BEST)
    return check_checkpoint_dir(path)


def load_config_json(path: Path) -> tuple[Config, dict[str, Any]]:
    try:
        raw = json.loads((path / CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path / CONFIG} is not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path / CONFIG} is not a JSON object")
    version = raw.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{path / CONFIG} has no format_version: it was not written by lstm-lm")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {version!r}, this lstm-lm reads format {FORMAT_VERSION} "
            "and older; upgrade lstm-lm"
        )
    meta = {k: raw.pop(k) for k in ("format_version", "lstm_lm_version", "vocab_size", "measured") if k in raw}
    try:
        cfg = config_from_dict(raw, origin=str(path / CONFIG))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    return cfg, meta


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu", impl: str | None = None
) -> tuple[LSTMLanguageModel, Tokenizer, Config]:
    """The model (in eval mode, on `device`), its tokenizer and its config. (Users of a
    trained model want `lstm_lm.LanguageModel.load`, which keeps the three together.)"""
    model, tokenizer, cfg, _, _ = load_checkpoint_dir(path, device, impl)
    return model, tokenizer, cfg


def load_checkpoint_dir(
    path: str | Path, device: torch.device | str = "cpu", impl: str | None = None
) -> tuple[LSTMLanguageModel, Tokenizer, Config, Path, dict[str, Any]]:
    """load_checkpoint's three, the checkpoint directory `path` resolved to, and what
    config.json says beside the settings (the measured validation, when it was saved)."""
    path = resolve_checkpoint(path)
    cfg, meta = load_config_json(path)
    try:
        tokenizer = Tokenizer.from_file(str(path / TOKENIZER))
    except Exception as e:  # tokenizers raises a plain Exception on bad JSON
        raise CheckpointError(f"{path / TOKENIZER} is not a valid tokenizer ({e})") from None
    vocab_size = meta.get("vocab_size")
    if vocab_size != tokenizer.get_vocab_size():
        raise CheckpointError(
            f"{path}: config.json says vocab_size {vocab_size} but tokenizer.json has "
            f"{tokenizer.get_vocab_size()} tokens"
        )
    model = LSTMLanguageModel(cfg.model, vocab_size, impl=impl)
    try:
        load_weights(model, load_file(str(path / WEIGHTS)))
    except (SafetensorError, RuntimeError, OSError) as e:
        raise CheckpointError(f"cannot load {path / WEIGHTS}: {str(e).splitlines()[0]}") from None
    measured = meta.get("measured") if isinstance(meta.get("measured"), dict) else {}
    return model.to(device).eval(), tokenizer, cfg, path, measured
