"""Streaming text deltas add up to what the tokenizer decodes in one go, whatever the characters."""

from __future__ import annotations

import random

import pytest
from transformers import PreTrainedTokenizerBase

from common.chat import decode
from node_agent.generation import Detokenizer

TEXTS = [
    "Hello  world, this is   a test.\n\nNew paragraph: émigré, naïve.",
    "日本語のテキスト and emoji 🙂🚀 mixed in",
    "   leading spaces\tand\ttabs   ",
    "<|im_end|>special<|im_start|> tokens are dropped",
]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_join_to_the_full_decode(tokenizer: PreTrainedTokenizerBase, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = Detokenizer(tokenizer)
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) == decode(tokenizer, ids) == detok.text
    assert not any("\ufffd" in d for d in deltas)  # a split multi-byte character is held back, never shown


def test_random_ids_never_emit_text_that_changes_later(tokenizer: PreTrainedTokenizerBase) -> None:
    rnd = random.Random(7)
    for _ in range(50):
        ids = [rnd.randrange(tokenizer.vocab_size) for _ in range(40)]
        detok = Detokenizer(tokenizer)
        streamed = ""
        for count, token in enumerate(ids, start=1):
            streamed += detok.add(token)
            assert decode(tokenizer, ids[:count]).startswith(streamed)


def test_no_tokenizer_means_no_text() -> None:
    detok = Detokenizer(None)
    assert detok.add(5) == "" and detok.text == ""
