"""Attention-sink metrics per block and head, streamed over batches (memory bounded by one batch).

Metric functions (tensors in, tensors out; `pattern` is `blocks.L.attn.hook_pattern`, `[batch, head, q, k]`,
`mask` the `[batch, pos]` attention mask of a left-padded batch, None = no padding):

- `first_token_attention(pattern, mask, exclude_first_query=True)` → `[batch, head]`: mean over the
  real queries of the attention to the first real token, F-Attn of Qiu et al. 2025 (query 0, which
  attends to itself only in a causal model, is left out by default).
- `key_attention(pattern, mask, causal=True)` → `[batch, head, pos]`: Gu et al. 2024's
  α[k] = mean over queries q ≥ k (all queries when `causal=False`) of A[q, k], keys left-aligned
  (index 0 = the first real token); padded keys are 0.
- `first_key_alpha(pattern, mask, t=64)` → `[batch, head]`: α[0] over the first `t` real queries. Gu et al. define the
  sink rate at T = 64 (with the tokenizer's default BOS); in a causal model the first 64 rows of a longer pattern are
  the 64-token prefix's pattern, so `sink_rate_t64` is reported beside the sink rate at the sequences' own length.
- `attention_outlier_keys(pattern, mask, frac=0.1)` → bool `[batch, pos]` (left-aligned): An et al. 2025's
  rule, column sum of the head-mean pattern ≥ frac · T.
- `sink_ratio(pattern, keys, mask)` → `[batch, head]`: the share of each head's attention that goes to
  the keys in `keys` (An et al.'s per-head ratio ρ). `AttentionStats` takes the sink set S of each sequence
  from its emergence layer (the first layer where the sequence has an attention-outlier key) and keeps it for
  every later layer, so ρ is not high by construction (re-detecting S in each layer would make it so).
- `left_align(x, mask)`: move each row's real positions to the front along the last dim.

Streaming: `AttentionStats(n_layers, n_heads, ...)` accumulates those metrics per layer and head;
`stats.hooks()` gives the forward hooks (pattern, and q/k/v when `qkv_norms`), `stats.begin_batch(indices,
tokens, mask)` must precede each forward. `attention_metrics(model, seqs, ...)` runs the loop and returns
the filled `AttentionStats`; read `per_layer()` (rows `{layer, first_token, sink_rate, sink_rate_t64, sink_ratio}`),
`sink_layers` (emergence layer → number of sequences whose S was fixed there),
`per_head()` (rows per layer and head), `overall()` (`first_token`, `sink_rate` in %), `other_sinks()`
(attention-outlier keys after the first token, by position and by token), `outlier_keys` (every attention-outlier key as
`(layer, sequence, position, token_id)`), `qkv_norm_rows()` and `example` (head-mean pattern of one sequence per layer,
its first `EXAMPLE_TOKENS` = 256 positions only).

Memory: each layer's pattern is reduced inside its hook and dropped. `pattern_sums(pattern, mask)` reduces it over
queries a block of rows at a time (`QUERY_BLOCK_BYTES` of float32), to the per-head sums every metric above needs
(attention to the first token per query, attention received per key, with and without q ≥ k): O(batch × head × pos),
never a float32 copy of the whole pattern; nothing of size pos × pos is kept across layers.
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interp import distributed
from interp.batching import run_batches
from interp.bridge import sdpa_attention, stopped_at

SINK_EPS = 0.3  # Gu et al. 2024, sink rate threshold ε
GU_T = 64  # Gu et al. 2024 define the sink rate on sequences of T = 64 tokens
OUTLIER_KEY_FRAC = 0.1  # An et al. 2025, attention-outlier key: column sum ≥ 0.1 · T
EXAMPLE_TOKENS = 256  # the example pattern keeps the first 256 positions (256 × 256 per layer, not T × T)
_LAYER = re.compile(r"^blocks\.(\d+)\.")


def _starts_lengths(mask: Tensor | None, batch: int, width: int, device) -> tuple[Tensor, Tensor]:
    if mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device), torch.full((batch,), width, device=device)
    mask = mask.to(device)
    lengths = mask.sum(-1).long()
    return (width - lengths), lengths


def left_align(x: Tensor, mask: Tensor | None) -> Tensor:
    """Shift each row of a left-padded `[batch, ..., pos]` tensor so its first real position is index 0 (tail 0)."""
    if mask is None:
        return x
    b, width = x.shape[0], x.shape[-1]
    starts, lengths = _starts_lengths(mask, b, width, x.device)
    idx = torch.arange(width, device=x.device).expand(b, width) + starts[:, None]
    valid = torch.arange(width, device=x.device)[None] < lengths[:, None]
    shape = (b,) + (1,) * (x.dim() - 2) + (width,)
    gathered = x.gather(-1, idx.clamp_max(width - 1).view(shape).expand_as(x))
    return gathered * valid.view(shape).to(x.dtype)


def _query_mask(mask: Tensor | None, b: int, width: int, device, exclude_first: bool) -> Tensor:
    starts, _ = _starts_lengths(mask, b, width, device)
    pos = torch.arange(width, device=device)[None]
    return pos >= (starts[:, None] + int(exclude_first))


QUERY_BLOCK_BYTES = 64 * 2 ** 20  # float32 bytes of one block of pattern rows reduced at once (all heads, batch)


@dataclass
class PatternSums:
    """One layer's pattern reduced over its queries: everything the sink metrics need, O(batch × head × pos).

    `to_first[b, h, q]` = A[q, first real key]; `received[b, h, k]` = Σ over real queries of A[q, k];
    `received_causal` the same over real queries q ≥ k (None unless asked for); keys not left-aligned."""

    to_first: Float[Tensor, "batch head q"]
    received: Float[Tensor, "batch head k"]
    received_causal: Float[Tensor, "batch head k"] | None


def pattern_sums(pattern: Float[Tensor, "batch head q k"], mask: Int[Tensor, "batch pos"] | None = None,
                 causal: bool = True, block: int | None = None) -> PatternSums:
    """Reduce `pattern` over its queries a block of `block` query rows at a time (default: as many as fit in
    `QUERY_BLOCK_BYTES` as float32), so no full float32 copy of the pattern is made."""
    b, h, width, _ = pattern.shape
    starts, _ = _starts_lengths(mask, b, width, pattern.device)
    to_first = pattern.gather(-1, starts.view(b, 1, 1, 1).expand(b, h, width, 1))[..., 0].float()
    qmask = _query_mask(mask, b, width, pattern.device, False).float()  # [b, q]
    if block is None:
        block = max(1, QUERY_BLOCK_BYTES // max(1, b * h * width * 4))
    received = torch.zeros(b, h, width, device=pattern.device)
    above = torch.zeros_like(received) if causal else None  # Σ over real queries q < k of A[q, k]
    for q0 in range(0, width, block):
        q1 = min(width, q0 + block)
        rows = pattern[:, :, q0:q1]
        rows = rows if rows.dtype == torch.float32 else rows.float()  # [b, head, n, k]: one block's copy at most
        w = qmask[:, None, None, q0:q1]  # [b, 1, 1, n]
        received += torch.matmul(w, rows)[:, :, 0]
        if causal:  # keys after the block lie above every row's diagonal; within the block, above the diagonal
            above[..., q1:] += torch.matmul(w, rows[..., q1:])[:, :, 0]
            upper = torch.ones(q1 - q0, q1 - q0, device=pattern.device).triu(1)  # k > q within the block
            above[..., q0:q1] += torch.matmul(w, rows[..., q0:q1] * upper)[:, :, 0]
        del rows
    received_causal = received - above if causal else None
    return PatternSums(to_first, received, received_causal)


def _first_token_from(to_first: Tensor, mask: Tensor | None, exclude_first_query: bool) -> Float[Tensor, "batch head"]:
    b, _, width = to_first.shape
    qmask = _query_mask(mask, b, width, to_first.device, exclude_first_query).float()
    return (to_first * qmask[:, None]).sum(-1) / qmask.sum(-1).clamp_min(1)[:, None]


def _alpha_from(sums: PatternSums, mask: Tensor | None, causal: bool) -> Float[Tensor, "batch head k"]:
    b, _, width = sums.received.shape
    device = sums.received.device
    if causal:
        pos = torch.arange(width, device=device)
        starts, _ = _starts_lengths(mask, b, width, device)
        # queries q ≥ k among the real ones: from max(k, start) to the end
        count = (width - torch.maximum(pos[None], starts[:, None])).float()
        received = sums.received_causal
    else:
        count = _query_mask(mask, b, width, device, False).float().sum(-1, keepdim=True).expand(b, width)
        received = sums.received
    return left_align(received / count.clamp_min(1)[:, None], mask)


def _first_key_alpha_from(to_first: Tensor, mask: Tensor | None, t: int) -> Float[Tensor, "batch head"]:
    b, _, width = to_first.shape
    starts, _ = _starts_lengths(mask, b, width, to_first.device)
    pos = torch.arange(width, device=to_first.device)[None]
    rows = ((pos >= starts[:, None]) & (pos < starts[:, None] + t)).float()
    return (to_first * rows[:, None]).sum(-1) / rows.sum(-1).clamp_min(1)[:, None]


def _outlier_keys_from(sums: PatternSums, mask: Tensor | None, frac: float) -> Bool[Tensor, "batch k"]:
    b, _, width = sums.received.shape
    _, lengths = _starts_lengths(mask, b, width, sums.received.device)
    col = sums.received.mean(1)  # [b, k]: column sum of the head-mean pattern over real queries
    keys = left_align(col, mask) >= frac * lengths[:, None].float()
    valid = torch.arange(width, device=col.device)[None] < lengths[:, None]
    return keys & valid


def _sink_ratio_from(sums: PatternSums, keys: Tensor, mask: Tensor | None) -> Float[Tensor, "batch head"]:
    col = left_align(sums.received, mask)  # [b, head, k]
    return (col * keys[:, None].float()).sum(-1) / col.sum(-1).clamp_min(1e-12)


def first_token_attention(pattern: Float[Tensor, "batch head q k"], mask: Int[Tensor, "batch pos"] | None = None,
                          exclude_first_query: bool = True) -> Float[Tensor, "batch head"]:
    """Mean over real queries of the attention each head pays to the first real token."""
    b, h, width, _ = pattern.shape
    starts, _ = _starts_lengths(mask, b, width, pattern.device)
    to_first = pattern.gather(-1, starts.view(b, 1, 1, 1).expand(b, h, width, 1))[..., 0].float()
    return _first_token_from(to_first, mask, exclude_first_query)


def key_attention(pattern: Float[Tensor, "batch head q k"], mask: Int[Tensor, "batch pos"] | None = None,
                  causal: bool = True) -> Float[Tensor, "batch head k"]:
    """Gu et al.'s α[k]: mean attention key k receives from queries q ≥ k (every query if not causal); left-aligned."""
    return _alpha_from(pattern_sums(pattern, mask, causal), mask, causal)


def first_key_alpha(pattern: Float[Tensor, "batch head q k"], mask: Int[Tensor, "batch pos"] | None = None,
                    t: int = GU_T) -> Float[Tensor, "batch head"]:
    """Gu et al.'s α[0] over the first `t` real tokens: mean attention of queries 0..t−1 to the first real token.
    In a causal model (sliding windows included) these rows are exactly the pattern of the `t`-token prefix, so a
    longer sequence gives the T = `t` sink rate with no second forward."""
    b, h, width, _ = pattern.shape
    starts, _ = _starts_lengths(mask, b, width, pattern.device)
    to_first = pattern.gather(-1, starts.view(b, 1, 1, 1).expand(b, h, width, 1))[..., 0].float()
    return _first_key_alpha_from(to_first, mask, t)


def attention_outlier_keys(pattern: Float[Tensor, "batch head q k"], mask: Int[Tensor, "batch pos"] | None = None,
                           frac: float = OUTLIER_KEY_FRAC) -> Bool[Tensor, "batch k"]:
    """Keys whose column sum of the head-mean pattern (over real queries) is ≥ frac · T (left-aligned)."""
    return _outlier_keys_from(pattern_sums(pattern, mask, causal=False), mask, frac)


def sink_ratio(pattern: Float[Tensor, "batch head q k"], keys: Bool[Tensor, "batch k"],
               mask: Int[Tensor, "batch pos"] | None = None) -> Float[Tensor, "batch head"]:
    """ρ: share of each head's attention (over real queries) that goes to the keys in `keys` (left-aligned)."""
    return _sink_ratio_from(pattern_sums(pattern, mask, causal=False), keys, mask)


class AttentionStats:
    """Streaming accumulator of the sink metrics per layer and head (see the module docstring)."""

    def __init__(self, n_layers: int, n_heads: int, layers: Sequence[int] | None = None, *, eps: float = SINK_EPS,
                 exclude_first_query: bool = True, causal: bool = True, outlier_frac: float = OUTLIER_KEY_FRAC,
                 qkv_norms: bool = False, example: int | None = None, gated_q: bool = False,
                 example_tokens: int | None = None):
        self.layers = list(range(n_layers)) if layers is None else sorted(layers)
        self.n_heads, self.eps, self.causal = n_heads, eps, causal
        self.exclude_first_query, self.outlier_frac, self.qkv_norms = exclude_first_query, outlier_frac, qkv_norms
        z = torch.zeros(n_layers, n_heads, dtype=torch.float64)
        self.first_sum, self.sink_count, self.ratio_sum = z.clone(), z.clone(), z.clone()
        # Gu's sink rate at T = 64 (first 64 rows); None when a sequence is shorter, or longer in an encoder
        self.sink64_count, self.t64_exact = z.clone(), True
        self.n_seqs = torch.zeros(n_layers, dtype=torch.long)
        self.outlier_keys: list[tuple[int, int, int, int]] = []  # (layer, sequence, position, token_id)
        # (layer, q|k|v, sink?) → [sum, n]
        self.norm_sums: dict = defaultdict(lambda: torch.zeros(2, dtype=torch.float64))
        self.gated_q = gated_q  # q hook holds [q_h | g_h] per head (Qwen3-Next / Qwen3.5): keep the query halves
        # head-mean pattern of sequence `example` per layer, its first `example_tokens` positions (queries and keys)
        self.example_index, self.example = example, {}
        self.example_tokens = EXAMPLE_TOKENS if example_tokens is None else example_tokens
        self.sink_layers: Counter = Counter()  # emergence layer → sequences whose sink set S was fixed there
        self._batch = None
        self._sink: Tensor | None = None  # [batch, k] sink set S of each sequence of the batch (empty until it emerges)
        self._norms: dict = {}

    def hooks(self) -> list[tuple[str, object]]:
        fwd = [(f"blocks.{layer}.attn.hook_pattern", self._pattern_hook) for layer in self.layers]
        if self.qkv_norms:
            fwd += [(f"blocks.{layer}.attn.hook_{w}", self._qkv_hook) for layer in self.layers for w in "qkv"]
        return fwd

    def begin_batch(self, indices: Sequence[int], tokens: Tensor, mask: Tensor | None) -> None:
        """Set the batch the next forward's hooks see (its sequence indices, tokens and mask)."""
        self._batch = (list(indices), tokens, mask)
        self._sink = None
        self._norms = {}

    def _qkv_hook(self, x, hook):
        which = hook.name.rsplit(".", 2)[-2][-1] if hook.name.endswith("hook_out") else hook.name[-1]
        x = x.detach().float()
        if which == "q" and self.gated_q and x.dim() == 4 and x.shape[2] == 2 * self.n_heads:
            x = x[:, :, 0::2]
        norms = x.norm(dim=-1)  # [b, pos, heads] or [b, pos] for unsplit heads
        self._norms[(int(_LAYER.match(hook.name).group(1)), which)] = norms.mean(-1) if norms.dim() == 3 else norms

    def _pattern_hook(self, pattern, hook):
        self.update(int(_LAYER.match(hook.name).group(1)), pattern.detach())

    @torch.no_grad()
    def update(self, layer: int, pattern: Float[Tensor, "batch head q k"]) -> None:
        """Add one layer's pattern for the current batch: reduced over queries (`pattern_sums`, a block of rows at a
        time) to per-head, per-key sums; nothing of the size of the pattern is kept."""
        indices, tokens, mask = self._batch
        b = pattern.shape[0]
        sums = pattern_sums(pattern, mask, self.causal)
        self.first_sum[layer] += _first_token_from(sums.to_first, mask, self.exclude_first_query).double().sum(0).cpu()
        alpha = _alpha_from(sums, mask, self.causal)
        sinks = alpha > self.eps  # [b, head, k]
        self.sink_count[layer] += sinks[:, :, 0].double().sum(0).cpu()
        self.sink64_count[layer] += (_first_key_alpha_from(sums.to_first, mask, GU_T) > self.eps).double().sum(0).cpu()
        lengths = _starts_lengths(mask, b, pattern.shape[-1], pattern.device)[1]
        self.t64_exact &= bool(lengths.min() >= GU_T and (self.causal or lengths.max() == GU_T))
        keys = _outlier_keys_from(sums, mask, self.outlier_frac)
        self.ratio_sum[layer] += _sink_ratio_from(sums, self._sink_set(layer, keys), mask).double().sum(0).cpu()
        self.n_seqs[layer] += b
        toks = left_align(tokens, mask).cpu()
        for row, pos in keys.nonzero().tolist():
            self.outlier_keys.append((layer, indices[row], pos, int(toks[row, pos])))
        for w in "qkv" if self.qkv_norms else "":
            norms = left_align(self._norms.pop((layer, w)), mask).cpu()  # [b, pos]
            valid = left_align(torch.ones_like(tokens) if mask is None else mask, mask).bool().cpu()
            kc = keys.cpu()
            for is_sink, sel in ((True, kc & valid), (False, ~kc & valid)):
                self.norm_sums[(layer, w, is_sink)] += torch.tensor([norms[sel].double().sum(), sel.sum()])
        if self.example_index is not None and self.example_index in indices:
            row = indices.index(self.example_index)
            n = int(mask[row].sum()) if mask is not None else pattern.shape[-1]
            start = pattern.shape[-1] - n
            m = min(n, self.example_tokens)  # the first `example_tokens` positions only
            self.example[layer] = pattern[row, :, start:start + m, start:start + m].float().mean(0).cpu()

    def merge(self, other: AttentionStats, order: Sequence[int]) -> AttentionStats:
        """Fold in `other`: the same metrics over other batches of the run (`interp.distributed`: another rank's
        shard). Sums and counts add; `order[i]`, the place of sequence i's batch in the run, puts the outlier keys in
        the order one process lists them."""
        for name in ("first_sum", "sink_count", "ratio_sum", "sink64_count", "n_seqs"):
            getattr(self, name).add_(getattr(other, name))
        self.t64_exact &= other.t64_exact
        self.outlier_keys = sorted(self.outlier_keys + other.outlier_keys, key=lambda r: order[r[1]])
        for key, value in other.norm_sums.items():
            self.norm_sums[key] += value
        self.example.update(other.example)
        self.sink_layers.update(other.sink_layers)
        return self

    def renumbered(self, idx: Sequence[int]) -> AttentionStats:
        """These metrics of the sequences `idx` (numbered 0.. in them), naming the run's sequence numbers."""
        self.outlier_keys = [(layer, idx[seq], pos, tok) for layer, seq, pos, tok in self.outlier_keys]
        if self.example_index is not None:
            self.example_index = idx[self.example_index]
        return self

    def __getstate__(self) -> dict:  # picklable (a plain dict of norm sums, no batch) to gather across ranks
        return {**vars(self), "norm_sums": dict(self.norm_sums), "_batch": None, "_sink": None, "_norms": {}}

    def __setstate__(self, state: dict) -> None:
        vars(self).update(state)
        self.norm_sums = defaultdict(lambda: torch.zeros(2, dtype=torch.float64), state["norm_sums"])

    def _sink_set(self, layer: int, keys: Bool[Tensor, "batch k"]) -> Bool[Tensor, "batch k"]:
        """The batch's sink sets S: a sequence without one yet takes this layer's attention-outlier keys, if any."""
        if self._sink is None:
            self._sink = torch.zeros_like(keys)
        new = keys.any(-1) & ~self._sink.any(-1)
        self._sink[new] = keys[new]
        self.sink_layers[layer] += int(new.sum())
        return self._sink

    def per_head(self) -> list[dict]:
        """Rows {layer, head, first_token, sink_rate (% of sequences with α[0] > ε), sink_rate_t64 (the same on the
        first 64 tokens; None when it cannot be read, see `sink_rate_t64`), sink_ratio}."""
        rows = []
        for layer in self.layers:
            n = max(int(self.n_seqs[layer]), 1)
            for h in range(self.n_heads):
                rows.append({"layer": layer, "head": h, "first_token": float(self.first_sum[layer, h] / n),
                             "sink_rate": float(100 * self.sink_count[layer, h] / n),
                             "sink_rate_t64": self._t64(self.sink64_count[layer, h], n),
                             "sink_ratio": float(self.ratio_sum[layer, h] / n)})
        return rows

    def _t64(self, count: Tensor, n: int) -> float | None:
        return float(100 * count.sum() / n) if self.t64_exact and n else None

    def per_layer(self) -> list[dict]:
        """Rows {layer, first_token (F-Attn), sink_rate (Gu's Sink^ε[0], %, at the sequences' length), sink_rate_t64
        (the same at Gu's T = 64: the first 64 rows of each pattern), sink_ratio (mean ρ over heads, S fixed at
        each sequence's emergence layer; 0 before it)}."""
        rows = []
        for layer in self.layers:
            n = max(int(self.n_seqs[layer]), 1) * self.n_heads
            rows.append({"layer": layer, "first_token": float(self.first_sum[layer].sum() / n),
                         "sink_rate": float(100 * self.sink_count[layer].sum() / n),
                         "sink_rate_t64": self._t64(self.sink64_count[layer], n),
                         "sink_ratio": float(self.ratio_sum[layer].sum() / n)})
        return rows

    def overall(self) -> dict:
        """{first_token: F-Attn averaged over layers, sink_rate: Gu's Sink^ε[0] in % of heads × layers × sequences,
        sink_rate_t64: the same at Gu's T = 64 (first 64 rows; None when a sequence is shorter than 64 tokens, or
        longer in a bidirectional encoder, where the first rows are not the prefix's pattern)}."""
        n = max(int(self.n_seqs[self.layers].sum()), 1) * self.n_heads
        return {"first_token": float(self.first_sum[self.layers].sum() / n),
                "sink_rate": float(100 * self.sink_count[self.layers].sum() / n),
                "sink_rate_t64": self._t64(self.sink64_count[self.layers], n)}

    def other_sinks(self, tokenizer=None, top: int = 20) -> list[dict]:
        """Keys other than the first that draw attention (An et al.'s attention-outlier rule), most frequent first:
        rows {layer, position, share} (share of sequences) and by token {layer, token_id, token, share}."""
        by_pos = Counter((layer, pos) for layer, _, pos, _ in self.outlier_keys if pos > 0)
        by_tok = Counter((layer, tid) for layer, _, pos, tid in self.outlier_keys if pos > 0)
        def most_common(counts: Counter) -> list:  # ties by (layer, position/token): the same for any batching
            return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]

        rows = [{"layer": layer, "position": pos, "token_id": None, "token": None,
                 "share": c / max(int(self.n_seqs[layer]), 1)} for (layer, pos), c in most_common(by_pos)]
        rows += [{"layer": layer, "position": None, "token_id": tid,
                  "token": tokenizer.decode([tid]) if tokenizer is not None else None,
                  "share": c / max(int(self.n_seqs[layer]), 1)} for (layer, tid), c in most_common(by_tok)]
        return rows

    def qkv_norm_rows(self) -> list[dict]:
        """Rows {layer, vector (q|k|v), sink_norm, other_norm}: mean per-head norms at attention-outlier keys vs
        elsewhere."""
        rows = []
        for layer in self.layers:
            for w in "qkv":
                s, o = self.norm_sums.get((layer, w, True)), self.norm_sums.get((layer, w, False))
                if s is None:
                    continue
                rows.append({"layer": layer, "vector": w,
                             "sink_norm": float(s[0] / s[1]) if s[1] else None,
                             "other_norm": float(o[0] / o[1]) if o[1] else None})
        return rows


@torch.no_grad()
def attention_metrics(model, seqs: Sequence[Sequence[int]], *, batch_size: int = 8, layers: Sequence[int] | None = None,
                      eps: float = SINK_EPS, exclude_first_query: bool = True, causal: bool = True,
                      outlier_frac: float = OUTLIER_KEY_FRAC, qkv_norms: bool = False, example: int | None = None,
                      fwd_hooks: Sequence = (), progress: bool = True) -> AttentionStats:
    """Run `seqs` batch by batch with pattern hooks on `layers` (default all) and return the filled stats.

    The forward stops after the last layer needed; `fwd_hooks` (e.g. an intervention) run alongside.
    Memory holds one batch's activations at a time. Under torchrun each rank runs whole batches of its shard and the
    ranks' stats are merged (`AttentionStats.merge`; every rank gets the whole set's).
    """
    if distributed.sharding():
        lengths = [len(s) for s in seqs]
        order = distributed.batch_order(lengths, batch_size)
        return distributed.map_stream(
            lambda idx: attention_metrics(
                model, [seqs[i] for i in idx], batch_size=batch_size, layers=layers, eps=eps,
                exclude_first_query=exclude_first_query, causal=causal, outlier_frac=outlier_frac, qkv_norms=qkv_norms,
                example=idx.index(example) if example in idx else None, fwd_hooks=fwd_hooks, progress=progress
            ).renumbered(idx),
            len(seqs), lambda a, b: a.merge(b, order), lengths=lengths, batch_size=batch_size)
    stats = AttentionStats(model.cfg.n_layers, model.cfg.n_heads, layers, eps=eps,
                           exclude_first_query=exclude_first_query, causal=causal, outlier_frac=outlier_frac,
                           qkv_norms=qkv_norms, example=example,
                           gated_q=bool(getattr(model.cfg, "gated_q_proj", False)))
    stop = max(stats.layers) + 1

    def step(idx: list[int], tokens: Tensor, mask: Tensor) -> None:
        stats.begin_batch(idx, tokens, mask)
        hooks = list(fwd_hooks) + stats.hooks()
        # the pattern is built a block of query rows at a time (interp.bridge.sdpa_attention): one layer's at most
        with sdpa_attention(model, [name for name, _ in hooks]), stopped_at(model, stop) as stop_at_layer:
            model.run_with_hooks(tokens, attention_mask=mask, return_type=None, stop_at_layer=stop_at_layer,
                                 fwd_hooks=hooks)

    # out of memory: the batch is halved and `stats` restored to before it (interp.batching.run_batches)
    run_batches(model, seqs, batch_size, step, desc="attention", progress=progress, state=[stats])
    return stats

