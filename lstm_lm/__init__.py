"""lstm-lm: train LSTM next-word language models, complete prompts, measure their perplexity.

lstm-lm train && lstm-lm complete "My name is John, I am from Tamilnadu and I speak"

from lstm_lm import LanguageModel
lm = LanguageModel.load("runs/demo")
lm.next_words("My name is John, I am from Tamilnadu and I speak")
"""

__version__ = "0.1.0"
__all__ = ["LanguageModel", "Session"]


def __getattr__(name: str):
    # Imported on first use, so that `lstm-lm --help` does not wait for torch.
    if name in __all__:
        from lstm_lm import api

        return getattr(api, name)
    raise AttributeError(f"module 'lstm_lm' has no attribute {name!r}")
