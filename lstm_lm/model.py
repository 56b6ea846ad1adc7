"""The language model: embedding -> stacked recurrent layers -> linear projection.

    model = LSTMLanguageModel(cfg.model, vocab_size=10_000)
    logits, state = model(ids)            # ids (T, B) -> logits (T, B, V)
    logits, state = model(ids2, state)    # carry the memory into the next chunk

`model.cell` picks the recurrent cell from the registry of lstm_lm/cells/: the LSTM
(the default), the simple RNN it was invented to improve on, the GRU, and the LSTM's
relatives CIFG and the Mogrifier; `model.proj_size` projects an LSTM's h (LSTMP).
Each cell is written out so that it reads like the textbook, and each cell torch.nn
has keeps its parameters: `weight_ih_l{k}` (G*H, I), `weight_hh_l{k}` (G*H, H),
`bias_ih_l{k}`, `bias_hh_l{k}` (G*H,), with G gate blocks in torch.nn's order.
Two engines share those weights: the hand-written cell ("custom") and the fused
kernel behind torch.nn.LSTM / GRU / RNN ("cudnn": cuDNN on a GPU, oneDNN or ATen's
own loop on a CPU), for the cells that have one. A state dict saved with one engine
loads into the other, and into the torch.nn module.

The regularization of AWD-LSTM (Merity et al. 2017) works with both engines and
every cell, because both engines read the weights afresh at every call: embedding
dropout (whole words), locked dropout (one mask for all time steps) on the
embedding output, between layers and on the output, and weight drop (DropConnect
on the matrices each cell names: W_hh).

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

from lstm_lm import cells
from lstm_lm.adaptive import AdaptiveSoftmax, default_cutoffs
from lstm_lm.cells.base import Cell
from lstm_lm.config import ModelConfig
from lstm_lm.loss import linear_cross_entropy_and_hits, output_cross_entropy, token_log_probs
from lstm_lm.utils import native_bf16, not_compiled

# Per layer a tuple of tensors, each (B, size), in the cell's state_names order: (h, c)
# for the LSTM family, (h,) for the GRU and the simple RNN. Layers may differ in size
# (AWD-LSTM's last layer is smaller).
State = list[tuple[Tensor, ...]]


def detach_state(state: State) -> State:
    """The same memory with the gradient history cut (truncated BPTT)."""
    return [tuple(t.detach() for t in layer) for layer in state]


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout (Srivastava et al. 2014): zero each element with probability p, scale the rest by 1/(1-p).

    The same as F.dropout, but on a CPU the mask comes from `keep_mask`, whose random
    draws cost a fifth of F.dropout's bernoulli_ there. GPUs keep PyTorch's fused kernel,
    and torch.compile's graphs draw with torch.rand, which Inductor fuses into the mask.
    """
    if not training or p == 0:
        return x
    if x.device.type != "cpu":
        return F.dropout(x, p, training)
    if torch.compiler.is_compiling():
        return x * (torch.rand(x.shape, device=x.device) >= p).to(x.dtype).mul_(1.0 / (1.0 - p))
    return x * keep_mask(x.shape, p, x.dtype, x.device)


def keep_mask(shape: torch.Size, p: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Inverted dropout's mask: 0 with probability p (rounded to a multiple of 2^-16), else 1/(1-p).

    Each element compares a random 16-bit integer with a threshold, four of them from each
    64-bit draw of the generator: the draws are most of a mask's cost on a CPU, and
    torch.rand makes one 32-bit draw per element (a (35, 20, 200) mask in 0.17 ms against
    0.34 ms for torch.rand and 0.82 ms for bernoulli_, on a 2-core Zen 5 EPYC).
    """
    if p >= 1:
        return torch.zeros(shape, dtype=dtype, device=device)
    dropped = round(p * 65536)  # of the 65,536 values a 16-bit integer takes
    n = math.prod(shape)
    drawn = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    bits = drawn.view(torch.int16)[:n].view(shape)  # uniform over [-32768, 32767]
    return (bits >= dropped - 32768).to(dtype).mul_(1.0 / (1.0 - p))


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


ENGINES = ("custom", "cudnn")


def cell_options(cfg: ModelConfig) -> dict:
    """The model.* fields `cfg.cell` reads beyond the sizes (model.proj_size, ...), set ones only."""
    return {name: getattr(cfg, name) for name in cells.get(cfg.cell).options if getattr(cfg, name) is not None}


def _cpu_runs_bf16() -> bool:
    """Whether this CPU has the instructions oneDNN's bf16 recurrent kernels need."""
    return native_bf16(torch.device("cpu"))


@not_compiled
def fused_rnn(
    cell: Cell,
    x: Tensor,
    state: tuple[Tensor, ...],
    weights: list[Tensor],
    num_layers: int,
    dropout: float,
    training: bool,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The kernel nn.LSTM / nn.GRU / nn.RNN.forward calls (cuDNN on a GPU), on the given
    weights. `state` holds (L, B, size) stacks; returns the output and the new stacks.

    Kept out of torch.compile's graph, as nn.LSTM is: traced, it decomposes into one
    small graph node per time step, which took minutes to compile and ran no faster.
    """
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and not _cpu_runs_bf16():
        # oneDNN's recurrent kernels take bf16 only on CPUs with AVX-512 (BF16) or AMX;
        # elsewhere they refuse it, so this kernel runs in float32 there.
        with torch.autocast("cpu", enabled=False):
            return fused_rnn(
                cell,
                x.float(),
                tuple(s.float() for s in state),
                [w.float() for w in weights],
                num_layers,
                dropout,
                training,
            )
    return cell.fused(x, state, weights, num_layers, dropout, training)


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
    """Stacked recurrent layers of any registered cell (lstm_lm/cells/), run by either engine (time-major).

    `Recurrent(I, H, L, dropout=p, cell="gru")` computes what `nn.GRU(I, H, L, dropout=p)`
    does, with the same parameters. Beyond it: a size per layer (`hidden_size=[1150,
    1150, 400]`), locked dropout between layers, weight drop, and the cells torch.nn
    lacks. `cell_options` go to the cell (`proj_size=P` for an LSTMP).
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int | Sequence[int],
        num_layers: int = 1,
        dropout: float = 0.0,
        *,
        cell: str = "lstm",
        engine: str = "custom",
        weight_drop: float = 0.0,
        locked_dropout: bool = False,
        **cell_options,
    ):
        super().__init__()
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        if cell not in cells.names():
            raise ValueError(cells.unknown(cell))
        spec = cells.get(cell)
        if engine == "cudnn" and spec.kernel is None:
            raise ValueError(f"the {cell} cell has no fused kernel: run it with engine custom")
        sizes = [hidden_size] * num_layers if isinstance(hidden_size, int) else list(hidden_size)
        assert len(sizes) == num_layers, "one hidden size per layer"
        self.input_size, self.sizes, self.num_layers, self.cell = input_size, sizes, num_layers, cell
        self.dropout, self.weight_drop, self.locked_dropout, self.engine = dropout, weight_drop, locked_dropout, engine
        self.cells: list[Cell] = []
        for k, H in enumerate(sizes):
            self.cells.append(spec(input_size if k == 0 else self.cells[-1].output_size, H, **cell_options))
            for name, shape in self.cells[-1].shapes().items():
                self.register_parameter(f"{name}_l{k}", nn.Parameter(torch.empty(shape)))
        # The layers each call of the fused kernel runs: all of them at once (torch.nn's
        # dropout between them) when they share their sizes and need no locked dropout
        # between them, else one call per layer.
        same = len({c.state_sizes() for c in self.cells}) == 1
        stacked = same and not (locked_dropout and dropout > 0)
        self.groups = [list(range(num_layers))] if stacked else [[k] for k in range(num_layers)]
        self.reset_parameters()
        self.flatten_parameters()

    @property
    def hidden_size(self) -> int:
        """The last layer's output size (its projection's with an LSTMP)."""
        return self.cells[-1].output_size

    def extra_repr(self) -> str:
        return f"{self.cell}, {self.input_size}, {self.sizes}, engine={self.engine}"

    def reset_parameters(self) -> None:
        for k, cell in enumerate(self.cells):
            cell.reset_parameters(self.params(k))

    def params(self, k: int) -> dict[str, nn.Parameter]:
        """Layer k's parameters as stored, by the cell's names ("weight_ih", ...)."""
        return {name: getattr(self, f"{name}_l{k}") for name in self.cells[k].shapes()}

    def group_parameters(self, i: int) -> list[nn.Parameter]:
        """The parameters of group i in the order the fused kernel takes them."""
        return [w for k in self.groups[i] for w in self.params(k).values()]

    @property
    def _flat_kernel(self) -> bool:
        """Whether the fused kernel reads the parameters themselves, kept in one flat buffer."""
        return self.engine == "cudnn" and cells.get(self.cell).kernel_takes_params

    @torch.no_grad()
    def flatten_parameters(self) -> None:
        """Copy each group's parameters into one new flat buffer and make them views of it."""
        self._flat = []
        if not self._flat_kernel or next(self.parameters()).is_meta:  # shapes only (checkpoint.py)
            return
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

    @not_compiled
    def fused_weights(self) -> list[list[Tensor]]:
        """Each group's weights for its call of the fused kernel. For a cell whose kernel
        reads its parameters: the parameters themselves, or in training with weight drop,
        views of one copy of the group's buffer in which the dropped matrices carry a fresh
        DropConnect mask and everything else is unchanged. For another (CIFG): the
        weights its `kernel_weights` makes of `layer_weights`. (Kept out of
        torch.compile's graph: it reads data pointers.)"""
        if not self._flat_kernel:
            return [
                [w for k in group for w in self.cells[k].kernel_weights(self.layer_weights(k))] for group in self.groups
            ]
        if not self.is_flat():
            self.flatten_parameters()
        groups = [self.group_parameters(i) for i in range(len(self.groups))]
        if not (self.training and self.weight_drop > 0):
            return groups
        weights = []
        for flat, params, group in zip(self._flat, groups, self.groups):
            mask = flat.new_ones(flat.shape)
            start = 0
            for k in group:
                for name, w in self.params(k).items():
                    if name in self.cells[k].dropped:
                        mask[start : start + w.numel()] = dropout(w.new_ones(w.numel()), self.weight_drop, True)
                    start += w.numel()
            dropped = _MaskedCopy.apply(flat, mask, *params)
            weights.append([v.view_as(p) for p, v in zip(params, dropped.split([p.numel() for p in params]))])
        return weights

    def layer_weights(self, k: int) -> dict[str, Tensor]:
        """Layer k's parameters as this call uses them: in training with weight drop, the
        cell's dropped matrices (W_hh) with a fresh DropConnect mask, shared by all time steps."""
        params = self.params(k)
        if self.training and self.weight_drop > 0:
            params = {
                name: dropout(w, self.weight_drop, True) if name in self.cells[k].dropped else w
                for name, w in params.items()
            }
        return params

    def zero_state(self, batch_size: int, device: torch.device | str, dtype: torch.dtype = torch.float32) -> State:
        """An empty memory: zeros for each layer's state tensors (h, and c for the LSTM family), (B, size) each."""
        return [
            tuple(torch.zeros(batch_size, size, device=device, dtype=dtype) for size in cell.state_sizes())
            for cell in self.cells
        ]

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """x (T, B, I) and the per-layer state -> the last layer's output (T, B, H) and the new state."""
        if state is None:
            state = self.zero_state(x.size(1), x.device, x.dtype)
        if self.engine == "cudnn":
            return self._fused_forward(x, state)
        weights = [self.layer_weights(k) for k in range(self.num_layers)]  # the weight-drop masks first, as fused
        new_state = []
        for k, cell in enumerate(self.cells):
            if k > 0 and self.dropout > 0:  # between layers
                x = (locked_dropout if self.locked_dropout else dropout)(x, self.dropout, self.training)
            x, layer_state = cell.sequence(x, state[k], weights[k])
            new_state.append(layer_state)
        return x, new_state

    def _fused_forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """The fused kernel, one call per group. A group of all the layers is what
        nn.LSTM.forward runs (torch.nn's dropout between layers; on a GPU cuDNN overlaps
        them); between groups of one layer, this module's (locked) dropout. A CPU in
        training runs a group layer by layer, with this module's dropout between: the
        kernel's own draws its masks with bernoulli_, 5x `keep_mask`'s cost there (the
        oneDNN kernel runs one layer at a time anyway)."""
        new_state = []
        for group, weights in zip(self.groups, self.fused_weights()):
            if group[0] > 0 and self.dropout > 0:
                x = (locked_dropout if self.locked_dropout else dropout)(x, self.dropout, self.training)
            stacks = tuple(torch.stack(parts) for parts in zip(*(state[k] for k in group)))  # (L, B, size) each
            calls = [(0, len(group), weights)]  # (first layer, end, weights) of each kernel call
            if len(group) > 1 and self.dropout > 0 and self.training and x.device.type == "cpu":
                n = len(weights) // len(group)
                calls = [(j, j + 1, weights[j * n : (j + 1) * n]) for j in range(len(group))]
            for lo, hi, w in calls:
                if lo > 0:  # a group split layer by layer: this module's dropout between
                    x = dropout(x, self.dropout, self.training)
                between = self.dropout if hi - lo > 1 else 0.0
                cell, layers = self.cells[group[lo]], tuple(s[lo:hi] for s in stacks)
                x, new = fused_rnn(cell, x, layers, w, hi - lo, between, self.training)
                new_state.extend(zip(*(s.unbind(0) for s in new)))
        return x, new_state


def resolve_impl(cfg: ModelConfig) -> str:
    """`auto` -> the fused kernel where the cell has one (every feature works with it), else custom."""
    if cfg.impl != "auto":
        return cfg.impl
    return "cudnn" if cells.get(cfg.cell).kernel is not None else "custom"


class LSTMLanguageModel(nn.Module):
    """Embedding -> dropout -> recurrent layers (cfg.cell, any registered cell) -> dropout -> linear
    (optionally tied to the embedding)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, impl: str | None = None, loss_impl: str = "fused"):
        super().__init__()
        self.cfg, self.vocab_size = cfg, vocab_size
        self.impl = impl or resolve_impl(cfg)
        self.p = cfg.dropouts()  # rate per site: input, hidden, output, embedding, weight
        sizes = cfg.layer_sizes
        self.embedding = nn.Embedding(vocab_size, cfg.embedding_size)
        self.cell = cfg.cell
        self.rnn = Recurrent(
            cfg.embedding_size,
            sizes,
            len(sizes),
            dropout=self.p["hidden"],
            cell=cfg.cell,
            engine=self.impl,
            weight_drop=self.p["weight"],
            locked_dropout=cfg.locked_dropout,
            **cell_options(cfg),
        )
        out_size = self.rnn.hidden_size
        self.loss_impl = loss_impl  # the full softmax's path in training_loss: "fused" or "plain" (loss.py)
        # The output layer: a full softmax (decoder) or an adaptive one (adaptive.py), never both.
        self.decoder: nn.Linear | None = None
        self.adaptive: AdaptiveSoftmax | None = None
        if cfg.softmax == "adaptive":
            # With tie_weights the head's word rows are the embedding's first rows.
            self.adaptive = AdaptiveSoftmax(
                out_size, vocab_size, cfg.cutoffs or default_cutoffs(vocab_size), cfg.div_value, tied=cfg.tie_weights
            )
        else:
            self.decoder = nn.Linear(out_size, vocab_size)
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
        for k, cell in enumerate(self.rnn.cells):
            params = self.rnn.params(k)
            layer = cell.step(cell.project_input(x, params), state[k], params, None if record is None else record[k])
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

    def training_loss(
        self, ids: Tensor, targets: Tensor, state: State | None = None, ar: float = 0.0, tar: float = 0.0
    ) -> tuple[Tensor, Tensor, State]:
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
