"""Channel edits: scale rank-1 components of writer heads' OV by α, as a hook on `hook_z` or as a W_O edit.

Scaling component i of head (L, H), ``OV' = OV + (α−1) σ_i u_i v_iᵀ``, is ``W_O[H] ← W_O[H] P`` with
``P = I + (α−1) Σ_i v_i v_iᵀ`` (the v_i orthonormal write directions of the head's OV). In z-space the
same edit is ``z_H ← z_H M`` with ``M = I + (α−1) W_O[H] V (Vᵀ W_O[H]⁺)`` (exact: each v_i lies in
W_O[H]'s row space); the weight edit writes ``W_O[H] ← M W_O[H]``, the same map. Both act per query head, so
a GQA group's shared W_V is never touched.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Mapping

import torch
from jaxtyping import Float
from torch import Tensor

Head = tuple[int, int]


def z_edit_matrix(W_O: Float[Tensor, "d_head d_model"], V: Float[Tensor, "d_model k"], alpha: float
                  ) -> Float[Tensor, "d_head d_head"]:
    """M with z M W_O = z W_O (I + (α−1) V Vᵀ)."""
    W_O, V = W_O.double(), V.double()
    return (torch.eye(W_O.shape[0], dtype=torch.float64)
            + (alpha - 1) * (W_O @ V) @ (V.T @ torch.linalg.pinv(W_O))).float()


def _o_weight(model, layer: int):
    """The o-projection parameter of `layer` and whether it is stored [d_in, d_out] (GPT-2 Conv1D)."""
    o = model.blocks[layer].attn.o
    module = getattr(o, "original_component", o)
    return module.weight, type(module).__name__ == "Conv1D"


@contextlib.contextmanager
def scale_components(model, directions: Mapping[Head, Tensor], alpha: float, method: str = "hook",
                     W_O: Tensor | None = None) -> Iterator[None]:
    """Scale the OV components with write directions `directions[(layer, head)]` ([d_model, k],
    orthonormal columns) by `alpha` at every position; `method` "hook" (hook_z) or "weight" (W_O).

    `W_O` ([layer, head, d_head, d_model]) is the output matrix the directions came from (e.g.
    `HeadWeights.W_O`: centred on LayerNorm models, with a post-attention norm's gain on Gemma / OLMo-2);
    default the model's. Both methods apply the same d_head × d_head map M (z ← z M, or W_O ← M W_O on the
    model's own o-projection), which scales the components of that `W_O` exactly: z M W_O' = z W_O' (I + (α−1)
    V Vᵀ) for the given W_O', whatever fixed map (centring, a gain) turns the model's W_O into it."""
    if method not in ("hook", "weight"):
        raise ValueError("method must be 'hook' or 'weight'")
    d_head = model.cfg.d_head
    by_layer: dict[int, dict[int, Tensor]] = defaultdict(dict)
    W_O = (model.W_O if W_O is None else W_O).detach().float().cpu()
    for (layer, head), V in directions.items():
        by_layer[layer][head] = (W_O[layer, head], V.float().cpu())
    if method == "hook":
        mats = {layer: {h: z_edit_matrix(W, V, alpha) for h, (W, V) in heads.items()}
                for layer, heads in by_layer.items()}

        def make(layer):
            def hook(z, hook):
                z = z.clone()
                for h, M in mats[layer].items():
                    z[:, :, h] = z[:, :, h] @ M.to(z.device, z.dtype)
                return z
            return hook

        with model.hooks(fwd_hooks=[(f"blocks.{layer}.attn.hook_z", make(layer)) for layer in sorted(mats)]):
            yield
        return
    saved = []
    try:
        with torch.no_grad():
            for layer, heads in by_layer.items():
                weight, conv = _o_weight(model, layer)
                saved.append((weight, weight.detach().clone()))
                for h, (W_src, V) in heads.items():
                    cols = slice(h * d_head, (h + 1) * d_head)
                    W = (weight[cols, :] if conv else weight[:, cols].T).detach().double().cpu()
                    # W ← M W: the hook's z ← z M moved into the weight (= W (I + (α−1) V Vᵀ) when W_src is W)
                    new = (z_edit_matrix(W_src, V, alpha).double() @ W).to(weight.dtype)
                    if conv:
                        weight[cols, :] = new.to(weight.device)
                    else:
                        weight[:, cols] = new.T.to(weight.device)
        yield
    finally:
        with torch.no_grad():
            for weight, original in saved:
                weight.copy_(original)
