"""The adaptive softmax (Grave, Joulin, Cissé, Grangier & Jégou 2017): an exact softmax
over a large vocabulary at a fraction of the cost of the full one.

    out = AdaptiveSoftmax(hidden=400, vocab=267_735, cutoffs=[20_000, 60_000])
    loss = out.loss(h, targets, words)            # h (N, H), targets (N,): mean cross-entropy
    log_p = out.log_probs(h, words)               # (N, V), a proper distribution

Words are sorted by frequency (the tokenizer's ids are). The `cutoffs[0]` most frequent
form the head, with one more entry per tail cluster; the rest are cut into clusters at
the other cutoffs:

    p(w) = p_head(w)                                  w in the head
    p(w) = p_head(cluster i) * p_tail_i(w | cluster i)   w in cluster i

The head is a softmax over cutoffs[0] + clusters entries of h; cluster i first projects
h down to hidden / div_value^(i+1) units, then takes a softmax over its words. In a
Zipfian text the head's few thousand words cover most tokens, so most positions never
touch the tails: training computes a tail only for the positions whose target is in it,
and evaluation (which needs p(target) only) does the same.

With `words` given (tie_weights), the head's word rows are the first cutoffs[0] rows of
the input embedding, as a tied full softmax uses all of them; the cluster rows and the
tails have weights of their own ("tying the head only"). torch.nn.AdaptiveLogSoftmaxWithLoss
computes the same distribution (a test checks it with copied weights); this version
adds the tied head, the per-token scores that evaluation needs, and the fused
cross-entropy of loss.py for the head, the largest product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lstm_lm.loss import _blocks, _compute_dtype, _logits, linear_cross_entropy, token_log_probs
from lstm_lm.utils import not_compiled


def default_cutoffs(vocab_size: int) -> list[int]:
    """About 1/12 and 1/4 of the vocabulary: [22_311, 66_933] for WikiText-103's 267,735
    words, close to the [20_000, 60_000] of Baevski & Auli (2019)."""
    return [max(1, vocab_size // 12), max(2, vocab_size // 4)]


def check_cutoffs(cutoffs: list[int], vocab_size: int) -> str | None:
    """What is wrong with `cutoffs` for this vocabulary, or None."""
    if not cutoffs or any(b <= a for a, b in zip(cutoffs, cutoffs[1:])) or cutoffs[0] < 1 or cutoffs[-1] >= vocab_size:
        return (
            f"model.cutoffs: need increasing sizes between 1 and the vocabulary size ({vocab_size:,}) "
            f"exclusive, got {cutoffs}"
        )
    return None


class AdaptiveSoftmax(nn.Module):
    def __init__(self, hidden: int, vocab_size: int, cutoffs: list[int], div_value: float = 4.0, tied: bool = False):
        super().__init__()
        if problem := check_cutoffs(cutoffs, vocab_size):
            raise ValueError(problem)
        self.vocab_size, self.shortlist = vocab_size, cutoffs[0]
        self.bounds = [*cutoffs, vocab_size]  # cluster i holds ids bounds[i] .. bounds[i + 1] - 1
        self.n_clusters = len(cutoffs)
        self.head_words = None if tied else nn.Parameter(torch.empty(self.shortlist, hidden))
        self.head_clusters = nn.Parameter(torch.empty(self.n_clusters, hidden))
        self.head_bias = nn.Parameter(torch.zeros(self.shortlist + self.n_clusters))
        self.tails = nn.ModuleList()
        for i in range(self.n_clusters):
            units = max(1, round(hidden / div_value ** (i + 1)))
            self.tails.append(
                nn.Sequential(
                    nn.Linear(hidden, units, bias=False), nn.Linear(units, self.bounds[i + 1] - self.bounds[i])
                )
            )
        if self.head_words is not None:
            nn.init.uniform_(self.head_words, -0.1, 0.1)
        nn.init.uniform_(self.head_clusters, -0.1, 0.1)

    def head_weight(self, words: Tensor | None) -> Tensor:
        """(shortlist + clusters, H): the word rows (tied: the embedding's first rows), then the clusters'."""
        words = self.head_words if words is None else words[: self.shortlist]
        return torch.cat([words, self.head_clusters])

    def _tail(self, i: int, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Cluster i's projected h and its output weight and bias."""
        proj, out = self.tails[i]
        return proj(h), out.weight, out.bias

    def _split(self, targets: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Each target's entry in the head (its own, or its cluster's) and, per cluster,
        the positions whose target is in it."""
        head_targets = targets.clone()
        rows = []
        for i in range(self.n_clusters):
            inside = (targets >= self.bounds[i]) & (targets < self.bounds[i + 1])
            head_targets[inside] = self.shortlist + i
            rows.append(inside.nonzero()[:, 0])
        return head_targets, rows

    @not_compiled  # which positions go to which tail changes every batch: no graph to keep
    def loss(self, h: Tensor, targets: Tensor, words: Tensor | None = None) -> Tensor:
        """The mean cross-entropy (float32) of h (N, H) against targets (N,), for training:
        the head over every position, each tail over the positions whose target is in it."""
        head_targets, rows = self._split(targets)
        total = linear_cross_entropy(h, self.head_weight(words), self.head_bias, head_targets, reduction="sum")
        for i, r in enumerate(rows):
            if r.numel():
                x, w, b = self._tail(i, h[r])
                total = total + linear_cross_entropy(x, w, b, targets[r] - self.bounds[i], reduction="sum")
            else:  # no target in this cluster: its weights still take part, with a zero gradient,
                # as DistributedDataParallel expects of every parameter at every step
                total = total + sum(p.sum() for p in self.tails[i].parameters()) * 0.0
        return total / targets.numel()

    def target_log_probs(self, h: Tensor, targets: Tensor, words: Tensor | None = None) -> Tensor:
        """log p(target) of each row, (N,) float32; differentiable where gradients are on
        (dynamic evaluation), else computed block by block without keeping logits."""
        head_targets, rows = self._split(targets)
        out = token_log_probs(h, self.head_weight(words), self.head_bias, head_targets)
        for i, r in enumerate(rows):
            if r.numel():
                x, w, b = self._tail(i, h[r])
                out = out.index_add(0, r, token_log_probs(x, w, b, targets[r] - self.bounds[i]))
        return out

    def log_probs(self, h: Tensor, words: Tensor | None = None) -> Tensor:
        """The whole distribution: h (..., H) -> log p (..., V) float32 (for sampling and export)."""
        head = torch.log_softmax(F.linear(h, self.head_weight(words), self.head_bias).float(), dim=-1)
        parts = [head[..., : self.shortlist]]
        for i in range(self.n_clusters):
            x, w, b = self._tail(i, h)
            tail = torch.log_softmax(F.linear(x, w, b).float(), dim=-1)
            parts.append(head[..., self.shortlist + i, None] + tail)
        return torch.cat(parts, dim=-1)

    @torch.no_grad()
    def loss_and_hits(
        self, h: Tensor, targets: Tensor, words: Tensor | None, ks: tuple[int, ...]
    ) -> tuple[Tensor, Tensor]:
        """For evaluation: the summed cross-entropy (float64) and, for each k in `ks`, how many
        rows have their target among the k most likely words, exactly, without building
        the whole distribution. One pass over the head, block by block, gives both p(target)
        and a row's rank: the number of words more likely than its target, counted in the
        head, then in a cluster only where the cluster itself is more likely than the
        target (no word in it can be, otherwise) and the head has not already found
        max(ks) of them."""
        kmax = max(ks)
        dtype = _compute_dtype(h)
        total = torch.zeros((), dtype=torch.float64, device=h.device)
        better = torch.zeros(h.size(0), dtype=torch.long, device=h.device)
        with torch.autocast(h.device.type, enabled=False):  # casts are explicit here
            hc, wc, bc = h.to(dtype), self.head_weight(words).to(dtype), self.head_bias.to(dtype)
            for start, end in _blocks(h.size(0), wc.size(0), evaluation=True):
                hb, y = hc[start:end], targets[start:end]
                head_targets, rows = self._split(y)
                head = torch.log_softmax(_logits(hb, wc, bc), dim=1)  # (n, shortlist + clusters)
                t = head.gather(1, head_targets[:, None])  # (n, 1), completed below for tail words
                for i, r in enumerate(rows):
                    if r.numel():
                        t[r, 0] += self._tail_log_probs(i, hb[r], dtype).gather(1, (y[r] - self.bounds[i])[:, None])[
                            :, 0
                        ]
                n_better = (head[:, : self.shortlist] > t).sum(1)
                for i in range(self.n_clusters):
                    need = ((head[:, self.shortlist + i, None] > t)[:, 0] & (n_better < kmax)).nonzero()[:, 0]
                    if need.numel():
                        tail = head[need, self.shortlist + i, None] + self._tail_log_probs(i, hb[need], dtype)
                        n_better[need] += (tail > t[need]).sum(1)
                better[start:end] = n_better
                total -= t.sum(dtype=torch.float64)
        return total, torch.stack([(better < k).sum() for k in ks])

    def _tail_log_probs(self, i: int, h: Tensor, dtype: torch.dtype) -> Tensor:
        """log p(word | cluster i) for every word of cluster i, (n, size) float32, in `dtype`'s products."""
        proj, out = self.tails[i]
        x = F.linear(h.to(dtype), proj.weight.to(dtype))
        return torch.log_softmax(_logits(x, out.weight.to(dtype), out.bias.to(dtype)), dim=1)
