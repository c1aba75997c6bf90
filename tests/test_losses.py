"""Chunked next-token cross-entropy equals the full-logits computation, and never builds [batch, pos, vocab]."""

from __future__ import annotations

import pytest
import torch

from interp.losses import forward_nll, next_token_nll


def _batch(model, lengths=(9, 13, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    tokens = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):  # left padding, as interp.batching.padded_batches
        tokens[row, width - n:] = torch.randint(3, model.cfg.d_vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return tokens, mask


def _reference(model, tokens, mask):
    """The previous computation: full logits, float32 log_softmax over the whole vocabulary, gathered."""
    logits = model(tokens, attention_mask=mask, return_type="logits")
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None])[..., 0]
    keep = (mask[:, :-1] * mask[:, 1:]).bool()
    return -float(logp[keep].double().sum()), int(keep.sum())


@pytest.mark.parametrize("chunk", [1, 4, 7, 128])
def test_chunked_nll_equals_full_cross_entropy(tiny_model, chunk):
    tokens, mask = _batch(tiny_model)
    with torch.no_grad():
        ref, n = _reference(tiny_model, tokens, mask)
        got, m = forward_nll(tiny_model, tokens, mask, chunk=chunk)
    assert m == n == sum(k - 1 for k in (9, 13, 5))
    assert got == pytest.approx(ref, rel=1e-5)
    # and torch's own cross-entropy on the full logits
    with torch.no_grad():
        logits = tiny_model(tokens, attention_mask=mask, return_type="logits")
    keep = (mask[:, :-1] * mask[:, 1:]).bool()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), tokens[:, 1:][keep], reduction="sum")
    assert got == pytest.approx(float(ce), rel=1e-5)


def test_no_mask_counts_every_pair(tiny_model):
    tokens, _ = _batch(tiny_model, lengths=(8, 8))
    with torch.no_grad():
        ref, n = _reference(tiny_model, tokens, torch.ones_like(tokens))
        got, m = forward_nll(tiny_model, tokens, None, chunk=3)
    assert (m, got) == (n, pytest.approx(ref, rel=1e-5))


def test_hooks_run_in_the_forward(tiny_model):
    """An intervention hook changes the loss exactly as it changes the full-logits loss."""
    tokens, mask = _batch(tiny_model)

    def zero(x, hook):
        return torch.zeros_like(x)

    hooks = [("blocks.0.hook_attn_out", zero)]
    with torch.no_grad():
        got, _ = forward_nll(tiny_model, tokens, mask, hooks=hooks, chunk=5)
        with tiny_model.hooks(fwd_hooks=hooks):
            ref, _ = _reference(tiny_model, tokens, mask)
        plain, _ = forward_nll(tiny_model, tokens, mask, chunk=5)
    assert got == pytest.approx(ref, rel=1e-5) and got != pytest.approx(plain, rel=1e-3)


def test_logits_never_cover_the_whole_batch(tiny_model):
    """The LM head only ever sees `chunk` positions: no [batch, pos, vocab] tensor (a hook on the HF lm_head)."""
    tokens, mask = _batch(tiny_model, lengths=(20, 17, 20, 11))
    seen = []
    head = tiny_model.original_model.get_output_embeddings()
    handle = head.register_forward_hook(lambda module, args, out: seen.append(tuple(out.shape)))
    try:
        with torch.no_grad():
            next_token_nll(tiny_model, torch.randn(4, 20, tiny_model.cfg.d_model), tokens, mask, chunk=6)
            forward_nll(tiny_model, tokens, mask, chunk=6)
    finally:
        handle.remove()
    assert seen and all(shape[0] == 1 and shape[1] <= 6 for shape in seen), seen
    assert sum(shape[1] for shape in seen) == 2 * sum(k - 1 for k in (20, 17, 20, 11))
