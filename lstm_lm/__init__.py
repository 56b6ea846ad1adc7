"""lstm-lm: train LSTM next-word language models, complete prompts, measure perplexity.

    lstm-lm train && lstm-lm complete "My name is John, I am from Tamilnadu and I speak"
"""

__version__ = "0.1.0"
