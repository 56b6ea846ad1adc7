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
import errno
import functools
import importlib.util
import inspect as pyinspect
import os
import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from typer.core import TyperGroup

from lstm_lm.config import FIELDS, choices, field_help
from lstm_lm.errors import ConfigError, Interrupted, LSTMLMError, describe_os_error
from lstm_lm.writing import check_stdout, dumps, emit


class _Commands(TyperGroup):
    """Typer's command group, with click's usage errors (an unknown option, a value out of
    its range) printed as one `error: ...` line and exit code 1, like every other bad input."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.Abort:
            typer.echo("error: interrupted", err=True)
            raise SystemExit(130) from None
        except typer.TyperException as e:  # click's usage errors, as Typer exposes them
            if type(e).__name__ == "NoArgsIsHelpError":  # `lstm-lm` alone: its help, already printed
                raise SystemExit(0) from None
            typer.echo(f"error: {e.format_message()}", err=True)
            raise SystemExit(1) from None
        raise SystemExit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_Commands,
    name="lstm-lm",
    help="Train LSTM next-word language models, complete prompts with them and measure their perplexity.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
    epilog=(
        "**Examples**\n\n"
        "    lstm-lm train                     # the demo model, about 26 s on a 2-core CPU\n\n"
        '    lstm-lm complete "My name is John, I am from Tamilnadu and I speak"\n\n'
        "    lstm-lm eval                      # perplexity of the last run's test split"
    ),
)

DEFAULT_CHECKPOINT = Path("runs/latest")  # rundir.LATEST_POINTER: what train points at the run it trained


def _precision(value: str | None) -> str | None:
    """--precision: one of train.precision's choices (a usage error otherwise)."""
    if value is not None and value not in choices("train.precision"):
        raise typer.BadParameter(f"must be one of {', '.join(choices('train.precision'))}, got {value!r}")
    return value


def _main_process() -> bool:
    """False in the processes of a torchrun run other than rank 0, which stay quiet."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def user_errors(results: bool = True):
    """Known problems -> one `error:` line on stderr and exit code 1, no traceback.
    `results`: the command writes its results to stdout, which must then be open."""
    try:
        if results:
            check_stdout()
        yield
    except Interrupted as e:  # a checkpoint was saved: say where, and how to go on
        if _main_process():
            typer.echo(str(e), err=True)
        raise typer.Exit(e.exit_code) from None
    except (LSTMLMError, OSError) as e:  # an OSError here is about a path the user gave, or a full disk
        if os.environ.get("LSTM_LM_DEBUG") == "1" or (
            isinstance(e, OSError) and e.filename is None and e.errno not in _USER_ERRNOS
        ):
            raise
        if _main_process() or getattr(e, "every_rank", False):
            typer.echo(f"error: {describe_os_error(e) if isinstance(e, OSError) else e}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        raise typer.Exit(130) from None


# OSErrors that are the machine's state, not a bug, even where they name no file.
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EPIPE, errno.EIO}


# `lstm-lm train`'s shortcuts for config fields, each declared here once: the option that
# sets the field. The option's type and help come from the field's declaration, its value
# goes into the config as if set with --set, and a bad value's error names both
# (train.lr (--lr): ...). A space in the entry gives the option's metavar.
TRAIN_FLAGS = {
    "train.epochs": "--epochs",
    "train.max_steps": "--max-steps",
    "train.batch_size": "--batch-size",
    "train.bptt": "--bptt",
    "train.lr": "--lr",
    "train.device": "--device",
    "train.seed": "--seed",
    "model.cell": "--cell",
    "model.impl": "--impl",
    "train.precision": "--precision",
    "train.compile": "--compile/--no-compile",
    "train.log_grad_flow": "--log-grad-flow",
    "train.time_budget": "--time-budget MINUTES",
}


def with_options(command, into: str, options: dict[str, tuple[str, Any, Any]]):
    """`command` with more keyword-only Typer options, {parameter: (key, annotation, default)};
    the command receives their values as the keyword `into`, {key: value}."""
    signature = pyinspect.signature(command, eval_str=True)
    keyword = pyinspect.Parameter.KEYWORD_ONLY
    params = [p for p in signature.parameters.values() if p.name != into]
    params += [
        pyinspect.Parameter(name, keyword, default=default, annotation=annotation)
        for name, (_, annotation, default) in options.items()
    ]

    @functools.wraps(command)
    def with_them(*args, **kwargs):
        return command(*args, **{into: {key: kwargs.pop(name) for name, (key, _, _) in options.items()}}, **kwargs)

    with_them.__signature__ = signature.replace(parameters=params)
    return with_them


def config_flags(flags: dict[str, str]):
    """Give a command one option per entry of `flags` (see TRAIN_FLAGS); the command receives
    them as `values`, {config key: value or None}."""
    options = {}
    for key, flag in flags.items():
        option_name, *metavar = flag.split(" ")
        option = typer.Option(option_name, help=field_help(key), metavar=metavar[0] if metavar else None)
        annotation = Annotated[Optional[FIELDS[key].base_type], option]  # noqa: UP045 (Typer reads it)
        options[key.split(".")[1]] = (key, annotation, None)
    return lambda command: with_options(command, "values", options)


def setting_flags(command):
    """Give `lstm-lm eval` its protocols' options, as the settings classes declare them
    (lstm_lm/evaluation/protocols.py, torch-free): the option that picks each protocol, then
    each setting's flag, help, default and bounds. The command receives them as `options`,
    {flag: value or None}."""
    from lstm_lm.evaluation.protocols import protocols, setting_help, setting_type, settings_fields

    options = {}
    for panel, (flag, kind, help_) in protocols().items():
        if kind is None:
            continue
        option = typer.Option(flag, help=help_, rich_help_panel=panel.capitalize())
        options[flag.removeprefix("--")] = (flag, Annotated[bool, option], False)
        for f in settings_fields(kind):
            option = typer.Option(
                f.metadata["flag"], help=setting_help(kind, f.name), rich_help_panel=panel.capitalize()
            )
            annotation = Annotated[Optional[setting_type(kind, f.name)], option]  # noqa: UP045 (Typer reads it)
            options[f.name] = (f.metadata["flag"], annotation, None)
    return with_options(command, "options", options)


KEYBOARD_FLAGS = {  # eval's keyboard options: {parameter: (flag, annotation, default)}
    "keystrokes": (
        "--keystrokes",
        Annotated[
            bool,
            typer.Option(
                "--keystrokes",
                help=(
                    "Instead of the perplexity, type the split with a keyboard's suggestions (a word model): "
                    "keystroke savings, top-1 and top-k recall, per-suggestion latency and size on disk "
                    "(docs/keyboard.md)."
                ),
                rich_help_panel="Keyboard",
            ),
        ],
        False,
    ),
    "suggestions": (
        "--suggestions",
        Annotated[int, typer.Option("--suggestions", "-k", help="Suggestions offered.", rich_help_panel="Keyboard")],
        3,
    ),
    "latency": (
        "--latency",
        Annotated[
            bool,
            typer.Option(
                help="With --keystrokes: time a suggestion in PyTorch, ONNX fp32 and ONNX int8 (one thread).",
                rich_help_panel="Keyboard",
            ),
        ],
        True,
    ),
}


def keyboard_flags(command):
    """Give `lstm-lm eval` the keyboard's options; it receives them as `keyboard`, {flag: value}."""
    return with_options(command, "keyboard", KEYBOARD_FLAGS)


def _keystrokes(checkpoint, device, precision, split, data, tune, options, keyboard) -> dict:
    """`lstm-lm eval --keystrokes`: the keyboard simulation's JSON (inference/keystrokes.py)."""
    from lstm_lm.inference.api import LanguageModel
    from lstm_lm.inference.keystrokes import run_keystrokes

    if tune or any(v for v in (options or {}).values()):
        raise ConfigError(
            ["--keystrokes: measures suggestions, not perplexity; drop --cache, --dynamic and --tune"], "command line"
        )
    lm = LanguageModel.load(checkpoint, device, precision=precision)
    k, latency = keyboard["--suggestions"], keyboard["--latency"]
    return run_keystrokes(lm, split, data, k, latency) | {"checkpoint": str(checkpoint)}


def _name_flags(e: ConfigError, flags: dict[str, str]) -> ConfigError:
    """The same problems, each config key followed by the option that sets it."""
    named = []
    for problem in e.problems:
        key = problem.split(":", 1)[0]
        named.append(problem.replace(key, f"{key} ({flags[key]})", 1) if key in flags else problem)
    return ConfigError(named, e.origin)


# `lstm-lm train`'s options beyond the config shortcuts of TRAIN_FLAGS.
_CONFIG = typer.Option(
    "--config",
    "-c",
    help="YAML recipe: a file, or a built-in recipe's name (demo, ptb-small, ptb-cpu-30min ...; see configs/). "
    "Default: the demo recipe when --data is not given either.",
)
_DATA = typer.Option(
    "--data",
    "-d",
    help="Corpus: 'demo', a directory with train/valid/test.txt, a text file, or a hub dataset NAME:CONFIG "
    "(data.source).",
)
_OUT = typer.Option(
    "--out",
    "-o",
    help="Run directory. Default: runs/NAME, NAME being the config file's or the data's name (runs/demo for the demo).",
)
_RESUME = typer.Option("--resume", help="Continue the run in --out from its last saved checkpoint.")
_OVERWRITE = typer.Option("--overwrite", help="Start afresh in an --out that already holds a run, deleting that run.")
_SET = typer.Option(
    "--set",
    help="Override any config field: section.key=value (repeatable), e.g. --set model.dropout=0.5; the value is "
    "read as the field's type.",
)


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
@config_flags(TRAIN_FLAGS)
def train(
    config: Annotated[Optional[str], _CONFIG] = None,
    data: Annotated[Optional[str], _DATA] = None,
    out: Annotated[Optional[Path], _OUT] = None,
    resume: Annotated[bool, _RESUME] = False,
    overwrite: Annotated[bool, _OVERWRITE] = False,
    set_: Annotated[Optional[list[str]], _SET] = None,
    values: dict | None = None,
) -> None:
    """Train a language model; the best model by validation loss is kept in the run directory.

    Prints a JSON summary of the run on stdout when it ends. Ctrl-C (or SIGTERM) stops
    after the current step with a checkpoint that --resume continues (exit code 130 or 143).
    """
    started = time.perf_counter()  # --time-budget counts from here, torch's import included
    from lstm_lm.training.train import run_training

    given = {key: value for key, value in (values or {}).items() if value is not None}
    with user_errors():
        try:
            summary = run_training(
                config, data, out, resume, list(set_ or []), started, overwrite=overwrite, values=given
            )
        except ConfigError as e:
            raise _name_flags(e, TRAIN_FLAGS | {"data.source": "--data"}) from None
        if _main_process():
            emit(dumps(summary))


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
    next_: Annotated[
        bool, typer.Option("--next", help="Print the --top-k most likely next words as word<TAB>probability instead.")
    ] = False,
    top_k: Annotated[
        Optional[int],
        typer.Option(help="With --next: how many words to list (default 5). Otherwise: sample from the K most likely."),
    ] = None,
    temperature: Annotated[
        float, typer.Option(help="0 decodes greedily (the default); above 0 samples, higher is more random.")
    ] = 0.0,
    top_p: Annotated[
        Optional[float], typer.Option(help="Sample from the smallest set of words whose probability adds up to P.")
    ] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling, for repeatable output.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "cpu",
) -> None:
    """Continue PROMPT with the model's words; only the continuation is printed."""
    from lstm_lm.inference.api import LanguageModel
    from lstm_lm.utils import log

    with user_errors():
        lm = LanguageModel.load(checkpoint, device, precision=None)  # the run's precision: bf16 is faster here
        if next_:
            emit("\n".join(f"{word}\t{p:.4f}" for word, p in lm.next_words(prompt, k=5 if top_k is None else top_k)))
            return
        text = lm.complete(prompt, words=words, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        if not text:
            log(
                "the model ended the sentence here: the first token it chose is <eos>, the end of a line "
                "(try --next to see its likeliest words, or sample with --temperature)"
            )
        emit(text)


@app.command(
    "eval",
    epilog=(
        "**Examples**\n\n"
        "    lstm-lm eval                                  # test split of the latest run\n\n"
        "    lstm-lm eval --checkpoint runs/ptb-small --split valid --batch-size 1\n\n"
        "    lstm-lm eval --cache --tune --batch-size 1    # the neural cache, fitted on valid first\n\n"
        "    lstm-lm eval --dynamic --tune                 # dynamic evaluation, fitted on valid first\n\n"
        "    lstm-lm eval --cache --window 2000 --theta 0.3 --lambda 0.1\n\n"
        "    lstm-lm eval --keystrokes --checkpoint runs/keyboard   # a keyboard's 3 suggestions: keystrokes saved"
    ),
)
@setting_flags
@keyboard_flags
def eval_(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint directory.")] = DEFAULT_CHECKPOINT,
    data: Annotated[
        Optional[str],
        typer.Option("--data", "-d", help="Corpus to evaluate on. Default: the one the model was trained on."),
    ] = None,
    split: Annotated[str, typer.Option(help="test or valid.")] = "test",
    batch_size: Annotated[
        Optional[int],
        typer.Option(
            help="Parallel streams (default: the run's eval_batch_size, 10). 1 gives each token the most context."
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    precision: Annotated[
        Optional[str],
        typer.Option(callback=_precision, help="auto, fp32 or bf16. Default: the run's own setting (train.precision)."),
    ] = None,
    tune: Annotated[
        bool,
        typer.Option(
            "--tune",
            help=(
                "First fit the technique's settings on the valid split (a fixed small search, stated in the "
                "output), then score --split once with them."
            ),
        ),
    ] = False,
    keyboard: dict | None = None,
    options: dict | None = None,
) -> None:
    """Print the perplexity of a checkpoint on a split as one JSON object.

    The static protocol is the default; --cache and --dynamic measure one of the two
    evaluation-time techniques instead, and the JSON's `protocol` and `settings` say
    which. Progress goes to stderr.
    """
    from lstm_lm.evaluation.protocols import CACHE, DYNAMIC, choose
    from lstm_lm.inference.api import LanguageModel

    with user_errors():
        if keyboard["--keystrokes"]:
            emit(dumps(_keystrokes(checkpoint, device, precision, split, data, tune, options, keyboard)))
            return
        protocol, settings = choose(options, tune, batch_size)
        lm = LanguageModel.load(checkpoint, device, precision=precision)
        result = lm.evaluate(
            split,
            data,
            batch_size,
            cache=settings if protocol == CACHE else None,
            dynamic=settings if protocol == DYNAMIC else None,
            progress=True,
            tune=tune,
        )
        emit(dumps(result | {"checkpoint": str(checkpoint)}))


experiment_app = typer.Typer(
    help="Experiments that show what each recurrent cell can and cannot do.",
    no_args_is_help=True,
    rich_markup_mode="markdown",
)
app.add_typer(experiment_app, name="experiment")


@experiment_app.command(
    "long-range",
    epilog=(
        "**Examples**\n\n"
        "    lstm-lm experiment long-range                      # every cell; 23.5 minutes on a 2-core CPU\n\n"
        "    lstm-lm experiment long-range --gaps 0,10,20,30 --cells rnn,lstm --out runs/rnn-vs-lstm\n\n"
        "    lstm-lm experiment long-range --steps 200 --probes 50   # a quick look"
    ),
)
def long_range(
    gaps: Annotated[
        str,
        typer.Option(
            help=(
                'Gaps to measure, in words between "I am from X" and "and I speak Y"; training sees every gap '
                "from 0 to the largest."
            )
        ),
    ] = "0,5,10,20,40",
    cells: Annotated[
        str, typer.Option(help="Cells to compare, comma-separated, or all (every registered cell).")
    ] = "all",
    out: Annotated[
        Path,
        typer.Option(
            "--out", "-o", help="Where results.json, results.csv, accuracy_vs_gap.png and each cell's run go."
        ),
    ] = Path("runs/long-range"),
    steps: Annotated[int, typer.Option(min=1, help="Training steps per cell (the same for every cell).")] = 5000,
    hidden: Annotated[
        int,
        typer.Option(
            min=1, help="The LSTM's units; the other cells get the hidden size that gives as many parameters."
        ),
    ] = 128,
    probes: Annotated[int, typer.Option(min=1, help="Held-out sentences per gap.")] = 300,
    demo_size: Annotated[int, typer.Option(min=1, help="Training biographies.")] = 20000,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "cpu",
    seed: Annotated[int, typer.Option(help="Seed of the corpus, the weights and the probes.")] = 0,
) -> None:
    """Every cell, from the simple RNN to the Mogrifier: accuracy on the language word as the gap grows.

    Trains each cell with the same parameter count and steps on the demo corpus, then
    asks each for the word after "I speak" on fresh sentences with exactly N words
    between the region and the language. Prints the table; writes results.json,
    results.csv and accuracy_vs_gap.png (with matplotlib) into --out.
    """
    from lstm_lm.experiment import Budget, long_range_command

    with user_errors():
        budget = Budget(
            steps=steps,
            lstm_hidden=hidden,
            embedding_size=min(64, hidden),
            probes=probes,
            demo_size=demo_size,
            device=device,
            seed=seed,
        )
        emit(long_range_command(gaps, cells, out, budget))


@experiment_app.command(
    "cells",
    epilog=(
        "**Examples**\n\n"
        "    lstm-lm experiment cells --minutes 1                # every cell on the demo corpus\n\n"
        "    lstm-lm experiment cells --config ptb-small --data ../shared/data/ptb --minutes 5 --out runs/cells-ptb\n\n"
        "    lstm-lm experiment cells --cells lstm,mingru --config ptb-small --data ../shared/data/ptb"
    ),
)
def cells(
    config: Annotated[Optional[str], _CONFIG] = None,
    data: Annotated[Optional[str], _DATA] = None,
    cells: Annotated[
        str, typer.Option(help="Cells to compare, comma-separated, or all (every registered cell).")
    ] = "all",
    minutes: Annotated[
        float, typer.Option(min=0.05, help="Wall time per cell, its learning-rate sweep and final test included.")
    ] = 5.0,
    lr_factors: Annotated[
        str, typer.Option(help="The sweep's candidates: the recipe's train.lr times each of these.")
    ] = "0.5,1,2",
    sweep_share: Annotated[
        float, typer.Option(help="The share of each cell's minutes its sweep's short runs get, together.")
    ] = 0.3,
    points: Annotated[int, typer.Option(min=1, help="Validations of each final run: the picture's points.")] = 5,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Where results.json, results.csv, valid_vs_time.png and the runs go.")
    ] = Path("runs/cells"),
    set_: Annotated[Optional[list[str]], _SET] = None,
) -> None:
    """Every cell on one corpus at the recipe's parameter count and the same wall time each.

    Each cell gets the hidden size that gives its model as many parameters as the
    recipe's, and --minutes of this machine's time, in which a short run at each
    candidate learning rate picks the best on the valid split and a fresh model trains
    at it for the rest. Prints the table (parameters, tokens/s, tokens, valid and test
    perplexity, top-1 accuracy); writes results.json, results.csv and
    valid_vs_time.png into --out.
    """
    from lstm_lm.cell_comparison import CellBudget, cells_command

    with user_errors():
        budget = CellBudget(minutes=minutes, sweep_share=sweep_share, points=points)
        emit(cells_command(config, data, list(set_ or []), cells, lr_factors, budget, out))


@app.command(
    epilog=(
        "**Examples**\n\n"
        '    lstm-lm inspect "My name is John, I am from Tamilnadu and I speak"\n\n'
        '    lstm-lm inspect "My name is John, I am from Tamilnadu and I speak" --swap Tamilnadu=Kerala\n\n'
        '    lstm-lm inspect "I am from Kerala and I speak" --checkpoint runs/long-range/runs/lstm --out gates.png'
    )
)
def inspect(
    prompt: Annotated[str, typer.Argument(help="The text to read.")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint directory.")] = DEFAULT_CHECKPOINT,
    out: Annotated[Path, typer.Option("--out", "-o", help="The picture (PNG).")] = Path("gates.png"),
    layer: Annotated[Optional[int], typer.Option(help="Which layer to show, from 1 (default: the last).")] = None,
    units: Annotated[
        int, typer.Option(min=1, help="Units in each heatmap: those that change most over the prompt.")
    ] = 16,
    top_k: Annotated[int, typer.Option(help="Next-word guesses per token.")] = 3,
    swap: Annotated[
        Optional[str],
        typer.Option(
            metavar="WORD=OTHER",
            help=(
                "Also read the prompt with OTHER in place of WORD, and show per token how far apart the two "
                "memories are: where WORD is written, and whether it is kept."
            ),
        ),
    ] = None,
) -> None:
    """Show the gates at work: per token, the mean forget / input / output gate (the GRU's
    reset / update gate), the memory's norm and the top next-word guesses.

    The table goes to stdout; the picture (means, norms and heatmaps of the most active
    units) to --out. --swap WORD=OTHER shows where the memory of WORD is written and kept.
    """
    from lstm_lm.errors import PromptError
    from lstm_lm.inference.api import LanguageModel
    from lstm_lm.inference.inspection import trace_table
    from lstm_lm.plots import PLOT_HINT, plot_inspection

    with user_errors():
        pair = None
        if swap is not None:
            word, sep, other = swap.partition("=")
            if not (sep and word.strip() and other.strip()):
                raise PromptError(f"--swap: expected WORD=OTHER, e.g. --swap Tamilnadu=Kerala, got {swap!r}")
            pair = (word.strip(), other.strip())
        trace = LanguageModel.load(checkpoint, "cpu").trace(prompt, layer, top_k, pair)
        png = plot_inspection(trace, out, units)
        emit(trace_table(trace))
    typer.echo(f"wrote {png}" if png else PLOT_HINT, err=True)


@app.command(
    epilog=(
        "**Examples**\n\n"
        "    lstm-lm plot runs/demo                      # -> runs/demo/training.png\n\n"
        "    lstm-lm train --cell rnn --log-grad-flow --out runs/rnn && lstm-lm plot runs/rnn --out rnn.png"
    )
)
def plot(
    run_dir: Annotated[Path, typer.Argument(help="A run directory (holding metrics.jsonl).")],
    out: Annotated[
        Optional[Path], typer.Option("--out", "-o", help="The picture (PNG). Default: RUN_DIR/training.png.")
    ] = None,
) -> None:
    """Draw a run's training and validation loss, and its gradient flow when it was
    trained with --log-grad-flow. Prints the validation curve as a table."""
    from lstm_lm.errors import DataError
    from lstm_lm.plots import PLOT_HINT, plot_run
    from lstm_lm.training.runlogs import read_run_logs

    with user_errors():
        if not run_dir.is_dir():
            raise DataError(f"{run_dir} is not a directory; give a run directory such as runs/demo")
        logs = read_run_logs(run_dir)
        metrics, flow = logs["metrics"], logs["flow"]
        if not metrics:
            raise DataError(f"{run_dir} holds no metrics.jsonl lines; is it a run directory that has validated once?")
        png = plot_run(run_dir.name, logs, out or run_dir / "training.png")
        lines = [f"{'epoch':>5} {'step':>7} {'train loss':>10} {'valid loss':>10} {'valid ppl':>10}"]
        lines += [
            f"{r['epoch']:>5} {r['step']:>7} {r['train_loss']:>10.4f} {r['val_loss']:>10.4f} {r['val_ppl']:>10.2f}"
            for r in metrics
        ]
        if flow:
            last = flow[-1]["grad_norm"][-1]
            shown = [k for k in (0, 1, 2, 5, 10, 20, 40, 80) if k < len(last)]
            lines.append(
                f"gradient flow at step {flow[-1]['step']} (last layer), |dL_T/dh_(T-k)| for k = "
                + ", ".join(f"{k}: {last[k]:.2e}" for k in shown)
            )
        emit("\n".join(lines))
    typer.echo(f"wrote {png}" if png else PLOT_HINT, err=True)


@app.command(
    epilog=(
        "**Examples**\n\n"
        "    lstm-lm score sentences.txt                       # one JSON line per line\n\n"
        '    echo "I am from Kerala and I speak Malayalam." | lstm-lm score - --per-token\n\n'
        "    lstm-lm score ../shared/data/ptb/test.txt --checkpoint runs/ptb-small > scores.jsonl"
    )
)
def score(
    file: Annotated[str, typer.Argument(metavar="FILE|-", help="A text file, one text per line, or - for stdin.")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint directory.")] = DEFAULT_CHECKPOINT,
    per_token: Annotated[
        bool,
        typer.Option("--per-token", help="Add each token's log-probability: token_logprobs, [token, logprob] pairs."),
    ] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "cpu",
    precision: Annotated[str, typer.Option(callback=_precision, help="fp32 (exact), bf16 or auto.")] = "fp32",
) -> None:
    """Score each line as a sentence: one JSON line per input line on stdout, with `text`,
    `tokens` (the line's tokens and the <eos> that ends it), `logprob` (natural log),
    `perplexity` and `unknown` (tokens read as <unk>). A blank line scores the <eos> alone.
    A line of any length is scored, in windows with the memory carried; the `text` of a
    line over 65,536 characters is its first 200, with `text_cut: true`."""
    from lstm_lm.errors import DataError
    from lstm_lm.inference.api import LanguageModel
    from lstm_lm.inference.scoring import LongText, read_lines

    with user_errors():
        lines = read_lines(file)
        lm = LanguageModel.load(checkpoint, device, precision=precision)
        scored = 0
        for block in lines:
            if isinstance(block, LongText):  # one line too long to hold: read and scored in windows
                emit(dumps({"text": block.head + "...", "text_cut": True} | lm.score_stream(block.pieces, per_token)))
                scored += 1
                continue
            for result in lm.score(block, per_token=per_token):
                emit(dumps(result))
            scored += len(block)
        if scored == 0:
            raise DataError(f"{'stdin' if file == '-' else file} holds no lines to score")


@app.command(
    epilog=(
        "**Examples**\n\n"
        "    lstm-lm serve                                     # runs/latest at http://127.0.0.1:8000\n\n"
        "    lstm-lm serve --checkpoint runs/ptb-small --port 8080\n\n"
        "    lstm-lm serve --host 0.0.0.0                      # reachable from other machines, with an access token"
    )
)
def serve(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint directory.")] = DEFAULT_CHECKPOINT,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 for every interface.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port; 0 picks a free one.")] = 8000,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "cpu",
    threads: Annotated[
        int,
        typer.Option(
            min=1,
            help=(
                "PyTorch's CPU threads for the model. The model answers one request at a time, and with 1 (the "
                "default) the other cores parse HTTP and JSON: faster here than 2 (docs/use.md)."
            ),
        ),
    ] = 1,
    token: Annotated[
        Optional[str],
        typer.Option(
            envvar="LSTM_LM_TOKEN",
            help=(
                "The access token requests must carry (Authorization: Bearer TOKEN, or /?token=TOKEN for the "
                "page). Default: none on a loopback address; beyond it, a new one, printed at start."
            ),
        ),
    ] = None,
    no_token: Annotated[
        bool,
        typer.Option(
            "--no-token",
            help=(
                "Serve beyond loopback without an access token (a warning is printed): anyone who can reach the "
                "port can use it."
            ),
        ),
    ] = False,
) -> None:
    """Serve the model over HTTP: a web page at / (suggestions as you type, the gates at
    work), the JSON API under /v1 and its documentation at /docs. Ctrl-C or SIGTERM stops it."""
    with user_errors(results=False):
        missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
        if missing:
            raise LSTMLMError(
                f"lstm-lm serve needs {' and '.join(missing)}, which the serve extra installs: "
                "pip install 'lstm-lm[serve]' (in a clone, scripts/setup.sh installs it)"
            )
        from lstm_lm.inference.serve import run_server

        run_server(checkpoint, host, port, device, threads, token, no_token)


@app.command(
    epilog=(
        "**Examples**\n\n"
        "    lstm-lm export --format onnx                      # runs/latest -> model.onnx\n\n"
        "    lstm-lm export --format onnx --checkpoint runs/ptb-small --out ptb-small.onnx\n\n"
        "    lstm-lm export --format onnx --int8 --out model-int8.onnx   # int8 weights: smaller and faster\n\n"
        "    lstm-lm export --format web site --checkpoint runs/keyboard   # a static page: suggestions, no server"
    )
)
def export(
    target: Annotated[
        Optional[Path],
        typer.Argument(help="The file (onnx) or folder (web) to write; the same as --out.", show_default=False),
    ] = None,
    format_: Annotated[
        str,
        typer.Option(
            "--format",
            help=(
                "onnx: a graph that reads chunks of tokens with their state. web: a folder any static host "
                "serves, a page with a keyboard's three suggestions run by onnxruntime-web (docs/keyboard.md)."
            ),
        ),
    ] = "onnx",
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint directory.")] = DEFAULT_CHECKPOINT,
    out: Annotated[
        Optional[Path],
        typer.Option(
            "--out",
            "-o",
            help="The file or folder to write. Default: model.onnx (model-int8.onnx with --int8), or web/.",
        ),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="--format web: replace the page in a folder that is not empty.")
    ] = False,
    fp32: Annotated[
        bool,
        typer.Option(
            "--fp32",
            help="--format web: float32 weights instead of int8 (4x the bytes; the suggestions are PyTorch's exactly).",
        ),
    ] = False,
    int8: Annotated[
        bool,
        typer.Option(
            "--int8",
            help=(
                "Quantize the weights to int8 (onnxruntime's dynamic quantization); reports the change in "
                "validation perplexity."
            ),
        ),
    ] = False,
    data: Annotated[
        Optional[str],
        typer.Option(
            "--data", "-d", help="Corpus for the validation perplexity. Default: the one the model was trained on."
        ),
    ] = None,
) -> None:
    """Export the model as an ONNX graph that reads a chunk of tokens with its state (see
    docs/export.md), or as a web page that suggests next words with no server
    (docs/keyboard.md); checks it against PyTorch and prints what it measured as JSON."""
    with user_errors():
        emit(dumps(_export(format_, checkpoint, out or target, target, int8, overwrite, fp32, data)))


def _export(format_, checkpoint, out, target, int8, overwrite, fp32, data) -> dict:
    """`lstm-lm export`'s checks of its options, then the export: its summary."""
    from lstm_lm.inference.api import LanguageModel

    if format_ not in ("onnx", "web"):
        raise ConfigError([f"--format: must be onnx or web, got {format_!r}"], "command line")
    if target is not None and out != target:
        raise ConfigError([f"give the place to write once: {target} or --out {out}"], "command line")
    if format_ == "web":
        if int8:
            raise ConfigError(["--int8: the page's weights are int8 unless --fp32; drop --int8"], "command line")
        from lstm_lm.inference.keyboard import export_web

        return export_web(LanguageModel.load(checkpoint, "cpu"), out or Path("web"), overwrite, int8=not fp32)
    if overwrite or fp32:
        flag = "--overwrite" if overwrite else "--fp32"
        raise ConfigError([f"{flag}: only for --format web (an ONNX file is replaced whole)"], "command line")
    from lstm_lm.inference.export import export_onnx

    lm = LanguageModel.load(checkpoint, "cpu")
    return export_onnx(lm, out or Path("model-int8.onnx" if int8 else "model.onnx"), int8=int8, data=data)


def main() -> None:
    from lstm_lm.utils import keep_freed_memory

    keep_freed_memory()  # before any large tensor: see its docstring
    app()


if __name__ == "__main__":
    main()
