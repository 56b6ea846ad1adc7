"""The language model: embedding -> stacked recurrent layers (LSTM, GRU or simple RNN) -> linear projection.

    model = LSTMLanguageModel(cfg.model, vocab_size=10_000)
    logits, state = model(ids)            # ids (T, B) -> logits (T, B, V)
    logits, state = model(ids2, state)    # carry the memory into the next chunk

`model.cell` picks the recurrent cell: "lstm" (the default), "gru" or "rnn" (the
simple tanh RNN of Elman 1990, which the LSTM was invented to improve on). Each
cell is written out below so that it reads like the textbook, and each keeps its
torch.nn counterpart's parameters: `weight_ih_l{k}` (G*H, I), `weight_hh_l{k}`
(G*H, H), `bias_ih_l{k}`, `bias_hh_l{k}` (G*H,), with G gate blocks in torch.nn's
order: LSTM (input, forget, candidate, output), GRU (reset, update, candidate),
RNN one block. Two engines share those weights: the hand-written cell ("custom")
and the fused kernel behind torch.nn.LSTM / GRU / RNN ("cudnn": cuDNN on a GPU,
oneDNN or ATen's own loop on a CPU). A state dict saved with one engine loads into
the other, and into the torch.nn module.

The regularization of AWD-LSTM (Merity et al. 2017) works with both engines and
every cell, because both engines read the weights afresh at every call: embedding
dropout (whole words), locked dropout (one mask for all time steps) on the
embedding output, between layers and on the output, and weight drop (DropConnect
on W_hh).

The weights of the layers that one call of the fused kernel runs live in one flat
buffer in cuDNN's order (per layer W_ih, W_hh, b_ih, b_hh), and the parameters are
views of it, as in torch.nn.LSTM: cuDNN reads them where they are, where weights
scattered in memory are first copied into one buffer at every call. Weight drop
makes one masked copy of that buffer per batch, in which only the W_hh blocks differ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lstm_lm.adaptive import AdaptiveSoftmax, default_cutoffs
from lstm_lm.config import ModelConfig
from lstm_lm.loss import linear_cross_entropy_and_hits, output_cross_entropy, token_log_probs
from lstm_lm.utils import native_bf16

# Per layer a tuple of tensors, each (B, H_k): (h, c) for the LSTM, (h,) for the GRU and
# the simple RNN. Layers may differ in size (AWD-LSTM's last layer is smaller).
State = list[tuple[Tensor, ...]]

def detach_state(state: State) -> State:
    """The same memory with the gradient history cut (truncated BPTT)."""
    return [tuple(t.detach() for t in layer) for layer in state]


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


def locked_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Locked (variational) dropout (Gal & Ghahramani 2016) on x (T, B, H): one mask per
    sequence, (1, B, H), the same units dropped at every time step."""
    if not training or p == 0:
        return x
    return x * dropout(x.new_ones(1, *x.shape[1:]), p, training)


def embedding_dropout(weight: Tensor, p: float, training: bool) -> Tensor:
    """Drop whole words (Gal & Ghahramani 2016): zero whole rows of the embedding matrix
    (V, E), scale the others by 1/(1-p). A dropped word is a zero vector wherever it occurs."""
    if not training or p == 0:
        return weight
    return weight * dropout(weight.new_ones(weight.size(0), 1), p, training)


# ---------------------------------------------------------------------------------------
# The cells: one time step each. `x_proj` is the input's contribution W_ih x + b_ih, with
# b_hh folded in where the cell allows it (LSTM, RNN), computed for all time steps at once
# by the caller. Pass a dict as `record` to get the gate activations back (`lstm-lm inspect`).


def lstm_cell(x_proj: Tensor, h: Tensor, c: Tensor, weight_hh: Tensor,
              record: dict | None = None) -> tuple[Tensor, Tensor]:
    """LSTM (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000).
    `x_proj` is W_ih x + b_ih + b_hh, (B, 4H)."""
    gates = torch.addmm(x_proj, h, weight_hh.t())  # x_proj + h W_hh^T, (B, 4H): the four gates side by side
    i, f, g, o = gates.chunk(4, dim=1)  # nn.LSTM's order

    forget_gate = torch.sigmoid(f)  # how much of the old memory to keep
    input_gate = torch.sigmoid(i)  # how much of the new candidate to write
    candidate = torch.tanh(g)  # the new content proposed for the memory
    c = forget_gate * c + input_gate * candidate  # cell update: keep some, write some
    output_gate = torch.sigmoid(o)  # how much of the memory to expose
    h = output_gate * torch.tanh(c)  # the hidden state the next layer and step see
    if record is not None:
        record.update(forget=forget_gate, input=input_gate, output=output_gate)
    return h, c


def gru_cell(x_proj: Tensor, h: Tensor, weight_hh: Tensor, bias_hh: Tensor,
             record: dict | None = None) -> Tensor:
    """GRU (Cho et al. 2014), as nn.GRU computes it. `x_proj` is W_ih x + b_ih, (B, 3H):
    b_hh stays apart because the reset gate scales the recurrent half of the candidate."""
    h_proj = torch.addmm(bias_hh, h, weight_hh.t())  # W_hh h + b_hh, (B, 3H)
    x_r, x_z, x_n = x_proj.chunk(3, dim=1)  # nn.GRU's order: reset, update, candidate
    h_r, h_z, h_n = h_proj.chunk(3, dim=1)

    reset_gate = torch.sigmoid(x_r + h_r)  # how much of the old state the candidate may read
    update_gate = torch.sigmoid(x_z + h_z)  # how much of the old state to keep as it is
    candidate = torch.tanh(x_n + reset_gate * h_n)  # the new content proposed
    h = update_gate * h + (1 - update_gate) * candidate  # keep some, replace the rest
    if record is not None:
        record.update(reset=reset_gate, update=update_gate)
    return h


def rnn_cell(x_proj: Tensor, h: Tensor, weight_hh: Tensor, record: dict | None = None) -> Tensor:
    """The simple (Elman) RNN: the new state is a squashed mix of the input and the old
    state, rewritten whole at every step. `x_proj` is W_ih x + b_ih + b_hh, (B, H)."""
    return torch.tanh(torch.addmm(x_proj, h, weight_hh.t()))


CELLS = ("lstm", "gru", "rnn")
GATE_BLOCKS = {"lstm": 4, "gru": 3, "rnn": 1}  # rows of W_ih and W_hh, in units of H
STATE_NAMES = {"lstm": ("h", "c"), "gru": ("h",), "rnn": ("h",)}  # what a layer carries
GATE_NAMES = {"lstm": ("forget", "input", "output"), "gru": ("reset", "update"), "rnn": ()}
ENGINES = ("custom", "cudnn")


def input_projection(cell: str, x: Tensor, w_ih: Tensor, b_ih: Tensor, b_hh: Tensor) -> Tensor:
    """W_ih x + b_ih (+ b_hh where the cell adds it outside any gate) for every time step at once."""
    return F.linear(x, w_ih, b_ih if cell == "gru" else b_ih + b_hh)


def cell_step(cell: str, x_proj: Tensor, state: tuple[Tensor, ...], w_hh: Tensor, b_hh: Tensor,
              record: dict | None = None) -> tuple[Tensor, ...]:
    """One time step of `cell` from its input projection: the layer's new state, h first."""
    if cell == "lstm":
        return lstm_cell(x_proj, *state, w_hh, record)
    if cell == "gru":
        return (gru_cell(x_proj, state[0], w_hh, b_hh, record),)
    return (rnn_cell(x_proj, state[0], w_hh, record),)


_FUSED = {"lstm": torch.lstm, "gru": torch.gru, "rnn": torch.rnn_tanh}


def _cpu_runs_bf16() -> bool:
    """Whether this CPU has the instructions oneDNN's bf16 recurrent kernels need."""
    return native_bf16(torch.device("cpu"))


@torch.compiler.disable
def fused_rnn(cell: str, x: Tensor, state: tuple[Tensor, ...], weights: list[Tensor], num_layers: int,
              dropout: float, training: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The kernel nn.LSTM / nn.GRU / nn.RNN.forward calls (cuDNN on a GPU), on the given
    weights. `state` holds (L, B, H) stacks; returns the output and the new stacks.

    Kept out of torch.compile's graph, as nn.LSTM is: traced, it decomposes into one
    small graph node per time step, which took minutes to compile and ran no faster.
    """
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and not _cpu_runs_bf16():
        # oneDNN's recurrent kernels take bf16 only on CPUs with AVX-512 (BF16) or AMX;
        # elsewhere they refuse it, so this kernel runs in float32 there.
        with torch.autocast("cpu", enabled=False):
            return fused_rnn(cell, x.float(), tuple(s.float() for s in state), [w.float() for w in weights],
                             num_layers, dropout, training)
    hx = state if cell == "lstm" else state[0]
    out, *new_state = _FUSED[cell](x, hx, weights, True, num_layers, dropout, training, False, False)
    return out, tuple(new_state)


class _MaskedCopy(torch.autograd.Function):
    """`flat * mask` as a new buffer, differentiable in `params`, the tensors that are
    consecutive views of `flat` (its gradient is split back into one per parameter)."""

    @staticmethod
    def forward(ctx, flat: Tensor, mask: Tensor, *params: Tensor) -> Tensor:
        ctx.save_for_backward(mask)
        ctx.shapes = [p.shape for p in params]
        return flat * mask

    @staticmethod
    def backward(ctx, grad: Tensor):
        (mask,) = ctx.saved_tensors
        grads = (grad * mask).split([s.numel() for s in ctx.shapes])
        return None, None, *(g.view(s) for g, s in zip(grads, ctx.shapes))


class Recurrent(nn.Module):
    """A multi-layer LSTM, GRU or simple RNN with torch.nn's parameters, run by either engine (time-major).

    `Recurrent(I, H, L, dropout=p, cell="gru")` computes what `nn.GRU(I, H, L, dropout=p)`
    does. Beyond it: a size per layer (`hidden_size=[1150, 1150, 400]`), locked dropout
    between layers and weight drop on the hidden-to-hidden matrices.
    """

    def __init__(self, input_size: int, hidden_size: int | Sequence[int], num_layers: int = 1,
                 dropout: float = 0.0, *, cell: str = "lstm", engine: str = "custom", weight_drop: float = 0.0,
                 locked_dropout: bool = False):
        super().__init__()
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {cell!r}")
        sizes = [hidden_size] * num_layers if isinstance(hidden_size, int) else list(hidden_size)
        assert len(sizes) == num_layers, "one hidden size per layer"
        self.input_size, self.sizes, self.num_layers, self.cell = input_size, sizes, num_layers, cell
        self.dropout, self.weight_drop, self.locked_dropout, self.engine = dropout, weight_drop, locked_dropout, engine
        blocks = GATE_BLOCKS[cell]
        for k, H in enumerate(sizes):
            layer_in = input_size if k == 0 else sizes[k - 1]
            self.register_parameter(f"weight_ih_l{k}", nn.Parameter(torch.empty(blocks * H, layer_in)))
            self.register_parameter(f"weight_hh_l{k}", nn.Parameter(torch.empty(blocks * H, H)))
            self.register_parameter(f"bias_ih_l{k}", nn.Parameter(torch.empty(blocks * H)))
            self.register_parameter(f"bias_hh_l{k}", nn.Parameter(torch.empty(blocks * H)))
        # The layers each call of the fused kernel runs: all of them at once (torch.nn's
        # dropout between them) when they share a size and need no locked dropout
        # between them, else one call per layer.
        stacked = len(set(sizes)) == 1 and not (locked_dropout and dropout > 0)
        self.groups = [list(range(num_layers))] if stacked else [[k] for k in range(num_layers)]
        self.reset_parameters()
        self.flatten_parameters()

    @property
    def hidden_size(self) -> int:
        return self.sizes[-1]

    def extra_repr(self) -> str:
        return f"{self.cell}, {self.input_size}, {self.sizes}, engine={self.engine}"

    def reset_parameters(self) -> None:
        for k, H in enumerate(self.sizes):  # torch.nn's initialisation: uniform(+-1/sqrt(H))
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                nn.init.uniform_(getattr(self, f"{name}_l{k}"), -1.0 / math.sqrt(H), 1.0 / math.sqrt(H))

    def raw_weights(self, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Layer k's (W_ih, W_hh, b_ih, b_hh) as stored."""
        return tuple(getattr(self, f"{name}_l{k}") for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"))

    def group_parameters(self, i: int) -> list[nn.Parameter]:
        """The parameters of group i in the order the fused kernel takes them."""
        return [w for k in self.groups[i] for w in self.raw_weights(k)]

    @torch.no_grad()
    def flatten_parameters(self) -> None:
        """Copy each group's parameters into one new flat buffer and make them views of it."""
        self._flat = []
        for i in range(len(self.groups)):
            params = self.group_parameters(i)
            flat = torch.cat([p.detach().reshape(-1) for p in params])
            for p, view in zip(params, flat.split([p.numel() for p in params])):
                p.data = view.view_as(p)
            self._flat.append(flat)

    def is_flat(self) -> bool:
        """Whether every parameter is still its view of its group's buffer (moving the
        module, loading with assign=True or copying it makes new tensors)."""
        for i, flat in enumerate(self._flat):
            ptr = flat.data_ptr()
            for p in self.group_parameters(i):
                if p.data_ptr() != ptr or p.dtype != flat.dtype or p.device != flat.device:
                    return False
                ptr += p.numel() * p.element_size()
        return True

    def _apply(self, fn, recurse=True):  # .to(), .cuda(), .bfloat16() make new tensors
        module = super()._apply(fn, recurse)
        self.flatten_parameters()
        return module

    @torch.compiler.disable
    def fused_weights(self) -> list[list[Tensor]]:
        """Each group's weights for its call of the fused kernel: the parameters
        themselves, or in training with weight drop, views of one copy of the group's
        buffer in which the W_hh blocks carry a fresh DropConnect mask and everything
        else is unchanged. (Kept out of torch.compile's graph: it reads data pointers.)"""
        if not self.is_flat():
            self.flatten_parameters()
        groups = [self.group_parameters(i) for i in range(len(self.groups))]
        if not (self.training and self.weight_drop > 0):
            return groups
        weights = []
        for flat, params in zip(self._flat, groups):
            mask = flat.new_ones(flat.shape)
            start = 0
            for w_ih, w_hh, b_ih, b_hh in zip(*[iter(params)] * 4):  # layer by layer
                start += w_ih.numel()
                mask[start:start + w_hh.numel()] = dropout(w_hh.new_ones(w_hh.numel()), self.weight_drop, True)
                start += w_hh.numel() + b_ih.numel() + b_hh.numel()
            dropped = _MaskedCopy.apply(flat, mask, *params)
            weights.append([v.view_as(p) for p, v in zip(params, dropped.split([p.numel() for p in params]))])
        return weights

    def layer_weights(self, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Layer k's (W_ih, W_hh, b_ih, b_hh) as this call uses them: in training with
        weight drop, W_hh with a fresh DropConnect mask, shared by all time steps."""
        w_ih, w_hh, b_ih, b_hh = self.raw_weights(k)
        if self.training and self.weight_drop > 0:
            w_hh = dropout(w_hh, self.weight_drop, True)
        return w_ih, w_hh, b_ih, b_hh

    def zero_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> State:
        """An empty memory: zeros for each layer's h (and c for an LSTM), (B, H_k) each."""
        return [tuple(torch.zeros(batch_size, H, device=device, dtype=dtype) for _ in STATE_NAMES[self.cell])
                for H in self.sizes]

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """x (T, B, I) and the per-layer state -> the last layer's output (T, B, H) and the new state."""
        if state is None:
            state = self.zero_state(x.size(1), x.device, x.dtype)
        if self.engine == "cudnn":
            return self._fused_forward(x, state)
        weights = [self.layer_weights(k) for k in range(self.num_layers)]
        new_state = []
        for k in range(self.num_layers):
            if k > 0 and self.dropout > 0:  # between layers
                x = (locked_dropout if self.locked_dropout else dropout)(x, self.dropout, self.training)
            x, layer_state = self._layer(x, state[k], weights[k])
            new_state.append(layer_state)
        return x, new_state

    def _fused_forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """The fused kernel, one call per group. A group of all the layers is what
        nn.LSTM.forward runs (torch.nn's dropout between layers; on a GPU cuDNN overlaps
        them); between groups of one layer, this module's (locked) dropout."""
        new_state = []
        for group, weights in zip(self.groups, self.fused_weights()):
            if group[0] > 0 and self.dropout > 0:
                x = (locked_dropout if self.locked_dropout else dropout)(x, self.dropout, self.training)
            stacks = tuple(torch.stack(parts) for parts in zip(*(state[k] for k in group)))  # (L, B, H) each
            between = self.dropout if len(group) > 1 else 0.0
            x, new = fused_rnn(self.cell, x, stacks, weights, len(group), between, self.training)
            new_state.extend(zip(*(s.unbind(0) for s in new)))
        return x, new_state

    def _layer(self, x: Tensor, state: tuple[Tensor, ...], weights: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        w_ih, w_hh, b_ih, b_hh = weights
        # The input half of every gate for all T steps in one matrix product; only the
        # recurrent half has to wait for the previous step.
        x_proj = input_projection(self.cell, x, w_ih, b_ih, b_hh)  # (T, B, G*H)
        outputs = []
        for x_t in x_proj.unbind(0):  # unbind, not x_proj[t]: its backward writes all T grads at once
            state = cell_step(self.cell, x_t, state, w_hh, b_hh)
            outputs.append(state[0])
        return torch.stack(outputs), state  # (T, B, H)


def resolve_impl(cfg: ModelConfig) -> str:
    """`auto` -> the fast path: every feature of this model works with it."""
    return "cudnn" if cfg.impl == "auto" else cfg.impl


class LSTMLanguageModel(nn.Module):
    """Embedding -> dropout -> recurrent layers (cfg.cell: LSTM, GRU or RNN) -> dropout -> linear
    (optionally tied to the embedding)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, impl: str | None = None):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.impl = impl or resolve_impl(cfg)
        self.p = cfg.dropouts()  # rate per site: input, hidden, output, embedding, weight
        sizes = cfg.layer_sizes
        self.embedding = nn.Embedding(vocab_size, cfg.embedding_size)
        self.cell = cfg.cell
        self.rnn = Recurrent(cfg.embedding_size, sizes, len(sizes), dropout=self.p["hidden"], cell=cfg.cell,
                             engine=self.impl, weight_drop=self.p["weight"], locked_dropout=cfg.locked_dropout)
        self.loss_impl = "fused"  # the full softmax's path in training_loss: "fused" or "plain" (loss.py)
        # The output layer: a full softmax (decoder) or an adaptive one (adaptive.py), never both.
        self.decoder: nn.Linear | None = None
        self.adaptive: AdaptiveSoftmax | None = None
        if cfg.softmax == "adaptive":
            # With tie_weights the head's word rows are the embedding's first rows.
            self.adaptive = AdaptiveSoftmax(sizes[-1], vocab_size, cfg.cutoffs or default_cutoffs(vocab_size),
                                            cfg.div_value, tied=cfg.tie_weights)
        else:
            self.decoder = nn.Linear(sizes[-1], vocab_size)
            if cfg.tie_weights:
                # Weight tying (Press & Wolf 2017; Inan et al. 2017): the output projection
                # reuses the input embedding, saving V*H parameters and improving perplexity.
                self.decoder.weight = self.embedding.weight
        self._init_weights()

    def _init_weights(self) -> None:
        # The classic word-language-model initialisation: small uniform embeddings and
        # a zero output bias; the recurrent layers keep torch.nn's own uniform(+-1/sqrt(H)).
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        if self.decoder is not None:
            if not self.cfg.tie_weights:
                nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
            nn.init.zeros_(self.decoder.bias)

    def init_state(self, batch_size: int, device: torch.device | str | None = None) -> State:
        return self.rnn.zero_state(batch_size, device or self.embedding.weight.device)

    def _drop(self, x: Tensor, p: float) -> Tensor:
        return (locked_dropout if self.cfg.locked_dropout else dropout)(x, p, self.training)

    def features(self, ids: Tensor, state: State | None = None, raw: bool = False):
        """ids (T, B) -> the last layer's output after dropout (T, B, H), the input of the
        decoder, and the new state; with `raw`, also that output before dropout."""
        if state is None:
            state = self.init_state(ids.size(1), ids.device)
        weight = embedding_dropout(self.embedding.weight, self.p["embedding"], self.training)
        x = self._drop(F.embedding(ids, weight), self.p["input"])  # (T, B, E)
        out, state = self.rnn(x, state)  # (T, B, H)
        dropped = self._drop(out, self.p["output"])
        return (dropped, state, out) if raw else (dropped, state)

    def forward(self, ids: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """ids (T, B) -> scores (T, B, V) (see `scores`) and the final state."""
        out, state = self.features(ids, state)
        return self.scores(out), state

    def step(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        """One time step for inference: ids (B,) -> scores (B, V) and the new state."""
        h, state = self.step_hidden(ids, state)
        return self.scores(h), state

    # -- the output layer: a full or an adaptive softmax over the vocabulary --------------

    def _head_words(self) -> Tensor | None:
        """The adaptive head's tied word rows: the embedding (its first rows are used)."""
        return self.embedding.weight if self.cfg.tie_weights else None

    def scores(self, h: Tensor) -> Tensor:
        """h (..., H) -> a score for every word (..., V) whose softmax is the model's
        distribution: the logits of the full softmax, the log-probabilities of the adaptive one."""
        if self.adaptive is not None:
            return self.adaptive.log_probs(h, self._head_words())
        return self.decoder(h)

    def log_probs(self, h: Tensor) -> Tensor:
        """h (..., H) -> log p(word) for every word (..., V), float32."""
        if self.adaptive is not None:
            return self.adaptive.log_probs(h, self._head_words())
        return torch.log_softmax(self.decoder(h).float(), dim=-1)

    def target_log_probs(self, h: Tensor, targets: Tensor) -> Tensor:
        """log p(target) of each row: h (N, H), targets (N,) -> (N,) float32. Differentiable
        where gradients are on (dynamic evaluation); else block by block, no logits kept."""
        if self.adaptive is not None:
            return self.adaptive.target_log_probs(h, targets, self._head_words())
        return token_log_probs(h, self.decoder.weight, self.decoder.bias, targets)

    def output_loss(self, h: Tensor, targets: Tensor) -> Tensor:
        """The mean cross-entropy (float32) of the output layer on h (N, H) against targets (N,)."""
        if self.adaptive is not None:
            return self.adaptive.loss(h, targets, self._head_words())
        return output_cross_entropy(h, self.decoder.weight, self.decoder.bias, targets, self.loss_impl)

    @torch.no_grad()
    def output_loss_and_hits(self, h: Tensor, targets: Tensor, ks: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """For evaluation: the summed cross-entropy (float64) and, for each k in `ks`, how
        many rows have their target among the k most likely words."""
        if self.adaptive is not None:
            return self.adaptive.loss_and_hits(h, targets, self._head_words(), ks)
        return linear_cross_entropy_and_hits(h, self.decoder.weight, self.decoder.bias, targets, ks)

    def step_hidden(self, ids: Tensor, state: State, record: list[dict] | None = None) -> tuple[Tensor, State]:
        """One time step for inference: ids (B,) -> the last layer's h (B, H) and the new state.

        Runs the textbook cell on the weights of either engine (they are the same):
        for batch-1 generation this is several times cheaper than a call of the fused
        kernel, whose oneDNN set-up costs more than the arithmetic of one step.
        Dropout is left out, as in eval mode. With `record`, one dict per layer, each
        layer's gate activations are stored in its dict (see `lstm-lm inspect`).
        """
        x = self.embedding(ids)  # (B, E)
        new_state = []
        for k in range(self.rnn.num_layers):
            w_ih, w_hh, b_ih, b_hh = self.rnn.raw_weights(k)
            x_proj = input_projection(self.cell, x, w_ih, b_ih, b_hh)
            layer = cell_step(self.cell, x_proj, state[k], w_hh, b_hh, None if record is None else record[k])
            new_state.append(layer)
            x = layer[0]
        return x, new_state

    def loss(self, ids: Tensor, targets: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Mean cross-entropy (float32) of predicting `targets` (T, B) from `ids` (T, B), and the final state.

        The same value as `F.cross_entropy(forward(ids)[0].flatten(0, 1), targets.flatten())`,
        computed without keeping the (T, B, V) logits (see loss.py).
        """
        out, state = self.features(ids, state)
        return self.output_loss(out.flatten(0, 1), targets.flatten()), state

    def training_loss(self, ids: Tensor, targets: Tensor, state: State | None = None,
                      ar: float = 0.0, tar: float = 0.0) -> tuple[Tensor, Tensor, State]:
        """The objective training minimises, the cross-entropy alone (for the logs) and the state.

        objective = cross-entropy + ar * mean(dropped output^2) + tar * mean((h_t - h_{t-1})^2),
        the activation and temporal activation regularization of Merity et al. (2017),
        on the last layer: AR keeps its activations small, TAR keeps them from jumping
        between time steps.
        """
        out, state, raw = self.features(ids, state, raw=True)
        ce = self.output_loss(out.flatten(0, 1), targets.flatten())
        objective = ce
        if ar > 0:
            objective = objective + ar * out.float().pow(2).mean()
        if tar > 0 and raw.size(0) > 1:
            objective = objective + tar * (raw[1:] - raw[:-1]).float().pow(2).mean()
        return objective, ce, state

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())  # tied weights counted once
