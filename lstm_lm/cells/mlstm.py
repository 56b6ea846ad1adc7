"""The mLSTM of xLSTM (Beck, Pöppel, Spanring, Auer, Prudnikova, Kopp, Klambauer,
Brandstetter & Hochreiter, xLSTM: extended long short-term memory, NeurIPS 2024).

Each head (model.num_heads of d units) keeps a matrix memory C (d x d) that stores
values under keys, written with a covariance update; every gate reads the input alone:

    q_t, k_t, v_t = W_q x_t + b_q, (W_k x_t + b_k) / sqrt(d), W_v x_t + b_v
    m_t = max(log f_t + m_{t-1}, i~_t)           the stabiliser, log f_t = log sigmoid(f~_t)
    i_t = exp(i~_t - m_t)                        input gate, exponential (one per head)
    f_t = exp(log f_t + m_{t-1} - m_t)           forget gate (one per head)
    C_t = f_t C_{t-1} + i_t v_t k_t^T            store v under the key k
    n_t = f_t n_{t-1} + i_t k_t                  the normaliser: the keys written
    h~_t = C_t q_t / max(|n_t . q_t|, exp(-m_t)) read the value stored under the query q
    h_t = sigmoid(W_o x_t + b_o) * norm(h~_t)    output gate, after each head's h~ is normalised

norm is a layer norm over each head's d units without weights (the xLSTM cell's outnorm,
there with weights): it puts every head's read on one scale whatever the magnitudes in
its memory. Without it, tests/test_cells.py's recipe found the demo's region-to-language
link in 3 of 11 seeds (on a 2-core Zen 3 EPYC); with it, in 11 of 11 (seeds 1 to 10 and
1111, each 100% right, on a 2-core Zen 4 EPYC).

The floor exp(-m_t) is the paper's 1 once the stabiliser is divided out: the stabilised
cell computes the unstabilised one. With no h_{t-1} on the right, a whole chunk runs
in parallel (`mlstm_chunk`): unrolled, h~_t is a causal, decayed attention of q_t over
the chunk's keys and values plus a read of the carried memory, and the state after the
chunk is the same sum at its last step. Chunks of CHUNK steps carry (C, n, m) from one
to the next. The forget gates' biases start between 3 and 6, as in the paper's code.
The state is flat per stream for the model's state lists: C (heads * d * d), n (H), m (heads).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lstm_lm.cells.base import HeadedCell, LayerState, LoopLayer, Params
from lstm_lm.cells.scan import full

CHUNK = 64  # time steps per parallel chunk: the (CHUNK x CHUNK) decay matrix per head and stream
FORGET_BIAS = (3.0, 6.0)  # the range the forget gates' biases start in, across heads


def head_norm(h_tilde: Tensor, eps: float = 1e-5) -> Tensor:
    """Each head's h~ (..., d) scaled to mean 0 and variance 1 over its d units: F.layer_norm
    without weights, written out because the ONNX export traces d as a tensor."""
    var, mean = torch.var_mean(h_tilde, dim=-1, correction=0, keepdim=True)
    return (h_tilde - mean) * torch.rsqrt(var + eps)


def mlstm_step(
    x_proj: Tensor, C: Tensor, n: Tensor, m: Tensor, heads: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One step from x_proj = W x + b (B, 4H + 2 heads): the new h, C, n, m and the input,
    forget (B, heads) and output (B, H) gates."""
    B, H = n.shape
    d = H // heads
    q, k, v, o = x_proj[:, : 4 * H].chunk(4, dim=1)
    i, f = x_proj[:, 4 * H :].chunk(2, dim=1)  # one scalar per head each
    q, k, v = q.view(B, heads, d), k.view(B, heads, d) / math.sqrt(d), v.view(B, heads, d)

    log_f = F.logsigmoid(f)
    m_new = torch.maximum(log_f + m, i)  # the stabiliser
    input_gate = torch.exp(i - m_new)  # exponential input gate
    forget_gate = torch.exp(log_f + m - m_new)
    C = forget_gate[:, :, None, None] * C.view(B, heads, d, d) + input_gate[:, :, None, None] * (
        v.unsqueeze(3) * k.unsqueeze(2)
    )  # store v under the key k: C += i v k^T
    n = forget_gate[:, :, None] * n.view(B, heads, d) + input_gate[:, :, None] * k
    read = torch.matmul(C, q.unsqueeze(3)).squeeze(3)  # C q: the value stored under the query
    scale = torch.maximum((n * q).sum(2).abs(), torch.exp(-m_new))  # (B, heads)
    output_gate = torch.sigmoid(o)
    h = output_gate * head_norm(read / scale.unsqueeze(2)).reshape(B, H)
    return h, C.reshape(B, -1), n.reshape(B, H), m_new, input_gate, forget_gate, output_gate


def mlstm_chunk(
    q: Tensor, k: Tensor, v: Tensor, i: Tensor, log_f: Tensor, C: Tensor, n: Tensor, m: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """h~ for a chunk of L steps at once, and the state after it.

    q, k, v (B, heads, L, d) (k already scaled), i, log_f (B, heads, L); the carried
    C (B, heads, d, d), n (B, heads, d), m (B, heads). Step t's memory is the carried one
    weighted by exp(F_t) plus each step s <= t's write weighted by exp(F_t - F_s + i_s),
    F the cumulative log forget gate; m_t is the largest of those log weights."""
    L = q.size(2)
    F_ = torch.cumsum(log_f, dim=2)  # (B, heads, L)
    log_w = F_.unsqueeze(3) - F_.unsqueeze(2) + i.unsqueeze(2)  # [t, s]: step s's write as seen at t
    future = torch.ones(L, L, dtype=torch.bool, device=q.device).triu(1)
    log_w = log_w.masked_fill(future, float("-inf"))  # causal: s <= t
    log_carried = F_ + m.unsqueeze(2)  # the carried memory's weight at t
    m_t = torch.maximum(log_carried, log_w.amax(3))  # the stabiliser, the step form's m_t
    w = torch.exp(log_w - m_t.unsqueeze(3))
    carried = torch.exp(log_carried - m_t)
    scores = torch.matmul(q, k.transpose(2, 3)) * w  # (B, heads, L, L): decayed q . k
    read = torch.matmul(scores, v) + carried.unsqueeze(3) * torch.matmul(q, C.transpose(2, 3))
    dot = scores.sum(3) + carried * torch.matmul(q, n.unsqueeze(3)).squeeze(3)  # n_t . q_t
    h_tilde = read / torch.maximum(dot.abs(), torch.exp(-m_t)).unsqueeze(3)
    last = w[:, :, -1].unsqueeze(3)  # each step's weight in the memory after the chunk
    C = carried[:, :, -1, None, None] * C + torch.matmul((v * last).transpose(2, 3), k)
    n = carried[:, :, -1, None] * n + (k * last).sum(2)
    return h_tilde, C, n, m_t[:, :, -1]


def mlstm_loop(
    x: Tensor, h: Tensor, C: Tensor, n: Tensor, m: Tensor, weight: Tensor, bias: Tensor, heads: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The step loop over x (T, B, I), for the ONNX export."""
    outputs = []
    for t in range(x.size(0)):
        h, C, n, m, _, _, _ = mlstm_step(F.linear(x[t], weight, bias), C, n, m, heads)
        outputs.append(h)
    return torch.stack(outputs), h, C, n, m


class MLSTM(HeadedCell):
    """xLSTM's matrix-memory LSTM: per head, values stored under keys and read with a query."""

    name = "mlstm"
    citation = "Beck et al., xLSTM: extended long short-term memory, NeurIPS 2024 (the mLSTM)"
    summary = (
        "xLSTM's mLSTM: a matrix memory per head (model.num_heads) written with keys and values, "
        "exponential gating, trained chunkwise in parallel"
    )
    title = "the mLSTM: its exponential gates and matrix memory C"
    order, colour = 80, "#e377c2"
    state_names, memory = ("h", "C", "n", "m"), "C"
    parameter_formula = "(4H + 2 heads)(I + 1)"
    gate_names = ("input", "forget", "output")
    dropped = ()  # no recurrent matrix for weight drop to mask

    def state_sizes(self) -> tuple[int, ...]:
        H, d = self.hidden_size, self.hidden_size // self.heads
        return H, self.heads * d * d, H, self.heads

    def shapes(self) -> dict[str, tuple[int, ...]]:
        rows = 4 * self.hidden_size + 2 * self.heads  # q, k, v, o; then i and f, one per head
        return {"weight_ih": (rows, self.input_size), "bias_ih": (rows,)}

    def reset_parameters(self, params: Params) -> None:
        super().reset_parameters(params)
        with torch.no_grad():
            params["bias_ih"][-self.heads :] = torch.linspace(*FORGET_BIAS, self.heads)

    def project_input(self, x: Tensor, p: Params) -> Tensor:
        return F.linear(x, p["weight_ih"], p["bias_ih"])

    def step(self, x_proj: Tensor, state: LayerState, p: Params, record: dict | None = None) -> LayerState:
        h, C, n, m, input_gate, forget_gate, output_gate = mlstm_step(x_proj, *state[1:], self.heads)
        if record is not None:
            record.update(input=input_gate, forget=forget_gate, output=output_gate)
        return h, C, n, m

    def sequence(self, x: Tensor, state: LayerState, p: Params) -> tuple[Tensor, LayerState]:
        T, B = x.shape[:2]
        H, heads, d = self.hidden_size, self.heads, self.hidden_size // self.heads
        proj = full(self.project_input(x, p))
        q, k, v, o = proj[..., : 4 * H].chunk(4, dim=2)
        i, f = proj[..., 4 * H :].chunk(2, dim=2)

        def per_head(t: Tensor) -> Tensor:  # (T, B, H) -> (B, heads, T, d)
            return t.reshape(T, B, heads, d).permute(1, 2, 0, 3)

        q, k, v = per_head(q), per_head(k) / math.sqrt(d), per_head(v)
        i, log_f = i.permute(1, 2, 0), F.logsigmoid(f).permute(1, 2, 0)  # (B, heads, T)
        C, n, m = full(state[1]).view(B, heads, d, d), full(state[2]).view(B, heads, d), full(state[3])
        parts = []
        for s in range(0, T, CHUNK):  # chunk by chunk, carrying (C, n, m)
            t = slice(s, s + CHUNK)
            h_tilde, C, n, m = mlstm_chunk(q[:, :, t], k[:, :, t], v[:, :, t], i[:, :, t], log_f[:, :, t], C, n, m)
            parts.append(h_tilde)
        h_tilde = head_norm(torch.cat(parts, dim=2)).permute(2, 0, 1, 3).reshape(T, B, H)
        h = (torch.sigmoid(o) * h_tilde).to(x.dtype)
        return h, (h[-1], C.reshape(B, -1), n.reshape(B, H), m)

    def export_layer(self, p: Params) -> nn.Module:
        return LoopLayer(mlstm_loop, {"weight": p["weight_ih"], "bias": p["bias_ih"]}, self.heads)


CELL = MLSTM
