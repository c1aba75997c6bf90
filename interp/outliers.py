"""Activation outliers, massive activations and weight outliers (Sun et al. 2024; An et al. 2025), streamed per batch.

Public functions:

- `m_act(layer_max)` → float: M-Act of Qiu et al. 2025, the mean over layers of the per-layer max |h|
  (`layer_max`: one value per layer, e.g. `ResidualStats.layer_max()`).
- `top_k_abs(h, k=3)` → (values, dims): the k largest |h| of a `[pos, d]` tensor and the dims they sit in.
- `massive_hits(h, abs_thr=100, ratio=1000)` → `[n, 2]` (position, dim) of Sun's massive activations:
  |h| > abs_thr and |h| ≥ ratio × median |h| (median over every entry of the sequence).
- `outlier_tokens(h, tau=1000)` → positions whose max |h| > tau × mean |h| (An et al.'s token rule).
- `token_type(position, token)` → "initial" | "strong_delimiter" | "weak_semantic" | "other" (An et al.'s classes).
- `ResidualStats(n_layers, ...)`: streaming accumulator over `blocks.L.hook_resid_post` (and the MLP
  down-projection input `blocks.L.mlp.out.hook_in` when `down=True`): `hooks()`, `begin_batch(indices, tokens, mask)`,
  then `profile()` (rows `{layer, max_abs, top1, top2, top3, median_abs, mean_abs, top_dims}`),
  `down_profile()`, `hits` (Sun's rule, `{layer, sequence, position, token_id, dim, value, median}`, the first
  `max_hits` listed, `n_hits_dropped` the rest; `n_hits` and `hit_counts[(layer, dim)]` count them all;
  `hit_positions[(layer, first, token_id)]` counts every position with at least one hit, `first` = position 0),
  `token_hits` (An's rule), `outlier_dims(min_share=0.5)`, `layer_max()`, `dim_max` (`[layer, d_model]`).
- `residual_stats(model, seqs, ...)` → `ResidualStats`: runs the loop with SDPA attention (no patterns).
- `down_projection(model, layer)` → `[d_model, d_mlp]` weight of the MLP down-projection (HF layout),
  UserError when the model has none; `is_moe(model)`.
- `weight_outliers(model, ratio=500)` → rows per layer and linear module: max and median of the per-column
  max/mean ratio of |W| (down-projection first), top columns, `outlier` flag.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from interp.batching import padded_batches
from interp.bridge import sdpa_attention, stopped_at
from interp.errors import UserError

MASSIVE_ABS, MASSIVE_RATIO = 100.0, 1000.0  # Sun et al. 2024
TOKEN_TAU = 1000.0  # An et al. 2025, token rule on the mean |h|
WEIGHT_RATIO = 500.0  # threshold on the column max/mean ratio of |W| (An et al. give none; our choice)
_LAYER = re.compile(r"^blocks\.(\d+)\.")

STRONG_DELIMITERS = (frozenset(". \\n , ; : ! ? - -- --- ' \" ( ) [ ] { } / \\ | * & ^ % $ # @ ~ `".split())
                     | {"\n", "<0x0A>"})
WEAK_SEMANTIC = frozenset(["", "▁", "Ġ", "and", "from", "of", "the", "a", "an", "in", "on", "at", "for", "with", "is",
                           "was", "are", "were", "to", "by", "as", "that", "this", "it", "but", "or", "if", "not"]
                          + [str(i) for i in range(1, 10)])


def m_act(layer_max: Sequence[float] | Tensor) -> float:
    """M-Act (Qiu et al. 2025): mean over layers of the largest |h| in that layer's output."""
    values = torch.as_tensor(layer_max, dtype=torch.float64)
    return float(values.mean()) if values.numel() else float("nan")


def top_k_abs(h: Float[Tensor, "pos d"], k: int = 3) -> tuple[Tensor, Tensor]:
    """The k largest |h| over (pos, d), largest first, and the dims where they sit."""
    flat = h.abs().flatten()
    vals, idx = flat.topk(min(k, flat.numel()))
    return vals, idx % h.shape[-1]


def massive_hits(h: Float[Tensor, "pos d"], abs_thr: float = MASSIVE_ABS, ratio: float = MASSIVE_RATIO) -> Tensor:
    """(position, dim) pairs where |h| > abs_thr and |h| ≥ ratio × median of |h| over the whole sequence."""
    a = h.abs().float()
    return ((a > abs_thr) & (a >= ratio * a.median())).nonzero()


def outlier_tokens(h: Float[Tensor, "pos d"], tau: float = TOKEN_TAU) -> Tensor:
    """Positions whose max |h| over dims exceeds tau × the mean |h| of the sequence (An et al.'s token rule)."""
    a = h.abs().float()
    return (a.amax(-1) > tau * a.mean()).nonzero()[:, 0]


def token_type(position: int, token: str) -> str:
    """An et al.'s token classes, on the token with surrounding whitespace stripped."""
    if position == 0:
        return "initial"
    stripped = token.strip()
    if token and not stripped and "\n" in token:
        return "strong_delimiter"
    if stripped in STRONG_DELIMITERS:
        return "strong_delimiter"
    if stripped.lower() in WEAK_SEMANTIC:
        return "weak_semantic"
    return "other"


class ResidualStats:
    """Streaming accumulator of residual (and down-projection input) magnitude statistics per layer."""

    def __init__(self, n_layers: int, *, down: bool = True, abs_thr: float = MASSIVE_ABS, ratio: float = MASSIVE_RATIO,
                 tau: float = TOKEN_TAU, max_hits: int = 5000):
        self.n_layers, self.down = n_layers, down
        self.abs_thr, self.ratio, self.tau, self.max_hits = abs_thr, ratio, tau, max_hits
        # top1..3, median, mean, top1²
        self.sums = {kind: torch.zeros(n_layers, 6, dtype=torch.float64) for kind in ("resid", "down")}
        self.global_max = {kind: torch.zeros(n_layers, dtype=torch.float64) for kind in ("resid", "down")}
        self.dim_max: dict[str, Tensor | None] = {"resid": None, "down": None}  # [layer, width] max |x|
        # [layer, width, 3]: sequence, position, sign
        self.dim_where: dict[str, Tensor | None] = {"resid": None, "down": None}
        self.n_seqs = torch.zeros(n_layers, dtype=torch.long)
        self.hits: list[dict] = []
        self.n_hits = 0
        self.hit_dims: dict[int, set] = {}  # layer → dims with a massive activation
        self.hit_counts: Counter = Counter()  # (layer, dim) → number of massive activations (all, not capped)
        self.hit_positions: Counter = Counter()  # (layer, position == 0, token_id) → positions with a hit (all)
        self.token_hits: list[dict] = []
        self.down_hits: list[dict] = []
        self._batch = None

    def hooks(self) -> list[tuple[str, object]]:
        fwd = [(f"blocks.{layer}.hook_resid_post", self._resid_hook) for layer in range(self.n_layers)]
        if self.down:
            fwd += [(f"blocks.{layer}.mlp.out.hook_in", self._down_hook) for layer in range(self.n_layers)]
        return fwd

    def begin_batch(self, indices: Sequence[int], tokens: Tensor, mask: Tensor | None) -> None:
        self._batch = (list(indices), tokens, mask)

    def _resid_hook(self, x, hook):
        self.update(int(_LAYER.match(hook.name).group(1)), x.detach(), "resid")

    def _down_hook(self, x, hook):
        self.update(int(_LAYER.match(hook.name).group(1)), x.detach(), "down")

    @torch.no_grad()
    def update(self, layer: int, x: Float[Tensor, "batch pos width"], kind: str = "resid") -> None:
        """Add one layer's activations (`resid`: block output; `down`: MLP down-projection input) for the batch."""
        indices, tokens, mask = self._batch
        width = x.shape[1]
        if self.dim_max[kind] is None:
            self.dim_max[kind] = torch.zeros(self.n_layers, x.shape[-1], dtype=torch.float64)
            self.dim_where[kind] = torch.zeros(self.n_layers, x.shape[-1], 3, dtype=torch.long)
        for row, seq in enumerate(indices):
            n = int(mask[row].sum()) if mask is not None else width
            h = x[row, width - n:].float()
            a = h.abs()
            vals, _ = top_k_abs(h, 3)
            vals = torch.cat([vals, vals.new_zeros(3 - len(vals))])
            median, mean = a.median(), a.mean()
            row_stats = torch.stack([vals[0], vals[1], vals[2], median, mean, vals[0] ** 2])
            self.sums[kind][layer] += row_stats.double().cpu()
            self.global_max[kind][layer] = max(self.global_max[kind][layer], float(vals[0]))
            per_dim, pos = a.max(0)
            better = per_dim.double().cpu() > self.dim_max[kind][layer]
            if better.any():
                self.dim_max[kind][layer][better] = per_dim.double().cpu()[better]
                where = self.dim_where[kind][layer]
                dims = better.nonzero()[:, 0]
                where[dims, 0] = seq
                where[dims, 1] = pos.cpu()[dims]
                where[dims, 2] = torch.sign(h[pos, torch.arange(h.shape[-1], device=h.device)]).long().cpu()[dims]
            toks = tokens[row, width - n:].tolist()
            hits = massive_hits(h, self.abs_thr, self.ratio).tolist()
            target = self.hits if kind == "resid" else self.down_hits
            if kind == "resid":
                self.n_hits += len(hits)
                self.hit_dims.setdefault(layer, set()).update(d for _, d in hits)
                self.hit_counts.update((layer, d) for _, d in hits)
                self.hit_positions.update((layer, t == 0, toks[t]) for t in sorted({t for t, _ in hits}))
                for t in outlier_tokens(h, self.tau).tolist():
                    self.token_hits.append({"layer": layer, "sequence": seq, "position": t, "token_id": toks[t],
                                            "value": float(a[t].max()), "mean": float(mean)})
            for t, d in hits:
                if len(target) < self.max_hits:
                    target.append({"layer": layer, "sequence": seq, "position": t, "token_id": toks[t], "dim": d,
                                   "value": float(h[t, d]), "median": float(median)})
        if kind == "resid":
            self.n_seqs[layer] += len(indices)

    @property
    def n_hits_dropped(self) -> int:
        """Massive activations counted but not listed in `hits` (beyond `max_hits`)."""
        return self.n_hits - len(self.hits)

    def _rows(self, kind: str) -> list[dict]:
        rows = []
        for layer in range(self.n_layers):
            n = max(int(self.n_seqs[layer]), 1)
            s = self.sums[kind][layer] / n
            sd = float(max(s[5] - s[0] ** 2, 0.0) ** 0.5)
            top = self.dim_max[kind][layer].topk(min(3, self.dim_max[kind].shape[-1])).indices.tolist() \
                if self.dim_max[kind] is not None else []
            rows.append({"layer": layer, "max_abs": float(self.global_max[kind][layer]), "top1": float(s[0]),
                         "top1_sd": sd, "top2": float(s[1]), "top3": float(s[2]), "median_abs": float(s[3]),
                         "mean_abs": float(s[4]), "top_dims": top})
        return rows

    def profile(self) -> list[dict]:
        """Per block: `max_abs` (largest |h| in the set), `top1..3` and `median_abs`, `mean_abs` (per-sequence
        values averaged over sequences, Sun's profile), `top1_sd`, `top_dims` (the 3 dims with the largest |h|)."""
        return self._rows("resid")

    def down_profile(self) -> list[dict]:
        """The same for the MLP down-projection input (`top_dims` are neurons)."""
        return self._rows("down") if self.down else []

    def layer_max(self) -> Tensor:
        """Largest |h| per layer over the set (M-Act's per-layer term)."""
        return self.global_max["resid"].clone()

    def outlier_dims(self, min_share: float = 0.5) -> list[dict]:
        """Dims with a massive activation in at least `min_share` of the blocks: rows {dim, n_blocks, layers,
        max_abs}."""
        count: dict[int, list[int]] = {}
        for layer, dims in self.hit_dims.items():
            for d in dims:
                count.setdefault(d, []).append(layer)
        need = min_share * self.n_layers
        return [{"dim": d, "n_blocks": len(ls), "layers": sorted(ls),
                 "max_abs": float(self.dim_max["resid"][:, d].max())}
                for d, ls in sorted(count.items(), key=lambda kv: -len(kv[1])) if len(ls) >= need]


@torch.no_grad()
def residual_stats(model, seqs: Sequence[Sequence[int]], *, batch_size: int = 8, down: bool = True,
                   abs_thr: float = MASSIVE_ABS, ratio: float = MASSIVE_RATIO, tau: float = TOKEN_TAU,
                   fwd_hooks: Sequence = (), progress: bool = True) -> ResidualStats:
    """Stream `seqs` through the model (SDPA attention, no patterns) and return the filled `ResidualStats`."""
    stats = ResidualStats(model.cfg.n_layers, down=down, abs_thr=abs_thr, ratio=ratio, tau=tau)
    hooks = list(fwd_hooks) + stats.hooks()
    with sdpa_attention(model, [n for n, _ in hooks]):
        for idx, tokens, mask in padded_batches(model, seqs, batch_size, desc="residual", progress=progress):
            stats.begin_batch(idx, tokens, mask)
            with stopped_at(model, model.cfg.n_layers) as stop_at_layer:
                model.run_with_hooks(tokens, attention_mask=mask, return_type=None, stop_at_layer=stop_at_layer,
                                     fwd_hooks=hooks)
    return stats


def is_moe(model) -> bool:
    """True when the blocks' MLP is a mixture of experts (no single down-projection)."""
    mlp = getattr(model.blocks[0], "mlp", None)
    return mlp is not None and any("expert" in name for name, _ in mlp.named_modules())


def down_projection(model, layer: int) -> Float[Tensor, "d_model d_mlp"]:
    """The MLP down-projection weight of block `layer` as `[d_model, d_mlp]` (column j = neuron j), float32, CPU."""
    mlp = getattr(model.blocks[layer], "mlp", None)
    out = getattr(mlp, "out", None) if mlp is not None else None
    if out is None or is_moe(model):
        raise UserError("this model has no single MLP down-projection (blocks.L.mlp.out); "
                        "the outlier analysis needs a dense MLP")
    module = getattr(out, "original_component", out)
    w = module.weight.detach().float().cpu()
    d_model = model.cfg.d_model
    return w if w.shape[0] == d_model else w.T  # GPT-2's Conv1D stores [in, out]


def check_down_projection(model) -> None:
    """UserError unless every block has an MLP down-projection with the `mlp.out.hook_in` hook."""
    if is_moe(model):
        return
    missing = [layer for layer in range(model.cfg.n_layers) if f"blocks.{layer}.mlp.out.hook_in" not in model.hook_dict]
    if missing:
        raise UserError(f"block {missing[0]} has no MLP down-projection (blocks.{missing[0]}.mlp.out); "
                        "the outlier analysis needs models with a dense MLP")


def column_ratios(w: Float[Tensor, "out inp"]) -> Float[Tensor, " inp"]:
    """Per input column j: max_i |W[i, j]| / (mean_i |W[i, j]| + 1e-8) (An et al.)."""
    a = w.abs().float()
    return a.amax(0) / (a.mean(0) + 1e-8)


def _linear_modules(model, layer: int) -> list[tuple[str, Tensor]]:
    """(name, weight as [out, in]) of the block's linear layers, the down-projection first."""
    found = [("down", down_projection(model, layer))]
    seen = {id(getattr(model.blocks[layer].mlp.out, "original_component", None))}
    hf_layer = getattr(model.blocks[layer], "original_component", None)
    if hf_layer is None:
        return found
    from transformers.pytorch_utils import Conv1D

    for name, mod in hf_layer.named_modules():
        if id(mod) in seen or not isinstance(mod, torch.nn.Linear | Conv1D):
            continue
        w = mod.weight.detach().float()
        label = [part for part in name.split(".") if part != "_original_component"][-1]
        found.append((label, w.T if isinstance(mod, Conv1D) else w))
    return found


def weight_outliers(model, ratio: float = WEIGHT_RATIO, top: int = 3) -> list[dict]:
    """Rows {layer, module, max_ratio, median_ratio, top_columns, row_max_ratio, outlier} for every linear
    module of every block, the down-projection first. `max_ratio` is the largest per-column max/mean of |W|;
    `row_max_ratio` the same over rows (An et al.'s module comparison takes the larger of the two)."""
    rows = []
    for layer in range(model.cfg.n_layers):
        for name, w in _linear_modules(model, layer):
            r = column_ratios(w)
            rr = column_ratios(w.T)
            rows.append({"layer": layer, "module": name, "max_ratio": float(r.max()), "median_ratio": float(r.median()),
                         "top_columns": r.topk(min(top, r.numel())).indices.tolist(),
                         "row_max_ratio": float(rr.max()), "outlier": bool(max(r.max(), rr.max()) > ratio)})
    return rows
