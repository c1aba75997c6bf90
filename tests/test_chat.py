"""Chat template, thinking spans and the closing marker of the refusal-cliff probe."""

from __future__ import annotations

import pytest

from interp.chat import (
    CLOSE_MARKER,
    chat_prefix,
    encode_with_span,
    has_thinking_tokens,
    opens_thinking,
    prompt_sequence,
    split_thinking,
    thinking_sequence,
)

THINKINGS = [
    "The user wants a recipe. This is harmless, so I will answer helpfully.",
    "x",
    "I should refuse.\n",
    " leading space and trailing space ",
    "multi\nline thinking 123",
    "émoji 🙂 and accents: café",
    "As an AI, I cannot assist with making weapons or hurting people.",
]


@pytest.fixture(scope="module")
def tok(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def test_template_opens_thinking(tok):
    prefix = chat_prefix(tok, "Hello")
    assert prefix.endswith("<|im_start|>assistant\n<think>\n")
    assert "<|im_start|>user\nHello<|im_end|>" in prefix
    assert opens_thinking(tok) and has_thinking_tokens(tok)


@pytest.mark.parametrize("thinking", THINKINGS)
def test_thinking_span_is_exact(tok, thinking):
    enc = thinking_sequence(tok, "Write a poem about the sea.", thinking)
    start, end = enc.span
    assert 0 < start < end < len(enc.input_ids)
    assert tok.decode(enc.input_ids[start:end]) == thinking
    # prefix + span + rest reassemble the whole text
    full = tok.decode(enc.input_ids)
    assert full == chat_prefix(tok, "Write a poem about the sea.") + "\n\n" + thinking + CLOSE_MARKER
    assert tok.decode(enc.input_ids[:start]) + thinking + tok.decode(enc.input_ids[end:]) == full


def test_thinking_sequence_ends_with_close_marker(tok):
    enc = thinking_sequence(tok, "How do I bake bread?", "The user wants bread.")
    close_id = tok.convert_tokens_to_ids("</think>")
    marker_ids = tok(CLOSE_MARKER, add_special_tokens=False)["input_ids"]
    assert close_id in marker_ids
    assert enc.input_ids[-len(marker_ids):] == marker_ids
    assert tok.decode(enc.input_ids[-len(marker_ids):]) == "\n</think>\n\n"
    # the </think> token comes right after the span's closing newline, exactly once
    assert enc.input_ids.count(close_id) == 1
    assert enc.input_ids.index(close_id) >= enc.span[1]
    assert enc.input_ids[-1] != close_id  # the probe position is the token after </think>


def test_empty_thinking(tok):
    enc = thinking_sequence(tok, "Hi", "")
    assert enc.span[0] == enc.span[1]
    assert tok.decode(enc.input_ids).endswith("<think>\n\n\n\n</think>\n\n")


def test_encode_with_span_boundaries(tok):
    enc = encode_with_span(tok, "abc ", "middle words", " end")
    start, end = enc.span
    assert tok.decode(enc.input_ids[start:end]) == "middle words"
    assert tok.decode(enc.input_ids[:start]) == "abc "
    assert tok.decode(enc.input_ids[end:]) == " end"
    empty = encode_with_span(tok, "abc", "", "def")
    assert empty.span[0] == empty.span[1]


def test_prompt_sequence_span(tok):
    enc = prompt_sequence(tok, "Explain photosynthesis simply.")
    start, end = enc.span
    assert tok.decode(enc.input_ids[start:end]) == "Explain photosynthesis simply."
    assert tok.decode(enc.input_ids).endswith("<think>\n")


@pytest.mark.parametrize("generated, expected", [
    ("I think so.</think>\n\nSure, here it is.", ("I think so.", "Sure, here it is.")),
    ("<think>\nhmm\n</think>\n\nanswer", ("hmm", "answer")),
    ("no marker at all ", ("", "no marker at all")),
    ("a</think>b</think>c", ("a", "b</think>c")),
    ("</think>", ("", "")),
])
def test_split_thinking(generated, expected):
    assert split_thinking(generated) == expected


def test_planted_tokenizer_keeps_whole_words(planted, planted_model):
    tok = planted_model.tokenizer
    for word in list(planted.harm_words) + [planted.jailbreak_word]:
        ids = tok(f"a{word} b", add_special_tokens=False)["input_ids"]
        assert tok.convert_tokens_to_ids(word) in ids
    enc = thinking_sequence(tok, "How do I build a bomb?", "The user is asking about a bomb.")
    start, end = enc.span
    assert tok.decode(enc.input_ids[start:end]) == "The user is asking about a bomb."
