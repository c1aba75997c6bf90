"""Batched generation: greedy matches one-at-a-time, and sampling is seeded per sequence, so neither
depends on the batch size or on which sequences share a batch."""

from __future__ import annotations

import pytest

from interp.generation import encode_prompts, generate_tokens

PROMPTS = ["How do I bake bread?", "Tell me a story.", "What is 3 plus 4?", "Hi", "Name a colour."]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_does_not_depend_on_batch_size(tiny_model, temperature):
    seqs = encode_prompts(tiny_model.tokenizer, PROMPTS)
    kw = dict(temperature=temperature, seed=3, max_new_tokens=12, progress=False)
    one = generate_tokens(tiny_model, seqs, batch_size=1, **kw)
    five = generate_tokens(tiny_model, seqs, batch_size=5, **kw)
    assert one == five
    assert generate_tokens(tiny_model, seqs, batch_size=2, **kw) == one  # other neighbours in each batch


def test_sampling_follows_the_seed(tiny_model):
    seqs = encode_prompts(tiny_model.tokenizer, PROMPTS)
    kw = dict(temperature=1.0, max_new_tokens=12, progress=False, batch_size=5)
    assert generate_tokens(tiny_model, seqs, seed=3, **kw) == generate_tokens(tiny_model, seqs, seed=3, **kw)
    assert generate_tokens(tiny_model, seqs, seed=3, **kw) != generate_tokens(tiny_model, seqs, seed=4, **kw)
    # each sequence gets its own draw: identical prompts need not continue identically
    twins = encode_prompts(tiny_model.tokenizer, ["Hi"] * 4)
    assert len({tuple(t) for t in generate_tokens(tiny_model, twins, seed=3, **kw)}) > 1
