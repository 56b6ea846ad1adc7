"""The hand-written cells that torch.nn has (LSTM, GRU, simple RNN) against torch.nn, state carry, and learning
on tiny data. tests/test_cells.py checks every registered cell."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lstm_lm import cells
from lstm_lm.config import ModelConfig
from lstm_lm.model import LSTMLanguageModel, Recurrent

CELLS = [name for name in cells.names() if cells.get(name).torch_module is not None]  # the cells torch.nn has


def _pair(cell="lstm", input_size=7, hidden=11, layers=2, dropout=0.0, engine="custom"):
    torch.manual_seed(0)
    ref = cells.get(cell).torch_module(input_size, hidden, layers, dropout=dropout)
    ours = Recurrent(input_size, hidden, layers, dropout=dropout, cell=cell, engine=engine)
    ours.load_state_dict(ref.state_dict())  # same names and shapes, so this is exact
    return ref, ours


def _stack(state):
    """Our per-layer [(h, c), ...] or [(h,), ...] -> torch.nn's stacks, each (L, B, H)."""
    return tuple(torch.stack(parts) for parts in zip(*state))


def _as_nn(cell, stacks):
    return stacks if len(stacks) > 1 else stacks[0]


@pytest.mark.parametrize("cell", CELLS)
def test_parameter_names_and_shapes_match_torch_nn(cell):
    ref, ours = _pair(cell, layers=3)
    assert {k: v.shape for k, v in ref.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("engine", ["custom", "cudnn"])
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_both_engines_match_torch_nn_outputs_state_and_gradients(layers, engine, cell):
    ref, ours = _pair(cell, layers=layers, engine=engine)
    x = torch.randn(9, 4, 7)
    states = tuple(torch.randn(layers, 4, 11) for _ in cells.get(cell).state_names)
    x_ref, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, state_ref = ref(x_ref, _as_nn(cell, states))
    state_ref = state_ref if len(states) > 1 else (state_ref,)
    out_ours, state = ours(x_ours, list(zip(*states)))
    state_ours = _stack(state)
    torch.testing.assert_close(out_ours, out_ref, atol=1e-5, rtol=0)
    assert len(state_ours) == len(state_ref)
    for a, b in zip(state_ours, state_ref):  # h, and c for the LSTM
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)

    # The same scalar of all outputs, so every gradient path (through h and c) is exercised.
    w = torch.randn_like(out_ref)
    ((out_ref * w).sum() + sum(s.sum() for s in state_ref)).backward()
    ((out_ours * w).sum() + sum(s.sum() for s in state_ours)).backward()
    torch.testing.assert_close(x_ours.grad, x_ref.grad, atol=1e-5, rtol=0)
    ours_params = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(ours_params[name].grad, p.grad, atol=1e-5, rtol=0, msg=name)


def test_lstm_cell_gates_follow_nn_lstm_order():
    """One step of the cell equals nn.LSTMCell with the same weights (gate order i, f, g, o)."""
    torch.manual_seed(1)
    cell = nn.LSTMCell(5, 6)
    x, h, c = torch.randn(3, 5), torch.randn(3, 6), torch.randn(3, 6)
    h_ref, c_ref = cell(x, (h, c))
    x_proj = F.linear(x, cell.weight_ih, cell.bias_ih + cell.bias_hh)
    gates = {}
    ours = cells.get("lstm")(5, 6)
    h_ours, c_ours = ours.step(x_proj, (h, c), {"weight_hh": cell.weight_hh}, record=gates)
    torch.testing.assert_close(h_ours, h_ref, atol=1e-6, rtol=0)
    torch.testing.assert_close(c_ours, c_ref, atol=1e-6, rtol=0)
    # The recorded forget gate is sigmoid of the second block, nn.LSTM's order.
    f = torch.sigmoid(x_proj + h @ cell.weight_hh.t()).chunk(4, dim=1)[1]
    torch.testing.assert_close(gates["forget"], f)
    assert set(gates) == {"forget", "input", "output"}


def test_gru_cell_follows_nn_gru_cell():
    """Gate order r, z, n, and b_hh inside the reset gate's product, as nn.GRUCell."""
    torch.manual_seed(1)
    cell = nn.GRUCell(5, 6)
    x, h = torch.randn(3, 5), torch.randn(3, 6)
    gates = {}
    gru = cells.get("gru")(5, 6)
    params = {
        "weight_ih": cell.weight_ih,
        "weight_hh": cell.weight_hh,
        "bias_ih": cell.bias_ih,
        "bias_hh": cell.bias_hh,
    }
    (ours,) = gru.step(gru.project_input(x, params), (h,), params, record=gates)
    torch.testing.assert_close(ours, cell(x, h), atol=1e-6, rtol=0)
    assert set(gates) == {"reset", "update"} and gates["update"].shape == (3, 6)


def test_rnn_cell_follows_nn_rnn_cell():
    torch.manual_seed(1)
    cell = nn.RNNCell(5, 6)
    x, h = torch.randn(3, 5), torch.randn(3, 6)
    rnn = cells.get("rnn")(5, 6)
    (ours,) = rnn.step(F.linear(x, cell.weight_ih, cell.bias_ih + cell.bias_hh), (h,), {"weight_hh": cell.weight_hh})
    torch.testing.assert_close(ours, cell(x, h), atol=1e-6, rtol=0)


def test_unknown_cell_is_refused():
    with pytest.raises(ValueError, match="unknown cell 'transformer'"):
        Recurrent(3, 4, cell="transformer")


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("impl", ["custom", "cudnn"])
def test_state_carry_whole_equals_two_halves(impl, cell):
    torch.manual_seed(0)
    model = LSTMLanguageModel(
        ModelConfig(embedding_size=8, hidden_size=8, dropout=0.0, impl=impl, cell=cell), 20
    ).eval()
    ids = torch.randint(0, 20, (12, 3))
    whole, state_whole = model(ids)
    first, state = model(ids[:5])
    second, state_halves = model(ids[5:], state)
    torch.testing.assert_close(torch.cat([first, second]), whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(_stack(state_halves), _stack(state_whole), atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", CELLS)
def test_one_state_dict_runs_on_both_engines(cell):
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_size=10, hidden_size=10, num_layers=2, dropout=0.0, cell=cell)
    fast = LSTMLanguageModel(cfg, 30, impl="cudnn").eval()
    hand = LSTMLanguageModel(cfg, 30, impl="custom").eval()
    assert fast.state_dict().keys() == hand.state_dict().keys()
    hand.load_state_dict(fast.state_dict())
    ids = torch.randint(0, 30, (6, 2))
    torch.testing.assert_close(hand(ids)[0], fast(ids)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", [c for c in CELLS if cells.get(c).kernel is not None])
def test_in_training_on_a_cpu_both_engines_draw_the_same_dropout_between_layers(cell):
    """A CPU runs the fused kernel layer by layer in training, with the model's own dropout
    between (the kernel's draws with bernoulli_): the masks are the hand-written engine's."""
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_size=10, hidden_size=10, num_layers=3, dropout=0.4, cell=cell)
    fast = LSTMLanguageModel(cfg, 30, impl="cudnn").train()
    hand = LSTMLanguageModel(cfg, 30, impl="custom").train()
    hand.load_state_dict(fast.state_dict())
    ids = torch.randint(0, 30, (6, 2))
    outputs = []
    for model in (fast, hand):
        torch.manual_seed(1)
        outputs.append(model(ids))
    (fast_logits, fast_state), (hand_logits, hand_state) = outputs
    torch.testing.assert_close(fast_logits, hand_logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(_stack(fast_state), _stack(hand_state), atol=1e-5, rtol=0)
    torch.manual_seed(2)
    assert not torch.allclose(fast(ids)[0], fast_logits)  # other masks: the dropout is on


def test_keep_mask_drops_p_of_the_elements_and_scales_the_rest_by_1_over_1_minus_p():
    from lstm_lm.model import keep_mask

    torch.manual_seed(0)
    for p, shape in ((0.2, (35, 20, 201)), (0.65, (1001,)), (0.5, (3,))):
        mask = keep_mask(torch.Size(shape), p, torch.float32, torch.device("cpu"))
        assert mask.shape == shape and mask.dtype == torch.float32
        kept = mask[mask != 0]
        torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - p)))
        if mask.numel() > 1000:  # 4 standard deviations of the dropped share
            assert abs((mask == 0).float().mean().item() - p) < 4 * (p * (1 - p) / mask.numel()) ** 0.5
    assert not keep_mask(torch.Size((4, 5)), 1.0, torch.bfloat16, torch.device("cpu")).any()
    first = keep_mask(torch.Size((64,)), 0.5, torch.float32, torch.device("cpu"))
    assert not torch.equal(first, keep_mask(torch.Size((64,)), 0.5, torch.float32, torch.device("cpu")))


def test_weight_tying_shares_the_embedding():
    model = LSTMLanguageModel(ModelConfig(embedding_size=12, hidden_size=12, tie_weights=True), 50)
    assert model.decoder.weight is model.embedding.weight
    untied = LSTMLanguageModel(ModelConfig(embedding_size=12, hidden_size=12, tie_weights=False), 50)
    assert untied.num_parameters() == model.num_parameters() + 50 * 12


def test_default_impl_is_the_fast_path():
    assert LSTMLanguageModel(ModelConfig(), 10).rnn.engine == "cudnn"
    assert LSTMLanguageModel(ModelConfig(impl="custom"), 10).rnn.engine == "custom"


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("impl", ["custom", "cudnn"])
def test_overfits_one_batch(impl, cell):
    """A tiny model memorises one batch of random tokens: loss from ~ln(30)=3.4 to below 0.1."""
    torch.manual_seed(0)
    cfg = ModelConfig(embedding_size=32, hidden_size=32, num_layers=1, dropout=0.0, impl=impl, cell=cell)
    model = LSTMLanguageModel(cfg, 30)
    ids = torch.randint(0, 30, (11, 4))
    x, y = ids[:-1], ids[1:]
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(300):
        logits, _ = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1


def _lm(impl, tie=True, cell="lstm"):
    torch.manual_seed(0)
    cfg = ModelConfig(
        impl=impl, embedding_size=12, hidden_size=12, num_layers=2, dropout=0.0, tie_weights=tie, cell=cell
    )
    return LSTMLanguageModel(cfg, vocab_size=30)


@pytest.mark.parametrize("impl", ["custom", "cudnn"])
@pytest.mark.parametrize("tie", [True, False])
def test_loss_equals_cross_entropy_of_the_logits_with_the_same_gradients(impl, tie):
    model = _lm(impl, tie)
    x, y = torch.randint(0, 30, (6, 3)), torch.randint(0, 30, (6, 3))
    logits, _ = model(x)
    ref = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    ref.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss, state = model.loss(x, y)
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=1e-6)
    loss.backward()
    for n, p in model.named_parameters():  # the tied embedding collects both of its gradients
        torch.testing.assert_close(p.grad, ref_grads[n], atol=1e-6, rtol=1e-5, msg=n)
    assert len(state) == 2 and state[0][0].shape == (3, 12)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("impl", ["custom", "cudnn"])
def test_step_by_step_generation_path_equals_the_full_forward(impl, cell):
    model = _lm(impl, cell=cell).eval()
    ids = torch.randint(0, 30, (7, 2))
    with torch.no_grad():
        logits, final = model(ids)
        state = model.init_state(2)
        steps = []
        for t in range(7):
            step_logits, state = model.step(ids[t], state)
            steps.append(step_logits)
    torch.testing.assert_close(torch.stack(steps), logits, atol=1e-5, rtol=0)
    assert len(state[0]) == len(cells.get(cell).state_names)
    torch.testing.assert_close(_stack(state), _stack(final), atol=1e-6, rtol=0)


def test_dropout_zeroes_p_of_the_elements_and_scales_the_rest():
    from lstm_lm.model import Dropout, dropout

    torch.manual_seed(0)
    x = torch.ones(200, 50, 10, requires_grad=True)
    y = dropout(x, 0.3, training=True)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(y[kept], torch.full_like(y[kept], 1 / 0.7))
    y.sum().backward()
    torch.testing.assert_close(x.grad, y.detach())  # the gradient goes through the same mask
    assert dropout(x, 0.3, training=False) is x and dropout(x, 0.0, training=True) is x
    module = Dropout(0.3).eval()
    assert module(x) is x and "p=0.3" in repr(module)
