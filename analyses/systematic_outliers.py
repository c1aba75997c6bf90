"""Systematic outliers (An et al. 2025; Sun et al. 2024; Gu et al. 2024): massive activations, attention sinks
and weight outliers, how they connect, and what removing the massive activations does.

Method. A text set is chunked to `seq_len` tokens (items joined by "\\n\\n"; a BOS first where the model's own
tokenizer adds one, `--bos` / `--no-bos` to force either way; `interp.tokens`) and streamed through the model
twice: once with SDPA attention capturing the block outputs `h_ℓ` and the MLP down-projection inputs (profiles:
top-1/2/3 |h|, median, mean; Sun's massive activations |h| > 100 and ≥ 1000 × median; An's token rule
max_d |h| > 1000 × mean), once with the attention patterns (F-Attn with query 0 excluded, Gu's sink rate at
ε = 0.3, also read at T = 64 from the first 64 rows of a longer chunk; An's attention-outlier keys
with column sum ≥ 0.1·T and per-head ratio ρ, q/k/v norms at those keys). Weight outliers: per-column
max/mean of |W| for every linear module, the down-projection first. Connections: each layer's top
down-projection neuron and the residual dims its column writes to; per massive dim the layer that
creates it and the one that cancels it (sign of the neuron's write against h); Jaccard and An's
share of activation-outlier positions that are attention-outlier keys. Interventions (Sun's set-zero /
set-mean): the massive dims and their means are chosen on one part of the chunks, then on the other part
the massive scalars at the emergence layer are set to zero or to the mean; loss, F-Attn, sink rate and
M-Act are measured, against random dims matched on the size of the change (same count, several draws; where no
ordinary dim changes as much, the same change moved onto random dims) and a repeated-token input. ρ keeps each
chunk's sink set from the layer where it emerges; token-type shares count every outlier position, per layer.
Details, defaults with citations and deviations: docs/systematic_outliers.md.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from interp import distributed, passes, sinks, stages
from interp import outliers as out
from interp.analysis import CommonConfig, attention_scope, require, run_header, skip_layers, warn
from interp.batching import run_batches
from interp.bridge import attention_layers, sdpa_attention, stopped_at
from interp.controls import ControlUnavailable, Draws, control_row, matched_draws, split
from interp.cost import announce, sequence_cost
from interp.errors import UserError
from interp.figures import intervention_bars, layer_head_heatmap
from interp.report import analysis_report
from interp.texts import TextSet, chunk_texts, load_texts, repeated_token_set, token_string
from interp.tokens import bos_id

DATASET_FIELD = "text_set"
RENAMED_OPTIONS = {"select_fraction": "selection_fraction"}


@dataclass
class Config(CommonConfig):
    """Defaults follow the papers (An et al. 2025, Sun et al. 2024, Gu et al. 2024) unless a comment says otherwise."""

    # text set (--dataset): natural-text (bundled), wikitext-2 or redpajama-sample (hub; the papers use RedPajama),
    # or a .txt file
    text_set: str = "natural-text"
    seq_len: int = 64  # tokens per chunk (Gu et al.'s sink rate is defined at T = 64; An/Sun profile 4096-token chunks)
    n_chunks: int = 100  # chunks analysed (Gu et al.: 100; Sun's profiles: 10)
    n_docs: int = 500  # hub text sets: a seeded, streamed sample of N documents (An et al. and Sun et al.: 500)
    # a BOS first in every chunk: unset, where the model's own tokenizer adds one (as trained; Gu et al.'s sink rate);
    # --bos always (a BOS-like token where it adds none); --no-bos never (An's and Sun's code: no special tokens)
    bos: bool | None = None
    massive_abs: float = 100.0  # Sun et al.'s rule: |h| above this ...
    massive_ratio: float = 1000.0  # ... and at least this many times the median |h| of the sequence (Sun et al.)
    token_tau: float = 1000.0  # An et al.'s token rule: max |h| of a token above tau × the mean |h| of the sequence
    sink_epsilon: float = 0.3  # Gu et al.'s sink-rate threshold ε on a head's mean attention to the first token
    # F-Attn averages query 0 too (always 1.0 in a causal model; Qiu et al. do not say)
    include_first_query: bool = False
    # An et al.: a key is an attention outlier when it receives ≥ frac · T of the head-mean attention
    outlier_key_frac: float = 0.1
    # flag a module whose column max/mean of |W| exceeds this (An et al. give no threshold; our choice)
    weight_ratio: float = 500.0
    max_dims: int = 2  # massive dims intervened on at most (Sun et al. set 2 in LLaMA2-7B)
    # share of chunks that choose the dims and their means; the rest measures the effect
    selection_fraction: float = 0.5
    random_draws: int = 5  # random-dims control draws (same number of dims, never the chosen ones, matched on norm)
    example: int = 0  # chunk whose attention pattern the report shows

    def validate(self, model=None) -> None:
        super().validate(model)
        require(self.seq_len >= 2, f"seq-len must be at least 2; got {self.seq_len}")
        require(self.n_chunks >= 2,
                f"n-chunks must be at least 2 (one part selects, the other measures); got {self.n_chunks}")
        require(self.n_docs >= 1, f"n-docs must be at least 1; got {self.n_docs}")
        for name in ("massive_abs", "massive_ratio", "token_tau", "weight_ratio"):
            require(getattr(self, name) > 0, f"{name.replace('_', '-')} must be positive; got {getattr(self, name)}")
        require(0 < self.sink_epsilon < 1, f"sink-epsilon must be in (0, 1); got {self.sink_epsilon}")
        require(0 < self.outlier_key_frac <= 1, f"outlier-key-frac must be in (0, 1]; got {self.outlier_key_frac}")
        require(0 < self.selection_fraction < 1,
                f"selection-fraction must be in (0, 1); got {self.selection_fraction}")
        require(self.max_dims >= 1, f"max-dims must be at least 1; got {self.max_dims}")
        require(0 <= self.example < self.n_chunks,
                f"example must be in 0..{self.n_chunks - 1} (a chunk index); got {self.example}")
        if model is not None:
            n_ctx = getattr(model.cfg, "n_ctx", None)
            require(not n_ctx or self.seq_len <= n_ctx,
                    f"seq-len {self.seq_len} exceeds the model's context of {n_ctx} tokens; "
                    f"use --seq-len {n_ctx} or less")
            require(self.max_dims < model.cfg.d_model, f"max-dims must be below d_model ({model.cfg.d_model})")


@dataclass
class Result:
    header: dict
    config: Config
    text_set: dict
    residual: list[dict]
    down_input: list[dict]
    massive_activations: list[dict]
    n_massive: int
    n_massive_listed: int
    token_outliers: list[dict]
    outlier_dims: list[dict]
    attention: list[dict]
    attention_heads: list[dict]
    attention_overall: dict
    other_sinks: list[dict]
    example_pattern: dict  # layer → [n, n] head-mean pattern of one chunk's first n = min(T, 256) positions (numpy)
    example_tokens: list[str]  # those n tokens
    weight_outliers: list[dict]
    connections: dict
    token_types: list[dict]
    interventions: list[dict]
    m_act: float
    notes: list[str]
    warnings: list[str] = field(default_factory=list)  # problems that did not stop the run (results.json, report)
    skipped_layers: dict[int, str] = field(default_factory=dict)  # layer → what was not measured there and why

    def to_dict(self) -> dict:
        return {**self.header, "warnings": self.warnings, "skipped_layers": self.skipped_layers,
                "text_set": self.text_set, "residual": self.residual,
                "down_input": self.down_input,
                "massive_activations": self.massive_activations, "n_massive": self.n_massive,
                "n_massive_listed": self.n_massive_listed,
                "token_outliers": self.token_outliers, "outlier_dims": self.outlier_dims,
                "attention": self.attention, "attention_overall": self.attention_overall,
                "other_sinks": self.other_sinks, "weight_outliers": self.weight_outliers,
                "connections": self.connections, "token_types": self.token_types,
                "interventions": self.interventions, "m_act": self.m_act, "notes": self.notes}

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"residual": pd.DataFrame(self.residual), "down_input": pd.DataFrame(self.down_input),
                "massive_activations": pd.DataFrame(self.massive_activations),
                "attention_heads": pd.DataFrame(self.attention_heads),
                "weight_outliers": pd.DataFrame(self.weight_outliers),
                "neurons": pd.DataFrame(self.connections["neurons"]),
                "interventions": pd.DataFrame(self.interventions)}


# ---------------------------------------------------------------- inputs

def preflight(config: Config) -> None:
    """Check the text set before the model loads: a registered name, or a readable non-empty .txt file."""
    from pathlib import Path

    from interp.datasets import DATASETS, dataset_names
    from interp.texts import read_text_file

    spec = config.text_set
    if spec in DATASETS:
        return
    if Path(spec).expanduser().exists() or Path(spec).suffix:
        read_text_file(spec)
        return
    raise UserError(f"unknown text set {spec!r}; choose one of {', '.join(dataset_names('texts'))} or pass a .txt file")


def load_text_set(model, config: Config) -> TextSet:
    """The configured text set, chunked (n_chunks, or `limit` when smaller)."""
    docs = load_texts(config.text_set, n_docs=config.n_docs, seed=config.seed)
    n = min(config.n_chunks, config.limit) if config.limit else config.n_chunks
    first = bos_id(model.tokenizer, config.bos) is not None
    return chunk_texts(model.tokenizer, docs, config.seq_len, n, bos=first, source=config.text_set)


def is_causal(model) -> bool:
    """Decoder LMs attend causally; encoders (BERT-style) attend both ways (TransformerLens `cfg.attention_dir`)."""
    return getattr(model.cfg, "attention_dir", "causal") != "bidirectional"


# ---------------------------------------------------------------- connections

def _neuron_rows(model, stats: out.ResidualStats, massive_dims: set[int],
                 layers: dict[int, out.LayerDown]) -> list[dict]:
    """Per layer read: the down-projection neuron with the largest |input| and the residual dims its column writes to.
    On an MoE layer a neuron is one of a routed expert's (`expert` its index) or of the shared expert's ("shared");
    `neuron` is its index within that expert, and its input counts the tokens routed to the expert only."""
    rows = []
    profile = {r["layer"]: r for r in stats.down_profile()}
    for layer, down in layers.items():
        dmax = stats.dim_max["down"][layer, :down.width]
        j = int(dmax.argmax())
        w = down.column(j, model.cfg.d_model)
        expert, neuron = down.label(j)
        top = w.abs().topk(min(3, w.numel())).indices.tolist()
        prof = profile[layer]
        rows.append({"layer": layer, "mlp": down.kind, "expert": expert, "neuron": neuron, "max_input": float(dmax[j]),
                     "input_ratio_to_median": float(dmax[j]) / max(prof["median_abs"], 1e-12),
                     "massive": bool(dmax[j] > stats.abs_thr and dmax[j] >= stats.ratio * prof["median_abs"]),
                     "writes_to": top, "weights": [float(w[d]) for d in top],
                     "column_ratio": float(out.column_ratios(w[:, None])[0]),
                     "writes_to_outlier_dims": sorted(set(top) & massive_dims)})
    return rows


def down_rows(stats: out.ResidualStats, layers: dict[int, out.LayerDown]) -> list[dict]:
    """The down-projection input profile, per layer read, with its MLP kind; on an MoE layer `top_dims` are neurons
    within their experts, `top_experts` the experts (index, or "shared")."""
    rows = []
    for row in stats.down_profile():
        down = layers[row["layer"]]
        labels = [down.label(j) for j in row["top_dims"]]
        rows.append({**row, "mlp": down.kind, "top_dims": [j for _, j in labels],
                     "top_experts": [e for e, _ in labels] if down.kind == "moe" else None})
    return rows


def _writer(model, stats: out.ResidualStats, down: out.LayerDown, dim: int) -> tuple[int | str | None, int, float]:
    """(expert, neuron) of the layer's neuron with the largest |input| × |W_down[dim, j]| and the sign of its write
    into `dim` (expert None on a dense layer)."""
    w = down.weight(model.cfg.d_model)[dim]
    j = int((stats.dim_max["down"][down.layer, :down.width].float() * w.abs()).argmax())
    sign = float(stats.dim_where["down"][down.layer, j, 2]) * float(torch.sign(w[j]))
    return *down.label(j), sign


def lifecycle(model, stats: out.ResidualStats, downs: dict[int, out.LayerDown]) -> list[dict]:
    """Per massive dim: the layer that creates it (first block with a hit) and the one that cancels it, with the
    neuron writing into the dim there and whether its write has the sign of h (creates) or the opposite (cancels).
    On an MoE layer the neuron is an expert's (`*_expert`); a layer whose down-projection is not read has None."""
    layers_of: dict[int, list[int]] = {}
    for layer, dims in stats.hit_dims.items():
        for d in dims:
            layers_of.setdefault(d, []).append(layer)
    rows = []
    for d, layers in sorted(layers_of.items()):
        first = min(layers)
        after = [layer for layer in range(first + 1, model.cfg.n_layers) if layer not in layers]
        h_sign = float(stats.dim_where["resid"][first, d, 2])
        row = {"dim": d, "emerges_at": first, "creator_expert": None, "creator_neuron": None, "creator_same_sign": None,
               "cancelled_at": None, "canceller_expert": None, "canceller_neuron": None,
               "canceller_opposite_sign": None}
        if first in downs:
            e, j, s = _writer(model, stats, downs[first], d)
            row.update(creator_expert=e, creator_neuron=j, creator_same_sign=s == h_sign)
        if after:
            row.update(cancelled_at=after[0])
            if after[0] in downs:
                ec, jc, sc = _writer(model, stats, downs[after[0]], d)
                prev_sign = float(stats.dim_where["resid"][after[0] - 1, d, 2])
                row.update(canceller_expert=ec, canceller_neuron=jc, canceller_opposite_sign=sc == -prev_sign)
        rows.append(row)
    return rows


def position_overlap(act: set, attn: set) -> dict:
    """An et al.'s consistency |P_act ∩ P_attn| / |P_act| and the Jaccard index (None when undefined)."""
    inter, union = len(act & attn), len(act | attn)
    return {"activation_positions": len(act), "attention_positions": len(attn), "both": inter,
            "share_of_activation": inter / len(act) if act else None, "jaccard": inter / union if union else None}


def token_type_counts(kind: str, counts: Counter, tokenizer) -> list[dict]:
    """Rows {kind, layer, type, count, share} from `counts[(layer, first, token_id)]` (positions, every one counted;
    `first`: position 0): per layer, and over all layers (`layer` "all", each layer's positions counted)."""
    by_layer: dict = {}
    for (layer, first, tid), c in counts.items():
        kind_of = out.token_type(0 if first else 1, token_string(tokenizer, tid))
        for key in (layer, "all"):
            by_layer.setdefault(key, Counter())[kind_of] += c
    rows = []
    for layer in sorted(by_layer, key=lambda k: (k != "all", k if k != "all" else -1)):
        total = sum(by_layer[layer].values())
        rows += [{"kind": kind, "layer": layer, "type": t, "count": c, "share": c / total}
                 for t, c in by_layer[layer].most_common()]
    return rows


# ---------------------------------------------------------------- interventions

def choose_dims(stats: out.ResidualStats, max_dims: int) -> tuple[int, list[int], bool]:
    """(layer, dims, massive): the emergence layer of the massive activations and their most frequent dims; without
    any, the layer with the largest top-1 / median ratio and its top dims (a candidate, flagged massive=False)."""
    if stats.hit_counts:
        layer = min(layer for layer, _ in stats.hit_counts)
        counts = Counter({d: c for (lay, d), c in stats.hit_counts.items() if lay == layer})
        return layer, [d for d, _ in counts.most_common(max_dims)], True
    prof = stats.profile()
    layer = max(prof, key=lambda r: r["top1"] / max(r["median_abs"], 1e-12))["layer"]
    return layer, prof[layer]["top_dims"][:max_dims], False


def carrier_positions(h: torch.Tensor, dims: list[int], massive: bool, abs_thr: float, ratio: float) -> list[int]:
    """Positions (of one sequence's `[pos, d]` block output) holding the massive scalars in `dims`: Sun's rule;
    without massive activations, Sun's recipe of position 0 and the position of the largest |h| in `dims`."""
    a = h.abs().float()
    if massive:
        hit = ((a[:, dims] > abs_thr) & (a[:, dims] >= ratio * a.median())).any(-1)
        return hit.nonzero()[:, 0].tolist()
    return sorted({0, int(a[:, dims].amax(-1).argmax())})


class SetScalars:
    """Forward hook on `blocks.layer.hook_resid_post`: at each sequence's carrier positions (found with `find_dims`),
    set `dims` to `targets[role]` (role 0: position 0, role 1: later positions). With `onto`, the dims keep their
    values and the change that setting would make is added to the dims `onto` instead (same change, other dims)."""

    def __init__(self, layer: int, find_dims: list[int], dims: list[int], targets: Float[Tensor, "2 k"],
                 massive: bool, abs_thr: float, ratio: float, onto: list[int] | None = None):
        self.layer, self.find_dims, self.dims, self.targets, self.onto = layer, find_dims, dims, targets, onto
        self.massive, self.abs_thr, self.ratio = massive, abs_thr, ratio
        self.mask = None
        self.n_positions = 0

    def hook(self, x, hook):
        x = x.clone()
        width = x.shape[1]
        for row in range(x.shape[0]):
            n = int(self.mask[row].sum()) if self.mask is not None else width
            start = width - n
            for p in carrier_positions(x[row, start:], self.find_dims, self.massive, self.abs_thr, self.ratio):
                value = self.targets[int(p > 0)].to(x.dtype).to(x.device)
                if self.onto is None:
                    x[row, start + p, self.dims] = value
                else:
                    x[row, start + p, self.onto] += value - x[row, start + p, self.dims]
                self.n_positions += 1
        return x

    def hooks(self):
        return [(f"blocks.{self.layer}.hook_resid_post", self.hook)]


@dataclass
class CarrierMoments:
    """Per role (0: position 0, 1: later carrier positions) and residual dim: sum, sum of squares and count of
    h_layer at the carrier positions of a chunk set."""

    sums: Float[Tensor, "2 d"]
    squares: Float[Tensor, "2 d"]
    counts: Float[Tensor, "2"]

    def means(self) -> Float[Tensor, "2 d"]:
        """Mean per role; a role never seen takes the other role's mean."""
        means = self.sums / self.counts.clamp_min(1)[:, None]
        for role in (0, 1):
            if self.counts[role] == 0:
                means[role] = means[1 - role]
        return means.float()

    def change_rms(self, mode: str) -> Float[Tensor, " d"]:
        """Per dim: root mean square over carrier positions of the change set-`mode` ("zero" | "mean") makes there."""
        n = self.counts.sum().clamp_min(1)
        if mode == "zero":
            return (self.squares.sum(0) / n).sqrt().float()
        spread = self.squares - self.sums ** 2 / self.counts.clamp_min(1)[:, None]
        return (spread.sum(0).clamp_min(0) / n).sqrt().float()


@torch.no_grad()
def carrier_moments(model, seqs, layer: int, find_dims: list[int], massive: bool, config: Config) -> CarrierMoments:
    """Sum, sum of squares and count of h_layer at the carrier positions of `seqs`, by role, for every dim."""
    d = model.cfg.d_model
    m = CarrierMoments(torch.zeros(2, d, dtype=torch.float64), torch.zeros(2, d, dtype=torch.float64),
                       torch.zeros(2, dtype=torch.float64))
    state = {}

    def read(x, hook):
        width = x.shape[1]
        for row in range(x.shape[0]):
            n = int(state["mask"][row].sum())
            found = carrier_positions(x[row, width - n:], find_dims, massive, config.massive_abs, config.massive_ratio)
            for p in found:
                h = x[row, width - n + p].double().cpu()
                m.sums[int(p > 0)] += h
                m.squares[int(p > 0)] += h ** 2
                m.counts[int(p > 0)] += 1

    hooks = [(f"blocks.{layer}.hook_resid_post", read)]

    def step(idx: list[int], tokens: Tensor, mask: Tensor) -> None:
        state["mask"] = mask
        with stopped_at(model, layer + 1) as stop:
            model.run_with_hooks(tokens, attention_mask=mask, return_type=None, stop_at_layer=stop, fwd_hooks=hooks)

    with sdpa_attention(model, [n for n, _ in hooks]):  # out of memory: halved, `m` restored (run_batches)
        run_batches(model, seqs, config.batch_size, step, desc="means", progress=config.progress, state=[m])
    return m


def norm_stratum(x: float) -> str:
    """The decade of a change's size: "1e2" for 100 ≤ x < 1000, "0" for no change."""
    return f"1e{math.floor(math.log10(x))}" if x > 0 else "0"


def norm_matched_dims(dims: list[int], change: Sequence[float], draws: int, seed: int, key: str) -> tuple[Draws, bool]:
    """Random dims for the control of intervening on `dims`, matched on the size of the change (`change[d]`, one
    value per dim): dims whose change falls in the same decade as each chosen dim's, and `moved` False. Where too
    few ordinary dims are comparable (massive dims), plain random dims and `moved` True: the control then moves
    the chosen dims' change onto them (the same change vector, so the same norm, on other dims)."""
    labels = {d: norm_stratum(float(c)) for d, c in enumerate(change)}
    pool = range(len(change))
    try:
        return matched_draws(dims, pool, stratum=labels, draws=draws, seed=seed, matched_on="norm", key=key), False
    except ControlUnavailable:
        plain = matched_draws(dims, pool, draws=draws, seed=seed, matched_on="norm", key=key)
        return Draws(plain.sets, "norm", dict(sorted(Counter(labels[d] for d in dims).items()))), True


def has_lm_head(model) -> bool:
    return hasattr(model.original_model, "lm_head") or hasattr(model.original_model, "get_output_embeddings") \
        and model.original_model.get_output_embeddings() is not None


def sink_options(model, config: Config) -> passes.SinkOptions:
    """How this analysis reads the sink statistics (the same in every pass, so the baseline passes are shared)."""
    return passes.SinkOptions(tuple(attention_layers(model)[0]), eps=config.sink_epsilon,
                              exclude_first_query=not config.include_first_query, causal=is_causal(model),
                              outlier_frac=config.outlier_key_frac)


@torch.no_grad()
def measure(model, seqs, config: Config, intervention: SetScalars | None = None, loss: bool = True) -> dict:
    """Mean next-token loss, F-Attn, Gu's sink rate and M-Act on `seqs`, under `intervention` if given: the text pass
    (`interp.passes`: one forward per batch, the pattern reduced as it is made, the loss a chunk of positions at a
    time). Without an intervention it is the stored baseline pass, which gated_attention reads too when it asks for
    the same chunks (`interp audit`). Under torchrun each rank measures whole batches of its shard; sums, counts,
    maxima and the intervention's position count are merged (`interp.distributed`)."""
    options = sink_options(model, config)
    if intervention is None:
        return passes.baseline(model, seqs, options, batch_size=config.batch_size, loss=loss, desc="measure",
                               progress=config.progress).summary()
    lengths = [len(s) for s in seqs]
    order = distributed.batch_order(lengths, config.batch_size)
    start = intervention.n_positions

    def part(idx: list[int]) -> tuple[passes.TextPass, int]:
        # out of memory: the batch is halved; the statistics and the intervention's count are restored first
        found = passes.stream(model, [seqs[i] for i in idx], options, batch_size=config.batch_size, loss=loss,
                              hooks=intervention.hooks(), before_batch=lambda mask: setattr(intervention, "mask", mask),
                              state=[intervention], desc="measure", progress=config.progress)
        return found.renumbered(idx), intervention.n_positions - start

    found, positions = distributed.map_stream(part, len(seqs), lambda a, b: (a[0].merge(b[0], order), a[1] + b[1]),
                                              lengths=lengths, batch_size=config.batch_size)
    intervention.n_positions = start + positions
    return found.summary()


MEASURED = ("loss", "first_token", "sink_rate", "m_act", "n_positions")


def control_summary(what: str, layer: int, rows: list[dict], draws: Draws, moved: bool) -> dict:
    """The mean ± sd row of a random control (`interp.controls.control_row`) and how it was matched on norm."""
    values = {k: [r[k] for r in rows] for k in MEASURED if any(r[k] is not None for r in rows)}
    return {"what": what, "dims": None, "layer": layer, "draw": "mean ± sd", **dict.fromkeys(MEASURED),
            **control_row(values, draws), "norm_match": "moved_change" if moved else "stratum"}


def interventions(model, texts: TextSet, config: Config, notes: list[str], warnings: list[str]) -> list[dict]:
    """Sun's set-zero / set-mean at the emergence layer, chosen on one split and measured on the other (`split`
    "held_out"; the same settings on the selection chunks are the in-sample rows, `split` "selection"), against
    random dims matched on the size of the change (`random_draws` draws, held out) and a repeated-token input."""
    sel, held = split(len(texts), config.selection_fraction, config.seed)
    sel_seqs, held_seqs = [texts.chunks[i] for i in sel], [texts.chunks[i] for i in held]
    # selection: residual statistics, carrier means, baseline and the two settings in-sample; held out: baseline, the
    # two settings, their random draws and the repeated-token input
    passes = [sequence_cost(sel_seqs, 5), sequence_cost(held_seqs, 4 + 2 * config.random_draws)]
    announce("interventions", sum(f for f, _, _ in passes), sum(t for _, t, _ in passes), config.seq_len,
             "eager attention, logits in chunks of positions", enabled=config.progress)
    sel_stats = out.residual_stats(model, sel_seqs, batch_size=config.batch_size, down=False,
                                   abs_thr=config.massive_abs, ratio=config.massive_ratio, tau=config.token_tau,
                                   progress=config.progress)
    layer, dims, massive = choose_dims(sel_stats, config.max_dims)
    if not massive:
        notes.append(f"No massive activation on the selection chunks: the interventions use the candidate dims {dims} "
                     f"of layer {layer} (largest top-1 / median ratio) at position 0 and each chunk's largest |h| in "
                     "them.")
    moments = carrier_moments(model, sel_seqs, layer, dims, massive, config)
    means = moments.means()
    lm = has_lm_head(model) and is_causal(model)
    if not has_lm_head(model):
        notes.append("The model has no LM head: loss / perplexity skipped.")
    elif not lm:
        notes.append("Bidirectional encoder: next-token loss / perplexity is undefined and skipped "
                     "(masked-LM loss is not computed).")
    base = {"what": "baseline", "dims": [], "layer": None, "draw": None, "n_positions": 0,
            **measure(model, held_seqs, config, loss=lm)}
    rows = [base]
    in_sample = [{"what": "baseline", "dims": [], "layer": None, "draw": None, "n_positions": 0, "split": "selection",
                  **measure(model, sel_seqs, config, loss=lm)}]
    scalars = dict(massive=massive, abs_thr=config.massive_abs, ratio=config.massive_ratio)
    for mode in ("zero", "mean"):
        target = torch.zeros_like(means) if mode == "zero" else means
        for part_name, part, into in (("held_out", held_seqs, rows), ("selection", sel_seqs, in_sample)):
            iv = SetScalars(layer, dims, dims, target[:, dims], **scalars)
            into.append({"what": f"set_{mode}", "dims": dims, "layer": layer, "draw": None, "split": part_name,
                         **measure(model, part, config, iv, loss=lm), "n_positions": iv.n_positions})
        change = moments.change_rms(mode).tolist()
        draws, moved = norm_matched_dims(dims, change, config.random_draws, config.seed, mode)
        if moved:
            warn(warnings, f"set_{mode}: no ordinary dim changes as much as the chosen dims {dims} (strata "
                           f"{draws.strata}); the random control moves the same change onto random dims instead")
        random_rows = []
        for k, rdims in enumerate(draws):
            iv = (SetScalars(layer, dims, dims, target[:, dims], onto=rdims, **scalars) if moved
                  else SetScalars(layer, dims, rdims, target[:, rdims], **scalars))
            random_rows.append({"what": f"set_{mode}_random", "dims": rdims, "layer": layer, "draw": k,
                                **measure(model, held_seqs, config, iv, loss=lm), "n_positions": iv.n_positions,
                                "matched_on": draws.matched_on, "strata": dict(draws.strata)})
        rows += random_rows + [control_summary(f"set_{mode}_random", layer, random_rows, draws, moved)]
    rep = repeated_token_set(model.tokenizer, config.seq_len, len(held_seqs), bos=texts.bos, seed=config.seed)
    rows.append({"what": "repeated_token", "dims": [], "layer": None, "draw": None, "n_positions": 0,
                 **measure(model, rep.chunks, config, loss=lm)})
    rows += in_sample
    for r in rows:
        r.setdefault("split", "held_out")
        r["massive"] = massive
        r["n_selection"], r["n_measured"] = len(sel), len(held)
    return rows

# ---------------------------------------------------------------- run

def residual_statistics(model, seqs: list[list[int]], config: Config) -> out.ResidualStats:
    """`out.residual_stats` (down-projection inputs included) shard by shard of whole batches (`stages.shards`),
    each shard's statistics stored in the run directory (stage "residual_stats"), then merged in the one-stream
    order (`ResidualStats.merge`: the same hits, maxima and their places; sums added shard by shard)."""
    lengths = [len(s) for s in seqs]
    parts = stages.shards(lengths, config.batch_size)

    def shard_stats(_, shard: list[list[int]]) -> list[dict]:
        return [out.residual_stats(model, [seqs[i] for i in idx], batch_size=config.batch_size, down=True,
                                   abs_thr=config.massive_abs, ratio=config.massive_ratio, tau=config.token_tau,
                                   progress=config.progress).renumbered(idx).state() for idx in shard]

    key = {"version": 1, "model": stages.model_key(model), "sequences": stages.digest(seqs),
           "shards": stages.digest(parts), "thresholds": [config.massive_abs, config.massive_ratio, config.token_tau]}
    states = stages.current().items("residual_stats", key, parts, shard_stats, 1)
    order = distributed.batch_order(lengths, config.batch_size)
    stats = out.ResidualStats.from_state(states[0])
    for state in states[1:]:
        stats.merge(out.ResidualStats.from_state(state), order)
    return stats


def run(model, config: Config | None = None) -> Result:
    """Profile, find, connect and ablate the outliers of `model` on the configured text set."""
    config = config or Config()
    config.validate(model)
    notes: list[str] = []
    warnings: list[str] = []
    skipped: dict[int, str] = {}
    down_layers, no_down = out.down_layers(model)
    skip_layers(skipped, warnings, no_down, "MLP down-projection (input profile, neurons, lifecycle)")
    attn_layers = attention_scope("systematic_outliers", model, skipped, warnings)  # softmax layers: sinks, q/k/v
    moe = sorted(layer for layer, d in down_layers.items() if d.kind == "moe")
    if moe:
        notes.append(f"Mixture-of-experts MLP in layer{'s' if len(moe) > 1 else ''} {', '.join(map(str, moe))}: the "
                     "down-projection input is read per routed expert on the tokens routed to it (and the shared "
                     "expert's on every token); its neurons, weight outliers and writers are (expert, neuron) pairs.")
    texts = load_text_set(model, config)
    seqs = texts.chunks
    if config.example >= len(seqs):
        raise UserError(f"example {config.example} is out of range: only {len(seqs)} chunks; "
                        f"use --example 0..{len(seqs) - 1}")
    announce("residual statistics (SDPA, no logits)", *sequence_cost(seqs), enabled=config.progress)
    stats = residual_statistics(model, seqs, config)
    causal = is_causal(model)
    if not causal:
        notes.append("Bidirectional attention: Gu's α[k] averages over every query, not only q ≥ k.")
    announce("attention patterns (eager, one layer's pattern at a time)", *sequence_cost(seqs), enabled=config.progress)
    att = sinks.attention_metrics(model, seqs, batch_size=config.batch_size, layers=attn_layers,
                                  eps=config.sink_epsilon, exclude_first_query=not config.include_first_query,
                                  causal=causal, outlier_frac=config.outlier_key_frac, qkv_norms=True,
                                  example=config.example, progress=config.progress)
    tok = model.tokenizer
    hits = [{**h, "token": token_string(tok, h["token_id"]),
             "token_type": out.token_type(h["position"], token_string(tok, h["token_id"]))} for h in stats.hits]
    massive_dims = {d for _, d in stats.hit_counts}
    act_pos = {(h["sequence"], h["position"]) for h in stats.token_hits}
    attn_pos = {(s, p) for _, s, p, _ in att.outlier_keys}
    connections = {
        "neurons": _neuron_rows(model, stats, massive_dims, down_layers),
        "lifecycle": lifecycle(model, stats, down_layers),
        "position_overlap": position_overlap(act_pos, attn_pos),
        "qkv_norms": att.qkv_norm_rows(),
    }
    if stats.n_hits_dropped:
        warn(warnings, f"massive_activations lists the first {len(stats.hits)} of {stats.n_hits} massive activations "
                       f"({stats.n_hits_dropped} not listed); n_massive, outlier_dims and token_types count them all")
    token_types = (token_type_counts("massive_activation", stats.hit_positions, tok)
                   + token_type_counts("activation_outlier", Counter((h["layer"], h["position"] == 0, h["token_id"])
                                                                     for h in stats.token_hits), tok)
                   + token_type_counts("attention_outlier", Counter((layer, p == 0, t)
                                                                    for layer, _, p, t in att.outlier_keys), tok))
    rows = interventions(model, texts, config, notes, warnings)
    summary = texts.first_token_summary()
    text_set = {"source": texts.source, "seq_len": texts.seq_len, "bos": texts.bos, "n_chunks": len(texts),
                "first_token_id": summary["id"], "first_token": summary["token"], "first_token_share": summary["share"]}
    header = run_header("systematic_outliers", model, config)
    return Result(
        header=header, config=config, text_set=text_set, residual=stats.profile(),
        down_input=down_rows(stats, down_layers),
        massive_activations=hits, n_massive=stats.n_hits, n_massive_listed=len(stats.hits),
        token_outliers=[{**h, "token": token_string(tok, h["token_id"])} for h in stats.token_hits],
        outlier_dims=stats.outlier_dims(0.5), attention=att.per_layer(), attention_heads=att.per_head(),
        attention_overall={**att.overall(), "sink_set_layers": dict(sorted(att.sink_layers.items()))},
        other_sinks=att.other_sinks(tok),
        example_pattern={layer: p.numpy() for layer, p in att.example.items()},
        example_tokens=[token_string(tok, t) for t in seqs[config.example][:sinks.EXAMPLE_TOKENS]],
        weight_outliers=out.weight_outliers(model, config.weight_ratio),
        connections=connections, token_types=token_types, interventions=rows, m_act=out.m_act(stats.layer_max()),
        notes=notes, warnings=warnings, skipped_layers=skipped)


# ---------------------------------------------------------------- report

def profile_figure(rows: list[dict], title: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    x = [r["layer"] for r in rows]
    for key, colour in (("top1", "#d62728"), ("top2", "#ff7f0e"), ("top3", "#bcbd22"), ("median_abs", "#1f77b4")):
        fig.add_trace(go.Scatter(x=x, y=[max(r[key], 1e-12) for r in rows], name=key, mode="lines+markers",
                                 line=dict(color=colour)))
    fig.update_layout(title=title, xaxis_title="layer (block output)", yaxis_title="|value|", yaxis_type="log")
    return fig


def example_figure(pattern: list, tokens: list[str], layer: int):
    import plotly.graph_objects as go

    labels = [f"{i}:{t!r}" for i, t in enumerate(tokens)]
    fig = go.Figure(go.Heatmap(z=pattern, x=labels, y=labels, colorscale="Viridis", colorbar=dict(title="attention")))
    fig.update_layout(title=f"Head-mean attention of one chunk, layer {layer}", xaxis_title="key", yaxis_title="query",
                      yaxis_autorange="reversed", height=650)
    return fig


def _t64_text(value: float | None, seq_len: int) -> float | str:
    """The T = 64 sink rate, or why there is none."""
    if value is not None:
        return value
    return f"n/a (chunks of {seq_len} < 64 tokens)" if seq_len < 64 else "n/a (bidirectional attention)"


def build_report(result: Result, tokenizer=None):
    """Headline numbers, layer profiles, outlier tables, attention, weights, connections, interventions."""
    rep = analysis_report(result.header, result.warnings)
    cfg, ts = result.config, result.text_set
    rows = result.interventions
    base = next(r for r in rows if r["what"] == "baseline" and r["split"] == "held_out")
    rep.add_metrics({
        "text set": f"{ts['source']}: {ts['n_chunks']} × {ts['seq_len']} tokens",
        "first token": f"{ts['first_token']!r} ({ts['first_token_share']:.0%} of chunks)",
        "massive activations (Sun)": result.n_massive,
        "outlier dims": ", ".join(str(r["dim"]) for r in result.outlier_dims) or "none",
        "M-Act": result.m_act,
        "F-Attn (first-token attention)": result.attention_overall["first_token"],
        f"sink rate (ε={cfg.sink_epsilon}, T = {ts['seq_len']}), %": result.attention_overall["sink_rate"],
        "sink rate at Gu's T = 64, %": _t64_text(result.attention_overall.get("sink_rate_t64"), ts["seq_len"]),
        "loss": base["loss"] if base["loss"] is not None else "skipped (no LM head)",
    })
    for note in result.notes:
        rep.add_notice(note, level="info")
    rep.add_heading("Residual stream profile")
    rep.add_paragraph("Per block output h_ℓ: the three largest |h| and the median |h| of each chunk, averaged over "
                      f"chunks (log axis). A massive activation (Sun et al.) is |h| > {cfg.massive_abs:g} and ≥ "
                      f"{cfg.massive_ratio:g} × the chunk's median |h|.")
    rep.add_figure(profile_figure(result.residual, "Block output |h| per layer"))
    rep.add_table(pd.DataFrame(result.residual), caption="Residual profile (top_dims: dims of the 3 largest |h|)")
    if result.down_input:
        rep.add_figure(profile_figure(result.down_input, "MLP down-projection input |x| per layer"))
    rep.add_heading("Massive activations")
    if result.massive_activations:
        rep.add_table(pd.DataFrame(result.massive_activations), caption=f"{result.n_massive} hits (Sun's rule), "
                      f"{result.n_massive_listed} listed")
        rep.add_table(pd.DataFrame(result.outlier_dims), caption="Dims massive in at least half the blocks")
    else:
        rep.add_paragraph("No massive activation by Sun's rule in any block.")
    if result.token_types:
        rep.add_table(pd.DataFrame(result.token_types), caption="Token types of outlier positions (An et al.)")
    rep.add_heading("Attention sinks")
    rep.add_paragraph("first_token: mean attention to the chunk's first token over queries "
                      + ("(query 0 included)" if cfg.include_first_query else "1..T−1") + ", heads averaged; "
                      f"sink_rate: % of heads × chunks with Gu's α[0] > {cfg.sink_epsilon} at the chunk length; "
                      "sink_rate_t64: the same on each chunk's first 64 tokens (Gu et al.'s T; the first 64 rows of a "
                      "causal pattern are the 64-token prefix's); sink_ratio: An's ρ, the "
                      "mean share of a head's attention to the sink set S (the attention-outlier keys, ≥ "
                      f"{cfg.outlier_key_frac} · "
                      "T, of the first layer where the chunk has any; kept for later layers, 0 before).")
    rep.add_table(pd.DataFrame(result.attention), caption="Per layer")
    heads = pd.DataFrame(result.attention_heads)
    every_layer = range(int(heads["layer"].max()) + 1)  # skipped (linear-attention) layers: empty rows
    grid = heads.pivot(index="layer", columns="head", values="first_token").reindex(every_layer).values
    rep.add_figure(layer_head_heatmap(grid, "First-token attention per head", "F-Attn", diverging=False))
    grid = heads.pivot(index="layer", columns="head", values="sink_rate").reindex(every_layer).values
    rep.add_figure(layer_head_heatmap(grid, "Sink rate per head (%)", "%", diverging=False))
    if result.other_sinks:
        rep.add_table(pd.DataFrame(result.other_sinks), caption="Attention-outlier keys after the first token")
    if result.example_pattern:
        f_attn = {r["layer"]: r["first_token"] for r in result.attention}
        layer = max(result.example_pattern, key=lambda k: (f_attn.get(k, 0.0), -k))
        n = len(result.example_pattern[layer])
        shown = f"its first {n} of {ts['seq_len']} tokens" if n < ts["seq_len"] else f"all {n} tokens"
        rep.add_figure(example_figure(np.asarray(result.example_pattern[layer]), result.example_tokens[:n], layer),
                       caption=f"Chunk {cfg.example}, {shown} (the example keeps at most {sinks.EXAMPLE_TOKENS}), in "
                               "the layer with the largest first-token attention over the text set")
    rep.add_heading("Weight outliers")
    if result.weight_outliers:
        w = pd.DataFrame(result.weight_outliers)
        rep.add_table(w.sort_values("max_ratio", ascending=False).head(20),
                      caption=f"Largest per-column max/mean |W| (outlier: > {cfg.weight_ratio:g})")
    rep.add_heading("Connections")
    rep.add_table(pd.DataFrame(result.connections["neurons"]),
                  caption="Per layer: the down-projection neuron with the largest input and the dims its column "
                          "writes to")
    if result.connections["lifecycle"]:
        rep.add_table(pd.DataFrame(result.connections["lifecycle"]), caption="Massive dims: created and cancelled")
    rep.add_table(pd.DataFrame([result.connections["position_overlap"]]),
                  caption="Activation-outlier positions (An's token rule) vs attention-outlier keys")
    if result.connections["qkv_norms"]:
        rep.add_table(pd.DataFrame(result.connections["qkv_norms"]),
                      caption="q/k/v norms at attention-outlier keys vs the rest")
    rep.add_heading("Interventions")
    rep.add_paragraph("Sun et al.'s set-zero / set-mean: dims, layer and means chosen on "
                      f"{rows[0]['n_selection']} chunks, effects measured on the other {rows[0]['n_measured']}. "
                      f"Control: {cfg.random_draws} draws of as many random dims at the same positions, matched on the "
                      "size of the change (same decade; where no ordinary dim compares, the same change moved onto "
                      "random dims: norm_match 'moved_change'); repeated-token input (Gu et al.'s negative control "
                      "for sinks). Rows with split 'selection' repeat the baseline and the "
                      "two settings on the selection chunks (in-sample).")
    bars = []
    for r in (r for r in rows if r["split"] == "held_out"):
        if r["what"] in ("set_zero", "set_mean"):
            bars.append({**r, "label": r["what"], "selection": "selected"})
        elif r["draw"] == "mean ± sd":
            bars.append({**r, "label": r["what"].removesuffix("_random"), "selection": "random"})
    if bars and base["loss"] is not None:
        rep.add_figure(intervention_bars(bars, ["loss", "first_token", "m_act"], baseline=base))
    rep.add_table(pd.DataFrame(rows), caption="Interventions (per draw and mean ± sd for the random control)")
    rep.add_run_section(result.header)
    return rep
