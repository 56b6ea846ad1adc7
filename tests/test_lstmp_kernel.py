"""The LSTMP kernel with the written-out backward (lstm_lm/cells/lstmp_kernel.py) against
torch.lstm, ATen's own LSTMP, with the same weights: values and every gradient."""

from __future__ import annotations

import pytest
import torch

from lstm_lm.cells import lstm as lstm_cell
from lstm_lm.cells.lstmp_kernel import lstmp
from lstm_lm.config import ModelConfig
from lstm_lm.model import LSTMLanguageModel

# ATen says it runs the LSTMP itself, oneDNN having no projection: that is the reference here
pytestmark = pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")


def _inputs(layers: int, T=6, B=3, I=5, H=7, P=4, dtype=torch.float64, scale=0.5):
    torch.manual_seed(0)
    weights = []
    for k in range(layers):
        weights += [
            torch.randn(4 * H, I if k == 0 else P, dtype=dtype) * scale,  # W_ih
            torch.randn(4 * H, P, dtype=dtype) * scale,  # W_hh
            torch.randn(4 * H, dtype=dtype) * scale / 2,  # b_ih
            torch.randn(4 * H, dtype=dtype) * scale / 2,  # b_hh
            torch.randn(P, H, dtype=dtype) * scale,  # W_hr
        ]
    x = torch.randn(T, B, I, dtype=dtype)
    h0, c0 = torch.randn(layers, B, P, dtype=dtype), torch.randn(layers, B, H, dtype=dtype)
    return [t.requires_grad_() for t in (x, h0, c0, *weights)]


def _aten(x, h0, c0, *weights, layers, dropout=0.0, training=True):
    out, h, c = torch.lstm(x, (h0, c0), list(weights), True, layers, dropout, training, False, False)
    return out, (h, c)


def _ours(x, h0, c0, *weights, layers, dropout=0.0, training=True):
    return lstmp(x, (h0, c0), list(weights), layers, dropout, training)


def _objective(out, state):
    """Uses every output and both final states, each weighted differently."""
    h, c = state
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return (out * weights).sum() + (h**2).sum() + c.sin().sum()


@pytest.mark.parametrize("layers", [1, 2])
def test_values_and_gradients_equal_torch_lstm_in_float64(layers):
    inputs = _inputs(layers)
    want = _aten(*inputs, layers=layers)
    got = _ours(*inputs, layers=layers)
    torch.testing.assert_close(got[0], want[0], atol=1e-12, rtol=0)
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    want_grads = torch.autograd.grad(_objective(*want), inputs)
    got_grads = torch.autograd.grad(_objective(*got), inputs)
    names = ["x", "h0", "c0"] + [f"{n}_l{k}" for k in range(layers) for n in ("w_ih", "w_hh", "b_ih", "b_hh", "w_hr")]
    for a, b, name in zip(got_grads, want_grads, names):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=name)


def test_gradcheck():
    inputs = _inputs(1, T=3, B=2, I=2, H=3, P=2)
    assert torch.autograd.gradcheck(lambda *a: _ours(*a, layers=1)[0], inputs, eps=1e-6, atol=1e-6)


def test_float32_matches_torch_lstm_at_the_recipe_shape_in_miniature():
    inputs = _inputs(1, T=35, B=4, I=16, H=40, P=16, dtype=torch.float32, scale=40**-0.5)
    want, got = _aten(*inputs, layers=1), _ours(*inputs, layers=1)
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    for a, b in zip(torch.autograd.grad(_objective(*got), inputs), torch.autograd.grad(_objective(*want), inputs)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_dropout_between_layers_in_training_only():
    """p = 1 drops all of the first layer's output, so the second layer sees zeros;
    out of training nothing is dropped."""
    inputs = _inputs(2)
    x, h0, c0, *weights = inputs
    out, _ = _ours(*inputs, layers=2, dropout=1.0, training=True)
    second, _ = _aten(torch.zeros(6, 3, 4, dtype=x.dtype), h0[1:], c0[1:], *weights[5:], layers=1)
    torch.testing.assert_close(out, second, atol=1e-12, rtol=0)
    evaluated, _ = _ours(*inputs, layers=2, dropout=1.0, training=False)
    torch.testing.assert_close(evaluated, _aten(*inputs, layers=2)[0], atol=1e-12, rtol=0)


def test_model_trains_with_it_and_its_gradients_are_the_hand_written_cells(monkeypatch):
    """An LSTMP language model on the fused engine runs this kernel where gradients are
    on; its loss and gradients equal those of the same weights on the textbook cell."""
    calls = []
    monkeypatch.setattr(lstm_cell, "lstmp", lambda *a: calls.append(1) or lstmp(*a))
    cfg = ModelConfig(embedding_size=8, hidden_size=12, proj_size=8, num_layers=2, dropout=0.0, tie_weights=True)
    ids, targets = torch.randint(0, 30, (2, 9, 3))
    grads = []
    for impl in ("cudnn", "custom"):
        torch.manual_seed(0)
        model = LSTMLanguageModel(cfg, 30, impl=impl).double().train()
        loss, _ = model.loss(ids, targets, model.rnn.zero_state(3, "cpu", torch.float64))
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    assert len(calls) == 1  # the fused engine's one call; the custom engine steps the cell
    with torch.no_grad():
        model.rnn.engine = "cudnn"
        model.rnn.flatten_parameters()
        model.loss(ids, targets, model.rnn.zero_state(3, "cpu", torch.float64))
    assert len(calls) == 1  # the forward alone is ATen's
    (loss_a, grads_a), (loss_b, grads_b) = grads
    torch.testing.assert_close(loss_a, loss_b, atol=1e-12, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-10, rtol=1e-8, msg=name)
