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
  down-projection input when `down=True`: `down_hooks`, default `blocks.L.mlp.out.hook_in`; MoE layers are fed
  by `residual_stats` through `update(..., "down")`, unrouted entries NaN): `hooks()`, `begin_batch(indices,
  tokens, mask)`, then `profile()` (rows `{layer, max_abs, top1, top2, top3, median_abs, mean_abs, top_dims}`),
  `down_profile()`, `hits` (Sun's rule, `{layer, sequence, position, token_id, dim, value, median}`, the first
  `max_hits` listed, `n_hits_dropped` the rest; `n_hits` and `hit_counts[(layer, dim)]` count them all;
  `hit_positions[(layer, first, token_id)]` counts every position with at least one hit, `first` = position 0),
  `token_hits` (An's rule), `outlier_dims(min_share=0.5)`, `layer_max()`, `dim_max` (`[layer, d_model]`).
- `residual_stats(model, seqs, ...)` → `ResidualStats`: runs the loop with SDPA attention (no patterns).
- `down_layers(model)` → ({layer: `LayerDown`}, {layer: reason skipped}): the down-projection(s) of each layer. A
  dense layer has one; an MoE layer one per routed expert plus its shared expert's, read as one layer-wide neuron
  axis: routed expert e's neuron j is neuron e·F + j, the shared expert's follow (`LayerDown.label`). Its
  down-projection input is each expert's act(gate)·up on the tokens routed to it (NaN elsewhere: statistics are
  over routed entries), the shared expert's on every token.
- `down_projection(model, layer, expert=None)` → `[d_model, width]` weight of a dense MLP down-projection (HF
  layout), of routed expert `expert` or of the shared expert (`expert="shared"`) of an MoE layer; UserError when
  there is none; `is_moe(model)` (any layer MoE; per layer: `interp.mlp.mlp_kinds`).
- `weight_outliers(model, ratio=500)` → rows per layer and linear module: max and median of the per-column
  max/mean ratio of |W| (down-projections first, one row per expert in an MoE layer, `expert` set), top columns,
  `outlier` flag.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from interp import distributed
from interp.batching import run_batches
from interp.bridge import sdpa_attention, stopped_at
from interp.errors import UserError
from interp.mlp import (
    DenseMLP,
    RoutedExperts,
    dense_mlp,
    mlp_kind,
    routed_down_inputs,
    routed_experts,
    shared_expert,
    unreadable_reason,
)

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
                 tau: float = TOKEN_TAU, max_hits: int = 5000, down_hooks: dict[int, str] | None = None,
                 sparse_layers: Sequence[int] = ()):
        self.n_layers, self.down = n_layers, down
        # layer → bridge hook of its dense down-projection input; MoE layers (`sparse_layers`, NaN where a token
        # is not routed to an expert) are fed through `update` by `residual_stats`
        self.down_hooks = ({layer: f"blocks.{layer}.mlp.out.hook_in" for layer in range(n_layers)}
                           if down_hooks is None else dict(down_hooks))
        self.sparse_layers = set(sparse_layers)
        self.down_seen: set[int] = set()
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

    def state(self) -> dict:
        """The accumulated statistics (every attribute but the batch in progress): what `interp.stages` stores."""
        return {k: v for k, v in vars(self).items() if k != "_batch"}

    @classmethod
    def from_state(cls, state: dict) -> ResidualStats:
        """The statistics `state()` returned."""
        stats = cls.__new__(cls)
        vars(stats).update(state, _batch=None)
        return stats

    def hooks(self) -> list[tuple[str, object]]:
        fwd = [(f"blocks.{layer}.hook_resid_post", self._resid_hook) for layer in range(self.n_layers)]
        if self.down:
            fwd += [(name, self._down_hook) for name in self.down_hooks.values()]
        return fwd

    def begin_batch(self, indices: Sequence[int], tokens: Tensor, mask: Tensor | None) -> None:
        self._batch = (list(indices), tokens, mask)

    def _resid_hook(self, x, hook):
        self.update(int(_LAYER.match(hook.name).group(1)), x.detach(), "resid")

    def _down_hook(self, x, hook):
        self.update(int(_LAYER.match(hook.name).group(1)), x.detach(), "down")

    def _widen(self, kind: str, width: int) -> None:
        """Make room for `width` neurons (an MoE layer's neuron axis is wider than a dense layer's)."""
        if self.dim_max[kind] is None:
            self.dim_max[kind] = torch.zeros(self.n_layers, width, dtype=torch.float64)
            self.dim_where[kind] = torch.zeros(self.n_layers, width, 3, dtype=torch.long)
        elif self.dim_max[kind].shape[1] < width:
            extra = width - self.dim_max[kind].shape[1]
            self.dim_max[kind] = torch.nn.functional.pad(self.dim_max[kind], (0, extra))
            self.dim_where[kind] = torch.nn.functional.pad(self.dim_where[kind], (0, 0, 0, extra))

    @torch.no_grad()
    def update(self, layer: int, x: Float[Tensor, "batch pos width"], kind: str = "resid") -> None:
        """Add one layer's activations (`resid`: block output; `down`: MLP down-projection input) for the batch.
        On an MoE layer (`sparse_layers`, kind "down") NaN marks entries of experts a token is not routed to: the
        statistics are over the routed entries."""
        indices, tokens, mask = self._batch
        width = x.shape[1]
        self._widen(kind, x.shape[-1])
        sparse = kind == "down" and layer in self.sparse_layers
        if kind == "down":
            self.down_seen.add(layer)
        for row, seq in enumerate(indices):
            n = int(mask[row].sum()) if mask is not None else width
            h = x[row, width - n:].float()
            a = h.abs()
            if sparse:
                real = ~torch.isnan(h)
                median, mean = a[real].median(), a[real].mean()
                h, a = h.nan_to_num(0.0), a.nan_to_num(0.0)
            else:
                median, mean = a.median(), a.mean()
            vals = a.flatten().topk(min(3, a.numel())).values  # `top_k_abs`, on the |h| already computed
            vals = torch.cat([vals, vals.new_zeros(3 - len(vals))])
            row_stats = torch.stack([vals[0], vals[1], vals[2], median, mean, vals[0] ** 2])
            self.sums[kind][layer] += row_stats.double().cpu()
            self.global_max[kind][layer] = max(self.global_max[kind][layer], float(vals[0]))
            per_dim, pos = a.max(0)
            better = per_dim.double().cpu() > self.dim_max[kind][layer, :h.shape[-1]]
            if better.any():
                self.dim_max[kind][layer, :h.shape[-1]][better] = per_dim.double().cpu()[better]
                where = self.dim_where[kind][layer]
                dims = better.nonzero()[:, 0]
                where[dims, 0] = seq
                where[dims, 1] = pos.cpu()[dims]
                where[dims, 2] = torch.sign(h[pos, torch.arange(h.shape[-1], device=h.device)]).long().cpu()[dims]
            toks = tokens[row, width - n:].tolist()
            # Sun's rule (`massive_hits`) and An's token rule (`outlier_tokens`) on the |h|, median and mean above:
            # one |h| copy and one median per sequence and layer
            hits = ((a > self.abs_thr) & (a >= self.ratio * median)).nonzero().tolist()
            target = self.hits if kind == "resid" else self.down_hits
            if kind == "resid":
                self.n_hits += len(hits)
                self.hit_dims.setdefault(layer, set()).update(d for _, d in hits)
                self.hit_counts.update((layer, d) for _, d in hits)
                self.hit_positions.update((layer, t == 0, toks[t]) for t in sorted({t for t, _ in hits}))
                for t in (a.amax(-1) > self.tau * mean).nonzero()[:, 0].tolist():
                    self.token_hits.append({"layer": layer, "sequence": seq, "position": t, "token_id": toks[t],
                                            "value": float(a[t].max()), "mean": float(mean)})
            for t, d in hits:
                if len(target) < self.max_hits:
                    target.append({"layer": layer, "sequence": seq, "position": t, "token_id": toks[t], "dim": d,
                                   "value": float(h[t, d]), "median": float(median)})
        if kind == "resid":
            self.n_seqs[layer] += len(indices)

    def merge(self, other: ResidualStats, order: Sequence[int]) -> ResidualStats:
        """Fold in `other`: the same statistics over other batches of the run (`interp.distributed`: another rank's
        shard). Sums, counts and maxima combine; `order[i]`, the place of sequence i's batch in the run, keeps the
        one-process order of the listed hits (and their `max_hits` cap) and, on ties, the sequence of a dim's
        maximum that one process met first."""
        for kind in ("resid", "down"):
            self.sums[kind] += other.sums[kind]
            self.global_max[kind] = torch.maximum(self.global_max[kind], other.global_max[kind])
            if other.dim_max[kind] is None:
                continue
            self._widen(kind, other.dim_max[kind].shape[1])
            mine, theirs = self.dim_max[kind], other.dim_max[kind]
            where, other_where = self.dim_where[kind], other.dim_where[kind]
            width = theirs.shape[1]
            seq_order = torch.as_tensor(order)
            tie = (theirs == mine[:, :width]) & (theirs > 0) & \
                (seq_order[other_where[..., 0]] < seq_order[where[:, :width, 0]])
            better = (theirs > mine[:, :width]) | tie
            mine[:, :width][better] = theirs[better]
            where[:, :width][better] = other_where[better]
        self.down_seen |= other.down_seen
        self.n_seqs += other.n_seqs
        self.n_hits += other.n_hits
        for layer, dims in other.hit_dims.items():
            self.hit_dims.setdefault(layer, set()).update(dims)
        self.hit_counts.update(other.hit_counts)
        self.hit_positions.update(other.hit_positions)
        for name, cap in (("hits", self.max_hits), ("down_hits", self.max_hits), ("token_hits", None)):
            rows = sorted(getattr(self, name) + getattr(other, name), key=lambda r: order[r["sequence"]])
            setattr(self, name, rows[:cap])
        self._batch = None
        return self

    def renumbered(self, idx: Sequence[int]) -> ResidualStats:
        """These statistics of the sequences `idx` (numbered 0.. in them), naming the run's sequence numbers."""
        for rows in (self.hits, self.down_hits, self.token_hits):
            for r in rows:
                r["sequence"] = idx[r["sequence"]]
        for kind, where in self.dim_where.items():
            if where is not None and idx:
                where[..., 0] = torch.as_tensor(list(idx))[where[..., 0]]
        self._batch = None
        return self

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
        """The same for the MLP down-projection input (`top_dims` are neurons), for the layers read."""
        return [r for r in self._rows("down") if r["layer"] in self.down_seen] if self.down else []

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


# ---------------------------------------------------------------- down-projections per layer (dense and MoE)

@dataclass
class LayerDown:
    """The down-projection(s) of one layer: a dense MLP's, or an MoE layer's routed experts' and shared expert's,
    on one neuron axis (routed expert e's neuron j at e·F + j, then the shared expert's neurons)."""

    layer: int
    dense: DenseMLP | None = None
    routed: RoutedExperts | None = None
    shared: DenseMLP | None = None

    @property
    def kind(self) -> str:
        return "dense" if self.dense is not None else "moe"

    @property
    def routed_width(self) -> int:
        return self.routed.n_experts * self.routed.width if self.routed is not None else 0

    @property
    def width(self) -> int:
        if self.dense is not None:
            return self.dense.width
        return self.routed_width + (self.shared.width if self.shared is not None else 0)

    def label(self, neuron: int) -> tuple[int | str | None, int]:
        """(expert, neuron within it) of a layer-axis neuron: expert None on a dense layer, "shared" for the
        shared expert's."""
        if self.dense is not None:
            return None, neuron
        if neuron < self.routed_width:
            return neuron // self.routed.width, neuron % self.routed.width
        return "shared", neuron - self.routed_width

    def parts(self, d_model: int) -> list[tuple[int | str | None, Tensor]]:
        """(expert, `[d_model, F]` down-projection weight) of every part, in neuron-axis order."""
        if self.dense is not None:
            return [(None, self.dense.down_weight(d_model))]
        found: list[tuple[int | str | None, Tensor]] = []
        if self.routed is not None:
            found += list(enumerate(self.routed.down_weights()))
        if self.shared is not None:
            found.append(("shared", self.shared.down_weight(d_model)))
        return found

    def weight(self, d_model: int) -> Float[Tensor, "d_model width"]:
        """The whole layer's down-projection on the neuron axis, `[d_model, width]`."""
        return torch.cat([w for _, w in self.parts(d_model)], dim=1)

    def column(self, neuron: int, d_model: int) -> Float[Tensor, " d_model"]:
        expert, j = self.label(neuron)
        if expert is None:
            return self.dense.down_weight(d_model)[:, j]
        if expert == "shared":
            return self.shared.down_weight(d_model)[:, j]
        return self.routed.down_weight(expert)[:, j]


def down_layers(model) -> tuple[dict[int, LayerDown], dict[int, str]]:
    """({layer: its down-projection(s)}, {layer: why it has none interp reads}) for every layer."""
    found, skipped = {}, {}
    for layer in range(model.cfg.n_layers):
        kind = mlp_kind(model, layer)
        if kind == "dense":
            dense = dense_mlp(model, layer)
            if dense is not None and dense.down_hook in model.hook_dict:
                found[layer] = LayerDown(layer, dense=dense)
            else:
                skipped[layer] = f"no MLP down-projection interp reads (blocks.{layer}.mlp.out)"
        elif kind == "moe":
            routed = routed_experts(model, layer)
            if routed is None:
                skipped[layer] = unreadable_reason(model, layer) or "mixture of experts interp does not read"
            else:
                found[layer] = LayerDown(layer, routed=routed, shared=shared_expert(model, layer))
        else:
            skipped[layer] = "no MLP in this block"
    return found, skipped


class _MoEDownInputs:
    """Assembles an MoE layer's down-projection input `[batch, pos, width]` during a forward (routed experts through
    `interp.mlp.routed_down_inputs`, the shared expert through its `hook_post`; NaN where a token is not routed to
    an expert) and hands it to `ResidualStats.update` when the MoE block's output hook fires."""

    def __init__(self, layers: dict[int, LayerDown], stats: ResidualStats):
        self.layers, self.stats = layers, stats
        self.buf: dict[int, Tensor] = {}
        self.shape: dict[int, tuple[int, int]] = {}

    def hooks(self) -> list[tuple[str, object]]:
        fwd = []
        for layer, parts in self.layers.items():
            fwd += [(f"blocks.{layer}.mlp.hook_in", self._begin), (f"blocks.{layer}.mlp.hook_out", self._flush)]
            if parts.shared is not None:
                fwd.append((parts.shared.key_hook, self._shared))
        return fwd

    def _begin(self, x, hook):
        layer = int(_LAYER.match(hook.name).group(1))
        b, pos = x.shape[:2]
        self.shape[layer] = (b, pos)
        self.buf[layer] = torch.full((b * pos, self.layers[layer].width), float("nan"), device=x.device)

    def routed(self, layer: int, tokens: Tensor, expert: int, x: Tensor) -> None:
        if layer in self.buf:
            w = self.layers[layer].routed.width
            self.buf[layer][tokens, expert * w:(expert + 1) * w] = x.float()

    def _shared(self, x, hook):
        layer = int(_LAYER.match(hook.name).group(1))
        if layer in self.buf:
            self.buf[layer][:, self.layers[layer].routed_width:] = x.detach().float().reshape(-1, x.shape[-1])

    def _flush(self, x, hook):
        layer = int(_LAYER.match(hook.name).group(1))
        buf = self.buf.pop(layer, None)
        if buf is not None:
            self.stats.update(layer, buf.view(*self.shape[layer], -1), "down")

    @contextlib.contextmanager
    def active(self, model) -> Iterator[None]:
        with routed_down_inputs(model, list(self.layers), self.routed):
            yield


@torch.no_grad()
def residual_stats(model, seqs: Sequence[Sequence[int]], *, batch_size: int = 8, down: bool = True,
                   abs_thr: float = MASSIVE_ABS, ratio: float = MASSIVE_RATIO, tau: float = TOKEN_TAU,
                   fwd_hooks: Sequence = (), progress: bool = True) -> ResidualStats:
    """Stream `seqs` through the model (SDPA attention, no patterns) and return the filled `ResidualStats`. With
    `down`, the down-projection input of every layer `down_layers` reads (MoE layers: per expert, on routed tokens).
    Under torchrun each rank runs whole batches of its shard and the ranks' statistics are merged
    (`ResidualStats.merge`; every rank gets the whole set's)."""
    if distributed.sharding():
        lengths = [len(s) for s in seqs]
        order = distributed.batch_order(lengths, batch_size)
        return distributed.map_stream(
            lambda idx: residual_stats(model, [seqs[i] for i in idx], batch_size=batch_size, down=down, abs_thr=abs_thr,
                                       ratio=ratio, tau=tau, fwd_hooks=fwd_hooks, progress=progress).renumbered(idx),
            len(seqs), lambda a, b: a.merge(b, order), lengths=lengths, batch_size=batch_size)
    layers = down_layers(model)[0] if down else {}
    moe = {layer: d for layer, d in layers.items() if d.kind == "moe"}
    stats = ResidualStats(model.cfg.n_layers, down=down, abs_thr=abs_thr, ratio=ratio, tau=tau,
                          down_hooks={layer: d.dense.down_hook for layer, d in layers.items() if d.kind == "dense"},
                          sparse_layers=list(moe))
    assembler = _MoEDownInputs(moe, stats)
    hooks = list(fwd_hooks) + stats.hooks() + assembler.hooks()

    def step(idx: list[int], tokens: Tensor, mask: Tensor) -> None:
        stats.begin_batch(idx, tokens, mask)
        with stopped_at(model, model.cfg.n_layers) as stop_at_layer:
            model.run_with_hooks(tokens, attention_mask=mask, return_type=None, stop_at_layer=stop_at_layer,
                                 fwd_hooks=hooks)

    with sdpa_attention(model, [n for n, _ in hooks]), assembler.active(model):
        # out of memory: the batch is halved and `stats` restored to before it (no partial update from its hooks;
        # the assembler's buffers are rebuilt per layer and batch)
        run_batches(model, seqs, batch_size, step, desc="residual", progress=progress, state=[stats])
    return stats


def is_moe(model) -> bool:
    """True when any layer's MLP is a mixture of experts (per layer: `interp.mlp.mlp_kinds`)."""
    from interp.mlp import is_moe as any_moe

    return any_moe(model)


def down_projection(model, layer: int, expert: int | str | None = None) -> Float[Tensor, "d_model width"]:
    """The down-projection weight of block `layer` as `[d_model, width]` (column j = neuron j), float32, CPU: the
    dense MLP's; on an MoE layer routed expert `expert`'s, or the shared expert's (`expert="shared"`)."""
    if getattr(model.blocks[layer], "mlp", None) is None:
        raise UserError(f"block {layer} has no MLP down-projection")
    kind = mlp_kind(model, layer)
    d_model = model.cfg.d_model
    if kind == "dense" and expert is None:
        dense = dense_mlp(model, layer)
        if dense is not None:
            return dense.down_weight(d_model)
    elif kind == "moe" and expert is not None:
        if expert == "shared" and shared_expert(model, layer) is not None:
            return shared_expert(model, layer).down_weight(d_model)
        routed = routed_experts(model, layer)
        if routed is not None and isinstance(expert, int) and 0 <= expert < routed.n_experts:
            return routed.down_weight(expert)
    what = "a mixture of experts: pass expert=" if kind == "moe" and expert is None else "no such "
    raise UserError(f"block {layer} has {what}MLP down-projection (expert {expert!r}, layer kind {kind})")


def check_down_projection(model) -> None:
    """UserError when no block has an MLP down-projection interp reads (dense, or MoE experts)."""
    layers, skipped = down_layers(model)
    if not layers:
        first = min(skipped)
        raise UserError(f"block {first} has no MLP down-projection interp reads ({skipped[first]}); "
                        "the outlier analysis needs an MLP")


def column_ratios(w: Float[Tensor, "out inp"]) -> Float[Tensor, " inp"]:
    """Per input column j: max_i |W[i, j]| / (mean_i |W[i, j]| + 1e-8) (An et al.)."""
    a = w.abs().float()
    return a.amax(0) / (a.mean(0) + 1e-8)


def _linear_modules(model, layer: int, down: LayerDown | None = None) -> list[tuple[str, int | str | None, Tensor]]:
    """(name, expert, weight as [out, in]) of the block's linear layers, the down-projection(s) first (one per
    expert on an MoE layer), then the routed experts' fused gate/up projections, then the block's other linears."""
    d_model = model.cfg.d_model
    found: list[tuple[str, int | str | None, Tensor]] = []
    seen = set()
    if down is not None:
        found += [("down", expert, w) for expert, w in down.parts(d_model)]
        for mlp in (down.dense, down.shared):
            if mlp is not None:
                seen.add(id(getattr(mlp.down, "original_component", mlp.down)))
        if down.routed is not None:
            found += [("gate_up", e, down.routed.gate_up_weight(e)) for e in range(down.routed.n_experts)]
    hf_layer = getattr(model.blocks[layer], "original_component", None)
    if hf_layer is None:
        return found
    from transformers.pytorch_utils import Conv1D

    for name, mod in hf_layer.named_modules():
        if id(mod) in seen or not isinstance(mod, torch.nn.Linear | Conv1D):
            continue
        w = mod.weight.detach().float()
        label = [part for part in name.split(".") if part != "_original_component"][-1]
        found.append((label, None, w.T if isinstance(mod, Conv1D) else w))
    return found


def weight_outliers(model, ratio: float = WEIGHT_RATIO, top: int = 3) -> list[dict]:
    """Rows {layer, module, expert, max_ratio, median_ratio, top_columns, row_max_ratio, outlier} for every linear
    module of every block, the down-projection(s) first (`expert`: the routed expert's index or "shared" on an MoE
    layer, None elsewhere). `max_ratio` is the largest per-column max/mean of |W|; `row_max_ratio` the same over rows
    (An et al.'s module comparison takes the larger of the two)."""
    layers = down_layers(model)[0]
    rows = []
    for layer in range(model.cfg.n_layers):
        for name, expert, w in _linear_modules(model, layer, layers.get(layer)):
            r = column_ratios(w)
            rr = column_ratios(w.T)
            rows.append({"layer": layer, "module": name, "expert": expert, "max_ratio": float(r.max()),
                         "median_ratio": float(r.median()), "top_columns": r.topk(min(top, r.numel())).indices.tolist(),
                         "row_max_ratio": float(rr.max()), "outlier": bool(max(r.max(), rr.max()) > ratio)})
    return rows
