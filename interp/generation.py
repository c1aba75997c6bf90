"""Batched generation with the chat template; hooks installed by the caller stay active."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from interp.batching import padded_batches
from interp.bridge import per_row_sampling
from interp.capture import check_context
from interp.chat import chat_prefix


def encode_prompts(tokenizer, prompts: Sequence[str], system: str | None = None) -> list[list[int]]:
    """Chat-templated token ids (generation prompt included; thinking models open `<think>`)."""
    return [tokenizer(chat_prefix(tokenizer, p, system), add_special_tokens=False)["input_ids"] for p in prompts]


@torch.no_grad()
def generate_tokens(
    model,
    seqs: Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
) -> list[list[int]]:
    """Continue each token sequence; returns the new token ids (stopped at EOS, padding removed).

    temperature 0 → greedy; otherwise sampling seeded per sequence (from `seed` and its index), so a
    sequence's continuation does not depend on the batch size or on which sequences share its batch.
    Any hooks active on `model` (e.g. `ablate_heads`) fire at every step.
    """
    check_context(model, seqs, new_tokens=max_new_tokens)
    tok = model.tokenizer
    eos = tok.eos_token_id
    out: list[list[int] | None] = [None] * len(seqs)
    for idx, tokens, mask in padded_batches(model, seqs, batch_size, desc="generate", progress=progress):
        sampled = temperature > 0
        with per_row_sampling([seed * 100_003 + i for i in idx]):
            result = model.generate(
                tokens, attention_mask=mask, max_new_tokens=max_new_tokens,
                do_sample=sampled, temperature=temperature if sampled else 1.0, top_p=top_p,
                stop_at_eos=True, eos_token_id=eos, return_type="tokens", verbose=False)
        new = result[:, tokens.shape[1]:].cpu()
        for row, i in enumerate(idx):
            ids = new[row].tolist()
            if eos in ids:
                ids = ids[: ids.index(eos)]
            out[i] = ids
    return out  # type: ignore[return-value]


def generate(model, prompts: Sequence[str], *, system: str | None = None, **kw) -> list[str]:
    """Chat-templated generation for each prompt; returns decoded continuations (special tokens kept
    except padding/EOS, so `</think>` survives for `split_thinking`)."""
    tok = model.tokenizer
    new = generate_tokens(model, encode_prompts(tok, prompts, system), **kw)
    return [tok.decode(ids, skip_special_tokens=False) for ids in new]
