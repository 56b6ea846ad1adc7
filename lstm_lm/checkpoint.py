"""The inference checkpoint: everything `complete`, `eval` and `score` need, nothing pickled.

    save_checkpoint("runs/demo/checkpoints/step-00000120", model, tokenizer, cfg)
    model, tokenizer, cfg = load_checkpoint("runs/demo", device="cpu")

A checkpoint directory holds config.json (all settings, the vocabulary size and a
format version), model.safetensors (the weights: the averaged ones once NT-ASGD has
begun) and tokenizer.json; a run's step checkpoints also hold the training state
for --resume (training_state.py). rundir.py lays them out in a run directory.
Weights are safetensors and everything else JSON: nothing is ever unpickled, and a
directory holding a pickle is refused.

Loading checks before it allocates: config.json is read with a size bound, the
safetensors header (every tensor's dtype, shape and place in the file, without its
data) is checked on its own, and config.json's sizes against it, on a model built on
the "meta" device, which holds shapes and no memory. Only then is the model made and
the weights read; weights that are not finite numbers are refused, naming the tensor.
"""

from __future__ import annotations

import json
import math
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
from lstm_lm.training.rundir import BEST, CHECKPOINTS, CONFIG, LAST, TOKENIZER, WEIGHTS, follow, step_checkpoints
from lstm_lm.utils import shapes_only
from lstm_lm.writing import write_atomically, write_json

CHECKPOINT_FILES = (CONFIG, WEIGHTS, TOKENIZER)
MAX_CONFIG_BYTES = 1 << 20  # config.json is a few KB; safetensors' own header limit is 100 MB
MAX_HEADER_BYTES = 100 << 20
# The dtypes a weight may have, and their sizes: integer or boolean weights would be cast
# silently into a float model, and change its answers.
FLOAT_DTYPES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}
# What torch.save, pickle and joblib files are called. None is ever loaded: unpickling
# runs whatever code the file names.
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt", ".joblib")


def weights_to_save(model: LSTMLanguageModel, copy: bool = True) -> dict[str, torch.Tensor]:
    """The state dict as separate CPU tensors, the tied decoder weight left out.

    Copies are needed: on a GPU nn.LSTM keeps its weights as views of one flat cuDNN
    buffer, and safetensors refuses tensors that share storage. (`copy=False`: the
    tensors themselves, for their names and shapes.)
    """
    return {
        name: t.detach().to("cpu", copy=True).contiguous() if copy else t
        for name, t in model.state_dict().items()
        if not (name == "decoder.weight" and model.cfg.tie_weights)
    }


def load_weights(model: LSTMLanguageModel, weights: dict[str, torch.Tensor]) -> None:
    if model.cfg.tie_weights and model.decoder is not None and "embedding.weight" in weights:
        weights = weights | {"decoder.weight": weights["embedding.weight"]}
    model.load_state_dict(weights, strict=True)  # copies in place: the tying survives


def save_checkpoint(
    run_dir: str | Path,
    model: LSTMLanguageModel,
    tokenizer: Tokenizer,
    cfg: Config,
    measured: dict[str, Any] | None = None,
) -> None:
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
    elif path.is_dir() and not (path / CONFIG).exists() and step_checkpoints(path):
        last = path / CHECKPOINTS / LAST
        raise CheckpointError(
            f"{path} is a run with no validated checkpoint yet (it stopped before its first validation): load "
            f"its newest with --checkpoint {last}, or train on with: lstm-lm train --out {path} --resume"
        )
    return check_checkpoint_dir(path)


def read_json_file(file: Path, limit: int = MAX_CONFIG_BYTES) -> Any:
    """A JSON file of at most `limit` bytes, or a CheckpointError that says what is wrong with it."""
    try:
        with open(file, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise CheckpointError(f"cannot read {file}: {e.strerror or e}") from None
    if len(data) > limit:
        raise CheckpointError(f"{file} is over {limit:,} bytes, too large for what lstm-lm writes there")
    try:
        return json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({str(e).splitlines()[0][:200]})") from None
    except RecursionError:
        raise CheckpointError(f"{file} is not valid JSON (nested too deeply)") from None


def load_config_json(path: Path) -> tuple[Config, dict[str, Any]]:
    raw = read_json_file(path / CONFIG)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path / CONFIG} is not a JSON object")
    version = raw.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool):
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
        raise CheckpointError(str(e)[:2000]) from None
    except (RecursionError, TypeError, ValueError) as e:  # a value of the wrong shape deep inside
        raise CheckpointError(f"bad config ({path / CONFIG}): {type(e).__name__}") from None
    measured = meta.get("measured")
    meta["measured"] = (
        {k: v for k, v in measured.items() if isinstance(k, str) and _finite_number(v)}
        if isinstance(measured, dict)
        else {}
    )
    return cfg, meta


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Each tensor's (dtype, shape) from a safetensors file's header, checked: the header
    fits the file, every tensor's bytes lie inside the data and match its dtype and shape,
    and every dtype is floating point. No tensor is read."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError("it is not a safetensors file (its header length does not fit the file)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read it: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CheckpointError("it is not a safetensors file (its header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError("it is not a safetensors file (its header is not a JSON object)")
    data_bytes = size - 8 - n
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        what = f"tensor {name[:100]!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise CheckpointError(f"{what} is not described by dtype, shape and data_offsets")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not (
            isinstance(shape, list)
            and all(_count(d) for d in shape)
            and isinstance(offsets, list)
            and len(offsets) == 2
            and all(_count(o) for o in offsets)
        ):
            raise CheckpointError(f"{what} has a malformed shape or data_offsets")
        if not isinstance(dtype, str) or dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"{what} has dtype {str(dtype)[:20]}; weights must be floating point ({', '.join(FLOAT_DTYPES)})"
            )
        start, end = offsets
        if not start <= end <= data_bytes:
            raise CheckpointError(f"{what} lies outside the file's data ({start}..{end} of {data_bytes} bytes)")
        if math.prod(shape) * FLOAT_DTYPES[dtype] != end - start:
            raise CheckpointError(
                f"{what}: shape {tuple(shape)} of {dtype} needs "
                f"{math.prod(shape) * FLOAT_DTYPES[dtype]} bytes, the file gives it {end - start}"
            )
        tensors[name] = (dtype, tuple(shape))
    return tensors


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def check_weights_fit(
    cfg: Config, vocab_size: int, header: dict[str, tuple[str, tuple[int, ...]]], impl: str | None = None
) -> None:
    """Fail unless the model that config.json describes has exactly the tensors of the
    header, shape for shape. The model is built on the meta device (shapes, no memory),
    after its sizes are bounded by the header's, so that no config can make it large."""
    m = cfg.model
    largest = max((d for _, shape in header.values() for d in shape), default=0)
    sizes = {
        "model.embedding_size": m.embedding_size,
        "vocab_size": vocab_size,
        **{f"model.hidden_sizes[{k}]": h for k, h in enumerate(m.layer_sizes)},
    }
    too_big = [f"{key} is {value}" for key, value in sizes.items() if value > largest]
    if len(m.layer_sizes) + len(m.cutoffs or ()) > len(header):
        too_big.append(f"model.num_layers is {len(m.layer_sizes)}")
    if too_big:
        raise CheckpointError(
            f"config.json does not fit it: {', '.join(too_big)[:300]}, more than its "
            f"{len(header)} tensors hold (the largest dimension among them is {largest})"
        )
    try:
        with shapes_only():
            shapes = {
                name: tuple(t.shape)
                for name, t in weights_to_save(LSTMLanguageModel(m, vocab_size, impl), copy=False).items()
            }
    except (RuntimeError, ValueError, OverflowError) as e:
        raise CheckpointError(
            f"config.json describes a model that cannot be built: {str(e).splitlines()[0][:200]}"
        ) from None
    missing = sorted(set(shapes) - set(header))
    if missing:
        raise CheckpointError(
            f"it has no tensor {missing[0]!r}, which config.json's model needs (shape {shapes[missing[0]]})"
        )
    extra = sorted(set(header) - set(shapes))
    if extra:
        raise CheckpointError(f"it holds a tensor {extra[0][:100]!r} that config.json's model does not have")
    for name, shape in shapes.items():
        if header[name][1] != shape:
            raise CheckpointError(f"tensor {name!r} has shape {header[name][1]}, config.json's model needs {shape}")


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
    try:
        check_weights_fit(cfg, vocab_size, read_header(path / WEIGHTS), impl)
        model = LSTMLanguageModel(cfg.model, vocab_size, impl=impl)
        try:
            weights = load_file(str(path / WEIGHTS))
        except (SafetensorError, RuntimeError, OSError, ValueError) as e:
            raise CheckpointError((str(e).splitlines() or [""])[0][:300]) from None
        for name, t in weights.items():
            if not torch.isfinite(t).all():
                raise CheckpointError(
                    f"tensor {name!r} holds {int((~torch.isfinite(t)).sum())} values that are not "
                    "finite numbers (NaN or infinity); these weights cannot give probabilities"
                )
    except CheckpointError as e:
        raise CheckpointError(f"cannot load {path / WEIGHTS}: {e}") from None
    load_weights(model, weights)
    return model.to(device).eval(), tokenizer, cfg, path, meta["measured"]
