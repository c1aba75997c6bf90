"""Batched activation capture: only the hooks asked for, left padding, early stop, results off-device."""

from __future__ import annotations

import contextlib
import re
import types
from collections.abc import Callable, Iterator, Sequence

import torch
from jaxtyping import Int
from torch import Tensor
from tqdm.auto import tqdm

from interp.errors import UserError

# Hooks that exist only in the bridge's eager re-implementation of attention.
_EAGER_ONLY = re.compile(r"attn\.(hook_attn_scores|hook_pattern|hook_rot_q|hook_rot_k|hook_cos|hook_sin|hook_q_gate)$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


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


FINAL_NORM = "ln_final.hook_out"


def stop_layer_for(hook_names: Sequence[str], n_layers: int) -> int | None:
    """The first block no requested hook needs (None when a hook after the blocks is needed).

    `stop == n_layers` runs every block but skips the final norm and the unembedding.
    """
    layers = []
    for name in hook_names:
        m = _BLOCK.match(name)
        if m is None:
            if name.startswith(("hook_embed", "embed.", "hook_pos_embed")):
                layers.append(-1)
                continue
            return None
        layers.append(int(m.group(1)))
    return max(layers, default=n_layers - 1) + 1


def _raise_stop(x, hook):
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    raise StopAtLayerException(x)


@contextlib.contextmanager
def stopped_at(model, stop: int | None) -> Iterator[int | None]:
    """Context for a forward that should end before block `stop`; yields the `stop_at_layer` to pass.

    TransformerLens ignores `stop_at_layer == n_layers` (it still runs the final norm and the
    unembedding), so that case stops with a hook at the final norm's input instead."""
    if stop is not None and stop >= model.cfg.n_layers and "ln_final.hook_in" in model.hook_dict:
        with model.hooks(fwd_hooks=[("ln_final.hook_in", _raise_stop)]):
            yield None
    else:
        yield stop


def readout_point(model, hook_name: str) -> tuple[str, int | None, Callable[[Tensor], Tensor]]:
    """(hook to read, stop layer, transform) that yield `hook_name`'s activations without running
    anything later: the final-norm output is read as ln_final(last resid_post), skipping the unembed."""
    n_layers = model.cfg.n_layers
    if hook_name == FINAL_NORM:
        return f"blocks.{n_layers - 1}.hook_resid_post", n_layers, model.ln_final
    return hook_name, stop_layer_for([hook_name], n_layers), lambda x: x


def _sdpa_forward(self, *args, **kwargs):
    """Attention through the wrapped HF module (SDPA kernel); hook_in/q/k/v/z/hook_out still fire."""
    hidden = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
    out, weights = self.original_component(self.hook_in(hidden), **kwargs)
    return self.hook_out(out), weights


def _sdpa_capable(model) -> bool:
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge,
    )

    blocks = getattr(model, "blocks", [])
    return len(blocks) > 0 and all(
        type(b.attn) is PositionEmbeddingsAttentionBridge and not getattr(model.cfg, "gated_q_proj", False)
        for b in blocks)


def _active_hook_names(model) -> list[str]:
    return [name for name, hp in model.hook_dict.items() if hp.fwd_hooks]


@contextlib.contextmanager
def sdpa_attention(model, needed_hooks: Sequence[str] = ()) -> Iterator[bool]:
    """Run attention with PyTorch SDPA instead of the bridge's eager re-implementation.

    Only when no requested or active hook needs attention internals (scores, pattern, rotary);
    otherwise, or for architectures it does not cover, it is a no-op. Yields whether SDPA is on.
    Not for generation: the bridge's KV cache lives in its eager path.
    """
    needs_eager = any(_EAGER_ONLY.search(n) for n in list(needed_hooks) + _active_hook_names(model))
    if needs_eager or not _sdpa_capable(model):
        yield False
        return
    config = model.original_model.config
    previous = config._attn_implementation
    for block in model.blocks:
        object.__setattr__(block.attn, "forward", types.MethodType(_sdpa_forward, block.attn))
    config._attn_implementation = "sdpa"
    try:
        yield True
    finally:
        config._attn_implementation = previous
        for block in model.blocks:
            object.__delattr__(block.attn, "forward")


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches of similar length (sorted, longest first) to minimise padding."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


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
    Results are float32 on `out_device`. Forward stops after the last block any hook needs.
    `reduce(name, acts)` maps each sequence's selected activations to what is kept (e.g. probe
    scores), so memory holds only the reduced values.
    """
    check_context(model, seqs)
    names = list(hook_names)
    unknown = [n for n in names if n not in model.hook_dict]
    if unknown:
        raise UserError(f"unknown hook name(s) {unknown[:3]}; see model.hook_dict for valid names")
    pad_id = model.tokenizer.pad_token_id
    n_layers = model.cfg.n_layers
    # The final-norm output is derived from the last residual stream: no unembedding needed.
    last_resid = f"blocks.{n_layers - 1}.hook_resid_post"
    cached = [n for n in names if n != FINAL_NORM] + ([last_resid] if FINAL_NORM in names else [])
    stop = stop_layer_for(cached, n_layers)
    per_seq: dict[str, list[Tensor | None]] = {n: [None] * len(seqs) for n in names}
    device = next(model.parameters()).device
    batches = length_batches([len(s) for s in seqs], batch_size)
    with sdpa_attention(model, names) if fast_attention else contextlib.nullcontext():
        for idx in tqdm(batches, desc="capture", disable=not progress, leave=False):
            tokens, mask = pad_left([seqs[i] for i in idx], pad_id)
            width = tokens.shape[1]
            with stopped_at(model, stop) as stop_at_layer:
                _, cache = model.run_with_cache(
                    tokens.to(device), attention_mask=mask.to(device), names_filter=lambda n: n in cached,
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
            del cache, acts
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

