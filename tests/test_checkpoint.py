"""Checkpoint directories: the exact files, round trips, and clear refusals."""

import json

import pytest
import torch

from lstm_lm.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint
from lstm_lm.config import FORMAT_VERSION, Config, ModelConfig
from lstm_lm.data import build_tokenizer
from lstm_lm.errors import CheckpointError
from lstm_lm.model import LSTMLanguageModel
from lstm_lm.training.optim import make_optimizer
from lstm_lm.training.rundir import update_latest
from lstm_lm.training.training_state import TrainState, load_training_state, save_training_state


@pytest.fixture
def saved(tmp_path):
    cfg = Config(model=ModelConfig(embedding_size=16, hidden_size=16, num_layers=2, dropout=0.0))
    tok = build_tokenizer(cfg.data, ["the cat sat on the mat", "a dog"])
    torch.manual_seed(0)
    model = LSTMLanguageModel(cfg.model, tok.get_vocab_size())
    save_checkpoint(tmp_path / "ckpt", model, tok, cfg)
    return tmp_path / "ckpt", model, tok, cfg


def test_checkpoint_holds_exactly_these_files(saved):
    path, *_ = saved
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    meta = json.loads((path / "config.json").read_text())
    assert meta["format_version"] == FORMAT_VERSION and meta["vocab_size"] == 9
    assert set(meta) >= {"data", "model", "train"}


@pytest.mark.parametrize("impl", ["cudnn", "custom"])
def test_round_trip_gives_the_same_logits_on_either_engine(saved, impl):
    path, model, tok, _ = saved
    loaded, loaded_tok, cfg = load_checkpoint(path, impl=impl)
    assert loaded.decoder.weight is loaded.embedding.weight  # tying survives the round trip
    assert loaded_tok.get_vocab() == tok.get_vocab()
    ids = torch.randint(0, 9, (7, 3))
    model.eval()
    torch.testing.assert_close(loaded(ids)[0], model(ids)[0], atol=1e-5, rtol=0)


def test_missing_checkpoint_and_missing_files(tmp_path, saved):
    with pytest.raises(CheckpointError, match="no checkpoint at .*lstm-lm train"):
        resolve_checkpoint(tmp_path / "nothing")
    path, *_ = saved
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="missing tokenizer.json"):
        load_checkpoint(path)


def test_newer_format_and_broken_weights_are_refused(saved):
    path, *_ = saved
    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(meta | {"format_version": 99}))
    with pytest.raises(CheckpointError, match="format 99"):
        load_checkpoint(path)
    (path / "config.json").write_text(json.dumps(meta))
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot load"):
        load_checkpoint(path)


def test_vocab_mismatch_is_refused(saved):
    path, *_ = saved
    meta = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(meta | {"vocab_size": 50}))
    with pytest.raises(CheckpointError, match="vocab_size 50 but tokenizer.json has 9"):
        load_checkpoint(path)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_training_state_round_trip(saved, optimizer):
    path, model, tok, cfg = saved
    cfg.train.optimizer = optimizer
    opt = make_optimizer(cfg, model)
    ids = torch.randint(0, 9, (5, 2))
    model(ids)[0].sum().backward()
    opt.step()
    hidden = [(torch.randn(2, 16), torch.randn(2, 16)) for _ in range(2)]
    extra = {"average.0": torch.randn(3, 4)}
    state = TrainState(
        lr=0.25,
        lr_peak=0.5,
        lr_set=1.0,
        step=3,
        epoch=2,
        pos=17,
        val_losses=[5.0, 4.5],
        averaging_since=2,
        epoch_loss_sum=12.5,
        epoch_tokens=40,
    )
    save_training_state(path, model, opt, state, hidden, extra)

    torch.manual_seed(123)
    fresh = LSTMLanguageModel(cfg.model, 9)
    fresh_opt = make_optimizer(cfg, fresh)
    restored_state, restored, restored_extra = load_training_state(path, fresh, fresh_opt, torch.device("cpu"))
    assert restored_state == state
    torch.testing.assert_close(restored, hidden)
    torch.testing.assert_close(restored_extra, extra)
    for (n, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b, msg=n)
    assert fresh.decoder.weight is fresh.embedding.weight
    for a, b in zip(opt.state.values(), fresh_opt.state.values()):
        for k in a:
            torch.testing.assert_close(torch.as_tensor(a[k]), torch.as_tensor(b[k]))


def test_weights_that_share_one_buffer_are_saved(saved, tmp_path):
    """On a GPU, nn.LSTM keeps its weights as views of one flat cuDNN buffer; emulate that here."""
    _, model, tok, cfg = saved
    params = list(model.rnn.parameters())
    flat = torch.cat([p.detach().flatten() for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    assert params[0].untyped_storage().data_ptr() == params[1].untyped_storage().data_ptr()
    save_checkpoint(tmp_path / "flat", model, tok, cfg)
    loaded, _, _ = load_checkpoint(tmp_path / "flat")
    ids = torch.randint(0, 9, (4, 2))
    torch.testing.assert_close(loaded(ids)[0], model.eval()(ids)[0], atol=1e-6, rtol=0)


def test_latest_is_a_link_or_a_pointer_file(saved):
    path, *_ = saved
    latest = path.parent / "latest"
    update_latest(path, latest)
    assert latest.is_symlink() and resolve_checkpoint(latest) == path
    latest.unlink()
    latest.write_text("ckpt\n")  # what update_latest writes where symlinks are not allowed
    assert resolve_checkpoint(latest) == path


def test_config_saved_before_precision_and_compile_existed_loads_with_their_defaults(saved):
    ckpt, *_ = saved
    cfg = json.loads((ckpt / "config.json").read_text())
    del cfg["train"]["precision"], cfg["train"]["compile"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    _, _, loaded = load_checkpoint(ckpt)
    assert loaded.train.precision == "auto" and loaded.train.compile is False


def test_a_safetensors_file_whose_header_starts_like_a_pickle_loads(saved):
    """A header of 896 bytes is written as 80 03 00 ..: the first two bytes of a protocol-3 pickle."""
    from safetensors.torch import save_file

    path, model, *_ = saved
    weights = {k: v.contiguous() for k, v in model.state_dict().items() if k != "decoder.weight"}
    pad = ""
    while True:  # metadata pads the JSON header to exactly 896 bytes (safetensors aligns it to 8)
        save_file(weights, str(path / "model.safetensors"), metadata={"pad": pad})
        n = int.from_bytes((path / "model.safetensors").read_bytes()[:8], "little")
        if n >= 896:
            break
        pad += "x" * max(1, (896 - n) // 2)
    if n != 896:
        pytest.skip(f"could not make an 896-byte header (got {n})")
    assert (path / "model.safetensors").read_bytes()[:2] == b"\x80\x03"
    load_checkpoint(path)


@pytest.mark.parametrize("softmax", ["full", "adaptive"])
def test_loading_and_completing_leave_torch_dynamo_unimported(tmp_path, softmax):
    """torch._dynamo costs 1.6 s to import on a 2-core CPU: `complete`, `eval` and `score`,
    which never compile, must not import it (not through torch.compiler.disable at import
    time, nor through the meta-device shape check of loading)."""
    import subprocess
    import sys

    cfg = Config(model=ModelConfig(embedding_size=8, hidden_size=8, softmax=softmax, cutoffs=[5]))
    tok = build_tokenizer(cfg.data, ["the cat sat on the mat", "a dog ran"])
    save_checkpoint(tmp_path / "ckpt", LSTMLanguageModel(cfg.model, tok.get_vocab_size()), tok, cfg)
    code = (
        "import sys; from lstm_lm import LanguageModel; "
        f"lm = LanguageModel.load({str(tmp_path / 'ckpt')!r}); lm.next_words('the cat', 2); "
        "print('torch._dynamo' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
