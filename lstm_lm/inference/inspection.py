"""Looking inside a trained model: its gates token by token, and how far back its gradient reaches.

    trace = trace_prompt(model, tokenizer, "My name is John, I am from Tamilnadu and I speak")
    print(trace_table(trace))              # gates, memory norm and top guesses per token
    norms = gradient_flow(model, x, y, state)   # |dL_T/dh_t| per layer, t counted back from T

Both run the textbook cells one step at a time (`model.step_hidden`), on the same
weights the fast engine uses, without dropout.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer
from torch import Tensor

from lstm_lm.errors import PromptError
from lstm_lm.inference.sample import encode_prompt
from lstm_lm.model import LSTMLanguageModel, State


@torch.no_grad()
def trace_prompt(
    model: LSTMLanguageModel,
    tokenizer: Tokenizer,
    prompt: str,
    kind: str = "word",
    layer: int | None = None,
    top_k: int = 3,
    swap: tuple[str, str] | None = None,
) -> dict:
    """Read `prompt` token by token and record, after each token, layer `layer`'s gates
    and state (1-based; default the last layer) and the top_k next-token guesses.

    With `swap` (WORD, OTHER), also read the prompt with OTHER in place of WORD and
    record, per token, how far apart the two memories are (|c - c'| for an LSTM,
    |h - h'| otherwise): zero before WORD, and after it the part of the memory that
    is about WORD: whether it is written, and whether it is kept.
    """
    model.eval()
    layers = model.rnn.num_layers
    layer = layers if layer is None else layer
    if not 1 <= layer <= layers:
        raise PromptError(f"--layer must be between 1 and {layers} (the model has {layers} layer(s)), got {layer}")
    ids = encode_prompt(tokenizer, prompt, kind)
    cell = model.rnn.cells[layer - 1]
    memory = cell.memory  # what carries the past: c for the LSTM family, h otherwise
    trace = {
        "prompt": prompt,
        "cell": model.cell,
        "title": cell.title,
        "layer": layer,
        "memory": memory,
        "tokens": [tokenizer.id_to_token(i) for i in ids[1:]],
        **_read(model, tokenizer, ids, layer, top_k),
    }
    if swap is not None:
        word, other = swap
        word_id, other_id = tokenizer.token_to_id(word), tokenizer.token_to_id(other)
        if word_id is None or word_id not in ids[1:]:
            raise PromptError(
                f"--swap {word}={other}: {word!r} is not one of the prompt's tokens ({' '.join(trace['tokens'])})"
            )
        if other_id is None:
            raise PromptError(f"--swap {word}={other}: {other!r} is not in the model's vocabulary")
        swapped = _read(model, tokenizer, [other_id if i == word_id else i for i in ids], layer, top_k)
        mine, theirs = torch.tensor(trace["states"][memory]), torch.tensor(swapped["states"][memory])
        trace["swap"] = {
            "word": word,
            "other": other,
            "distance": (mine - theirs).norm(dim=1).tolist(),
            "difference": (mine - theirs).tolist(),
            "guesses": swapped["guesses"],
        }
    return trace


def _read(model: LSTMLanguageModel, tokenizer: Tokenizer, ids: list[int], layer: int, top_k: int) -> dict:
    """Gates, states and guesses after each token but the first (the <eos> a prompt starts with)."""
    device = model.embedding.weight.device
    state = model.init_state(1, device)
    cell = model.rnn.cells[layer - 1]
    gates = {name: [] for name in cell.gate_names}
    states = {name: [] for name in cell.state_names}
    guesses = []
    for pos, i in enumerate(ids):
        record = [{} for _ in range(model.rnn.num_layers)]
        h, state = model.step_hidden(torch.tensor([i], device=device), state, record)
        if pos == 0:
            continue  # the <eos> is read, not shown
        for name in gates:
            gates[name].append(record[layer - 1][name][0].float().tolist())
        for name, t in zip(states, state[layer - 1]):
            states[name].append(t[0].float().tolist())
        probs = model.log_probs(h)[0].exp()
        top = torch.topk(probs, min(top_k, probs.numel()))
        guesses.append([(tokenizer.id_to_token(int(j)), float(p)) for p, j in zip(top.values, top.indices)])
    return {"gates": gates, "states": states, "guesses": guesses}


def trace_table(trace: dict) -> str:
    """One line per token: mean gate activations, state norms (and with a swap, how far
    the swapped prompt's memory is) and the top guesses."""
    gate_names = list(trace["gates"])
    state_names = list(trace["states"])
    swap = trace.get("swap")
    width = max(8, *(len(t) for t in trace["tokens"])) + 1
    head = f"{'#':>3}  {'token':<{width}}" + "".join(f"{g:>8}" for g in gate_names)
    head += "".join(f"{'|' + s + '|':>8}" for s in state_names)
    if swap:
        m = trace["memory"]
        head += f"{'|' + m + '-' + m + chr(39) + '|':>9}"
    head += "   next-word guesses"
    rows = [head]
    for t, token in enumerate(trace["tokens"]):
        line = f"{t + 1:>3}  {token:<{width}}"
        line += "".join(f"{sum(trace['gates'][g][t]) / len(trace['gates'][g][t]):8.3f}" for g in gate_names)
        line += "".join(f"{sum(v * v for v in trace['states'][s][t]) ** 0.5:8.3f}" for s in state_names)
        if swap:
            line += f"{swap['distance'][t]:9.3f}"
        line += "   " + ", ".join(f"{w} {p:.2f}" for w, p in trace["guesses"][t])
        rows.append(line)
    if swap:
        rows.append(
            f"{trace['memory']}' is the memory with {swap['other']!r} in place of {swap['word']!r}; "
            f"it then guesses: " + ", ".join(f"{w} {p:.2f}" for w, p in swap["guesses"][-1])
        )
    return "\n".join(rows)


def gradient_flow(model: LSTMLanguageModel, ids: Tensor, targets: Tensor, state: State) -> list[list[float]]:
    """How much the loss at a chunk's last step depends on each earlier hidden state.

    For every layer, [|dL_T/dh_{T-1}|, |dL_T/dh_{T-2}|, ..., |dL_T/dh_0|]: the norm of
    the gradient of the last step's cross-entropy with respect to the hidden state k
    steps back (mean over the B streams). In a simple RNN it shrinks geometrically
    with k (the vanishing gradient, Bengio et al. 1994); an LSTM's cell state lets it
    reach further. Dropout is off; no parameter gradient is kept.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), torch.autocast(ids.device.type, enabled=False):
            state = [tuple(t.detach().float() for t in layer) for layer in state]  # bf16 under autocast
            hs: list[list[Tensor]] = [[] for _ in state]
            for t in range(ids.size(0)):
                top, state = model.step_hidden(ids[t], state)
                for k, layer in enumerate(state):
                    hs[k].append(layer[0])
            loss = -model.target_log_probs(top, targets[-1]).mean()
            # allow_unused: an mLSTM's later steps never read h (its memory C carries the past): no gradient reaches it
            grads = torch.autograd.grad(loss, [h for layer in hs for h in layer], allow_unused=True)
    finally:
        model.train(was_training)
    T = ids.size(0)
    norms = [0.0 if g is None else float(g.norm(dim=1).mean()) for g in grads]
    return [list(reversed(norms[k * T : (k + 1) * T])) for k in range(len(hs))]


def trace_summary(trace: dict, units: int = 12) -> dict:
    """A trace made small enough to draw in a web page: per token, each gate's mean and the
    values of the `units` units that change most over the prompt (as `inspect`'s picture
    picks them), the state norms, how much the memory changed at each token
    (|c_t - c_{t-1}| for an LSTM, |h_t - h_{t-1}| otherwise: where it is written), and
    the guesses; with a swap, how far the swapped prompt's memory is after each token.
    A cell without gates (the simple RNN): `gates` is empty and `note` says so."""
    memory = torch.tensor(trace["states"][trace["memory"]])  # (T, H)
    previous = torch.cat([torch.zeros_like(memory[:1]), memory[:-1]])  # the memory before each token
    gates = {}
    for name, values in trace["gates"].items():
        v = torch.tensor(values)  # (T, H)
        picked = _most_changing(v, units)
        gates[name] = {"mean": v.mean(1).tolist(), "units": picked, "values": v[:, picked].tolist()}
    picked = _most_changing(memory, units)
    summary = {
        "cell": trace["cell"],
        "title": trace["title"],
        "layer": trace["layer"],
        "tokens": trace["tokens"],
        "memory": trace["memory"],
        "gates": gates,
        "norms": {name: torch.tensor(v).norm(dim=1).tolist() for name, v in trace["states"].items()},
        "memory_change": (memory - previous).norm(dim=1).tolist(),
        "memory_units": {"units": picked, "values": memory[:, picked].tolist()},
        "guesses": trace["guesses"],
    }
    if not gates:
        cell = trace["title"].split(":")[0]  # "the simple RNN"
        summary["note"] = f"{cell} has no gates: it rewrites its whole state h at every step"
    if "swap" in trace:
        swap = trace["swap"]
        summary["swap"] = {
            "word": swap["word"],
            "other": swap["other"],
            "distance": swap["distance"],
            "guesses": swap["guesses"][-1],
        }
    return summary


def _most_changing(values: Tensor, n: int) -> list[int]:
    """The n units (columns of a (T, H) tensor) whose values vary most over the tokens."""
    spread = values.std(0) if values.size(0) > 1 else values.abs()[0]
    return torch.argsort(spread, descending=True)[:n].tolist()
