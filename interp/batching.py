"""The batching loop every analysis uses: sort by length, left-pad with a mask, move to the device, show progress."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm


def pad_left(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
    """Left-pad token id lists; returns (tokens, attention_mask)."""
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            tokens[i, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return tokens, mask


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar length (sorted, longest first) to minimise padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def padded_batches(
    model, seqs: Sequence[Sequence[int]], batch_size: int, *, desc: str = "batches", progress: bool = True, device=None
) -> Iterator[tuple[list[int], Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]]:
    """Yield `(indices, tokens, attention_mask)` per batch of similar-length sequences, left-padded with
    the tokenizer's pad id and moved to the model's device (or `device`); a tqdm bar counts batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = device if device is not None else next(model.parameters()).device
    pad_id = model.tokenizer.pad_token_id if model.tokenizer is not None else 0
    for idx in tqdm(length_batches([len(s) for s in seqs], batch_size), desc=desc, disable=not progress, leave=False):
        tokens, mask = pad_left([seqs[i] for i in idx], pad_id)
        yield idx, tokens.to(device), mask.to(device)
