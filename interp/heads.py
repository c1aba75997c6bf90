"""How much each attention head contributes to a linear readout (e.g. a probe) at the last token.

Three estimates, all returned as `[n_layers, n_heads]` means over sequences, signed so that a
negative value means the head pushes the readout down:
- `projection_scores`: the head's output at the last position written through W_O, projected on
  the readout direction (RefusalCliff's "Refusal Suppression Head" score); with `fold_norm`, through
  the final norm as well (its gain γ and the last position's 1/rms, the scale held fixed);
- `gradient_scores`: gradient × activation of the readout logit w.r.t. the head's z at all
  positions (attribution patching, first-order estimate of the head's total effect);
- `causal_scores`: minus the change of the readout score when the head is zero-ablated alone
  (one forward per head, heads batched as replicas), with the same rescale an ablation sweep uses.
Heads in blocks after the readout point cannot change it: `readout_heads` counts the blocks before
it, and `ranking` leaves out heads whose score is NaN. Only softmax-attention layers have heads here: on a
hybrid (Qwen3.5, Qwen3-Next) the linear-attention layers' rows are NaN in every score.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from interp import distributed
from interp.batching import input_device, length_batches, pad_left, padded_batches
from interp.bridge import (
    attention_layers,
    checkpointed_blocks,
    head_W_O,
    readout_point,
    sdpa_attention,
    stopped_at,
)
from interp.capture import capture
from interp.interventions import real_positions, rescale_ablated

Readout = tuple[str, Tensor, float]  # (hook name, weight [d_model], bias)


def _z_names(model, n_layers: int | None = None) -> list[str]:
    """`hook_z` of the softmax-attention layers among the first `n_layers` blocks (default: all)."""
    n = model.cfg.n_layers if n_layers is None else n_layers
    return [f"blocks.{layer}.attn.hook_z" for layer in attention_layers(model)[0] if layer < n]


def _layer_of(name: str) -> int:
    return int(name.split(".")[1])


def readout_heads(model, hook_name: str) -> int:
    """How many blocks run before the readout point `hook_name` (only their heads can change it)."""
    stop = readout_point(model, hook_name)[1]
    return model.cfg.n_layers if stop is None else min(stop, model.cfg.n_layers)


def stacked_W_O(model) -> Float[Tensor, "layer head d_head d_model"]:
    """Every layer's per-head W_O (NaN on layers without softmax attention; MLA: `interp.bridge.head_W_O`)."""
    per_layer = {layer: head_W_O(model, layer) for layer in attention_layers(model)[0]}
    like = next(iter(per_layer.values()))
    nan = torch.full_like(like, float("nan"))
    return torch.stack([per_layer.get(layer, nan) for layer in range(model.cfg.n_layers)])


def final_norm_fold(model) -> tuple[Float[Tensor, " d_model"], float, bool]:
    """(effective gain γ, eps, centres) of the final norm: γ = what the norm makes of an all-ones vector times
    its 1/rms (so a (1 + w) parametrisation folds too); `centres` for a LayerNorm (mean removed)."""
    norm = getattr(model.ln_final, "original_component", model.ln_final)
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
    centres = "rms" not in type(norm).__name__.lower()
    param = next(norm.parameters())
    if centres:
        return norm.weight.detach().float().cpu(), eps, True
    ones = torch.ones(1, model.cfg.d_model, dtype=param.dtype, device=param.device)
    with torch.no_grad():
        gain = norm(ones)[0].float().cpu() * math.sqrt(1 + eps)
    return gain, eps, False


def projection_scores(model, seqs: Sequence[Sequence[int]], direction: Float[Tensor, " d_model"], *,
                      n_layers: int | None = None, fold_norm: bool = False, batch_size: int = 8,
                      progress: bool = True) -> Float[Tensor, "layer head"]:
    """Mean over sequences of ⟨W_O[l,h]ᵀ z_{l,h,T}, w⟩ / ‖w‖ at the last token T (RefusalCliff's
    head score). Only the first `n_layers` blocks (default: all) are scored; later rows are NaN.

    `fold_norm` (a readout on the final norm's output): the direction becomes γ ⊙ w / ‖w‖ (centred for a
    LayerNorm) and each sequence's projection is divided by the rms (sd) of its last residual state, i.e. the
    head's share of the readout logit with the norm's scale held fixed (over ‖w‖)."""
    W_O = stacked_W_O(model).float()
    w_hat = (direction / direction.norm()).float()
    resid = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    gain, eps, centres = final_norm_fold(model) if fold_norm else (torch.ones_like(w_hat), 0.0, False)
    w_hat = w_hat * gain
    w_hat = w_hat - w_hat.mean() if centres else w_hat
    per_head_dir = torch.einsum("lhed,d->lhe", W_O, w_hat.to(W_O.device))  # [layer, head, d_head]

    def project(name: str, z: Tensor) -> Tensor:
        if name == resid:
            x = z.float() - z.float().mean(-1, keepdim=True) if centres else z.float()
            return (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        return torch.einsum("he,he->h", z.to(per_head_dir.device), per_head_dir[_layer_of(name)])

    names = _z_names(model, n_layers)
    scores = torch.full(per_head_dir.shape[:2], float("nan"))
    if names:
        out = capture(model, seqs, names + ([resid] if fold_norm else []), positions="last", batch_size=batch_size,
                      progress=progress, reduce=project)
        scale = out[resid].cpu() if fold_norm else 1.0  # [n, 1]
        for n in names:
            scores[_layer_of(n)] = (out[n].cpu() / scale).mean(0)
    return scores


@contextlib.contextmanager
def _frozen(model):
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def gradient_scores(model, seqs: Sequence[Sequence[int]], readout: Readout, *, batch_size: int = 8,
                    checkpoint: bool = True, progress: bool = True) -> Float[Tensor, "layer head"]:
    """Mean over sequences of Σ_pos z_{l,h}·∂logit/∂z_{l,h}, logit = w·act_T + b at the readout hook.

    Memory: the forward stops at the readout; with `checkpoint` (default) each block keeps only its input for
    the backward and recomputes its internals there (`interp.bridge.checkpointed_blocks`): the graph holds
    blocks × batch × T × d_model plus one block's internals, not every block's (same scores)."""
    if distributed.sharding():  # whole batches per rank; the sums over sequences added up
        return _sharded_mean(gradient_scores, model, seqs, readout, batch_size, batch_size=batch_size,
                             checkpoint=checkpoint, progress=progress)
    hook_name, weight, bias = readout
    n_layers = model.cfg.n_layers
    read_hook, stop, transform = readout_point(model, hook_name)
    layers = [_layer_of(name) for name in _z_names(model, stop)]
    total = torch.zeros(n_layers, model.cfg.n_heads)
    total[[layer for layer in range(n_layers) if layer not in attention_layers(model)[0]]] = float("nan")
    for _, tokens, mask in padded_batches(model, seqs, batch_size, desc="grad x act", progress=progress):
        saved: dict[str, Tensor] = {}

        def keeper(name: str):
            def keep(t, hook):
                if not t.requires_grad:
                    t = t.detach().requires_grad_(True)
                saved[name] = t
                return t
            return keep

        names = [f"blocks.{layer}.attn.hook_z" for layer in layers] + [read_hook]
        hooks = [(name, keeper(name)) for name in names]
        recompute = checkpointed_blocks(model) if checkpoint else contextlib.nullcontext()
        # the hooks stay on through the backward: a recomputed block runs them again
        with _frozen(model), torch.enable_grad(), sdpa_attention(model), recompute, model.hooks(fwd_hooks=hooks):
            with stopped_at(model, stop) as stop_at:
                model(tokens, attention_mask=mask, return_type=None, stop_at_layer=stop_at)
            act = transform(saved[read_hook][:, -1:])[:, 0].float()  # on the readout block's device
            logit = act @ weight.float().to(act.device) + bias
            zs = [saved[f"blocks.{layer}.attn.hook_z"] for layer in layers]
            grads = torch.autograd.grad(logit.sum(), zs, allow_unused=True)
        for layer, z, g in zip(layers, zs, grads):
            if g is None:  # the head runs after the readout point (e.g. blocks.L.hook_resid_pre)
                continue
            contrib = (z.detach().float() * g.float()).sum(-1) * mask.to(z.device)[:, :, None]  # [b, pos, head]
            total[layer] += contrib.sum((0, 1)).cpu()
    return total / len(seqs)


@torch.no_grad()
def causal_scores(model, seqs: Sequence[Sequence[int]], readout: Readout, *, rescale: str = "none",
                  batch_size: int = 8, progress: bool = True) -> Float[Tensor, "layer head"]:
    """−(mean change of sigmoid(readout) at the last token) when each head alone is zero-ablated and
    the layer's output rescaled as `interp.interventions.ablate_heads(..., rescale=rescale)` does."""
    if distributed.sharding():  # whole example batches per rank; the sums over sequences added up
        return _sharded_mean(causal_scores, model, seqs, readout, max(1, batch_size // 4), rescale=rescale,
                             batch_size=batch_size, progress=progress)
    hook_name, weight, bias = readout
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    stop = readout_point(model, hook_name)[1]
    heads = [(_layer_of(name), h) for name in _z_names(model, stop) for h in range(n_heads)]
    device = input_device(model)
    w = weight.float()
    effect = torch.zeros(n_layers, n_heads)
    effect[[layer for layer in range(n_layers) if layer not in attention_layers(model)[0]]] = float("nan")
    # a pass holds about `batch_size` sequences: a few examples, each replicated once per head
    example_batches = length_batches([len(s) for s in seqs], max(1, batch_size // 4))
    bar = tqdm(total=len(example_batches) * len(heads), desc="causal scan", disable=not progress, leave=False)
    for idx in example_batches:
        tokens, mask = pad_left([seqs[i] for i in idx], model.tokenizer.pad_token_id)
        b = len(idx)

        def score(t, m, hooks):
            act = _last_readout(model, t, m, hooks, hook_name)
            return torch.sigmoid(act @ w.to(act.device) + bias)

        base = score(tokens.to(device), mask.to(device), [])
        chunk = max(1, batch_size // b)
        for start in range(0, len(heads), chunk):
            group = heads[start:start + chunk]
            k = len(group)
            rep_tokens, rep_mask = tokens.repeat(k, 1).to(device), mask.repeat(k, 1).to(device)
            hooks = []
            for layer in sorted({layer for layer, _ in group}):
                rows = [(j, h) for j, (l2, h) in enumerate(group) if l2 == layer]
                hooks.append((f"blocks.{layer}.attn.hook_z", _replica_zero(rows, b, rescale, rep_mask)))
            ablated = score(rep_tokens, rep_mask, hooks).view(k, b)
            for j, (layer, h) in enumerate(group):
                effect[layer, h] += (ablated[j] - base).sum().cpu()
            bar.update(k)
    bar.close()
    return -effect / len(seqs)


def _sharded_mean(scores, model, seqs: Sequence[Sequence[int]], readout: Readout, per_batch: int,
                  **kw) -> Float[Tensor, "layer head"]:
    """`scores` (a mean over sequences) under torchrun: each rank scores whole batches (`per_batch` sequences) of
    its shard, the ranks' sums are added and divided by the number of sequences."""
    def total(idx: list[int]) -> Tensor:
        part = scores(model, [seqs[i] for i in idx], readout, **kw)
        return part * len(idx) if idx else torch.zeros_like(part)

    lengths = [len(s) for s in seqs]
    return distributed.map_stream(total, len(seqs), torch.add, lengths=lengths, batch_size=per_batch) / len(seqs)


def _replica_zero(rows: list[tuple[int, int]], b: int, rescale: str, mask: Tensor):
    """Zero head h in replica j (rows j*b .. j*b+b-1), then rescale each replica like the sweep would:
    per sequence without padding, or (frobenius_batch) over the replica's b sequences."""
    def hook(z, hook):
        out = z.clone()
        for j, h in rows:
            out[j * b:(j + 1) * b, :, h] = 0.0
        if rescale == "frobenius_batch":
            parts = [rescale_ablated(z[j * b:(j + 1) * b], out[j * b:(j + 1) * b], rescale)
                     for j in range(z.shape[0] // b)]
            return torch.cat(parts)
        return rescale_ablated(z, out, rescale, real_positions(mask, z.shape[1]))
    return hook


def _last_readout(model, tokens, mask, hooks, hook_name) -> Tensor:
    read_hook, stop, transform = readout_point(model, hook_name)
    saved = {}

    def keep(t, hook):
        saved["x"] = t[:, -1:]

    with sdpa_attention(model), stopped_at(model, stop) as stop_at:
        model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks + [(read_hook, keep)],
                             return_type=None, stop_at_layer=stop_at)
    # the final norm (when it is the readout) runs here, after the stop hook is gone
    return transform(saved["x"])[:, 0].float()


def ranking(scores: Float[Tensor, "layer head"]) -> list[dict]:
    """All heads with a score (NaN = not scored) sorted ascending (most negative = most suppressive first)."""
    n_layers, n_heads = scores.shape
    rows = [{"layer": layer, "head": h, "score": float(scores[layer, h])}
            for layer in range(n_layers) for h in range(n_heads) if not torch.isnan(scores[layer, h])]
    return sorted(rows, key=lambda r: (r["score"], r["layer"], r["head"]))


def rankings_table(rankings: dict[str, list[dict]]) -> pd.DataFrame:
    """One row per head with each method's score and rank, side by side."""
    frames = []
    for method, rows in rankings.items():
        df = pd.DataFrame(rows).assign(rank=lambda d: range(1, len(d) + 1))
        frames.append(df.set_index(["layer", "head"]).add_prefix(f"{method}_"))
    return pd.concat(frames, axis=1).reset_index()
