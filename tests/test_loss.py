"""The fused output layer + cross-entropy against F.cross_entropy of F.linear, in float32 and bf16."""

import pytest
import torch
import torch.nn.functional as F

import lstm_lm.loss as loss_mod
from lstm_lm.loss import linear_cross_entropy


def _inputs(n=37, hidden=12, vocab=50, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.5).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.1).requires_grad_() if bias else None
    y = torch.randint(0, vocab, (n,), generator=g)
    return h, w, b, y


def _grads(*tensors):
    return [t.grad.clone() for t in tensors if t is not None]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("block_rows", [1000, 8, 5])  # one block; several; several with a ragged last one
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_cross_entropy_of_linear_in_float32(monkeypatch, bias, block_rows, reduction):
    monkeypatch.setattr(loss_mod, "BLOCK_ELEMENTS", block_rows * 50)
    h, w, b, y = _inputs(bias=bias)
    ref = F.cross_entropy(F.linear(h, w, b), y, reduction=reduction)
    ref.backward()
    ref_grads = _grads(h, w, b)
    for t in (h, w, b):
        if t is not None:
            t.grad = None
    ours = linear_cross_entropy(h, w, b, y, reduction)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-6)
    ours.backward()
    for got, want in zip(_grads(h, w, b), ref_grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_gradient_scales_with_the_upstream_gradient():
    h, w, b, y = _inputs()
    (3.0 * F.cross_entropy(F.linear(h, w, b), y)).backward()
    ref = _grads(h, w, b)
    h.grad = w.grad = b.grad = None
    (3.0 * linear_cross_entropy(h, w, b, y)).backward()
    for got, want in zip(_grads(h, w, b), ref):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_without_gradients_gives_the_same_loss():
    h, w, b, y = _inputs()
    with torch.no_grad():
        ours = linear_cross_entropy(h, w, b, y, "sum")
        ref = F.cross_entropy(F.linear(h, w, b), y, reduction="sum")
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-6)


def test_bf16_autocast_products_float32_loss_close_to_float32():
    h, w, b, y = _inputs(n=64, hidden=32, vocab=200)
    ref = linear_cross_entropy(h, w, b, y)
    ref.backward()
    ref_grads = _grads(h, w, b)
    h.grad = w.grad = b.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = linear_cross_entropy(h, w, b, y)
    assert ours.dtype == torch.float32  # the loss itself is float32 ...
    ours.backward()
    assert w.grad.dtype == torch.float32 and b.grad.dtype == torch.float32  # ... and so are the weights' gradients
    assert abs(ours.item() - ref.item()) < 0.02 * ref.item()  # ... of bf16 products: close, not equal
    assert ours.item() != ref.item()
    for got, want in zip(_grads(h, w, b), ref_grads):
        assert (got - want).norm() < 0.03 * want.norm()


@pytest.mark.parametrize("bias", [True, False])
def test_loss_and_top_k_hits_for_evaluation_match_the_logits(bias, monkeypatch):
    from lstm_lm.loss import linear_cross_entropy_and_hits

    monkeypatch.setattr(loss_mod, "EVAL_BLOCK_ELEMENTS", 50 * 8)  # 8 rows a block: several blocks
    h, w, b, y = _inputs(n=37, hidden=12, vocab=50, bias=bias)
    with torch.no_grad():  # words 0 to 6 score alike: ties, which count in the target's favour
        w[1:7] = w[0]
        if b is not None:
            b[1:7] = b[0]
        y[:9], h[:9] = 3, 20 * w[0]  # ... and top the rows that want word 3
    logits = F.linear(h, w, b).detach()
    total, hits = linear_cross_entropy_and_hits(h, w, b, y, ks=(1, 5))
    assert total.dtype == torch.float64  # float32 per-token losses, summed in float64
    torch.testing.assert_close(total.float(), F.cross_entropy(logits, y, reduction="sum"), atol=1e-4, rtol=1e-6)
    rank = (logits > logits.gather(1, y[:, None])).sum(1)  # how many tokens score above the target
    assert hits.tolist() == [(rank < 1).sum().item(), (rank < 5).sum().item()]
    assert 9 < hits[0] < hits[1] < 37 and (rank[:9] == 0).all()


def test_both_output_loss_paths_give_the_same_loss_and_gradients():
    from lstm_lm.loss import output_cross_entropy

    results = []
    for impl in ("fused", "plain"):
        h, w, b, y = _inputs()
        loss = output_cross_entropy(h, w, b, y, impl)
        loss.backward()
        results.append((loss.detach(), _grads(h, w, b)))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-6, rtol=1e-6)
    for got, want in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="loss impl"):
        output_cross_entropy(*_inputs(), "other")


@pytest.mark.parametrize("bias", [True, False])
def test_loss_and_gradients_match_cross_entropy_of_the_logits_in_float64(monkeypatch, bias):
    """The fused path's arithmetic, free of float32 rounding: the loss and all three
    gradients against autograd through F.cross_entropy on the materialized logits."""
    monkeypatch.setattr(loss_mod, "BLOCK_ELEMENTS", 8 * 50)  # several blocks, a ragged last one
    h, w, b, y = (
        t.double().detach().requires_grad_() if t is not None and t.is_floating_point() else t
        for t in _inputs(bias=bias)
    )
    ref = F.cross_entropy(F.linear(h, w, b), y)
    ref.backward()
    ref_grads = _grads(h, w, b)
    for t in (h, w, b):
        if t is not None:
            t.grad = None
    ours = linear_cross_entropy(h, w, b, y)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, atol=1e-12, rtol=1e-12)
    ours.backward()
    for got, want in zip(_grads(h, w, b), ref_grads):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_a_target_the_model_all_but_excludes_keeps_a_finite_exact_loss():
    """Targets whose probability underflows float32 (log-prob -150): the loss is still
    log-sum-exp minus the target's logit, as log-softmax gives it, and finite."""
    h, w, b, y = _inputs(n=6, hidden=4, vocab=10)
    b = torch.zeros(10)
    b[y[0]] = -150.0  # the first row's target
    b[y[1]] = -120.0
    ref = F.cross_entropy(F.linear(h, w, b).double(), y, reduction="none")
    assert ref[0] > 140
    with torch.no_grad():
        total = linear_cross_entropy(h, w, b, y, reduction="sum")
    torch.testing.assert_close(total.double(), ref.sum(), atol=1e-3, rtol=1e-5)
    ours = linear_cross_entropy(h, w, b, y, reduction="sum")
    torch.testing.assert_close(ours.double(), ref.sum(), atol=1e-3, rtol=1e-5)
    ours.backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("n", [5, 37])  # fewer rows than h's width: addmm adds the bias; more: a weight column
def test_scoring_without_gradients_matches_log_softmax_of_the_logits(n):
    from lstm_lm.loss import linear_cross_entropy_and_hits, token_log_probs

    h, w, b, y = _inputs(n=n, hidden=12, vocab=50)
    with torch.no_grad():
        want = torch.log_softmax(F.linear(h, w, b), dim=1).gather(1, y[:, None])[:, 0]
        torch.testing.assert_close(token_log_probs(h, w, b, y), want, atol=1e-5, rtol=1e-6)
        total, _ = linear_cross_entropy_and_hits(h, w, b, y)
    torch.testing.assert_close(total.float(), -want.sum(), atol=1e-4, rtol=1e-6)
