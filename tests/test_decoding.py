"""Incremental decoding with the default model's real tokenizer."""

import pytest
from transformers import AutoTokenizer

from sessions.engine.decoding import IncrementalDecoder

TEXTS = [" Hello  wörld", "🦀🇫🇷 日本語", "code:\n    x = 1<|im_end|>", "naïve café", "12345"]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.mark.parametrize("text", TEXTS)
def test_token_by_token_deltas_add_up_to_the_text(tokenizer, text):
    decoder = IncrementalDecoder(tokenizer)
    decoder.add_context(tokenizer("Say:", add_special_tokens=False)["input_ids"])
    deltas = [decoder.push([token]) for token in tokenizer(text, add_special_tokens=False)["input_ids"]]
    assert "".join(deltas) == text
    assert not any("\ufffd" in delta for delta in deltas)


def test_partial_character_is_held_back_until_complete(tokenizer):
    ids = tokenizer("🦀", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1  # byte-level pieces of one character
    decoder = IncrementalDecoder(tokenizer)
    assert [decoder.push([token]) for token in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.push(ids[-1:]) == "🦀"


def test_new_context_drops_an_unfinished_character(tokenizer):
    ids = tokenizer("🦀", add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tokenizer)
    decoder.push(ids[:1])
    decoder.add_context(tokenizer("Next:", add_special_tokens=False)["input_ids"])
    assert decoder.push(tokenizer(" ok", add_special_tokens=False)["input_ids"]) == " ok"
