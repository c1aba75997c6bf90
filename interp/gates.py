"""Gated attention (Qiu et al. 2025, arXiv 2505.06708): gate scores, output sparsity, gate interventions.

Gated models (Qwen3-Next, Qwen3.5, `organism-gated`) multiply each head's softmax-attention output
Y (before `o_proj`) elementwise by a query-dependent gate g = σ(z), z = X W_θ from the same normed
input as Q/K/V: Y' = Y ⊙ σ(z). The bridge exposes the pre-sigmoid logits z as
`blocks.L.attn.hook_q_gate` (`[batch, pos, H·d_head]`, head h at `[h·d:(h+1)·d]`), only on the
full-attention layers; Qwen3-Next / Qwen3.5 linear-attention (Gated DeltaNet) layers have no
softmax pattern and no such hook (`softmax_layers` lists the layers that do).

- `GateStats`: streamed per-(layer, head) gate statistics (mean, share below 0.1, variance across
  tokens, per-element means for the mean intervention) and per-layer histograms (bin 0.05).
- `rebuild_ungated`: Y = pattern @ values (GQA-expanded), the ungated output (`hook_z` is Y' on
  gated models); `SparsityStats`: share of |Y| < θ, |Y'| < θ and |ḡ·Y| < θ per layer.
- `implicit_scale`: s(q) = 1 − attention of query q to the first token (a sink key), per head,
  the quantity An et al. 2025 liken to a gate; defined on any softmax-attention model.
- `PushStats`: per head, the factor by which a gate intervention scales the head's output size (Σ|K(Y)| / Σ|Y'|):
  ≈ 1/ḡ for gates forced to 1. A random-head control matched on it answers "these heads, or a push that size?".
- Interventions (context managers over the gate hook, gated models only): `force_gates_one`,
  `gates_to_mean`, `scale_gates`; `scale_outputs` scales each listed head's gated output by its own factor.

`measure` and `measure_push` stream per layer: hooks collect one layer's pattern, values and gate logits, reduce them
to the statistics above as soon as the layer's last one fires, and drop them (one layer's pattern at a time, never a
cache of every layer).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from interp import distributed
from interp.errors import UserError

BIN_WIDTH = 0.05
N_BINS = 20
LOW_GATE = 0.1
QUERY_BLOCK_BYTES = 64 * 2 ** 20  # bytes of one block of query rows when a pattern is cast to another dtype
Head = tuple[int, int]


def gate_hook(layer: int) -> str:
    return f"blocks.{layer}.attn.hook_q_gate"


def is_gated(model) -> bool:
    """Whether the model has a Qwen3-Next-style output gate exposed as `hook_q_gate`."""
    return bool(getattr(model.cfg, "gated_q_proj", False)) and any(gate_hook(layer) in model.hook_dict
                                                                   for layer in range(model.cfg.n_layers))


def softmax_layers(model) -> list[int]:
    """Layers with softmax attention (a `hook_pattern`); hybrid linear-attention layers are left out."""
    return [layer for layer in range(model.cfg.n_layers) if f"blocks.{layer}.attn.hook_pattern" in model.hook_dict]


def layer_kinds(model) -> list[str]:
    """Per layer: "softmax" or "linear" (no softmax pattern: e.g. Gated DeltaNet)."""
    soft = set(softmax_layers(model))
    return ["softmax" if layer in soft else "linear" for layer in range(model.cfg.n_layers)]


def check_gated(model, what: str = "a gate intervention") -> None:
    if not is_gated(model):
        raise UserError(f"{what} needs a gated-attention model (Qwen3-Next / Qwen3.5 / organism-gated); "
                        "this model has no attention output gate")


def split_heads(z: Float[Tensor, "batch pos hd"], n_heads: int) -> Float[Tensor, "batch pos head d_head"]:
    return z.view(*z.shape[:-1], n_heads, z.shape[-1] // n_heads)


def rebuild_ungated(pattern: Float[Tensor, "batch head q k"],
                    v: Float[Tensor, "batch k kv_head d_head"]) -> Float[Tensor, "batch q head d_head"]:
    """Y = A · V per query head (GQA: query head h reads KV head h // (H / n_kv)), before any gate. A block of
    query rows at a time (`QUERY_BLOCK_BYTES`), so a pattern of another dtype is never copied whole."""
    v = v.repeat_interleave(pattern.shape[1] // v.shape[2], dim=2)
    b, h, width, keys = pattern.shape
    if pattern.dtype == v.dtype:
        return torch.einsum("bhqk,bkhd->bqhd", pattern, v)
    out = torch.empty(b, width, h, v.shape[-1], dtype=v.dtype, device=v.device)
    block = max(1, QUERY_BLOCK_BYTES // max(1, b * h * keys * v.element_size()))
    for q0 in range(0, width, block):
        out[:, q0:q0 + block] = torch.einsum("bhqk,bkhd->bqhd", pattern[:, :, q0:q0 + block].to(v.dtype), v)
    return out


def implicit_scale(pattern: Float[Tensor, "batch head q k"], first: Tensor) -> Float[Tensor, "batch head q"]:
    """s(q) = 1 − A[q, first] per head: the output share that does not go to the first (sink) token.

    `first[b]` is the index of row b's first real token (left padding)."""
    idx = first.view(-1, 1, 1, 1).expand(pattern.shape[0], pattern.shape[1], pattern.shape[2], 1)
    return 1.0 - pattern.gather(-1, idx.to(pattern.device)).squeeze(-1).float()


class GateStats:
    """Streamed gate statistics over real tokens: per (layer, head, dim) sums, below-0.1 counts, histograms."""

    def __init__(self, layers: Sequence[int], n_heads: int, d_head: int):
        self.layers = list(layers)
        shape = (len(self.layers), n_heads, d_head)
        self.sum = torch.zeros(shape, dtype=torch.float64)
        self.sum_sq = torch.zeros(shape, dtype=torch.float64)
        self.low = torch.zeros(shape, dtype=torch.float64)
        self.min = torch.full((len(self.layers),), float("inf"), dtype=torch.float64)
        self.max = torch.full((len(self.layers),), float("-inf"), dtype=torch.float64)
        self.hist = torch.zeros((len(self.layers), N_BINS), dtype=torch.float64)
        self.count = torch.zeros(len(self.layers), dtype=torch.float64)
        self.n_heads = n_heads

    def update(self, layer: int, logits: Float[Tensor, "batch pos hd"], mask: Tensor) -> None:
        """Add the real tokens (`mask` 1) of one batch of gate logits of `layer`."""
        i = self.layers.index(layer)
        g = torch.sigmoid(split_heads(logits, self.n_heads)[mask.bool().to(logits.device)].double()).cpu()  # [N, H, d]
        self.sum[i] += g.sum(0)
        self.sum_sq[i] += (g * g).sum(0)
        self.low[i] += (g < LOW_GATE).double().sum(0)
        self.count[i] += g.shape[0]
        if g.numel():
            self.min[i] = min(self.min[i], g.min())
            self.max[i] = max(self.max[i], g.max())
        bins = (g / BIN_WIDTH).floor().long().clamp(0, N_BINS - 1)
        self.hist[i] += torch.bincount(bins.flatten(), minlength=N_BINS).double()

    def merge(self, other: GateStats) -> GateStats:
        """Fold in `other`, the same statistics over other tokens (`interp.distributed`: another rank's shard)."""
        return distributed.add_fields(self, other, sums=("sum", "sum_sq", "low", "hist", "count"), maxima=("max",),
                                      minima=("min",))

    def element_means(self) -> dict[int, Tensor]:
        """layer → [n_heads, d_head] mean gate score over tokens (the per-head means for `gates_to_mean`)."""
        return {layer: (self.sum[i] / self.count[i]).float() for i, layer in enumerate(self.layers)}

    def head_rows(self) -> list[dict]:
        """Rows {layer, head, mean, frac_below_0_1, var_tokens}; var_tokens = variance of each gate
        element across tokens, averaged over the head's dims (0 for a query-independent gate)."""
        rows = []
        for i, layer in enumerate(self.layers):
            n = self.count[i]
            mean = self.sum[i] / n
            var = (self.sum_sq[i] / n - mean ** 2).clamp_min(0.0)
            for h in range(self.n_heads):
                rows.append({"layer": layer, "head": h, "mean": float(mean[h].mean()),
                             "frac_below_0_1": float(self.low[i, h].sum() / (n * mean.shape[1])),
                             "var_tokens": float(var[h].mean())})
        return rows

    def layer_rows(self) -> list[dict]:
        """Per layer: mean, sd, min, max of all gate scores, variance of the head means across heads,
        and the histogram (shares per 0.05 bin)."""
        rows = []
        for i, layer in enumerate(self.layers):
            n = self.count[i] * self.sum.shape[1] * self.sum.shape[2]
            mean = self.sum[i].sum() / n
            head_means = self.sum[i].sum(-1) / (self.count[i] * self.sum.shape[2])
            rows.append({"layer": layer, "mean": float(mean),
                         "sd": float((self.sum_sq[i].sum() / n - mean ** 2).clamp_min(0.0).sqrt()),
                         "min": float(self.min[i]), "max": float(self.max[i]),
                         "var_heads": float(head_means.var(unbiased=False)),
                         "histogram": (self.hist[i] / self.hist[i].sum()).tolist()})
        return rows


class SparsityStats:
    """Per layer, over real query tokens: share of |Y| < θ (ungated), |Y'| < θ (gated), |ḡ·Y| < θ
    (ungated output scaled by the layer's mean gate: the paper's "mere downscaling" control), and
    mean |Y|, mean |Y'|."""

    def __init__(self, theta: float):
        self.theta = theta
        self.acc: dict[int, dict[str, float]] = {}

    def update(self, layer: int, y: Float[Tensor, "batch q head d"], mask: Tensor,
               gate: Float[Tensor, "batch q head d"] | None = None, mean_gate: float | None = None) -> None:
        keep = mask.bool().to(y.device)  # the mask is on the embedding's device, y on its layer's
        y = y[keep].abs().double()
        a = self.acc.setdefault(layer, {"n": 0.0, "ungated": 0.0, "abs_ungated": 0.0,
                                        "gated": 0.0, "abs_gated": 0.0, "scaled": 0.0})
        a["n"] += y.numel()
        a["ungated"] += float((y < self.theta).sum())
        a["abs_ungated"] += float(y.sum())
        if gate is not None:
            yg = y * gate[keep].double()
            a["gated"] += float((yg < self.theta).sum())
            a["abs_gated"] += float(yg.sum())
        if mean_gate is not None:
            a["scaled"] += float((y * mean_gate < self.theta).sum())

    def merge(self, other: SparsityStats) -> SparsityStats:
        """Fold in `other`, the same counts over other tokens (`interp.distributed`: another rank's shard)."""
        return distributed.add_fields(self, other, sums=("acc",))

    def rows(self, gated: bool) -> list[dict]:
        """Rows {layer, ungated, gated} (shares below θ; gated None on an ungated model)."""
        return [{"layer": layer, "ungated": a["ungated"] / a["n"], "gated": a["gated"] / a["n"] if gated else None}
                for layer, a in sorted(self.acc.items())]

    def detail_rows(self, gated: bool) -> list[dict]:
        out = []
        for layer, a in sorted(self.acc.items()):
            out.append({"layer": layer, "theta": self.theta, "ungated": a["ungated"] / a["n"],
                        "gated": a["gated"] / a["n"] if gated else None,
                        "mean_gate_scaled": a["scaled"] / a["n"] if gated else None,
                        "mean_abs_ungated": a["abs_ungated"] / a["n"],
                        "mean_abs_gated": a["abs_gated"] / a["n"] if gated else None})
        return out


def _by_layer(model, heads: Sequence[Head] | None) -> dict[int, list[int]]:
    """layer → query heads to intervene on (None: every head of every gated layer)."""
    layers = [layer for layer in range(model.cfg.n_layers) if gate_hook(layer) in model.hook_dict]
    if heads is None:
        return {layer: list(range(model.cfg.n_heads)) for layer in layers}
    out: dict[int, list[int]] = {}
    for layer, head in heads:
        if layer not in layers or not 0 <= head < model.cfg.n_heads:
            raise UserError(f"head ({layer}, {head}) has no gate: gated layers are {layers}, "
                            f"heads 0..{model.cfg.n_heads - 1}")
        out.setdefault(layer, []).append(head)
    return out


@contextlib.contextmanager
def _edit_gates(model, heads: Sequence[Head] | None, edit) -> Iterator[None]:
    """Apply `edit(z_heads [.., k, d], layer, idx) -> new logits` to the selected heads' gate logits."""
    check_gated(model)
    n_heads = model.cfg.n_heads

    def make_hook(layer: int, idx: list[int]):
        def hook(z, hook):
            z4 = split_heads(z.clone(), n_heads)
            z4[..., idx, :] = edit(z4[..., idx, :], layer, idx).to(z.dtype)
            return z4.flatten(-2)
        return hook

    fwd = [(gate_hook(layer), make_hook(layer, idx)) for layer, idx in sorted(_by_layer(model, heads).items())]
    with model.hooks(fwd_hooks=fwd):
        yield


def force_gates_one(model, heads: Sequence[Head] | None = None):
    """Gates forced to 1 (logit +inf): the selected heads run ungated with the same weights."""
    return _edit_gates(model, heads, lambda z, layer, idx: torch.full_like(z, float("inf")))


def gates_to_mean(model, means: dict[int, Float[Tensor, "head d_head"]], heads: Sequence[Head] | None = None):
    """Gates set to their per-head mean score (per gate element, over tokens): query dependence removed.

    `means` (layer → [n_heads, d_head]) come from `GateStats.element_means()` on another text split."""
    def edit(z, layer, idx):
        m = means[layer][idx].to(z.device).double().clamp(1e-7, 1 - 1e-7)
        return torch.logit(m).expand_as(z)
    return _edit_gates(model, heads, edit)


def scale_gates(model, alpha: float, heads: Sequence[Head] | None = None):
    """Gate scores scaled by `alpha` (σ(z) → α·σ(z), any α ≥ 0, also above 1/σ): applied to the gated
    head output at `hook_z` (= Y ⊙ σ(z)), which is the same product."""
    if alpha < 0:
        raise UserError(f"gate scale alpha must be >= 0, got {alpha}")
    return scale_outputs(model, {(layer, h): alpha for layer, idx in _by_layer(model, heads).items() for h in idx})


def scale_outputs(model, factors: Mapping[Head, float]):
    """Each head's gated output (`hook_z`, Y ⊙ σ(z)) multiplied by its own factor (heads not listed: unchanged).
    Composes with the gate edits above, which act earlier (on `hook_q_gate`)."""
    check_gated(model)
    _by_layer(model, list(factors))  # checks the heads
    by_layer: dict[int, dict[int, float]] = {}
    for (layer, head), f in factors.items():
        by_layer.setdefault(layer, {})[head] = float(f)

    def make_hook(scale: dict[int, float]):
        def hook(z, hook):  # [batch, pos, head, d_head]
            f = torch.ones(z.shape[2], dtype=z.dtype, device=z.device)
            f[list(scale)] = torch.tensor(list(scale.values()), dtype=z.dtype, device=z.device)
            return z * f[:, None]
        return hook

    fwd = [(f"blocks.{layer}.attn.hook_z", make_hook(scale)) for layer, scale in sorted(by_layer.items())]
    return model.hooks(fwd_hooks=fwd)


class PushStats:
    """Per (layer, head), over real tokens: Σ|Y'| of the gated output and Σ|K(Y)| under each gate intervention K that
    sets the gate (`one`: σ = 1, so Y; `mean`: Y ⊙ m with the per-element mean gates m). `factors()` gives the push
    Σ|K(Y)| / Σ|Y'|: how many times larger K makes the head's output (gates forced to 1: about 1/ḡ)."""

    def __init__(self, layers: Sequence[int], n_heads: int, means: dict[int, Float[Tensor, "head d_head"]]):
        self.layers, self.means = list(layers), means
        zeros = torch.zeros((len(self.layers), n_heads), dtype=torch.float64)
        self.gated, self.sums = zeros.clone(), {"one": zeros.clone(), "mean": zeros.clone()}

    def update(self, layer: int, y: Float[Tensor, "batch q head d"], gate: Float[Tensor, "batch q head d"],
               mask: Tensor) -> None:
        i = self.layers.index(layer)
        keep = mask.bool().to(y.device)
        y, g = y[keep].double(), gate[keep].double()  # [N, head, d]
        self.gated[i] += (y * g).abs().sum((0, 2)).cpu()
        self.sums["one"][i] += y.abs().sum((0, 2)).cpu()
        self.sums["mean"][i] += (y * self.means[layer].to(y.device).double()).abs().sum((0, 2)).cpu()

    def merge(self, other: PushStats) -> PushStats:
        """Fold in `other`, the same sums over other tokens (`interp.distributed`: another rank's shard)."""
        return distributed.add_fields(self, other, sums=("gated", "sums"))

    def factors(self) -> dict[str, dict[Head, float]]:
        """kind ("one", "mean") → (layer, head) → push (1.0 for a head whose output is 0: nothing to push)."""
        out: dict[str, dict[Head, float]] = {}
        for kind, sums in self.sums.items():
            push = torch.where(self.gated > 0, sums / self.gated.clamp_min(1e-300), torch.ones_like(sums))
            out[kind] = {(layer, h): float(push[i, h]) for i, layer in enumerate(self.layers)
                         for h in range(push.shape[1])}
        return out


class ScaleStats:
    """Streamed implicit scale s(q) per (layer, head) over real queries after the first token: mean,
    sd, per-layer histograms on the gate bins (to set beside the gate scores), and on gated models
    the correlation across queries between a head's gate (mean over its dims) and its first-token
    attention A[q, first] = 1 − s(q)."""

    def __init__(self, layers: Sequence[int], n_heads: int):
        self.layers = list(layers)
        zeros = torch.zeros((len(self.layers), n_heads), dtype=torch.float64)
        self.sum, self.sum_sq = zeros.clone(), zeros.clone()
        self.g_sum, self.g_sq, self.gs_sum = zeros.clone(), zeros.clone(), zeros.clone()
        self.count = torch.zeros((len(self.layers), 1), dtype=torch.float64)
        self.hist = torch.zeros((len(self.layers), N_BINS), dtype=torch.float64)
        self.gated = False

    def update(self, layer: int, pattern: Float[Tensor, "batch head q k"], mask: Tensor,
               gate: Float[Tensor, "batch q head d"] | None = None) -> None:
        i = self.layers.index(layer)
        mask = mask.to(pattern.device)                               # on the embedding's device under a device map
        first = mask.long().argmax(-1)                               # first real token per row
        s = implicit_scale(pattern, first).transpose(1, 2)           # [batch, q, head], float32
        keep = mask.bool().clone()
        keep[torch.arange(len(first)), first] = False                # q >= 1 (query 0 only sees itself)
        s = s[keep].double().cpu()                                   # [N, head]
        self.sum[i] += s.sum(0)
        self.sum_sq[i] += (s * s).sum(0)
        self.count[i] += s.shape[0]
        self.hist[i] += torch.bincount((s / BIN_WIDTH).floor().long().clamp(0, N_BINS - 1).flatten(),
                                       minlength=N_BINS).double()
        if gate is not None:
            self.gated = True
            g = gate.mean(-1)[keep].double().cpu()                   # [N, head]
            self.g_sum[i] += g.sum(0)
            self.g_sq[i] += (g * g).sum(0)
            self.gs_sum[i] += (g * s).sum(0)

    def merge(self, other: ScaleStats) -> ScaleStats:
        """Fold in `other`, the same sums over other queries (`interp.distributed`: another rank's shard)."""
        return distributed.add_fields(self, other, sums=("sum", "sum_sq", "g_sum", "g_sq", "gs_sum", "count", "hist"),
                                      ors=("gated",))

    def head_rows(self) -> list[dict]:
        """Rows {layer, head, mean, sd, gate_corr} (gate_corr: Pearson r across queries of the head's
        gate and its first-token attention; None on ungated models or when either is constant)."""
        n = self.count
        mean = self.sum / n
        var_s = (self.sum_sq / n - mean ** 2).clamp_min(0.0)
        g_mean = self.g_sum / n
        var_g = (self.g_sq / n - g_mean ** 2).clamp_min(0.0)
        cov = self.gs_sum / n - g_mean * mean                       # cov(g, s) = −cov(g, A[q, first])
        rows = []
        for i, layer in enumerate(self.layers):
            for h in range(mean.shape[1]):
                defined = self.gated and var_g[i, h] > 1e-10 and var_s[i, h] > 1e-10  # not constant (float64 noise)
                corr = -float(cov[i, h] / (var_g[i, h] * var_s[i, h]).sqrt()) if defined else None
                rows.append({"layer": layer, "head": h, "mean": float(mean[i, h]), "sd": float(var_s[i, h].sqrt()),
                             "gate_corr": corr})
        return rows

    def histograms(self) -> dict[int, list[float]]:
        return {layer: (self.hist[i] / self.hist[i].sum()).tolist() for i, layer in enumerate(self.layers)}


def _stream_layers(model, seqs: Sequence[Sequence[int]], batch_size: int, progress: bool, desc: str,
                   consume: Callable[..., None]) -> None:
    """Per batch and softmax layer, `consume(layer, pattern, ungated Y, gate σ(z) or None, gate logits or None,
    mask)` is called from inside the forward, as soon as the layer's pattern, values (and gate logits) exist; then
    they are dropped. Memory: one layer's pattern at a time (no cache of every layer). The forward stops after the
    last attention layer."""
    from interp.batching import padded_batches
    from interp.bridge import sdpa_attention, stopped_at

    layers = softmax_layers(model)
    gated = is_gated(model)
    n_heads = model.cfg.n_heads
    # the gate logits: from the q projection, which holds [q_h | g_h] per head (the pattern then needs no eager
    # attention), unless a gate edit hooks hook_q_gate (the edited logits are read there, on the eager path)
    edited = gated and any(model.hook_dict[gate_hook(layer)].fwd_hooks for layer in layers)
    gate_kind = ("hook_q_gate" if edited else "hook_q") if gated else None
    need = ("hook_pattern", "hook_v") + ((gate_kind,) if gated else ())
    parts: dict[int, dict[str, Tensor]] = {}
    state: dict = {}

    def collector(layer: int, kind: str):
        def collect(x, hook):  # (the hook's own name may be an alias, e.g. attn.v.hook_out)
            got = parts.setdefault(layer, {})
            got[kind] = x.detach()
            if len(got) < len(need):
                return
            del parts[layer]
            y = rebuild_ungated(got["hook_pattern"], got["hook_v"].float())
            logits = None
            if gated:
                logits = got[gate_kind].float()
                if gate_kind == "hook_q":  # [b, pos, 2·heads, d] or [b, pos, heads·2·d]: per head q_h then g_h
                    b, pos = logits.shape[:2]
                    logits = logits.reshape(b, pos, n_heads, 2, -1)[:, :, :, 1].reshape(b, pos, -1)
            g = torch.sigmoid(split_heads(logits, n_heads)) if gated else None
            consume(layer, got.pop("hook_pattern"), y, g, logits, state["mask"])
        return collect

    hooks = [(f"blocks.{layer}.attn.{kind}", collector(layer, kind)) for layer in layers for kind in need]
    for _, tokens, mask in padded_batches(model, seqs, batch_size, desc=desc, progress=progress):
        state["mask"] = mask
        # the pattern a block of rows at a time; the bridge's eager attention only while a gate edit hooks hook_q_gate
        with sdpa_attention(model, [n for n, _ in hooks]), stopped_at(model, max(layers) + 1) as stop:
            model.run_with_hooks(tokens, attention_mask=mask, return_type=None, stop_at_layer=stop, fwd_hooks=hooks)
        if parts:
            missing = {layer: sorted(set(need) - set(got)) for layer, got in parts.items()}
            parts.clear()
            raise RuntimeError(f"attention hooks did not fire in layer(s) {missing}")


@torch.no_grad()
def measure(model, seqs: Sequence[Sequence[int]], *, batch_size: int = 8, theta: float = 1e-2,
            mean_gate: dict[int, float] | None = None, progress: bool = True):
    """One streamed pass over `seqs` (token id lists): `(GateStats | None, SparsityStats, ScaleStats)`
    on the softmax-attention layers. `mean_gate` (layer → ḡ, from another split) enables the
    |ḡ·Y| < θ control. Under torchrun each rank streams whole batches of its shard; the statistics are merged."""
    if distributed.sharding():
        return distributed.map_stream(
            lambda idx: measure(model, [seqs[i] for i in idx], batch_size=batch_size, theta=theta, mean_gate=mean_gate,
                                progress=progress),
            len(seqs), lambda a, b: tuple(x.merge(y) if x is not None else None for x, y in zip(a, b)),
            lengths=[len(s) for s in seqs], batch_size=batch_size)
    layers = softmax_layers(model)
    n_heads = model.cfg.n_heads
    gates = GateStats(layers, n_heads, model.cfg.d_head) if is_gated(model) else None
    sparsity, scale = SparsityStats(theta), ScaleStats(layers, n_heads)

    def consume(layer, pattern, y, g, logits, mask):
        if gates is not None:
            gates.update(layer, logits, mask)
        sparsity.update(layer, y, mask, g, None if mean_gate is None else mean_gate.get(layer))
        scale.update(layer, pattern, mask, g)

    _stream_layers(model, seqs, batch_size, progress, "gates", consume)
    return gates, sparsity, scale


@torch.no_grad()
def measure_push(model, seqs: Sequence[Sequence[int]], means: dict[int, Float[Tensor, "head d_head"]], *,
                 batch_size: int = 8, progress: bool = True) -> PushStats:
    """One streamed pass over `seqs` filling `PushStats` (gated models; `means` from `GateStats.element_means()`);
    under torchrun, whole batches per rank and the sums merged."""
    check_gated(model, "measuring the push of a gate intervention")
    if distributed.sharding():
        return distributed.map_stream(
            lambda idx: measure_push(model, [seqs[i] for i in idx], means, batch_size=batch_size, progress=progress),
            len(seqs), PushStats.merge, lengths=[len(s) for s in seqs], batch_size=batch_size)
    push = PushStats(softmax_layers(model), model.cfg.n_heads, means)
    _stream_layers(model, seqs, batch_size, progress, "push",
                   lambda layer, pattern, y, g, logits, mask: push.update(layer, y, g, mask))
    return push
