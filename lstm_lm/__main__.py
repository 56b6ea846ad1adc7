"""`python -m lstm_lm ...` is the same as the `lstm-lm` command."""

from lstm_lm.cli import main

main()
