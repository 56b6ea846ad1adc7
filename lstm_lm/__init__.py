"""lstm-lm: train LSTM next-word language models, complete prompts, measure their perplexity.

lstm-lm train && lstm-lm complete "My name is John, I am from Tamilnadu and I speak"

from lstm_lm import LanguageModel
lm = LanguageModel.load("runs/demo")
lm.next_words("My name is John, I am from Tamilnadu and I speak")

The package, by concern:

    cells/       the recurrent cells, one module each, found by name (lstm, gru, rnn, cifg, ...)
    model.py     the language model around them: embedding, stacked layers, softmax, two engines
    adaptive.py, loss.py   the output layer: the adaptive softmax, the fused cross-entropy
    data.py, demo.py       corpora, tokenizers and the token cache; the generated demo biographies
    config.py, configs/    every setting declared once; the built-in recipes
    checkpoint.py          saving and (defensively) loading a model
    training/    `lstm-lm train`: the trainer, its state, the run directory, its lock and logs, torchrun
    evaluation/  perplexity under the static protocol, the neural cache and dynamic evaluation
    inference/   using a model: the Python API, sampling, scoring, the server and its page, export
    experiment.py, plots.py   the long-range experiment and the pictures
    cli.py       the `lstm-lm` command line; arguments.py, errors.py, writing.py, utils.py: shared plumbing
"""

__version__ = "0.1.0"
__all__ = ["LanguageModel", "Session"]


def __getattr__(name: str):
    # Imported on first use, so that `lstm-lm --help` does not wait for torch.
    if name in __all__:
        from lstm_lm.inference import api

        return getattr(api, name)
    raise AttributeError(f"module 'lstm_lm' has no attribute {name!r}")
