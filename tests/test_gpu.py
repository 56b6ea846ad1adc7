"""CUDA checks (skipped without a GPU): the hand-written cell against cuDNN, and training on the GPU."""

import warnings

import pytest
import torch
from conftest import requires_cuda
from torch import nn

from lstm_lm import cells
from lstm_lm.checkpoint import load_checkpoint
from lstm_lm.config import load_config
from lstm_lm.model import Recurrent
from lstm_lm.training.train import train

pytestmark = [pytest.mark.gpu, requires_cuda]


@pytest.fixture
def exact_float32():
    """cuDNN and cuBLAS may use TF32 for float32; turn it off so 1e-5 is a fair bound."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("weight_drop", [0.0, 0.5])
@pytest.mark.parametrize("sizes", [[64, 64], [64, 48]])
def test_cudnn_reads_the_flat_buffer_in_place(sizes, weight_drop):
    """The parameters sit where torch.nn's cuDNN flattening puts them, and no call makes
    cuDNN copy them (it warns "not part of single contiguous chunk" when it does)."""
    torch.manual_seed(0)
    ours = Recurrent(32, sizes, 2, engine="cudnn", weight_drop=weight_drop).cuda().train()
    if len(set(sizes)) == 1:
        ref = nn.LSTM(32, sizes[0], 2).cuda()  # flattened by torch._cudnn_rnn_flatten_weight
        offsets = [p.data_ptr() - ref.weight_ih_l0.data_ptr() for p in ref._flat_weights]
        assert [p.data_ptr() - ours._flat[0].data_ptr() for p in ours.group_parameters(0)] == offsets
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for precision in (torch.float32, torch.bfloat16):
            with torch.autocast("cuda", dtype=precision, enabled=precision != torch.float32):
                out, _ = ours(torch.randn(20, 8, 32, device="cuda"))
            out.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())


@pytest.mark.parametrize("cell", [c for c in cells.names() if cells.get(c).torch_module is not None])
def test_custom_cell_matches_cudnn_on_cuda(exact_float32, cell):
    torch.manual_seed(0)
    ref = cells.get(cell).torch_module(32, 64, 2).cuda()
    ours = Recurrent(32, 64, 2, cell=cell).cuda()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(20, 8, 32, device="cuda")
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, state_ref = ref(x_ref)
    state_ref = state_ref if isinstance(state_ref, tuple) else (state_ref,)
    out_ours, state = ours(x_ours)
    state_ours = tuple(torch.stack(parts) for parts in zip(*state))
    for a, b in ((out_ours, out_ref), *zip(state_ours, state_ref)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    w = torch.randn_like(out_ref)
    ((out_ref * w).sum() + state_ref[-1].sum()).backward()
    ((out_ours * w).sum() + state_ours[-1].sum()).backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-5, rtol=0)
    ours_params = dict(ours.named_parameters())
    for name, p in ref.named_parameters():  # sums over 160 positions, in another order than cuDNN's
        torch.testing.assert_close(
            ours_params[name].grad, p.grad, atol=1e-4, rtol=1e-4, msg=lambda m, name=name: f"{name}: {m}"
        )


def test_awd_regularization_runs_on_cudnn_and_matches_the_custom_cell(exact_float32):
    """Weight drop, locked dropout and per-layer sizes with cuDNN: the same masks give the
    same outputs as the hand-written cell, and training steps run."""
    from lstm_lm.config import ModelConfig
    from lstm_lm.model import LSTMLanguageModel

    cfg = dict(
        embedding_size=16,
        hidden_sizes=[32, 24, 16],
        num_layers=3,
        dropout=0.3,
        dropout_embedding=0.1,
        weight_drop=0.5,
        locked_dropout=True,
    )
    torch.manual_seed(0)
    hand = LSTMLanguageModel(ModelConfig(impl="custom", **cfg), 50).cuda().train()
    fast = LSTMLanguageModel(ModelConfig(impl="cudnn", **cfg), 50).cuda().train()
    fast.load_state_dict(hand.state_dict())
    ids = torch.randint(0, 50, (12, 4), device="cuda")
    outs = []
    for model in (hand, fast):
        torch.manual_seed(3)
        outs.append(model(ids)[0])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
    objective, _, _ = fast.training_loss(ids, ids, ar=2.0, tar=1.0)
    objective.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in fast.parameters())


def test_fused_loss_matches_cross_entropy_on_cuda(exact_float32):
    from lstm_lm.loss import linear_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(70, 32, device="cuda", requires_grad=True)
    w = torch.randn(500, 32, device="cuda", requires_grad=True)
    b = torch.randn(500, device="cuda", requires_grad=True)
    y = torch.randint(0, 500, (70,), device="cuda")
    ref = torch.nn.functional.cross_entropy(torch.nn.functional.linear(h, w, b), y)
    ref.backward()
    grads = [t.grad.clone() for t in (h, w, b)]
    h.grad = w.grad = b.grad = None
    ours = linear_cross_entropy(h, w, b, y)
    ours.backward()
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-6)
    for t, g in zip((h, w, b), grads):
        torch.testing.assert_close(t.grad, g, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss_impl", ["fused", "plain"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_training_step_never_waits_for_the_gpu(precision, loss_impl):
    """No host sync in train_step (cuDNN engine, weight drop on): the CPU queues step after
    step. torch.cuda's sync debug mode raises on any operation that synchronizes."""
    from lstm_lm.config import ModelConfig
    from lstm_lm.model import LSTMLanguageModel
    from lstm_lm.training.trainer import train_step

    torch.manual_seed(0)
    model = LSTMLanguageModel(ModelConfig(embedding_size=64, hidden_size=64, weight_drop=0.3), 1000).cuda().train()
    model.loss_impl = loss_impl
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    data = torch.randint(0, 1000, (36 * 4, 8), device="cuda")
    hidden = model.init_state(8, "cuda")
    for i in range(4):
        if i == 1:  # after the first step, which sets up cuDNN and the caching allocator
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            _, hidden = train_step(
                model,
                optimizer,
                data[i * 36 : i * 36 + 35],
                data[i * 36 + 1 : i * 36 + 36],
                hidden,
                clip=0.25,
                precision=precision,
            )
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize(
    "impl,cell",
    [
        (impl, cell)
        for cell in cells.names()
        for impl in (["cudnn", "custom"] if cells.get(cell).kernel else ["custom"])
    ],
)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_on_cuda_gives_a_checkpoint_that_loads_on_the_cpu(tmp_path, impl, cell, precision):
    cfg = load_config(
        None,
        [
            "data.source=demo",
            "data.demo_size=600",
            "data.split_punctuation=true",
            "model.embedding_size=32",
            "model.hidden_size=32",
            "model.num_layers=2",
            f"model.impl={impl}",
            f"model.cell={cell}",
            "train.epochs=3",
            "train.batch_size=8",
            "train.optimizer=adamw",
            "train.lr=0.01",
            "train.device=cuda",
            f"train.precision={precision}",
        ],
    )
    summary = train(cfg, tmp_path / "run")
    gpu_model, _, _ = load_checkpoint(tmp_path / "run", "cuda")
    cpu_model, _, _ = load_checkpoint(tmp_path / "run", "cpu")
    # It learned: an untrained model's perplexity is about the vocabulary's size (~200 here).
    assert summary["best_valid_perplexity"] < cpu_model.vocab_size / 4
    ids = torch.randint(0, cpu_model.vocab_size, (10, 3))
    torch.testing.assert_close(gpu_model(ids.cuda())[0].cpu(), cpu_model(ids)[0], atol=1e-3, rtol=1e-3)


def test_the_python_api_on_cuda_answers_as_on_the_cpu(demo_workdir):
    """LanguageModel on the GPU (what `serve --device cuda` and `score --device cuda` use):
    the same next words and scores as on the CPU."""
    from lstm_lm import LanguageModel
    from lstm_lm.demo import SEED_PROMPT

    cpu, gpu = (LanguageModel.load(demo_workdir / "runs" / "demo", device) for device in ("cpu", "cuda"))
    (a, pa), (b, pb) = zip(*cpu.next_words(SEED_PROMPT, 3)), zip(*gpu.next_words(SEED_PROMPT, 3))
    assert a == b and pa == pytest.approx(pb, abs=1e-4)
    texts = [SEED_PROMPT + " Tamil.", "My name is"]
    for x, y in zip(cpu.score(texts), gpu.score(texts)):
        assert x["logprob"] == pytest.approx(y["logprob"], abs=1e-3)


@pytest.mark.parametrize("name,opts", [(c, {}) for c in cells.names()] + [("lstm", {"proj_size": 16})])
def test_every_cell_runs_on_cuda_and_its_engines_agree(exact_float32, name, opts):
    """Each registered cell (and the LSTMP) on CUDA: the step loop and, where the cell has
    one, the fused kernel (cuDNN) give the same outputs, and gradients reach every parameter."""
    torch.manual_seed(0)
    rnn = Recurrent(32, 64, 2, cell=name, **opts).cuda()
    x = torch.randn(20, 8, 32, device="cuda")
    out, _ = rnn(x)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in rnn.parameters())
    if cells.get(name).kernel is not None:
        rnn.engine = "cudnn"
        rnn.flatten_parameters()
        fused, _ = rnn(x)
        torch.testing.assert_close(fused, out, atol=1e-5, rtol=0)
