"""AWD-LSTM's regularization does what it claims: locked dropout shares its mask across
time steps, embedding dropout drops whole words, weight drop masks W_hh, AR/TAR add
what they say; per-layer sizes run on both engines."""

import pytest
import torch
from torch import nn

from lstm_lm import cells
from lstm_lm.config import ModelConfig
from lstm_lm.model import LSTMLanguageModel, Recurrent, embedding_dropout, locked_dropout


def _rnn_inputs(model, ids):
    """What the LSTM stack receives (the embedding output after its dropout), by a forward hook."""
    seen = []
    handle = model.rnn.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    model.features(ids)
    handle.remove()
    return seen[0]


def test_locked_dropout_shares_one_mask_across_time_steps():
    torch.manual_seed(0)
    out = locked_dropout(torch.ones(20, 8, 64), 0.5, training=True)
    assert torch.equal(out, out[:1].expand_as(out))  # every time step has step 0's mask
    assert set(out.unique().tolist()) == {0.0, 2.0}  # dropped, or kept and scaled by 1/(1-p)
    assert 0.4 < (out[0] == 0).float().mean() < 0.6
    assert torch.equal(locked_dropout(torch.ones(3, 2, 4), 0.5, training=False), torch.ones(3, 2, 4))


@pytest.mark.parametrize("locked", [True, False])
def test_model_applies_locked_dropout_to_the_embedding_output(locked):
    torch.manual_seed(0)
    cfg = ModelConfig(
        embedding_size=32, hidden_size=32, num_layers=1, dropout=0.0, dropout_input=0.5, locked_dropout=locked
    )
    model = LSTMLanguageModel(cfg, 50).train()
    x = _rnn_inputs(model, torch.randint(0, 50, (12, 4)))
    zeros = x == 0
    same_every_step = torch.equal(zeros, zeros[:1].expand_as(zeros))
    assert same_every_step == locked  # per-step dropout draws a new mask each step
    assert 0.35 < zeros.float().mean() < 0.65


def test_embedding_dropout_drops_whole_words_everywhere_in_the_batch():
    torch.manual_seed(0)
    weight = torch.randn(1000, 16)
    dropped = embedding_dropout(weight, 0.3, training=True)
    rows_zero = (dropped == 0).all(dim=1)
    assert 0.25 < rows_zero.float().mean() < 0.35
    torch.testing.assert_close(dropped[~rows_zero], weight[~rows_zero] / 0.7)  # kept rows are scaled, whole

    cfg = ModelConfig(embedding_size=16, hidden_size=16, num_layers=1, dropout=0.0, dropout_embedding=0.5)
    model = LSTMLanguageModel(cfg, 10).train()
    ids = torch.arange(10).repeat(6, 3)  # (6, 30): every word at many positions of every stream
    x = _rnn_inputs(model, ids)
    word_dropped = {}
    for pos in zip(*torch.where(torch.ones_like(ids, dtype=torch.bool))):
        word, vec = ids[pos].item(), x[pos]
        is_zero = bool((vec == 0).all())
        assert is_zero or not (vec == 0).any()  # a vector is dropped whole or not at all
        assert word_dropped.setdefault(word, is_zero) == is_zero  # the same word: the same decision
    assert 0 < sum(word_dropped.values()) < 10


@pytest.mark.parametrize("engine", ["custom", "cudnn"])
def test_weight_drop_masks_the_hidden_to_hidden_weights(engine):
    torch.manual_seed(0)
    rnn = Recurrent(6, 10, 1, engine=engine, weight_drop=0.5).train()
    x, state = torch.randn(7, 3, 6), [(torch.randn(3, 10), torch.randn(3, 10))]

    torch.manual_seed(1)
    w_hh = rnn.layer_weights(0)["weight_hh"]  # the weights the next forward will use
    kept = w_hh != 0
    assert 0.4 < (~kept).float().mean() < 0.6
    torch.testing.assert_close(w_hh[kept], rnn.weight_hh_l0[kept] * 2)  # scaled by 1/(1-p)

    torch.manual_seed(1)  # the same mask again, now inside forward
    out, _ = rnn(x, state)
    ref = nn.LSTM(6, 10, 1)
    ref.load_state_dict(rnn.state_dict())
    with torch.no_grad():
        ref.weight_hh_l0.copy_(w_hh)
    out_ref, _ = ref(x, tuple(t[None] for t in state[0]))
    torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=0)

    # The gradient reaches W_hh only through the kept entries; W_ih is not masked.
    out.sum().backward()
    assert torch.equal(rnn.weight_hh_l0.grad == 0, ~kept)
    assert (rnn.weight_ih_l0.grad != 0).float().mean() > 0.99

    rnn.eval()  # no mask at evaluation: exactly nn.LSTM with the stored weights
    ref.load_state_dict(rnn.state_dict())
    torch.testing.assert_close(rnn(x, state)[0], ref(x, tuple(t[None] for t in state[0]))[0], atol=1e-5, rtol=0)


def _awd_config(impl):
    return ModelConfig(
        impl=impl,
        embedding_size=8,
        hidden_sizes=[12, 10, 8],
        num_layers=3,
        dropout=0.3,
        dropout_input=0.4,
        dropout_hidden=0.2,
        dropout_output=0.3,
        dropout_embedding=0.1,
        weight_drop=0.5,
        locked_dropout=True,
        tie_weights=True,
    )


def test_both_engines_agree_with_every_regularizer_on_and_per_layer_sizes():
    """The same seed draws the same masks in both engines, so training outputs agree too."""
    torch.manual_seed(0)
    hand = LSTMLanguageModel(_awd_config("custom"), 30).train()
    fast = LSTMLanguageModel(_awd_config("cudnn"), 30).train()
    fast.load_state_dict(hand.state_dict())
    ids = torch.randint(0, 30, (9, 4))
    for model in (hand, fast):
        assert [p.shape for p in model.rnn.parameters()][:2] == [(48, 8), (48, 12)]
    outs = []
    for model in (hand, fast):
        torch.manual_seed(5)
        out, state = model(ids)
        outs.append((out, state))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-5, rtol=0)
    assert [h.shape for h, _ in outs[0][1]] == [(4, 12), (4, 10), (4, 8)]
    hand.eval(), fast.eval()
    torch.testing.assert_close(hand(ids)[0], fast(ids)[0], atol=1e-5, rtol=0)


def test_training_loss_adds_activation_and_temporal_activation_regularization():
    torch.manual_seed(0)
    model = LSTMLanguageModel(ModelConfig(embedding_size=8, hidden_size=8, num_layers=2, dropout=0.0), 20).train()
    x, y = torch.randint(0, 20, (6, 3)), torch.randint(0, 20, (6, 3))
    plain, ce, _ = model.training_loss(x, y)
    torch.testing.assert_close(plain, ce)
    torch.testing.assert_close(ce, model.loss(x, y)[0])
    out, _ = model.features(x)  # dropout 0: dropped output == raw output
    objective, ce2, _ = model.training_loss(x, y, ar=2.0, tar=1.0)
    expected = ce + 2.0 * out.pow(2).mean() + 1.0 * (out[1:] - out[:-1]).pow(2).mean()
    torch.testing.assert_close(objective, expected)
    torch.testing.assert_close(ce2, ce)


def _group_is_one_buffer(rnn, i, buffer):
    """Group i's weights lie back to back from the start of `buffer`, in cuDNN's order."""
    ptr = buffer.data_ptr()
    for k in rnn.groups[i]:
        for w in rnn.params(k).values():
            assert w.data_ptr() == ptr
            ptr += w.numel() * w.element_size()
    return True


@pytest.mark.parametrize(
    "sizes, locked, groups",
    [
        ([10, 10], False, [[0, 1]]),  # one kernel call for the stack: one buffer
        ([10, 10], True, [[0], [1]]),  # locked dropout between layers: a call (and a buffer) per layer
        ([12, 8], False, [[0], [1]]),  # per-layer sizes
    ],
)
def test_recurrent_weights_are_views_of_one_flat_buffer_per_kernel_call(sizes, locked, groups):
    rnn = Recurrent(6, sizes, len(sizes), dropout=0.3, engine="cudnn", locked_dropout=locked)
    assert rnn.groups == groups
    for i, flat in enumerate(rnn._flat):
        assert _group_is_one_buffer(rnn, i, flat)
        assert flat.numel() == sum(p.numel() for p in rnn.group_parameters(i))
    assert rnn.fused_weights() == [rnn.group_parameters(i) for i in range(len(groups))]  # no copy

    # Still a state dict of separate tensors: it loads into torch.nn.LSTM and back.
    if len(set(sizes)) == 1:
        ref = nn.LSTM(6, sizes[0], len(sizes))
        ref.load_state_dict(rnn.state_dict())
        x = torch.randn(5, 3, 6)
        torch.testing.assert_close(rnn.eval()(x)[0], ref(x)[0], atol=1e-5, rtol=0)
        ref.weight_hh_l1.data.normal_()
        rnn.load_state_dict(ref.state_dict())  # copies into the views
        assert rnn.is_flat()
        torch.testing.assert_close(rnn.weight_hh_l1, ref.weight_hh_l1, atol=0, rtol=0)


def test_flat_buffer_survives_optimizer_steps_averaging_moves_and_copies():
    import copy

    from lstm_lm.training.optim import WeightAverage

    torch.manual_seed(0)
    rnn = Recurrent(6, 10, 2, engine="cudnn")
    opt = torch.optim.SGD(rnn.parameters(), lr=0.5)
    average = WeightAverage(rnn)
    x = torch.randn(5, 3, 6)
    for _ in range(2):
        opt.zero_grad()
        rnn(x)[0].pow(2).sum().backward()
        opt.step()
        average.update()
    assert rnn.is_flat()
    own = {k: v.clone() for k, v in rnn.state_dict().items()}
    with average.swapped_in():
        assert rnn.is_flat()
        assert not torch.equal(rnn.weight_ih_l0, own["weight_ih_l0"])
    assert rnn.is_flat() and all(torch.equal(v, own[k]) for k, v in rnn.state_dict().items())

    rnn.double()  # a move makes new tensors: flattened again, in the new dtype
    assert rnn.is_flat() and rnn._flat[0].dtype == torch.float64
    rnn.float()
    twin = copy.deepcopy(rnn)  # separate tensors: the first forward flattens them again
    assert not twin.is_flat()
    torch.testing.assert_close(twin(x)[0], rnn(x)[0], atol=0, rtol=0)
    assert twin.is_flat()


@pytest.mark.parametrize("cell", [c for c in cells.names() if cells.get(c).kernel and cells.get(c).kernel_takes_params])
@pytest.mark.parametrize("sizes", [[10, 10], [12, 8]])
def test_weight_drop_masks_a_copy_of_the_buffer_in_w_hh_only(cell, sizes):
    torch.manual_seed(0)
    rnn = Recurrent(6, sizes, len(sizes), cell=cell, engine="cudnn", weight_drop=0.5).train()
    torch.manual_seed(1)
    expected = [rnn.layer_weights(k) for k in range(len(sizes))]  # the masks the custom engine draws
    torch.manual_seed(1)
    weights = rnn.fused_weights()
    for i, group in enumerate(rnn.groups):
        assert _group_is_one_buffer(rnn, i, rnn._flat[i])  # the parameters stay where they were
        copy_start = weights[i][0]
        assert copy_start.data_ptr() != rnn._flat[i].data_ptr()
        ptr = copy_start.data_ptr()
        for w in weights[i]:  # the dropped weights: views of one new buffer, back to back
            assert w.data_ptr() == ptr
            ptr += w.numel() * w.element_size()
        for k, (w_ih, w_hh, b_ih, b_hh) in zip(group, zip(*[iter(weights[i])] * 4)):
            params = list(rnn.params(k).values())
            for ours, param in ((w_ih, params[0]), (b_ih, params[2]), (b_hh, params[3])):
                assert torch.equal(ours, param)  # untouched
            assert torch.equal(w_hh, expected[k]["weight_hh"])  # the same DropConnect mask as the custom engine's
            assert 0.3 < (w_hh == 0).float().mean() < 0.7  # p = 0.5; an RNN's 8 x 8 W_hh: 64 draws

    # Gradients reach each parameter through its view; W_hh only through the kept entries.
    upstream = [[torch.randn_like(w) for w in ws] for ws in weights]
    sum((w * u).sum() for ws, us in zip(weights, upstream) for w, u in zip(ws, us)).backward()
    for i, group in enumerate(rnn.groups):
        for j, k in enumerate(group):
            params = list(rnn.params(k).values())
            kept = (expected[k]["weight_hh"] != 0).float() * 2  # mask / (1 - p)
            for n in (0, 2, 3):
                assert torch.equal(params[n].grad, upstream[i][4 * j + n])
            torch.testing.assert_close(params[1].grad, upstream[i][4 * j + 1] * kept, atol=0, rtol=0)

    rnn.eval()  # no mask at evaluation: the parameters themselves
    assert rnn.fused_weights() == [rnn.group_parameters(i) for i in range(len(rnn.groups))]
