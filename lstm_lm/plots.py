"""Pictures: accuracy against the gap, gate activations, gradient flow and training curves.

matplotlib is an optional extra (`pip install 'lstm-lm[plot]'`); every function
here returns None, drawing nothing, when it is missing, and the commands print
their tables all the same with a hint from `missing_hint()`.
"""

from __future__ import annotations

from pathlib import Path

from lstm_lm.errors import DataError
from lstm_lm.writing import write_atomically

PLOT_HINT = (
    "no picture: matplotlib is missing; install it with  pip install 'lstm-lm[plot]'  (or: pip install matplotlib)"
)


def cell_colour(name: str) -> str | None:
    """The colour a cell declares (lstm_lm/cells/), None (matplotlib's next) for one this version lacks."""
    from lstm_lm import cells

    return cells.get(name).colour if name in cells.module_names() else None


def _pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None when it is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    """Write `fig` to the PNG file `path` and free it."""
    import matplotlib.pyplot as plt

    try:
        path = Path(path)
        if path.suffix.lower() != ".png":
            raise DataError(f"{path}: the picture is written as PNG; give a file name ending in .png")
        write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
        return path
    finally:
        plt.close(fig)


def plot_long_range(results: dict, path: str | Path) -> Path | None:
    """Accuracy on the language word against the gap, one line per cell."""
    plt = _pyplot()
    if plt is None:
        return None
    gaps = results["gaps"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for cell, r in results["cells"].items():
        accs = [100 * r["accuracy"][str(g)] for g in gaps]
        ax.plot(
            gaps,
            accs,
            marker="o",
            lw=2,
            color=cell_colour(cell),
            label=f"{cell.upper()} ({r['hidden_size']} units, {r['parameters']:,} params)",
        )
    from lstm_lm.demo import REGION_LANGUAGE

    languages = list(REGION_LANGUAGE.values())
    chance = 100 * max(languages.count(lang) for lang in languages) / len(languages)
    ax.axhline(chance, color="grey", ls=":", lw=1.5, label=f"always the most common language ({chance:.1f}%)")
    ax.set_xlabel('gap: words between "I am from X" and "and I speak ___"')
    ax.set_ylabel("top-1 accuracy on the language (%)")
    ax.set_ylim(0, 102)
    ax.set_xticks(gaps)
    ax.grid(alpha=0.3)
    budget = results["budget"]
    ax.set_title(
        f"Remembering the region across the gap ({budget['steps']} steps per cell, "
        f"{budget['probes']} sentences per gap)",
        fontsize=10,
    )
    # Beside the axes, not on them: lines may run anywhere from the chance line to 100%.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9)
    return _save(fig, path)


def perplexity_range(curves: list[list[float]]) -> tuple[float, float] | None:
    """The y range for perplexity curves when a run that blew up (perplexity in the millions)
    would squash the others: up to twice the worst curve's best point, so every curve's best
    stays in view; None when every point fits under that."""
    if not any(curves):
        return None
    points = [p for curve in curves for p in curve]
    top = 2 * max(min(curve) for curve in curves if curve)
    return (0.8 * min(points), top) if max(points) > top else None


def plot_cell_comparison(results: dict, path: str | Path) -> Path | None:
    """Validation perplexity against wall time, one line per cell (`experiment cells`):
    each line begins where its learning-rate sweep ended."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(9, 4.5))
    curves = []
    for cell, r in results["cells"].items():
        if not r.get("curve"):
            continue
        minutes, ppl = [p[0] / 60 for p in r["curve"]], [p[1] for p in r["curve"]]
        curves.append(ppl)
        label = f"{cell} ({r['hidden_size']} units, lr {r['lr']:g}): test {r['test_perplexity']:.1f}"
        ax.plot(minutes, ppl, marker="o", lw=2, color=cell_colour(cell), label=label)
    budget = results["budget"]
    ax.axvline(budget["minutes"] * budget["sweep_share"], color="grey", ls=":", lw=1, label="the sweeps end")
    ax.set_yscale("log")
    clipped = perplexity_range(curves)
    if clipped:
        ax.set_ylim(*clipped)
        note = f"off the top: above {clipped[1]:,.0f}"
        ax.text(0.99, 0.98, note, transform=ax.transAxes, ha="right", va="top", fontsize=8)
    ax.set_xlabel("wall time per cell (minutes), its learning-rate sweep included")
    ax.set_ylabel("validation perplexity")
    ax.grid(alpha=0.3, which="both")
    ax.set_title(
        f"{Path(results['corpus']).name}: every cell at {results['target_parameters']:,} parameters and "
        f"{budget['minutes']:g} minutes ({results['machine']})",
        fontsize=9,
    )
    if len(ax.get_legend_handles_labels()[0]) > 1:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, path)


def plot_inspection(trace: dict, path: str | Path, units: int = 16) -> Path | None:
    """Gate activations per token: the means over units, the cell state's norm, and
    heatmaps of the `units` most active units of each gate and of the memory."""
    plt = _pyplot()
    if plt is None:
        return None
    import numpy as np

    tokens, gates, swap = trace["tokens"], trace["gates"], trace.get("swap")  # gates: name -> (T, H) lists
    memory_name = trace["memory"]
    memory = np.array(trace["states"][memory_name])  # (T, H)
    maps = [(name, np.array(values), None) for name, values in gates.items()]
    if swap:  # the part of the memory that is about the swapped word, on the units that hold most of it
        difference = np.array(swap["difference"])
        maps.append((f"{memory_name} - {memory_name}'", difference, np.argsort(-np.abs(difference[-1]))[:units]))
    else:
        maps.append((f"memory {memory_name}", memory, None))
    fig_h = 2.6 + 1.55 * len(maps)
    size = (max(7.0, 0.42 * len(tokens) + 2), fig_h)
    ratios = {"height_ratios": [1.6] + [1] * len(maps)}
    fig, axes = plt.subplots(1 + len(maps), 1, figsize=size, gridspec_kw=ratios, sharex=True)
    x = np.arange(len(tokens))
    _gate_means(axes[0], x, trace, memory)
    guesses = ", ".join(f"{w} {p:.0%}" for w, p in trace["guesses"][-1][:3])
    fig.suptitle(
        f"{trace['cell'].upper()} layer {trace['layer']} reading the prompt; next word: {guesses}", fontsize=11
    )
    for ax, (name, values, picked) in zip(axes[1:], maps):
        if picked is None:
            picked = np.argsort(-values.std(0))[:units]  # the units that change most over the prompt
        lo, hi = (0, 1) if name in gates else (-np.abs(values).max(), np.abs(values).max())
        cmap = "viridis" if name in gates else "coolwarm"
        im = ax.imshow(values[:, picked].T, aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_ylabel(f"{name}\nunit", fontsize=9)
        ax.set_yticks(range(len(picked)))
        ax.set_yticklabels([str(u) for u in picked], fontsize=6)
        fig.colorbar(im, ax=ax, pad=0.01, fraction=0.03)
    axes[-1].set_xticks(x)
    axes[-1].set_xticklabels(tokens, rotation=45, ha="right", fontsize=9)
    axes[-1].set_xlabel("prompt token (each column: the state after reading it)")
    return _save(fig, path)


def _gate_means(ax, x, trace: dict, memory) -> None:
    """The top panel: each gate's mean over units, and the memory's norm (and the swap's distance)."""
    import numpy as np

    gates, swap, memory_name = trace["gates"], trace.get("swap"), trace["memory"]
    for name, values in gates.items():
        ax.plot(x, np.array(values).mean(1), marker="o", ms=3, lw=1.8, label=f"{name} gate (mean)")
    ax.set_ylabel("gate (mean)")
    ax.set_ylim(0, 1)
    if not gates:
        ax.set_ylabel("")
        ax.set_yticks([])
        note = "this cell has no gates:\nit rewrites its whole state at every step"
        ax.text(0.02, 0.5, note, transform=ax.transAxes, fontsize=9, va="center", color="dimgray")
    ax.grid(alpha=0.3)
    norm_ax = ax.twinx()
    norm_ax.plot(x, np.linalg.norm(memory, axis=1), color="black", ls="--", lw=1.5, label=f"|{memory_name}| (norm)")
    if swap:
        label = f"|{memory_name} - {memory_name}'|, {memory_name}' with {swap['other']} for {swap['word']}"
        norm_ax.plot(x, swap["distance"], color="#d62728", lw=2.2, label=label)
    norm_ax.set_ylabel(f"|{memory_name}| (norm)")
    (lines, labels), (more, more_labels) = ax.get_legend_handles_labels(), norm_ax.get_legend_handles_labels()
    where = {"loc": "lower center", "bbox_to_anchor": (0.5, 1.0)}
    ax.legend(lines + more, labels + more_labels, **where, fontsize=8, ncol=3, frameon=False)


def plot_run(name: str, logs: dict[str, list[dict]], path: str | Path) -> Path | None:
    """Training and validation loss over the steps, and the gradient flow when the run
    logged it (`train --log-grad-flow`); `logs` as `read_run_logs` gives them."""
    plt = _pyplot()
    if plt is None:
        return None
    import numpy as np

    steps, metrics, flow = logs["steps"], logs["metrics"], logs["flow"]
    panels = 1 + bool(flow)
    fig, axes = plt.subplots(1, panels, figsize=(6.2 * panels, 4.2), squeeze=False)
    ax = axes[0][0]
    if steps:
        ax.plot(
            [r["step"] for r in steps],
            [r["loss"] for r in steps],
            lw=1.2,
            alpha=0.8,
            label="training (per log interval)",
        )
    if metrics:
        ax.plot([r["step"] for r in metrics], [r["val_loss"] for r in metrics], marker="o", lw=2, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats per token)")
    losses = [r["val_loss"] for r in metrics] + [r["loss"] for r in steps[len(steps) // 10 :]]
    if losses:  # the first steps' loss, far above the rest, would flatten the curves
        ax.set_ylim(
            min(losses) - 0.05 * (max(losses) - min(losses)) - 1e-3,
            max(losses) + 0.15 * (max(losses) - min(losses)) + 1e-3,
        )
    ax.set_title(f"Loss of {name}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    if flow:
        ax = axes[0][1]
        picked = flow if len(flow) <= 6 else [flow[round(i * (len(flow) - 1) / 5)] for i in range(6)]
        colours = plt.cm.viridis(np.linspace(0, 0.9, len(picked)))
        for row, colour in zip(picked, colours):
            norms = row["grad_norm"][-1]  # the last layer
            ax.semilogy(range(len(norms)), norms, color=colour, lw=1.8, label=f"step {row['step']}")
        ax.set_xlabel("time steps back from the end of the chunk")
        ax.set_ylabel("|dL_T / dh_t| (mean over streams)")
        ax.set_title(
            f"Gradient flow ({flow[0].get('cell', '?').upper()}): the last step's loss reaching back", fontsize=10
        )
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
