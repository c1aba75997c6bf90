"""Next-token loss without the whole batch's logits: chunked cross-entropy over positions.

- `next_token_nll(model, resid, tokens, mask, chunk)` → (summed NLL, count): −log p(token[t+1] | ≤ t) over the real
  (unpadded) consecutive pairs of a batch, from the last block's output `resid` (`interp.logits.final_residual`).
  The real positions are gathered into one `[N, d_model]` list and the final norm, the unembedding (with the model's
  own output scaling, `interp.logits.logits_at`) and a float32 cross-entropy run on `chunk` of them at a time.
- `forward_nll(model, tokens, mask, hooks, chunk)`: one forward (with `hooks`) that stops before the final norm,
  then `next_token_nll`.

Memory: the residual (batch × pos × d_model) and the logits of `chunk` positions (`chunk × vocab`, float32, plus
the cross-entropy's temporaries of the same size); never `[batch, pos, vocab]`. Equal to the full computation
(`log_softmax(logits).gather(...)`) up to float32 rounding (tests/test_losses.py).
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.logits import LOGIT_CHUNK, final_residual, logits_at, position_chunks


@torch.no_grad()
def next_token_nll(model, resid: Float[Tensor, "batch pos d_model"], tokens: Int[Tensor, "batch pos"],
                   mask: Int[Tensor, "batch pos"] | None = None, chunk: int = LOGIT_CHUNK) -> tuple[float, int]:
    """(Σ −log p(tokens[:, t+1] | ≤ t), number of pairs) over the pairs whose two positions are real."""
    keep = torch.ones_like(tokens[:, 1:], dtype=torch.bool) if mask is None else (mask[:, :-1] * mask[:, 1:]).bool()
    keep = keep.to(resid.device)
    states = resid[:, :-1][keep]  # [N, d_model]
    targets = tokens[:, 1:].to(resid.device)[keep]  # [N]
    total = 0.0
    for start, stop in position_chunks(states.shape[0], chunk):
        logits = logits_at(model, states[None, start:stop])[0].float()  # [n, vocab]
        total += float(torch.nn.functional.cross_entropy(logits, targets[start:stop], reduction="sum").double())
        del logits
    return total, int(states.shape[0])


@torch.no_grad()
def forward_nll(model, tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"] | None = None,
                hooks: list | None = None, chunk: int = LOGIT_CHUNK) -> tuple[float, int]:
    """One forward with `hooks` (stopping before the final norm), then `next_token_nll` on its last residual."""
    resid = final_residual(model, tokens, mask, hooks)
    return next_token_nll(model, resid, tokens, mask, chunk)
