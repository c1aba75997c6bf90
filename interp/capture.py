"""Batched activation capture: only the hooks asked for, left padding, early stop, results off-device."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from interp import distributed
from interp.batching import run_batches
from interp.bridge import FINAL_NORM, sdpa_attention, stop_layer_for, stopped_at
from interp.errors import UserError


def check_context(model, seqs: Sequence[Sequence[int]], new_tokens: int = 0) -> None:
    """Refuse sequences that (with `new_tokens` to generate) exceed the model's context window."""
    n_ctx = getattr(model.cfg, "n_ctx", None)
    longest = max((len(s) for s in seqs), default=0)
    if n_ctx and longest + new_tokens > n_ctx:
        extra = f" + {new_tokens} to generate" if new_tokens else ""
        raise UserError(f"a sequence has {longest} tokens{extra} but the model's context is {n_ctx}; "
                        "shorten the prompts/thinking, lower --max-new-tokens or drop the longest inputs")
    if any(len(s) == 0 for s in seqs):
        raise UserError("an input sequence is empty after tokenization")


PositionSelector = Callable[[int], Sequence[int]]


@torch.no_grad()
def capture(
    model,
    seqs: Sequence[Sequence[int]],
    hook_names: Sequence[str],
    *,
    positions: str | PositionSelector | Sequence[Sequence[int]] = "last",
    batch_size: int = 8,
    fast_attention: bool = True,
    progress: bool = True,
    out_device: str = "cpu",
    reduce: Callable[[str, Tensor], Tensor] | None = None,
) -> dict[str, Tensor | list[Tensor]]:
    """Capture `hook_names` for each token sequence, batch by batch, keeping only what is asked.

    positions: "last" → one vector per sequence (`[n, ...]`); "all" → a `[len_i, ...]` tensor per
    sequence (padding removed); a callable `len -> indices`, or one index list per sequence →
    `[k_i, ...]` per sequence.
    Results are float32 on `out_device`. Forward stops after the last block any hook needs. Out of memory:
    the batch is halved (`interp.batching.run_batches`).
    `reduce(name, acts)` maps each sequence's selected activations to what is kept (e.g. probe
    scores), so memory holds only the reduced values. Under torchrun each rank captures its shard of `seqs`; every
    rank gets all sequences' results, in order (`interp.distributed`).
    """
    if distributed.sharding():
        return _sharded(model, seqs, hook_names, positions=positions, batch_size=batch_size,
                        fast_attention=fast_attention, progress=progress, out_device=out_device, reduce=reduce)
    check_context(model, seqs)
    names = list(hook_names)
    unknown = [n for n in names if n not in model.hook_dict]
    if unknown:
        raise UserError(f"unknown hook name(s) {unknown[:3]}; see model.hook_dict for valid names")
    n_layers = model.cfg.n_layers
    # The final-norm output is derived from the last residual stream: no unembedding needed.
    last_resid = f"blocks.{n_layers - 1}.hook_resid_post"
    cached = [n for n in names if n != FINAL_NORM] + ([last_resid] if FINAL_NORM in names else [])
    stop = stop_layer_for(cached, n_layers)
    per_seq: dict[str, list[Tensor | None]] = {n: [None] * len(seqs) for n in names}

    def step(idx: list[int], tokens: Tensor, mask: Tensor) -> None:  # per-sequence results: safe to repeat
        width = tokens.shape[1]
        with stopped_at(model, stop) as stop_at_layer:
            _, cache = model.run_with_cache(
                tokens, attention_mask=mask, names_filter=lambda n: n in cached,
                stop_at_layer=stop_at_layer, pos_slice=-1 if positions == "last" else None, return_type=None)
        acts = {n: cache[n] for n in cached}
        if FINAL_NORM in names:
            acts[FINAL_NORM] = model.ln_final(cache[last_resid])
        for name in names:
            act = acts[name]
            for row, i in enumerate(idx):
                wanted = positions if isinstance(positions, str) or callable(positions) else positions[i]
                picked = _select(act[row], wanted, len(seqs[i]), width)
                per_seq[name][i] = (picked if reduce is None else reduce(name, picked)).to(out_device)

    with sdpa_attention(model, names) if fast_attention else contextlib.nullcontext():
        run_batches(model, seqs, batch_size, step, desc="capture", progress=progress)
    if positions == "last":
        return {n: torch.stack(v) for n, v in per_seq.items()}
    return per_seq


def _select(act: Tensor, positions, length: int, width: int) -> Tensor:
    """Pick positions of one left-padded row (`act` is [pos, ...] or [1, ...] for "last"), as float32."""
    if positions == "last":
        return act[-1].to(torch.float32, copy=True)
    real = act[width - length:]
    if positions == "all":
        return real.to(torch.float32, copy=True)  # a copy: a view would keep the padded batch alive
    index = positions(length) if callable(positions) else positions
    return real[torch.as_tensor(list(index), dtype=torch.long, device=act.device)].float()


def _sharded(model, seqs: Sequence[Sequence[int]], hook_names: Sequence[str], *, positions, **kw) -> dict:
    """`capture` of this rank's shard of `seqs`, gathered in order on every rank (per-sequence results: exact)."""
    def mine(idx: list[int]) -> list[dict]:
        wanted = positions if isinstance(positions, str) or callable(positions) else [positions[i] for i in idx]
        got = capture(model, [seqs[i] for i in idx], hook_names, positions=wanted, **kw)
        return [{n: got[n][k] for n in got} for k in range(len(idx))]

    rows = distributed.map_items(mine, len(seqs), lengths=[len(s) for s in seqs], batch_size=kw["batch_size"])
    return {n: torch.stack([r[n] for r in rows]) if positions == "last" else [r[n] for r in rows] for n in hook_names}
