"""The batching loop every analysis uses: sort by length, left-pad with a mask, move to the device, show progress;
`run_batches` adds the out-of-memory backoff (half the batch, remembered per length)."""

from __future__ import annotations

import copy
import gc
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.errors import UserError


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


def input_device(model) -> torch.device:
    """Where token ids go: the first parameter's device, or under a device map (`cfg.n_devices` > 1) the embedding's,
    which TransformerLens records as `cfg.device` (the first parameter may be another block's, or offloaded)."""
    if getattr(model.cfg, "n_devices", 1) > 1 and getattr(model.cfg, "device", None) is not None:
        return torch.device(model.cfg.device)
    return next(model.parameters()).device


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
    device = device if device is not None else input_device(model)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer is not None else 0
    for idx in tqdm(length_batches([len(s) for s in seqs], batch_size), desc=desc, disable=not progress, leave=False):
        tokens, mask = pad_left([seqs[i] for i in idx], pad_id)
        yield idx, tokens.to(device), mask.to(device)


# ---------------------------------------------------------------- out-of-memory backoff

def is_out_of_memory(exc: BaseException) -> bool:
    """True for a device out-of-memory error: `torch.OutOfMemoryError` (CUDA's) or a RuntimeError saying so."""
    oom = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
    return isinstance(exc, oom) or (isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower())


# model → stage → {length: batch size that fit}; later batches of that length or longer start there
_FITTED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fitted_sizes(model, stage: str) -> dict[int, int]:
    """{sequence length: largest batch size that fit} recorded by `run_batches` for `stage` on `model`."""
    return _FITTED.setdefault(model, {}).setdefault(stage, {})


def _limit(fitted: dict[int, int], length: int, batch_size: int) -> int:
    return min([size for fit_len, size in fitted.items() if length >= fit_len] + [batch_size])


def _snapshot(state: Sequence) -> list:
    """Copies of tensors, lists, dicts, and objects' public attributes."""
    return [s.clone() if isinstance(s, Tensor) else copy.deepcopy(s) if isinstance(s, list | dict) else
            copy.deepcopy({k: v for k, v in vars(s).items() if not k.startswith("_")}) for s in state]


def _restore(state: Sequence, saved: list) -> None:
    """Put the copies back in place (the same objects: hooks keep their references)."""
    for s, kept in zip(state, saved):
        if isinstance(s, Tensor):
            s.copy_(kept)
        elif isinstance(s, list):
            s[:] = kept
        elif isinstance(s, dict):
            s.clear()
            s.update(kept)
        else:
            vars(s).update(kept)


def run_batches(
    model, seqs: Sequence[Sequence[int]], batch_size: int, step: Callable[[list[int], Tensor, Tensor], None], *,
    desc: str = "batches", progress: bool = True, device=None, state: Sequence = (),
) -> None:
    """Call `step(indices, tokens, attention_mask)` on each batch of `padded_batches`, backing off on out-of-memory.

    A batch that runs out of memory is retried as two halves (said once on stderr) and the size that fit is
    remembered for its length (`fitted_sizes`: later batches of that length or longer, in this stage on this model,
    start there). At batch size 1 it is a `UserError` naming the options that reduce memory. `step` must be safe to
    repeat for the same indices: it writes per-index results, or accumulates into `state` (tensors, lists, dicts or
    objects' public attributes, holding no model), restored to their state before the batch when it fails (a
    forward that failed halfway through its hooks leaves no partial update).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = device if device is not None else input_device(model)
    pad_id = model.tokenizer.pad_token_id if model.tokenizer is not None else 0
    fitted = fitted_sizes(model, desc)
    told = False
    for planned in tqdm(length_batches([len(s) for s in seqs], batch_size), desc=desc, disable=not progress,
                        leave=False):
        longest = len(seqs[planned[0]])
        size = _limit(fitted, longest, len(planned))
        todo = [planned[i:i + size] for i in range(0, len(planned), size)]
        while todo:
            idx = todo.pop(0)
            saved = _snapshot(state) if state else None
            tokens, mask = pad_left([seqs[i] for i in idx], pad_id)
            try:
                step(idx, tokens.to(device), mask.to(device))
                continue
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled; the rest re-raised
                if not is_out_of_memory(exc):
                    raise
            del tokens, mask
            if saved is not None:
                _restore(state, saved)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(idx) == 1:
                raise UserError(f"out of memory in {desc} at batch size 1 (a sequence of {len(seqs[idx[0]])} "
                                "tokens); reduce memory: --batch-size, --seq-len (shorter inputs), --device-map auto "
                                "(spread the model over GPUs), --dtype bfloat16")
            half = (len(idx) + 1) // 2
            fitted[longest] = min(fitted.get(longest, half), half)
            if not told:
                print(f"note: out of memory in {desc} at batch size {len(idx)} (length {longest}); retrying with "
                      f"{half} (later batches of this length or longer start at the size that fit)", file=sys.stderr)
                told = True
            todo[:0] = [idx[:half], idx[half:]]
