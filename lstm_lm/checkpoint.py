"""Checkpoint directories: everything `complete` and `eval` need, and nothing pickled.

    save_checkpoint("runs/demo", model, tokenizer, cfg)
    model, tokenizer, cfg = load_checkpoint("runs/demo", device="cpu")

A checkpoint directory holds

    config.json                  all settings, the vocabulary size and a format version
    model.safetensors            the weights (averaged ones once NT-ASGD has triggered)
    tokenizer.json               the `tokenizers` tokenizer
    training_state.safetensors   for --resume: the latest weights, optimizer tensors,
                                 RNG states and hidden state, with the step, epoch,
                                 learning rate and data position as JSON in the
                                 file's metadata

A run directory keeps its checkpoints as whole directories:

    runs/NAME/checkpoints/step-00001200/   one checkpoint, as above
    runs/NAME/checkpoints/last             -> the newest one (what --resume continues)
    runs/NAME/best                         -> the best by validation loss (what
                                              `--checkpoint runs/NAME` loads)

A checkpoint is written into a temporary directory, flushed to disk and renamed
into place; the `last` and `best` pointers move only after that, and older
checkpoints are deleted only after those. A process killed at any moment leaves
the previous checkpoint whole. Weights are safetensors and everything else JSON:
nothing is ever unpickled, and a directory holding a pickle is refused.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
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
CHECKPOINTS, LAST, BEST = "checkpoints", "last", "best"
STEP_DIR = re.compile(r"step-(\d+)(?:-(\d+))?")  # step-00001200, or step-00001200-2 if saved again
# What torch.save, pickle and joblib files are called. None is ever loaded: unpickling
# runs whatever code the file names.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib")


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
            head = fh.read(2)
        if f.suffix.lower() in PICKLE_SUFFIXES or (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
            raise CheckpointError(
                f"{f} looks like a pickle (torch.save) file; lstm-lm does not load pickles, since loading "
                "one can run any code. Remove it, or convert trusted weights to safetensors"
            )


def point(link: Path, target: str) -> None:
    """Make `link` point at `target` (relative to the link's directory) in one atomic step:
    a symlink, or where links are not allowed a one-line pointer file."""
    if link.is_dir() and not link.is_symlink():
        raise CheckpointError(f"{link} is a real directory; move it away so it can point at {target}")
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        tmp.symlink_to(target, target_is_directory=True)
    except OSError:
        tmp.write_text(target + "\n", encoding="utf-8")
    os.replace(tmp, link)


def follow(link: Path) -> Path:
    """Where a pointer (a symlink, or a pointer file) leads; any other path is itself."""
    if link.is_symlink():
        target = Path(os.readlink(link))
    elif link.is_file() and link.name in (LAST, BEST, "latest"):
        target = Path(link.read_text(encoding="utf-8").strip())
    else:
        return link
    return target if target.is_absolute() else link.parent / target


def update_latest(run_dir: Path) -> None:
    """Point `<parent>/latest` at this run."""
    point(run_dir.parent / "latest", run_dir.name)


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
    state: dict[str, Any], hidden: list[tuple[torch.Tensor, ...]] | None,
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
    for k, layer in enumerate(hidden or []):  # (h, c) for an LSTM, (h,) for a GRU or RNN
        for name, t in zip(("h", "c"), layer):
            tensors[f"hidden.{k}.{name}"] = t
    for name, t in (extra or {}).items():
        tensors[f"extra.{name}"] = t
    meta = {"state": state, "param_groups": opt["param_groups"], "optim_scalars": opt_scalars}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomically(run_dir / TRAINING_STATE,
                     lambda tmp: save_file(tensors, str(tmp), metadata={"json": json.dumps(meta)}))


def load_training_state(
    ckpt_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> tuple[dict[str, Any], list[tuple[torch.Tensor, torch.Tensor]] | None, dict[str, torch.Tensor]]:
    """Restore what `save_training_state` wrote into `ckpt_dir`; returns the JSON state,
    the hidden state and the `extra` tensors."""
    path = ckpt_dir / TRAINING_STATE
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {path} does not exist (was the run started with this --out?)")
    refuse_pickles(ckpt_dir)
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["json"])
        tensors = load_file(str(path))
    except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot resume from {path}: {str(e).splitlines()[0]}") from None
    opt_state: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, idx, key = k.split(".", 2)
            opt_state.setdefault(int(idx), {})[key] = v.to(device)
    try:
        load_weights(model, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        for idx, scalars in meta["optim_scalars"].items():
            opt_state.setdefault(int(idx), {}).update(scalars)
        optimizer.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot resume from {path}: it does not fit this model and optimizer "
                              f"({str(e).splitlines()[0]})") from None
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
        hidden = [tuple(tensors[f"hidden.{k}.{name}"].to(device) for name in ("h", "c") if f"hidden.{k}.{name}" in tensors)
                  for k in range(layers)]
    extra = {k[len("extra."):]: v.to(device) for k, v in tensors.items() if k.startswith("extra.")}
    return meta["state"], hidden, extra


# ---------------------------------------------------------------------------------------
# A run's checkpoints: whole directories, switched atomically


def _fsync_dir(path: Path) -> None:
    """Flush a directory's entries (new names, renames) to disk, where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checkpoint_dir(final: Path, fill: Callable[[Path], None], keeps: str) -> None:
    """Fill a temporary directory beside `final` (a new name) with `fill(tmp)`, flush it
    and rename it to `final`: readers (and a crash) see the whole directory or none of it.

    A failure (a full disk, say) removes the temporary directory and raises a
    CheckpointError saying that `keeps`, the previous checkpoint, is untouched.
    """
    tmp = final.with_name(f".{final.name}.tmp")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        fill(tmp)
        _fsync_dir(tmp)
        os.rename(tmp, final)
        _fsync_dir(final.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "the disk is full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else (e.strerror or str(e))
        raise CheckpointError(f"could not save the checkpoint {final}: {reason}; {keeps} is unchanged") from None


def step_checkpoints(run_dir: Path) -> list[Path]:
    """The run's complete step checkpoints, oldest first."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [d for d in folder.iterdir() if STEP_DIR.fullmatch(d.name) and d.is_dir() and not d.is_symlink()]
    return sorted(found, key=_step_key)


def _step_key(d: Path) -> tuple[int, int]:
    step, again = STEP_DIR.fullmatch(d.name).groups()
    return int(step), int(again or 1)


def last_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint --resume continues: `checkpoints/last`, else the newest step
    directory with a training state, else (a run from before step directories) the
    run directory itself."""
    last = follow(run_dir / CHECKPOINTS / LAST)
    if (last / TRAINING_STATE).is_file():
        return last
    with_state = [d for d in step_checkpoints(run_dir) if (d / TRAINING_STATE).is_file()]
    if with_state:
        return with_state[-1]
    return run_dir if (run_dir / TRAINING_STATE).is_file() else None


def save_step_checkpoint(
    run_dir: Path, step: int, fill: Callable[[Path], None], best: bool, keep_last: int,
) -> Path:
    """Write `checkpoints/step-N` with `fill`, then point `last` (and with `best`, the
    run's `best`) at it, then delete all but the newest `keep_last` and the best."""
    # A step saved again (a run resumed from an older checkpoint) gets a new name, so
    # that no directory is ever replaced in place.
    final, again = run_dir / CHECKPOINTS / f"step-{step:08d}", 1
    while final.exists():
        again += 1
        final = run_dir / CHECKPOINTS / f"step-{step:08d}-{again}"
    previous = last_checkpoint(run_dir)
    keeps = f"the previous checkpoint ({previous})" if previous is not None else "nothing saved before"
    write_checkpoint_dir(final, fill, keeps)
    point(run_dir / CHECKPOINTS / LAST, final.name)
    if best:
        point(run_dir / BEST, f"{CHECKPOINTS}/{final.name}")
    prune_checkpoints(run_dir, keep_last)
    return final


def prune_checkpoints(run_dir: Path, keep_last: int) -> None:
    """Delete step checkpoints beyond the newest `keep_last`, never the best or the last,
    and leftovers of interrupted writes."""
    kept = {follow(run_dir / BEST).resolve(), follow(run_dir / CHECKPOINTS / LAST).resolve()}
    steps = step_checkpoints(run_dir)
    for d in steps[: max(len(steps) - keep_last, 0)]:
        if d.resolve() not in kept:
            # Renamed first, so that a half-deleted checkpoint never shows under a step name.
            doomed = d.with_name(f".{d.name}.deleting")
            os.rename(d, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    for d in (run_dir / CHECKPOINTS).glob(".step-*"):
        if d.is_dir():
            shutil.rmtree(d, ignore_errors=True)
