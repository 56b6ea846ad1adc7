"""Prompt encoding and the decoding rules: greedy, top-k, top-p."""

import pytest
import torch

from lstm_lm.config import DataConfig
from lstm_lm.data import build_tokenizer
from lstm_lm.errors import PromptError
from lstm_lm.inference.sample import MAX_PROMPT_TOKENS, _pick, encode_prompt


def test_prompt_is_read_after_an_eos():
    tok = build_tokenizer(DataConfig(), ["the cat sat"])
    assert encode_prompt(tok, "  the cat ") == [1, tok.token_to_id("the"), tok.token_to_id("cat")]


def test_char_prompt_keeps_its_trailing_space():
    tok = build_tokenizer(DataConfig(tokenizer="char"), ["the cat sat"])
    assert encode_prompt(tok, "the ", kind="char")[-1] == tok.token_to_id(" ")


def test_unreadable_prompts_are_refused():
    tok = build_tokenizer(DataConfig(), ["the cat sat"])
    with pytest.raises(PromptError, match="empty"):
        encode_prompt(tok, " \n ")
    with pytest.raises(PromptError, match="vocabulary"):
        encode_prompt(tok, "zebra giraffe")
    with pytest.raises(PromptError, match=f"limit is {MAX_PROMPT_TOKENS}"):
        encode_prompt(tok, "the " * (MAX_PROMPT_TOKENS + 1))


def test_greedy_top_k_and_top_p():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.3, 0.15]))
    assert _pick(logits, 0.0, None, None, None) == 1
    g = torch.Generator().manual_seed(0)
    picks = {_pick(logits, 1.0, 2, None, g) for _ in range(200)}
    assert picks == {1, 2}  # top-2 only
    picks = {_pick(logits, 1.0, None, 0.6, g) for _ in range(200)}
    assert picks == {1, 2}  # 0.5 < 0.6, so the token that crosses 0.6 (p=0.3) is kept
    picks = {_pick(logits, 1.0, None, 0.5, g) for _ in range(100)}
    assert picks == {1}


@pytest.mark.parametrize("impl", ["custom", "cudnn"])
def test_generation_continues_like_the_full_forward_in_fp32_and_bf16(impl):
    import itertools

    from lstm_lm.config import ModelConfig
    from lstm_lm.inference.sample import generate
    from lstm_lm.model import LSTMLanguageModel

    torch.manual_seed(0)
    model = LSTMLanguageModel(ModelConfig(impl=impl, embedding_size=16, hidden_size=16, num_layers=2), 40).eval()
    with torch.no_grad():
        model.decoder.weight.mul_(20)  # well-separated scores, so bf16 rounding cannot swap the best two
    prompt = [1, 5, 9, 3]
    # greedy decoding by re-reading the whole sequence each time with the full forward
    seq, want = list(prompt), []
    for _ in range(12):
        with torch.no_grad():
            logits, _ = model(torch.tensor(seq).unsqueeze(1))
        want.append(int(logits[-1, 0].argmax()))
        seq.append(want[-1])
    for precision in ("fp32", "bf16"):
        assert list(itertools.islice(generate(model, prompt, precision=precision), 12)) == want, precision
