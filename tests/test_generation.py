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


# --------------------------------------------------------------------------- KV cache, hooks, truncation

HEADS = [(1, 1)]  # one head: the continuation still depends on every position (padding errors show)


def _ablated(model, seqs, **kw):
    from interp.interventions import ablate_heads

    with ablate_heads(model, HEADS):
        return generate_tokens(model, seqs, progress=False, **kw)


@pytest.mark.parametrize("eager", [False, True])
def test_cached_ablated_generation_equals_recomputed(tiny_model, eager):
    """Head ablation (hook_z) with the KV cache gives the same tokens as recomputing the whole sequence each
    step, on a ragged left-padded batch, through SDPA and through the eager path (a pattern hook forces it)."""
    seqs = encode_prompts(tiny_model.tokenizer, PROMPTS)
    hooks = [("blocks.0.attn.hook_pattern", lambda x, hook: x)] if eager else []
    kw = dict(max_new_tokens=12, batch_size=5)
    with tiny_model.hooks(fwd_hooks=hooks):
        cached = _ablated(tiny_model, seqs, **kw)
        recomputed = _ablated(tiny_model, seqs, use_cache=False, **kw)
    assert cached == recomputed
    assert cached != generate_tokens(tiny_model, seqs, progress=False, **kw)  # the ablation acts


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_ablated_generation_does_not_depend_on_padding(tiny_model, temperature):
    seqs = encode_prompts(tiny_model.tokenizer, PROMPTS)
    kw = dict(max_new_tokens=12, temperature=temperature, seed=5)
    alone = _ablated(tiny_model, seqs, batch_size=1, **kw)  # no padding
    assert _ablated(tiny_model, seqs, batch_size=5, **kw) == alone  # left-padded up to the longest prompt
    assert _ablated(tiny_model, seqs, batch_size=2, **kw) == alone
    assert _ablated(tiny_model, seqs, batch_size=5, use_cache=False, **kw) == alone


def test_greedy_generation_matches_hugging_face(tiny_dir, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    from interp.batching import pad_left

    tok = tiny_model.tokenizer
    seqs = encode_prompts(tok, PROMPTS)
    ours = generate_tokens(tiny_model, seqs, max_new_tokens=10, batch_size=5, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    tokens, mask = pad_left(seqs, tok.pad_token_id)
    with torch.no_grad():
        ref = hf.generate(tokens, attention_mask=mask, max_new_tokens=10, do_sample=False,
                          pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[:, tokens.shape[1]:]
    for row, ids in zip(ref.tolist(), ours):
        assert ids == [t for t in row if t != tok.pad_token_id][:len(ids)]
        assert tok.eos_token_id not in row or row[len(ids)] == tok.eos_token_id


def _eos_at(model, step: int):
    """A hook that makes EOS the argmax at the `step`-th forward (0: the prefill) and only there."""
    calls = [0]

    def hook(logits, hook):
        if calls[0] == step:
            logits = logits.clone()
            logits[:, -1, model.tokenizer.eos_token_id] = 1e4
        calls[0] += 1
        return logits
    return ("unembed.hook_out", hook)


def test_rows_say_whether_they_ended_or_hit_the_cap(tiny_model):
    seqs = encode_prompts(tiny_model.tokenizer, PROMPTS[:4])
    caps = [2, 3, 8, 8]  # EOS comes at the 4th token: rows capped at 2 or 3 never see it
    with tiny_model.hooks(fwd_hooks=[_eos_at(tiny_model, 3)]):
        new = generate_tokens(tiny_model, seqs, max_new_tokens=caps, batch_size=4, progress=False)
    assert [len(ids) for ids in new] == [2, 3, 3, 3]
    assert new.truncated == [True, True, False, False]
    assert new.n_truncated == 2
    plain = generate_tokens(tiny_model, seqs, max_new_tokens=3, batch_size=4, progress=False)
    assert plain.truncated == [True] * 4 and all(len(ids) == 3 for ids in plain)
    from interp.generation import generate

    texts = generate(tiny_model, PROMPTS[:2], max_new_tokens=3, progress=False)
    assert texts.truncated == [True, True] and all(isinstance(t, str) for t in texts)


def test_finished_rows_leave_the_batch_and_steps_describe_the_forward(tiny_model):
    """After a row ends, later forwards (and the hooks in them) no longer carry it; each step says which
    rows, the whole mask so far and how many new columns the forward computes."""
    import contextlib

    seqs = encode_prompts(tiny_model.tokenizer, PROMPTS[:3])
    steps, widths = [], []

    @contextlib.contextmanager
    def record(step):
        steps.append(step)
        yield

    with tiny_model.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", lambda x, hook: widths.append(tuple(x.shape[:2])))]):
        new = generate_tokens(tiny_model, seqs, max_new_tokens=[1, 4, 2], batch_size=3, progress=False,
                              step_context=record)
    assert [len(ids) for ids in new] == [1, 4, 2]
    longest = max(len(s) for s in seqs)
    assert [s.step for s in steps] == [0, 1, 2, 3]
    assert [len(s.rows) for s in steps] == [3, 2, 1, 1]
    assert [s.new for s in steps] == [longest, 1, 1, 1]
    assert [s.mask.shape[1] for s in steps] == [longest, longest + 1, longest + 2, longest + 3]
    assert widths == [(3, longest), (2, 1), (1, 1), (1, 1)]
    assert all(int(s.mask[k].sum()) == len(seqs[i]) + s.step for s in steps for k, i in enumerate(s.rows))


def test_bridge_overhead_patches_keep_every_result(tiny_model):
    """interp.bridge skips work the bridge throws away (norm statistics nobody hooks, signature look-ups, empty
    offload contexts): outputs equal the original path's, and hooks on the norms still see and edit their values."""
    import torch

    tokens = torch.tensor([encode_prompts(tiny_model.tokenizer, ["How do I bake bread?"])[0]])
    normalized = [n for n in tiny_model.hook_dict if n.endswith("hook_normalized")]
    assert len(normalized) == 2 * tiny_model.cfg.n_layers + 1
    with torch.no_grad():
        fast = tiny_model(tokens)
        with tiny_model.hooks(fwd_hooks=[(n, lambda x, hook: x) for n in normalized]):  # the original path
            slow = tiny_model(tokens)
        assert torch.equal(fast, slow)
        with tiny_model.hooks(fwd_hooks=[("ln_final.hook_normalized", lambda x, hook: x * 0.5)]):
            edited = tiny_model(tokens)
        assert not torch.allclose(edited, fast)
        names = ("hook_scale", "hook_normalized")
        _, cache = tiny_model.run_with_cache(tokens, names_filter=lambda n: n.endswith(names))
    assert len(cache) == 2 * len(normalized) and cache["ln_final.hook_scale"].shape == (1, tokens.shape[1], 1)
