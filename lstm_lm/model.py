"""The LSTM language model: embedding -> stacked LSTM -> linear projection to the vocabulary.

    model = LSTMLanguageModel(cfg.model, vocab_size=10_000)
    logits, state = model(ids)            # ids (T, B) -> logits (T, B, V)
    logits, state = model(ids2, state)    # carry the memory into the next chunk

Two engines share one set of weights: `LSTM` below, a hand-written stack whose
cell reads like the textbook explanation of the gates, and `torch.nn.LSTM` (cuDNN
on a GPU, oneDNN on a CPU). Both hold parameters named `weight_ih_l{k}` (4H, I),
`weight_hh_l{k}` (4H, H), `bias_ih_l{k}`, `bias_hh_l{k}` (4H,), with the gates in
nn.LSTM's order (input, forget, candidate, output), so a state dict saved from
one loads into the other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lstm_lm.config import ModelConfig
from lstm_lm.loss import linear_cross_entropy

State = tuple[Tensor, Tensor]  # (h, c), each (num_layers, B, H) as in nn.LSTM


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout (Srivastava et al. 2014): zero each element with probability p, scale the rest by 1/(1-p).

    The same as F.dropout, but on a CPU the mask comes from torch.rand: F.dropout
    draws it with bernoulli_, which took twice as long for a (35, 20, 650) tensor
    forward and backward on the 2-core dev machine. GPUs keep PyTorch's fused kernel.
    """
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training)
    mask = (torch.rand(x.shape, device=x.device) >= p).to(x.dtype).mul_(1.0 / (1.0 - p))
    return x * mask


class Dropout(nn.Module):
    """nn.Dropout with the mask drawn as in `dropout` above."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


def lstm_cell(x_proj: Tensor, h: Tensor, c: Tensor, weight_hh: Tensor) -> State:
    """One time step. `x_proj` is the input's contribution W_ih x + b_ih + b_hh, (B, 4H)."""
    gates = torch.addmm(x_proj, h, weight_hh.t())  # x_proj + h W_hh^T, (B, 4H): the four gates side by side
    i, f, g, o = gates.chunk(4, dim=1)  # nn.LSTM's order

    forget_gate = torch.sigmoid(f)  # how much of the old memory to keep
    input_gate = torch.sigmoid(i)  # how much of the new candidate to write
    candidate = torch.tanh(g)  # the new content proposed for the memory
    c = forget_gate * c + input_gate * candidate  # cell update: keep some, write some
    output_gate = torch.sigmoid(o)  # how much of the memory to expose
    h = output_gate * torch.tanh(c)  # the hidden state the next layer and step see
    return h, c


class LSTM(nn.Module):
    """A hand-written multi-layer LSTM, a drop-in for `nn.LSTM(I, H, L, dropout=p)` (time-major)."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, dropout: float = 0.0):
        super().__init__()
        self.input_size, self.hidden_size, self.num_layers, self.dropout = (
            input_size, hidden_size, num_layers, dropout,
        )
        for k in range(num_layers):
            layer_in = input_size if k == 0 else hidden_size
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(4 * hidden_size, layer_in)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(4 * hidden_size, hidden_size)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(4 * hidden_size)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(4 * hidden_size)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.hidden_size)  # nn.LSTM's initialisation
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        T, B, _ = x.shape  # (T, B, I)
        if state is None:
            zeros = x.new_zeros(self.num_layers, B, self.hidden_size)
            state = (zeros, zeros)
        h_n, c_n = [], []
        for k in range(self.num_layers):
            w_ih, w_hh = getattr(self, f"weight_ih_l{k}"), getattr(self, f"weight_hh_l{k}")
            b = getattr(self, f"bias_ih_l{k}") + getattr(self, f"bias_hh_l{k}")
            # The input half of every gate for all T steps in one matrix product; only
            # the recurrent half has to wait for the previous step.
            x_proj = F.linear(x, w_ih, b)  # (T, B, 4H)
            h, c = state[0][k], state[1][k]  # (B, H)
            outputs = []
            for x_t in x_proj.unbind(0):  # unbind, not x_proj[t]: its backward writes all T grads at once
                h, c = lstm_cell(x_t, h, c, w_hh)
                outputs.append(h)
            x = torch.stack(outputs)  # (T, B, H)
            if k < self.num_layers - 1 and self.dropout > 0:
                x = dropout(x, self.dropout, self.training)  # between layers, as nn.LSTM does
            h_n.append(h)
            c_n.append(c)
        return x, (torch.stack(h_n), torch.stack(c_n))


def resolve_impl(cfg: ModelConfig) -> str:
    """`auto` -> the fast path: no feature of this model needs the hand-written cell."""
    return "cudnn" if cfg.impl == "auto" else cfg.impl


class LSTMLanguageModel(nn.Module):
    """Embedding -> dropout -> LSTM layers -> dropout -> linear (optionally tied to the embedding)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, impl: str | None = None):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.impl = impl or resolve_impl(cfg)
        E, H, L = cfg.embedding_size, cfg.hidden_size, cfg.num_layers
        self.embedding = nn.Embedding(vocab_size, E)
        self.drop = Dropout(cfg.dropout)
        rnn_cls = nn.LSTM if self.impl == "cudnn" else LSTM
        self.rnn = rnn_cls(E, H, L, dropout=cfg.dropout if L > 1 else 0.0)
        self.decoder = nn.Linear(H, vocab_size)
        if cfg.tie_weights:
            # Weight tying (Press & Wolf 2017; Inan et al. 2017): the output projection
            # reuses the input embedding, saving V*H parameters and improving perplexity.
            self.decoder.weight = self.embedding.weight
        self._init_weights()

    def _init_weights(self) -> None:
        # The classic word-language-model initialisation: small uniform embeddings and
        # a zero output bias; the LSTM keeps nn.LSTM's own uniform(+-1/sqrt(H)).
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        if not self.cfg.tie_weights:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        device = device or self.embedding.weight.device
        zeros = torch.zeros(self.cfg.num_layers, batch_size, self.cfg.hidden_size, device=device)
        return zeros, zeros.clone()

    def features(self, ids: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """ids (T, B) -> the last layer's output after dropout (T, B, H), the input of the decoder."""
        if state is None:
            state = self.init_state(ids.size(1), ids.device)
        x = self.drop(self.embedding(ids))  # (T, B, E)
        out, state = self.rnn(x, state)  # (T, B, H)
        return self.drop(out), state

    def forward(self, ids: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """ids (T, B) -> logits (T, B, V) and the final (h, c)."""
        out, state = self.features(ids, state)
        return self.decoder(out), state

    def step(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        """One time step for inference: ids (B,) -> logits (B, V) and the new (h, c)."""
        h, state = self.step_hidden(ids, state)
        return self.decoder(h), state

    def step_hidden(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        """One time step for inference: ids (B,) -> the last layer's h (B, H) and the new (h, c).

        Runs the textbook cell on the weights of either engine (they have the same
        names): for batch-1 generation this is several times cheaper than a call of
        nn.LSTM, whose oneDNN set-up costs more than the arithmetic of one step.
        Dropout is left out, as in eval mode.
        """
        x = self.embedding(ids)  # (B, E)
        h_n, c_n = [], []
        for k in range(self.cfg.num_layers):
            w = {name: getattr(self.rnn, f"{name}_l{k}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
            x_proj = F.linear(x, w["weight_ih"], w["bias_ih"] + w["bias_hh"])  # (B, 4H)
            x, c = lstm_cell(x_proj, state[0][k], state[1][k], w["weight_hh"])
            h_n.append(x)
            c_n.append(c)
        return x, (torch.stack(h_n), torch.stack(c_n))

    def loss(self, ids: Tensor, targets: Tensor, state: State | None = None,
             reduction: str = "mean") -> tuple[Tensor, State]:
        """Cross-entropy (float32) of predicting `targets` (T, B) from `ids` (T, B), and the final state.

        The same value as `F.cross_entropy(forward(ids)[0].flatten(0, 1), targets.flatten())`,
        computed without keeping the (T, B, V) logits (see loss.py): what training and
        evaluation use.
        """
        out, state = self.features(ids, state)
        loss = linear_cross_entropy(out.flatten(0, 1), self.decoder.weight, self.decoder.bias,
                                    targets.flatten(), reduction)
        return loss, state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights counted once
