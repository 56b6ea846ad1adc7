"""The `lstm-lm` command line: each command parses its options and calls one library function.

    lstm-lm train
    lstm-lm complete "My name is John, I am from Tamilnadu and I speak"
    lstm-lm eval

Results go to stdout (the completion, JSON); progress and logs go to stderr.
Problems the user can fix are printed as one `error: ...` line with exit code 1
(set LSTM_LM_DEBUG=1 for the traceback).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from lstm_lm.errors import Interrupted, LSTMLMError

app = typer.Typer(
    name="lstm-lm",
    help="Train LSTM next-word language models, complete prompts with them and measure their perplexity.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    epilog=(
        "**Examples**\n\n"
        "    lstm-lm train                     # the demo model, about 30 s on a laptop CPU\n\n"
        '    lstm-lm complete "My name is John, I am from Tamilnadu and I speak"\n\n'
        "    lstm-lm eval                      # perplexity of the last run's test split"
    ),
)

DEFAULT_CHECKPOINT = Path("runs/latest")


def _main_process() -> bool:
    """False in the processes of a torchrun run other than rank 0, which stay quiet."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def user_errors():
    """Known problems -> one `error:` line on stderr and exit code 1, no traceback."""
    try:
        yield
    except Interrupted as e:  # a checkpoint was saved: say where, and how to go on
        if _main_process():
            typer.echo(str(e), err=True)
        raise typer.Exit(e.exit_code) from None
    except LSTMLMError as e:
        if os.environ.get("LSTM_LM_DEBUG") == "1":
            raise
        if _main_process():
            typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        raise typer.Exit(130) from None


@app.command(
    epilog=(
        "**Examples**\n\n"
        "    lstm-lm train                     # demo corpus -> runs/demo\n\n"
        "    lstm-lm train --config configs/ptb-small.yaml --data ../shared/data/ptb\n\n"
        "    lstm-lm train --data corpus.txt --set data.tokenizer=char --epochs 3\n\n"
        "    lstm-lm train --out runs/ptb-small --resume --epochs 10\n\n"
        "    lstm-lm train --config configs/ptb-small.yaml --precision bf16 --compile   # fastest on a CPU\n\n"
        "    lstm-lm train --config configs/ptb-cpu-30min.yaml --time-budget 10   # the best model in 10 minutes"
    )
)
def train(
    config: Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML recipe (see configs/). Default: the demo recipe when --data is not given either.")] = None,
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="Corpus: 'demo', a directory with train/valid/test.txt, a text file, or a hub dataset NAME:CONFIG.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Run directory. Default: runs/NAME, NAME being the config file's or the data's name (runs/demo for the demo).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last saved checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start afresh in an --out that already holds a run, deleting that run.")] = False,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="Override any config field: section.key=value (repeatable), e.g. --set model.dropout=0.5.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Passes over the training split (train.epochs).")] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps (train.max_steps).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Parallel streams per batch (train.batch_size).")] = None,
    bptt: Annotated[Optional[int], typer.Option(help="Time steps per truncated-BPTT chunk (train.bptt).")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate (train.lr).")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:N or mps (train.device).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed (train.seed).")] = None,
    cell: Annotated[Optional[str], typer.Option(help="Recurrent cell: lstm, gru or rnn, the simple RNN (model.cell).")] = None,
    impl: Annotated[Optional[str], typer.Option(help="Engine: auto, custom (the hand-written cell) or cudnn (torch.nn's kernel) (model.impl).")] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto (bf16 where the hardware does it natively), fp32 or bf16 (train.precision).")] = None,
    compile_: Annotated[Optional[bool], typer.Option("--compile/--no-compile", help="torch.compile the training step; compiling takes 20 s to 1.5 min once per run (train.compile).")] = None,
    time_budget: Annotated[Optional[float], typer.Option("--time-budget", metavar="MINUTES", help="Stop after this many minutes of wall time, final validation and test included; the cosine schedule is planned against it (train.time_budget).")] = None,
) -> None:
    """Train a language model; the best model by validation loss is kept in the run directory.

    Prints a JSON summary of the run on stdout when it ends. Ctrl-C (or SIGTERM) stops
    after the current step with a checkpoint that --resume continues (exit code 130 or 143).
    """
    started = time.perf_counter()  # --time-budget counts from here, torch's import included
    from lstm_lm.train import run_training

    options = {
        "train.epochs": epochs, "train.max_steps": max_steps, "train.batch_size": batch_size,
        "train.bptt": bptt, "train.lr": lr, "train.device": device, "train.seed": seed, "model.cell": cell, "model.impl": impl,
        "train.precision": precision, "train.compile": compile_, "train.time_budget": time_budget,
    }
    overrides = list(set_ or []) + [f"{k}={v}" for k, v in options.items() if v is not None]
    with user_errors():
        summary = run_training(config, data, out, resume, overrides, started, overwrite=overwrite)
    if _main_process():
        typer.echo(json.dumps(summary))


@app.command(
    epilog=(
        "**Examples**\n\n"
        '    lstm-lm complete "My name is John, I am from Tamilnadu and I speak"\n\n'
        '    lstm-lm complete "I am from Kerala and I speak" --next --top-k 3\n\n'
        '    lstm-lm complete "the company said" --checkpoint runs/ptb-small --temperature 0.8 --seed 1'
    )
)
def complete(
    prompt: Annotated[str, typer.Argument(help="The text to continue.")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint directory.")] = DEFAULT_CHECKPOINT,
    words: Annotated[int, typer.Option(help="Stop after this many words (or at the end of the sentence).")] = 20,
    next_: Annotated[bool, typer.Option("--next", help="Print the --top-k most likely next words as word<TAB>probability instead.")] = False,
    top_k: Annotated[Optional[int], typer.Option(help="With --next: how many words to list (default 5). Otherwise: sample from the K most likely.")] = None,
    temperature: Annotated[float, typer.Option(help="0 decodes greedily (the default); above 0 samples, higher is more random.")] = 0.0,
    top_p: Annotated[Optional[float], typer.Option(help="Sample from the smallest set of words whose probability adds up to P.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling, for repeatable output.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "cpu",
) -> None:
    """Continue PROMPT with the model's words; only the continuation is printed."""
    from lstm_lm.checkpoint import load_checkpoint
    from lstm_lm.sample import complete as complete_prompt
    from lstm_lm.sample import next_words
    from lstm_lm.utils import pick_device, pick_precision

    with user_errors():
        dev = pick_device(device)
        model, tokenizer, cfg = load_checkpoint(checkpoint, dev)
        if next_:
            for word, p in next_words(model, tokenizer, prompt, k=top_k or 5, kind=cfg.data.tokenizer):
                typer.echo(f"{word}\t{p:.4f}")
            return
        text = complete_prompt(model, tokenizer, cfg.data.tokenizer, prompt, words=words,
                               temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                               precision=pick_precision(cfg.train.precision, dev))
    typer.echo(text)


@app.command(
    "eval",
    epilog=(
        "**Examples**\n\n"
        "    lstm-lm eval                                  # test split of the latest run\n\n"
        "    lstm-lm eval --checkpoint runs/ptb-small --split valid --batch-size 1"
    ),
)
def eval_(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint directory.")] = DEFAULT_CHECKPOINT,
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="Corpus to evaluate on. Default: the one the model was trained on.")] = None,
    split: Annotated[str, typer.Option(help="test or valid.")] = "test",
    batch_size: Annotated[Optional[int], typer.Option(help="Parallel streams (default: the run's eval_batch_size, 10). 1 gives each token the most context.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    precision: Annotated[Optional[str], typer.Option(help="auto, fp32 or bf16. Default: the run's own setting (train.precision).")] = None,
) -> None:
    """Print the perplexity of a checkpoint on a split as one JSON object."""
    from lstm_lm.evaluate import evaluate_checkpoint

    with user_errors():
        result = evaluate_checkpoint(checkpoint, data, split, batch_size, device, precision)
    typer.echo(json.dumps(result))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
