"""Logits a chunk of positions at a time: the forward stops after the last block (no [batch, pos, vocab] tensor),
then the final norm and the unembedding run on `chunk` positions at once.

- `final_residual(model, tokens, mask)`: the last block's output `[batch, pos, d_model]` (the final norm's input),
  nothing after it runs;
- `logits_at(model, resid)`: final norm + unembedding + the model's own output transform (Gemma-2/3 final logit
  soft-capping, Cohere's logit scale, Granite's logits scaling) of a few positions, as the full forward computes them;
- `position_chunks(n, chunk)`: the `(start, stop)` ranges of positions, `chunk` at a time.

Memory: O(batch × pos × d_model) for the residual plus `chunk × vocab` per chunk of logits (and its float32
temporaries), instead of batch × pos × vocab.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.bridge import sdpa_attention, stopped_at

LOGIT_CHUNK = 128  # positions unembedded at once (128 × 152k float32 = 78 MB a copy)


def final_residual(model, tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"] | None = None,
                   hooks: list | None = None) -> Float[Tensor, "batch pos d_model"]:
    """The last block's output (before the final norm); the final norm and the unembedding do not run."""
    n_layers = model.cfg.n_layers
    saved: dict[str, Tensor] = {}

    def keep(x, hook):
        saved["x"] = x

    hooks = [*(hooks or []), (f"blocks.{n_layers - 1}.hook_resid_post", keep)]
    # attention through the HF modules (SDPA; with a pattern hook, the pattern built a block of rows at a time)
    with sdpa_attention(model, [name for name, _ in hooks]), stopped_at(model, n_layers) as stop_at, \
            model.hooks(fwd_hooks=hooks):
        model(tokens, attention_mask=mask, return_type=None, stop_at_layer=stop_at)
    return saved["x"]


def logits_at(model, resid: Float[Tensor, "*pos d_model"]) -> Float[Tensor, "*pos vocab"]:
    """Final norm + unembedding of residual states, with the output transform the model's forward applies after
    the unembedding (the TransformerLens adapter's `apply_output_logits_transform`: Gemma-2/3 soft-capping, Cohere's
    logit scale, Granite's logits scaling, ...; without an adapter, the HF config's final_logit_softcapping)."""
    logits = model.unembed(model.ln_final(resid))
    adapter = getattr(model, "adapter", None)
    if adapter is not None and hasattr(adapter, "apply_output_logits_transform"):
        return adapter.apply_output_logits_transform(logits)
    config = getattr(getattr(model, "original_model", None), "config", None)
    cap = getattr(config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


def position_chunks(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    """(start, stop) of consecutive ranges of at most `chunk` positions covering 0..n."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)
