"""Using a trained model: the Python API and everything built on it.

api.py         LanguageModel: load a checkpoint, then next words, completions, scores, perplexity
sample.py      reading a prompt and decoding (greedy, temperature, top-k, top-p) a word at a time
scoring.py     the log-probability of texts of any length, batched or in windows
serve.py       `lstm-lm serve`: the JSON API and the web page (web/) of the gates
inspection.py  `lstm-lm inspect`: the gates and the memory token by token, the gradient's reach
export.py      `lstm-lm export`: the model as an ONNX graph, optionally int8
keystrokes.py  `lstm-lm eval --keystrokes`: a keyboard's suggestions and the keystrokes they save
keyboard.py    `lstm-lm export --format web`: the one-step graph, int8 weights, the page (keyboard_page/)
"""
