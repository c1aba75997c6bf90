"""Interventions as context managers over TransformerLens hooks (active during forward and generate)."""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from interp.bridge import forward_attention_mask
from interp.errors import UserError

Head = tuple[int, int]
RESCALE_MODES = ("none", "frobenius", "frobenius_batch", "per_token")


def check_heads(model, heads: Sequence[Head]) -> None:
    """Refuse (layer, head) pairs outside the model."""
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    for layer, head in heads:
        if not (0 <= layer < n_layers and 0 <= head < n_heads):
            raise UserError(f"head ({layer}, {head}) is out of range: the model has {n_layers} layers "
                            f"x {n_heads} query heads (0-based)")


def rescale_ablated(z: Float[Tensor, "batch pos head d_head"], out: Float[Tensor, "batch pos head d_head"], mode: str,
            real: Bool[Tensor, "batch pos"] | None = None) -> Tensor:
    """Scale the ablated `out` back to the norm of the original `z` (RefusalCliff's re-scaling).

    "frobenius": one factor per sequence, ‖z_b‖_F / ‖out_b‖_F over its real positions (`real`, None =
    all), so a sequence's numbers do not depend on its batch or padding. "frobenius_batch": the
    reference code's single factor over the whole batch × pos × head × d_head tensor, padding
    included. "per_token": one factor per (sequence, position). "none": `out` unchanged.
    """
    if mode not in RESCALE_MODES:
        raise ValueError(f"rescale must be one of {RESCALE_MODES}")
    if mode == "none":
        return out
    if mode == "frobenius_batch":
        return out * (z.float().norm() / out.float().norm().clamp_min(1e-12)).to(z.dtype)
    if mode == "per_token":
        before = z.float().flatten(2).norm(dim=-1, keepdim=True)
        after = out.float().flatten(2).norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return out * (before / after).unsqueeze(-1).to(z.dtype)
    weight = torch.ones(z.shape[:2], device=z.device) if real is None else real.to(z.device, torch.float32)
    before = (z.float().pow(2).sum((2, 3)) * weight).sum(1).sqrt()
    after = (out.float().pow(2).sum((2, 3)) * weight).sum(1).sqrt().clamp_min(1e-12)
    return out * (before / after).view(-1, 1, 1, 1).to(z.dtype)


def zero_heads(z: Float[Tensor, "batch pos head d_head"], heads: Sequence[int], rescale: str = "none",
               replacement: Float[Tensor, "head d_head"] | None = None,
               real: Bool[Tensor, "batch pos"] | None = None) -> Tensor:
    """Replace the given query heads of `z` (zeros, or `replacement` rows), then rescale (see `rescale_ablated`)."""
    if rescale not in RESCALE_MODES:
        raise ValueError(f"rescale must be one of {RESCALE_MODES}")
    idx = list(heads)
    out = z.clone()
    out[:, :, idx] = 0.0 if replacement is None else replacement[idx].to(z.dtype)
    return rescale_ablated(z, out, rescale, real)



def real_positions(mask: Tensor | None, n_pos: int) -> Tensor | None:
    """The real (non-pad) positions of activations with `n_pos` positions, from a forward's 2-D mask."""
    return None if mask is None else mask[:, -n_pos:].bool()


@contextlib.contextmanager
def ablate_heads(model, heads: Sequence[Head], *, rescale: str = "none",
                 means: dict[int, Float[Tensor, "head d_head"]] | None = None) -> Iterator[None]:
    """Ablate query heads at every position via `blocks.L.attn.hook_z` (GQA-correct: per query head).

    `means` (layer → [n_heads, d_head]) turns zero-ablation into mean-ablation. The "frobenius"
    rescale reads the forward's attention mask, so padding never enters a sequence's norm; during
    generation each decode step rescales its new position (the prefill, the whole prompt).
    """
    check_heads(model, heads)
    if rescale not in RESCALE_MODES:
        raise ValueError(f"rescale must be one of {RESCALE_MODES}")
    by_layer: dict[int, list[int]] = defaultdict(list)
    for layer, head in heads:
        by_layer[layer].append(head)

    with forward_attention_mask(model) as state:
        def make_hook(layer: int, idx: list[int]):
            def hook(z, hook):
                replacement = None if means is None else means[layer].to(z.device)
                return zero_heads(z, idx, rescale, replacement, real_positions(state["mask"], z.shape[1]))
            return hook

        fwd = [(f"blocks.{layer}.attn.hook_z", make_hook(layer, idx)) for layer, idx in sorted(by_layer.items())]
        with model.hooks(fwd_hooks=fwd):
            yield


def project_out(x: Float[Tensor, "... d"], direction: Float[Tensor, " d"]) -> Tensor:
    """x − (x·r̂) r̂: remove the component along `direction`."""
    r = (direction / direction.norm()).to(x.dtype).to(x.device)
    return x - (x @ r).unsqueeze(-1) * r


@contextlib.contextmanager
def ablate_direction(
    model, direction: Float[Tensor, " d_model"], hook_names: Sequence[str] | None = None
) -> Iterator[None]:
    """Directional ablation (Arditi et al.): project `direction` out of the given residual hooks.

    Default: every block's resid_pre, attention output and MLP output, at all positions.
    """
    if hook_names is None:
        hook_names = [f"blocks.{layer}.{h}" for layer in range(model.cfg.n_layers)
                      for h in ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")]
    fwd = [(name, lambda x, hook: project_out(x, direction)) for name in hook_names]
    with model.hooks(fwd_hooks=fwd):
        yield


@contextlib.contextmanager
def add_direction(model, direction: Float[Tensor, " d_model"], hook_name: str, alpha: float = 1.0) -> Iterator[None]:
    """Activation addition: x ← x + alpha · direction at `hook_name`, all positions."""
    with model.hooks(fwd_hooks=[(hook_name, lambda x, hook: x + alpha * direction.to(x.dtype).to(x.device))]):
        yield


@torch.no_grad()
def head_means(model, seqs, layers: Sequence[int], batch_size: int = 8) -> dict[int, Tensor]:
    """Mean of each query head's z over all real tokens of `seqs` (for mean-ablation), streamed."""
    from interp.batching import padded_batches

    sums = {layer: 0.0 for layer in layers}
    count = 0
    for _, tokens, mask in padded_batches(model, seqs, batch_size, desc="head means", progress=False):
        keep = mask.bool()

        def accumulate(z, hook):
            layer = int(hook.name.split(".")[1])
            sums[layer] = sums[layer] + z[keep.to(z.device)].float().sum(0)

        model.run_with_hooks(tokens, attention_mask=mask, return_type=None,
                             fwd_hooks=[(f"blocks.{layer}.attn.hook_z", accumulate) for layer in layers],
                             stop_at_layer=max(layers) + 1 if max(layers) + 1 < model.cfg.n_layers else None)
        count += int(keep.sum())
    return {layer: (sums[layer] / count).cpu() for layer in layers}
