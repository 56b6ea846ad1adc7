"""The 2024 cells' own claims, beyond what tests/test_cells.py checks of every cell: the
parallel forms (the minimal RNNs' log-space scan, the mLSTM's chunks) equal the step form
over long sequences and chunk boundaries, the stabiliser changes nothing, and the sLSTM's
heads are independent."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from lstm_lm import cells
from lstm_lm.cells import mlstm
from lstm_lm.cells.base import Cell
from lstm_lm.cells.scan import InputGatedCell, linear_recurrence, linear_scan
from lstm_lm.config import ModelConfig
from lstm_lm.model import LSTMLanguageModel, Recurrent
from lstm_lm.training.trainer import compile_loss

SCANNED = [n for n in cells.names() if issubclass(cells.get(n), InputGatedCell)]


def _steps(rnn: Recurrent, x: torch.Tensor, state):
    """Layer by layer, step by step: the form generation runs."""
    for k, cell in enumerate(rnn.cells):
        p, outputs, layer = rnn.params(k), [], state[k]
        for x_t in x.unbind(0):
            layer = cell.step(cell.project_input(x_t, p), layer, p)
            outputs.append(layer[0])
        x, state = torch.stack(outputs), [*state[:k], layer, *state[k + 1 :]]
    return x, state


def _recurrence_form(rnn: Recurrent, parallel: bool) -> Recurrent:
    """The minimal RNNs' sequence path in one form on any device: the scan or step by step."""
    for cell in rnn.cells:
        cell.sequence = functools.partial(cell.scan, parallel=parallel)
    return rnn


def _two_chunks(rnn: Recurrent, x: torch.Tensor, state):
    """The sequence path over x in two chunks, the state carried from the first into the second."""
    with torch.no_grad():
        first, carried = rnn(x[:150], state)
        second, last = rnn(x[150:], carried)
    return torch.cat([first, second]), last


@pytest.mark.parametrize("parallel", [True, False], ids=["scan", "step-by-step"])
@pytest.mark.parametrize("cell", SCANNED)
def test_scan_equals_steps_over_long_chunks_with_a_carried_state(cell, parallel):
    """Two chunks of 150 steps in float32 from an empty memory, the state carried from the
    first into the second. (tests/test_cells.py starts short chunks from random states.)"""
    torch.manual_seed(0)
    rnn = _recurrence_form(Recurrent(12, 16, 2, cell=cell).eval(), parallel)
    x, state = torch.randn(300, 3, 12), rnn.zero_state(3, "cpu")
    with torch.no_grad():
        want, want_state = _steps(rnn, x, state)
    got, got_state = _two_chunks(rnn, x, state)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(got_state, want_state):
        for s, t in zip(a, b):
            torch.testing.assert_close(s, t, atol=1e-5, rtol=1e-5)


def test_linear_recurrence_against_the_scan_and_finite_differences():
    """The step-by-step recurrence's hand-written backward: gradcheck in float64 (a state
    of either sign, gates in (0, 1)), and values and gradients equal to the log-space scan's
    (which autograd differentiates)."""
    torch.manual_seed(0)
    a = torch.rand(7, 2, 3, dtype=torch.float64).requires_grad_()
    b = (torch.rand(7, 2, 3, dtype=torch.float64) + 0.1).requires_grad_()
    h0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(linear_recurrence, (a, b, h0))
    weights = torch.randn(7, 2, 3, dtype=torch.float64)
    results = []
    for h in (linear_recurrence(a, b, h0), linear_scan(a.log(), b.log(), h0)):
        results.append([h, *torch.autograd.grad((h * weights).sum(), (a, b, h0))])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("cell", SCANNED)
def test_both_forms_give_the_step_loops_loss_and_gradients(cell):
    """A two-layer model's output, final state and the gradients on its input, carried
    state and every parameter in float64: the parallel scan, step by step, and the cell's
    own step loop (the base cell's sequence) all agree."""
    torch.manual_seed(0)
    rnn = Recurrent(5, 6, 2, cell=cell).double()
    x = torch.randn(40, 3, 5, dtype=torch.float64)
    state = [c.random_state(3, torch.float64) for c in rnn.cells]
    results = []
    for form in ("scan", "step by step", "step loop"):
        for c in rnn.cells:
            c.sequence = (
                functools.partial(Cell.sequence, c)
                if form == "step loop"
                else functools.partial(c.scan, parallel=form == "scan")
            )
        x_in = x.clone().requires_grad_()
        state_in = [tuple(s.clone().requires_grad_() for s in layer) for layer in state]
        out, last = rnn(x_in, state_in)
        loss = (out * torch.linspace(-1, 1, 6, dtype=torch.float64)).sum() + sum(
            s.sum() for layer in last for s in layer
        )
        leaves = [x_in, *(s for layer in state_in for s in layer), *rnn.parameters()]
        results.append([out, *last, *torch.autograd.grad(loss, leaves)])
    for form in results[1:]:
        for got, want in zip(form, results[0]):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


def test_mlstm_chunkwise_equals_steps_over_chunk_boundaries(monkeypatch):
    """Sub-chunks of 16 carrying (C, n, m), inside two chunks carrying the state. In float64
    the two forms are one computation. In float32 both drift from it where |n . q| is small
    (h~ divides by it; the outputs reach ~15 there): the chunkwise form no further than the
    step form, and the two agree within 1e-5 everywhere else (99% of the values)."""
    monkeypatch.setattr(mlstm, "CHUNK", 16)
    torch.manual_seed(0)
    rnn = Recurrent(12, 16, 2, cell="mlstm").eval()
    x, state = torch.randn(300, 3, 12), rnn.zero_state(3, "cpu")
    with torch.no_grad():
        want32, _ = _steps(rnn, x, state)
    got32, _ = _two_chunks(rnn, x, state)
    rnn.double()
    state64 = rnn.zero_state(3, "cpu", torch.float64)
    with torch.no_grad():
        want, want_state = _steps(rnn, x.double(), state64)
    got, got_state = _two_chunks(rnn, x.double(), state64)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    for a, b in zip(got_state, want_state):
        for s, t in zip(a, b):
            torch.testing.assert_close(s, t, atol=1e-10, rtol=1e-10)
    assert (got32.double() - want).abs().max() <= (want32.double() - want).abs().max()
    assert ((got32 - want32).abs() <= 1e-5 + 1e-5 * want32.abs()).float().mean() >= 0.99


@pytest.mark.parametrize("parallel", [True, False], ids=["scan", "step-by-step"])
@pytest.mark.parametrize("cell", SCANNED)
def test_the_log_space_scan_holds_where_products_of_gates_underflow(cell, parallel):
    """Gates that keep 1e-4 of the state per step: over 2,000 steps their product is 1e-8000,
    far below float32. The scan in log space still gives the step loop's h (float64), and so
    does the step-by-step form, which never forms the product."""
    torch.manual_seed(0)
    rnn = _recurrence_form(Recurrent(4, 8, 1, cell=cell), parallel)
    with torch.no_grad():
        rnn.bias_ih_l0[:8] = 10.0 if cell == "mingru" else -10.0  # z ~ 1 (minGRU), f ~ 0 (minLSTM)
    x = torch.randn(2000, 2, 4)
    state = rnn.zero_state(2, "cpu")
    with torch.no_grad():
        got, _ = rnn(x, state)
        want, _ = _steps(rnn.double(), x.double(), [tuple(s.double() for s in layer) for layer in state])
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


def _unstabilised_mlstm(x_proj: torch.Tensor, heads: int) -> torch.Tensor:
    """The paper's mLSTM without the stabiliser, in float64: exp(i~) as it is (no head norm)."""
    T, B, _ = x_proj.shape
    H = (x_proj.size(2) - 2 * heads) // 4
    d = H // heads
    C, n, outputs = torch.zeros(B, heads, d, d, dtype=torch.float64), torch.zeros(B, heads, d, dtype=torch.float64), []
    for t in range(T):
        q, k, v, o = x_proj[t, :, : 4 * H].chunk(4, dim=1)
        i, f = x_proj[t, :, 4 * H :].chunk(2, dim=1)
        q, k, v = q.view(B, heads, d), k.view(B, heads, d) / math.sqrt(d), v.view(B, heads, d)
        i, f = torch.exp(i)[..., None], torch.sigmoid(f)[..., None]
        C = f[..., None] * C + i[..., None] * v[..., :, None] * k[..., None, :]
        n = f * n + i * k
        h = (C @ q[..., None]).squeeze(-1) / torch.clamp((n * q).sum(-1, keepdim=True).abs(), min=1)
        outputs.append(torch.sigmoid(o) * h.reshape(B, H))
    return torch.stack(outputs)


def test_the_stabilised_mlstm_computes_the_unstabilised_one(monkeypatch):
    """Compared before the head norm, which would hide any error that scales a head's h~."""
    monkeypatch.setattr(mlstm, "head_norm", lambda h: h)
    torch.manual_seed(0)
    rnn = Recurrent(6, 8, 1, cell="mlstm", num_heads=2).double()
    x = torch.randn(20, 3, 6, dtype=torch.float64)
    with torch.no_grad():
        got, _ = rnn(x)
        want = _unstabilised_mlstm(rnn.cells[0].project_input(x, rnn.params(0)), 2)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


def test_the_mlstm_head_norm_is_a_layer_norm_per_head():
    torch.manual_seed(0)
    h = torch.randn(3, 4, 5, 16, dtype=torch.float64) * 7 + 2
    torch.testing.assert_close(mlstm.head_norm(h), torch.nn.functional.layer_norm(h, (16,)))


def test_slstm_heads_are_independent():
    """Block-diagonal recurrence: the next step's gates of head 1 do not read head 0's h."""
    torch.manual_seed(0)
    rnn = Recurrent(4, 8, 1, cell="slstm", num_heads=2)
    cell, p = rnn.cells[0], rnn.params(0)
    h, c, n, m = cell.random_state(1)
    h = h.requires_grad_()
    out = cell.step(cell.project_input(torch.randn(1, 4), p), (h, c, n, m), p)[0]
    (grad,) = torch.autograd.grad(out[0, 4:].sum(), h)
    assert grad[0, :4].abs().max() == 0 and grad[0, 4:].abs().max() > 0
    assert p["weight_hh"].shape == (2, 16, 4)  # per head: four gate blocks of 4x4


@pytest.mark.parametrize("cell", SCANNED)
def test_compiled_training_loss_runs_the_written_out_backward_as_eager_does(cell):
    """`train.compile` (the wikitext-2 recipe's default) traces the step-by-step recurrence,
    an autograd Function with Python loops: the compiled loss and gradients are eager's."""
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_size=16, hidden_size=16, dropout=0.0, cell=cell)
    model = LSTMLanguageModel(cfg, 50).train()
    x, y, hidden = torch.randint(0, 50, (12, 3)), torch.randint(0, 50, (12, 3)), model.init_state(3)
    results = []
    for loss_fn in (model.training_loss, compile_loss(model)):
        loss = loss_fn(x, y, hidden)[0]
        results.append([loss, *torch.autograd.grad(loss, list(model.parameters()))])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
