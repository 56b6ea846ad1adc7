"""The output projection and the cross-entropy loss in one pass, without keeping the logits.

    loss = linear_cross_entropy(h, decoder.weight, decoder.bias, targets)   # h (N, H), targets (N,)

For a small LSTM the output layer is most of the cost: at PTB size (10k words,
200 units, 700 tokens a step) the logits are a (700, 10000) matrix, and the
textbook `F.cross_entropy(decoder(h), y)` writes it, reads it for log-softmax,
writes the log-probabilities, and in backward fills a zero gradient of the same
size, scatters into it and reads both again. Here each block of rows (a whole
PTB-size step is one block) computes its logits, their softmax in float32 (one pass
of exp, which gives both the loss and the gradient `softmax - onehot`) and at once
the gradient's two matrix products, so nothing of the logits is kept for backward (the idea of the fused
linear-cross-entropy kernels of Liger and of Apple's Cut Cross-Entropy).
Under bf16 autocast the matrix products run in bf16 and the softmax and loss in
float32 ("bf16 logits, float32 loss").

Without gradients (evaluation) the same blocks compute the loss only, or with
`linear_cross_entropy_and_hits` also how often the target is among the top k.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# Rows per block: the (rows, V) float32 block stays around 64 MiB at most, so the
# whole of a PTB-size step is one block and a 50k vocabulary is cut in a few.
BLOCK_ELEMENTS = 1 << 24
# Evaluation's blocks (a span of several thousand rows, evaluate.SPAN_TOKENS) stay near
# 16 MiB, so that the passes over a block's logits after the product find them in cache.
EVAL_BLOCK_ELEMENTS = 1 << 22


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The matrix-product dtype: autocast's where it is on (bf16 training), else the input's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _blocks(n: int, vocab: int, evaluation: bool = False):
    """(start, end) of each block of the n rows: as few blocks as keep each within its
    budget of elements, of even sizes."""
    most = max(1, (EVAL_BLOCK_ELEMENTS if evaluation else BLOCK_ELEMENTS) // vocab)
    rows = math.ceil(n / math.ceil(n / most)) if n else 1
    for start in range(0, n, rows):
        yield start, min(start + rows, n)


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """h W^T + b in h's dtype, returned in float32 (float64 stays float64). (A separate
    .float() then a float32 softmax is several times faster on a CPU than
    softmax(bf16, dtype=float32).)"""
    logits = F.linear(h, weight, bias)
    return logits if logits.dtype == torch.float64 else logits.float()


def _softmax_and_nll(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """softmax(logits) (n, V) and each row's -log softmax[target] (n,), from one pass of
    exp over the block.

    The loss is read off the softmax without a second pass: -log p_target, where p_target
    is a normal float (above 1.2e-38 in float32; its log is then as exact as
    log-softmax's). A row whose target the model all but excludes underflows there, and
    gets log-sum-exp minus the target's logit instead. Finding such rows waits for the
    device, which costs a CPU nothing; on a GPU, and in a compiled graph, every row's
    log-sum-exp comes from two cheap passes of max instead: with m the row's highest
    logit, log-sum-exp = m - log p_max, and p_max >= 1/V, so its log is exact too."""
    probs = torch.softmax(logits, dim=1)
    if logits.device.type != "cpu" or torch.compiler.is_compiling():
        top_logit = logits.amax(dim=1)  # (amax: max(dim) with its indices costs as much as the softmax)
        target_logit = logits.gather(1, targets[:, None])[:, 0]
        return probs, top_logit - probs.amax(dim=1).log() - target_logit
    p_target = probs.gather(1, targets[:, None])[:, 0]
    nll = p_target.log().neg_()
    underflowed = (p_target < torch.finfo(probs.dtype).tiny).nonzero()[:, 0]
    if len(underflowed):
        rows, y = logits[underflowed], targets[underflowed]
        nll[underflowed] = torch.logsumexp(rows, dim=1) - rows.gather(1, y[:, None])[:, 0]
    return probs, nll


def _with_bias_column(h: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """h (N, H) and weight (V, H) in `dtype`, the bias riding as one more column of the
    weight against a column of ones in h, so that `h @ weight.T` adds it: addmm would first
    copy the bias into every row of the (N, V) logits, a pass over them that this saves
    for the price of one over the weight (at ptb-small's shape, 700 rows, addmm 3.82 ms
    against mm 3.07 ms on a Zen 5 EPYC in bf16; a 201st column costs the product nothing)."""
    if bias is None:
        return h.to(dtype), weight.to(dtype)
    n, hidden = h.shape
    hc = torch.cat([h.to(dtype), h.new_ones(n, 1, dtype=dtype)], dim=1)
    wc = torch.empty(weight.size(0), hidden + 1, dtype=dtype, device=weight.device)
    wc[:, :hidden], wc[:, hidden] = weight, bias  # cast as copied: one pass over the weight
    return hc, wc


def _scoring_operands(h: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype):
    """h, weight and bias in `dtype` for the paths without gradients: the bias as a weight
    column where the rows outnumber the weight's columns, so that building the column
    costs less than addmm's copies of the bias, else left to addmm (a few rows to score
    against a large vocabulary: no copy of the weight)."""
    if bias is not None and h.size(0) > h.size(1):
        return (*_with_bias_column(h, weight, bias, dtype), None)
    return h.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _blocked_loss_and_hits(
    h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, dtype: torch.dtype, ks: tuple[int, ...]
) -> tuple[Tensor, Tensor]:
    """The summed loss block by block, the matrix products in `dtype`, and for each k in
    `ks` how many rows have their target among the k highest logits (fewer than k words
    score above it: a tie counts in the target's favour)."""
    hc, wc, bc = _scoring_operands(h, weight, bias, dtype)
    # Evaluation sums the float32 per-token losses in float64, as the cache and dynamic
    # evaluation sum theirs: the cache, which scores the same spans, agrees with it to
    # float64 rounding, dynamic evaluation (a product per segment) to float32's.
    total = torch.zeros((), dtype=torch.float64, device=h.device)
    hits = torch.zeros(len(ks), dtype=torch.long, device=h.device)
    for start, end in _blocks(h.size(0), weight.size(0), evaluation=True):
        logits, y = _logits(hc[start:end], wc, bc), targets[start:end]  # (n, V) float32
        log_probs = torch.log_softmax(logits, dim=1)  # the one pass the loss needs
        total -= log_probs.gather(1, y[:, None]).sum(dtype=total.dtype)
        if ks:
            # The target's rank, how many words score above it, counted in the
            # log-probabilities' buffer, which is done with: the comparison writes 0/1
            # floats into it (no new (n, V) tensor), summed exactly below 2^24 words,
            # rather than a bool tensor converted to int (the block's loss and counts
            # 1.6x faster than that on a Zen 3 at (350, 10000)).
            rank = torch.gt(logits, logits.gather(1, y[:, None]), out=log_probs).sum(dim=1)
            for i, k in enumerate(ks):
                hits[i] += (rank < k).sum()
    return total, hits


def _blocked_loss_and_grads(
    h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, dtype: torch.dtype
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor | None]]:
    """The summed loss block by block, the matrix products in `dtype`, and its gradients
    with respect to h, weight and bias (float32 for the weights, float64 for float64 ones).

    The bias rides as one more column of the weight (`_with_bias_column`), whose gradient
    the weight gradient's product then gives too, where a sum over the rows is one more
    pass (the two together 1.3 ms of a 30 ms ptb-small bf16 step on a Zen 5 EPYC)."""
    n, hidden = h.shape
    hc, wc = _with_bias_column(h, weight, bias, dtype)
    grad_dtype = torch.promote_types(weight.dtype, torch.float32)
    total = torch.zeros((), dtype=grad_dtype, device=h.device)
    grad_h, grad_w = torch.empty_like(h), None  # grad_w: the first block's, then summed into
    for start, end in _blocks(n, weight.size(0)):
        h_blk, y = hc[start:end], targets[start:end]
        probs, nll = _softmax_and_nll(_logits(h_blk, wc, None), y)
        total += nll.sum(dtype=total.dtype)
        # d(loss)/d(logits) = softmax - onehot(target), in place of the softmax
        grad_logits = probs.scatter_add_(1, y[:, None], probs.new_full((end - start, 1), -1.0)).to(dtype)
        grad_h[start:end] = (grad_logits @ wc)[:, :hidden]  # (n, H)
        part = (grad_logits.t() @ h_blk).to(grad_dtype)  # (V, H), and the bias's column
        grad_w = part if grad_w is None else grad_w.add_(part)
    grad_b = grad_w[:, hidden] if bias is not None else None
    return total, (grad_h, grad_w[:, :hidden], grad_b)


class _LinearCrossEntropy(torch.autograd.Function):
    """Sum of -log softmax(h W^T + b)[target] over rows; gradients computed in forward."""

    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, dtype: torch.dtype) -> Tensor:
        total, grads = _blocked_loss_and_grads(h, weight, bias, targets, dtype)
        ctx.save_for_backward(*grads)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        grad_h = grad_h * grad_total.to(grad_h.dtype)
        grad_w = (grad_w * grad_total).to(ctx.weight_dtype)
        grad_b = grad_b * grad_total if grad_b is not None else None
        return grad_h, grad_w, grad_b, None, None


def linear_cross_entropy(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of `h @ weight.T + bias` against `targets`, in float32.

    h (N, H), weight (V, H), bias (V,), targets (N,) -> a float32 scalar, the mean
    (or with reduction="sum" the sum) of the per-row negative log-likelihoods.
    Equal to `F.cross_entropy(F.linear(h, weight, bias).float(), targets)`.
    """
    dtype = _compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):  # casts are explicit here
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            total = _LinearCrossEntropy.apply(h, weight, bias, targets, dtype)
        else:
            total, _ = _blocked_loss_and_hits(h, weight, bias, targets, dtype, ks=())
            total = total.float()
    return total / targets.numel() if reduction == "mean" else total


LOSS_IMPLS = ("fused", "plain")


def output_cross_entropy(
    h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, impl: str = "fused"
) -> Tensor:
    """The mean cross-entropy of the output layer `h @ weight.T + bias` against `targets`,
    float32, by one of two paths with the same value: "fused" (linear_cross_entropy above)
    or "plain", the textbook `F.cross_entropy` of float32 logits, which keeps them for
    backward and leaves the kernels to the library (cuBLAS and PyTorch's own softmax on a GPU)."""
    if impl == "fused":
        return linear_cross_entropy(h, weight, bias, targets)
    if impl != "plain":
        raise ValueError(f"loss impl must be one of {LOSS_IMPLS}, got {impl!r}")
    return F.cross_entropy(F.linear(h, weight, bias).float(), targets)


def resolve_loss_impl(impl: str, device: torch.device) -> str:
    """`auto` -> the path measured faster on this kind of device: fused on a CPU (see
    docs/speed.md). No GPU has measured the two yet, so a GPU keeps fused too;
    `scripts/bench_speed.py --device cuda` times both."""
    return "fused" if impl == "auto" else impl


@torch.no_grad()
def linear_cross_entropy_and_hits(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    ks: tuple[int, ...] = (1, 5),
) -> tuple[Tensor, Tensor]:
    """For evaluation: the summed cross-entropy (as linear_cross_entropy with
    reduction="sum") and, for each k in `ks`, the number of rows whose target is
    among the k highest-scoring tokens (top-k accuracy = hits / rows), from the same
    logits blocks."""
    dtype = _compute_dtype(h)
    with torch.autocast(h.device.type, enabled=False):  # casts are explicit here
        return _blocked_loss_and_hits(h, weight, bias, targets, dtype, ks)


def token_log_probs(h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor) -> Tensor:
    """log softmax(h W^T + b)[target] for each row: h (N, H), targets (N,) -> (N,) float32.

    Differentiable where autograd needs it (gradients on and h or the weight requiring
    them: dynamic evaluation, gradient flow); otherwise block by block as above, so that
    scoring many sentences never holds all their (N, V) logits at once.
    """
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return torch.log_softmax(F.linear(h, weight, bias).float(), dim=-1).gather(1, targets[:, None])[:, 0]
    dtype = _compute_dtype(h)
    out = torch.empty(h.size(0), dtype=torch.float32, device=h.device)
    with torch.no_grad(), torch.autocast(h.device.type, enabled=False):
        hc, wc, bc = _scoring_operands(h, weight, bias, dtype)
        for start, end in _blocks(h.size(0), weight.size(0), evaluation=True):
            logits = _logits(hc[start:end], wc, bc)
            out[start:end] = torch.log_softmax(logits, dim=1).gather(1, targets[start:end, None])[:, 0]
    return out
