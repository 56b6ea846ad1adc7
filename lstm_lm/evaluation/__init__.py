"""Evaluation: perplexity under the three protocols that `lstm-lm eval` and `LanguageModel.evaluate` offer.

protocols.py     the protocols behind one interface: their settings (flags, defaults, bounds), the rules
                 between them, the choice the command line makes (torch-free)
run.py           a protocol run on a loaded model, and its settings fitted on valid (--tune)
evaluate.py      the static protocol: the split read in bptt chunks with the state carried
neural_cache.py  the neural cache (Grave et al. 2017): recent hidden states point at the words that followed
dynamic_eval.py  dynamic evaluation (Krause et al. 2018): a gradient step on each segment once it is scored
"""
