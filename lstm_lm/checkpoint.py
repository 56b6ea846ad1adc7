"""Checkpoint directories: everything `complete` and `eval` need, and nothing pickled.

    save_checkpoint("runs/demo", model, tokenizer, cfg)
    model, tokenizer, cfg = load_checkpoint("runs/demo", device="cpu")

A checkpoint directory holds

    config.json                  all settings, the vocabulary size and a format version
    model.safetensors            the weights (the best by validation loss)
    tokenizer.json               the `tokenizers` tokenizer
    training_state.safetensors   for --resume only: the latest weights, optimizer
                                 tensors, RNG states and hidden state, with the
                                 step, epoch, learning rate and data position as
                                 JSON in the file's metadata

Every file is written to a temporary name and renamed into place.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from lstm_lm import __version__
from lstm_lm.config import FORMAT_VERSION, Config, config_from_dict
from lstm_lm.errors import CheckpointError, ConfigError
from lstm_lm.model import LSTMLanguageModel

CONFIG, WEIGHTS, TOKENIZER, TRAINING_STATE = (
    "config.json", "model.safetensors", "tokenizer.json", "training_state.safetensors",
)
CHECKPOINT_FILES = (CONFIG, WEIGHTS, TOKENIZER)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: Path, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp)`, flush tmp to disk, give it the usual permissions, rename it to `path`.

    A reader (or a crash) sees the old file or the new one, never half of one.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates files readable by the owner only
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8"))


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
    if model.cfg.tie_weights and "embedding.weight" in weights:
        weights = weights | {"decoder.weight": weights["embedding.weight"]}
    model.load_state_dict(weights, strict=True)  # copies in place: the tying survives


def save_checkpoint(run_dir: str | Path, model: LSTMLanguageModel, tokenizer: Tokenizer, cfg: Config) -> None:
    """Write config.json, model.safetensors and tokenizer.json into `run_dir`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    weights = weights_to_save(model)
    write_atomically(run_dir / WEIGHTS, lambda tmp: save_file(weights, str(tmp)))
    write_atomically(run_dir / TOKENIZER, lambda tmp: tokenizer.save(str(tmp)))
    meta = {"format_version": FORMAT_VERSION, "lstm_lm_version": __version__, "vocab_size": model.vocab_size}
    write_json(run_dir / CONFIG, meta | cfg.to_dict())


def check_checkpoint_dir(path: str | Path) -> Path:
    """Fail with a message that lists what is missing and how to make a checkpoint."""
    path = Path(path)
    hint = "train one with: lstm-lm train (or pass --checkpoint DIR)"
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}; {hint}")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} is not a directory; {hint}")
    missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is missing {', '.join(missing)}; {hint}")
    return path


def update_latest(run_dir: Path) -> None:
    """Point `<parent>/latest` at this run: a relative symlink, or a pointer file where links fail."""
    latest = run_dir.parent / "latest"
    if latest.is_dir() and not latest.is_symlink():
        raise CheckpointError(f"{latest} is a real directory; move it away so it can point at the latest run")
    tmp = run_dir.parent / ".latest.tmp"
    tmp.unlink(missing_ok=True)
    try:
        tmp.symlink_to(run_dir.name, target_is_directory=True)
    except OSError:
        tmp.write_text(run_dir.name + "\n", encoding="utf-8")
    os.replace(tmp, latest)


def resolve_checkpoint(path: str | Path) -> Path:
    """Follow `runs/latest` (a symlink, or a one-line pointer file where symlinks fail)."""
    path = Path(path)
    if path.is_file() and path.name == "latest":
        target = Path(path.read_text(encoding="utf-8").strip())
        path = target if target.is_absolute() else path.parent / target
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
    meta = {k: raw.pop(k) for k in ("format_version", "lstm_lm_version", "vocab_size") if k in raw}
    try:
        cfg = config_from_dict(raw, origin=str(path / CONFIG))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None
    return cfg, meta


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu", impl: str | None = None
) -> tuple[LSTMLanguageModel, Tokenizer, Config]:
    """The model (in eval mode, on `device`), its tokenizer and its config."""
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
    return model.to(device).eval(), tokenizer, cfg


# ---------------------------------------------------------------------------------------
# Training state for --resume


def save_training_state(
    run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
    state: dict[str, Any], hidden: list[tuple[torch.Tensor, torch.Tensor]] | None,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Latest weights, optimizer, RNG and hidden state as tensors; `state` (JSON) in the metadata.

    `extra` tensors (the NT-ASGD weight average) are stored under their own names.
    """
    tensors = {f"model.{name}": t for name, t in weights_to_save(model).items()}
    opt = optimizer.state_dict()
    opt_scalars: dict[str, dict[str, Any]] = {}
    for idx, pstate in opt["state"].items():
        for key, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                opt_scalars.setdefault(str(idx), {})[key] = value
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    for k, (h, c) in enumerate(hidden or []):
        tensors[f"hidden.{k}.h"], tensors[f"hidden.{k}.c"] = h, c
    for name, t in (extra or {}).items():
        tensors[f"extra.{name}"] = t
    meta = {"state": state, "param_groups": opt["param_groups"], "optim_scalars": opt_scalars}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomically(run_dir / TRAINING_STATE,
                     lambda tmp: save_file(tensors, str(tmp), metadata={"json": json.dumps(meta)}))


def load_training_state(
    run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> tuple[dict[str, Any], list[tuple[torch.Tensor, torch.Tensor]] | None, dict[str, torch.Tensor]]:
    """Restore what `save_training_state` wrote; returns the JSON state, the hidden state
    and the `extra` tensors."""
    path = run_dir / TRAINING_STATE
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} does not exist (was the run started with this --out?)")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["json"])
        tensors = load_file(str(path))
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot resume from {path}: {e}") from None
    load_weights(model, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[key] = v.to(device)
    for idx, scalars in meta["optim_scalars"].items():
        opt_state.setdefault(int(idx), {}).update(scalars)
    optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.cpu"])
    cuda_keys = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    cuda_states = [tensors[k] for k in cuda_keys]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    hidden = None
    if "hidden.h" in tensors:  # format 1 before per-layer sizes: (L, B, H) stacks
        hidden = list(zip(tensors["hidden.h"].to(device).unbind(0), tensors["hidden.c"].to(device).unbind(0)))
    elif "hidden.0.h" in tensors:
        layers = sum(1 for k in tensors if k.startswith("hidden.") and k.endswith(".h"))
        hidden = [(tensors[f"hidden.{k}.h"].to(device), tensors[f"hidden.{k}.c"].to(device)) for k in range(layers)]
    extra = {k[len("extra."):]: v.to(device) for k, v in tensors.items() if k.startswith("extra.")}
    return meta["state"], hidden, extra
