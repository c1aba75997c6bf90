"""Gated attention (Qiu et al. 2025, *Gated Attention for LLMs*, arXiv 2505.06708), side by side with an ungated model.

A gated model multiplies each head's softmax-attention output Y by a query-dependent sigmoid gate
before `o_proj`: Y' = Y ⊙ σ(X W_θ) (position G1, elementwise, head-specific: Qwen3-Next, Qwen3.5,
`organism-gated`). The paper finds the gates sparse (mean score 0.116, most scores < 0.5), the
gated output sparser than mere down-scaling explains, and the attention sink (first-token
attention 0.467 → 0.048) and massive activations (M-Act 1053 → 94) gone.

Per model, on a text set chunked to `seq_len` tokens and split in two (a selection part and a
held-out part, seeded):

1. Gate scores σ(z) from `blocks.L.attn.hook_q_gate` (gated models): per layer and head the mean,
   the share below 0.1 and the variance across tokens (of each gate element, averaged over the
   head's dims: the query dependence); per layer the histogram (bin 0.05), sd, min, max and the
   variance of the head means across heads.
2. Output sparsity: share of |Y| < θ (Y rebuilt as pattern · values, since `hook_z` is Y' on gated
   models), of |Y'| < θ, and of |ḡ·Y| < θ with ḡ the layer's mean gate from the selection part
   (the paper's control: sparsity beyond down-scaling).
3. Sink metrics (`interp.sinks`): first-token attention (F-Attn, queries ≥ 1) and Gu et al.'s sink
   rate (share of heads with α[0] > ε = 0.3), per layer; M-Act (`interp.outliers`).
4. The implicit scale s(q) = 1 − A[q, first token] per head (An et al. 2025's hypothesised gate
   of ungated models), on every model, beside the gate scores; on gated models the correlation
   across queries of each head's gate and its first-token attention.
5. Gate interventions (gated models; the toolkit's probes, not the paper's): gates forced to 1
   (the same weights ungated), set to their per-element mean over the selection part (query
   dependence removed), scaled by α → held-out (and in-sample) loss, first-token attention and
   M-Act; on every gated head, and on the heads selected on the selection part (lowest mean gate,
   or highest token variance) against random heads of the same number, never overlapping, several
   draws (mean ± sd), matched on the push: forcing a gate of mean ḡ to 1 makes the head's output
   ~1/ḡ times larger, so each random head gets the same intervention and then the rescale that
   gives it its paired selected head's push (`interp.gates.PushStats`, pairs by rank). The
   unmatched random row (no rescale) stays beside it, labelled.

Qwen3-Next / Qwen3.5 linear-attention (Gated DeltaNet) layers have no softmax pattern: their rows
carry null and the report says "no softmax pattern". `--compare MODEL` runs a second model the same
way; by default an organism is paired with its twin (`organism` ↔ `organism-gated`,
`organism-sink` ↔ `organism-sink-gated`).
Method, defaults and deviations: docs/gated_attention.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from interp import gates, passes, stages
from interp.analysis import CommonConfig, attention_scope, require, run_header, warn
from interp.bridge import hooks_active
from interp.controls import Draws, control_row, matched_draws, n_selected, split, wilson
from interp.cost import announce, sequence_cost
from interp.figures import intervention_bars, layer_head_heatmap
from interp.models import model_info
from interp.report import analysis_report

DATASET_FIELD = "text_set"
RENAMED_OPTIONS = {"select_fraction": "head_fraction"}
TWINS = {"organism": "organism-gated", "organism-gated": "organism",
         "organism-sink": "organism-sink-gated", "organism-sink-gated": "organism-sink"}
PUBLIC_KEYS = ("gated", "gates", "sparsity", "attention", "m_act", "interventions")
METRICS = ("loss", "first_token", "sink_rate", "m_act", "loss_in_sample")  # measured under each intervention
Head = gates.Head


@dataclass
class Config(CommonConfig):
    # the text set, also --dataset: a registered name (--list) or a .txt file; paper: a held-out LM test set
    text_set: str = "natural-text"
    seq_len: int = 64  # tokens per chunk (Gu et al.'s sink rate is defined at T = 64; the paper evaluates at 4096)
    n_chunks: int = 64  # chunks of the text set used (fewer if the text is shorter)
    n_docs: int = 500  # hub text sets: a seeded, streamed sample of N documents (An et al. and Sun et al.: 500)
    # a BOS first in every chunk: unset, where the model's own tokenizer adds one (as trained; Gu et al.'s sink rate);
    # --bos always (a BOS-like token where it adds none, e.g. Qwen's <|endoftext|>); --no-bos never
    bos: bool | None = None
    selection_fraction: float = 0.5  # share of chunks for head selection and gate means; the rest is held out
    sparsity_threshold: float = 0.01  # θ: share of |output| < θ (paper Fig. 5: 1e-2 and 1e-3)
    sink_epsilon: float = 0.3  # sink rate threshold ε on α[0] (Gu et al. 2024)
    # gate interventions: auto = on gated models only, on = required
    interventions: Literal["auto", "on", "off"] = "auto"
    alphas: tuple[float, ...] = (0.5, 2.0)  # gate scale factors α (σ(z) → α·σ(z)); toolkit probe, not in the paper
    head_fraction: float = 0.25  # share of gated heads selected for the head-level interventions (at most 0.5)
    # head selection: lowest mean gate, or highest variance across tokens
    select_by: Literal["low_mean", "high_var"] = "low_mean"
    # random-head control draws (same number of heads, never the selected ones, matched on the push; at least 2)
    random_draws: int = 5
    compare: str = "auto"  # second model side by side: a model name/path, none, or auto (an organism's twin)

    def validate(self, model=None) -> None:
        super().validate(model)
        require(self.seq_len >= 2, f"seq-len must be at least 2; got {self.seq_len}")
        require(self.n_chunks >= 2,
                f"n-chunks must be at least 2 (one to select on, one held out); got {self.n_chunks}")
        require(self.n_docs >= 1, f"n-docs must be at least 1; got {self.n_docs}")
        require(0 < self.selection_fraction < 1, f"selection-fraction must be in (0, 1); got {self.selection_fraction}")
        require(self.sparsity_threshold > 0, f"sparsity-threshold must be > 0; got {self.sparsity_threshold}")
        require(0 < self.sink_epsilon < 1, f"sink-epsilon must be in (0, 1); got {self.sink_epsilon}")
        require(all(a >= 0 for a in self.alphas), f"alphas must be >= 0; got {self.alphas}")
        require(0 < self.head_fraction <= 0.5, f"head-fraction must be in (0, 0.5] so random heads can avoid "
                                                f"the selected ones; got {self.head_fraction}")
        if model is not None:
            n_ctx = getattr(model.cfg, "n_ctx", None)
            require(not n_ctx or self.seq_len <= n_ctx, f"seq-len {self.seq_len} exceeds the model's context {n_ctx}")
            require(self.interventions != "on" or gates.is_gated(model),
                    "--interventions on needs a gated-attention model (this one has no attention output gate); "
                    "use --interventions auto or off")
            require(bool(gates.softmax_layers(model)), "the model has no softmax-attention layer to measure")


def preflight(config: Config) -> None:
    """Check the options and that the text set loads, before any model is loaded."""
    from interp.datasets import load_dataset

    config.validate()
    load_dataset(config.text_set, "texts")


def compare_name(model, config: Config) -> str | None:
    """The second model's name: `compare`, or for "auto" the organism twin (None: one model)."""
    if config.compare == "none":
        return None
    if config.compare == "auto":
        return TWINS.get(model_info(model).name) if model is not None else None
    return config.compare


# ---------------------------------------------------------------- measurements

@dataclass
class ModelResult:
    """Everything measured on one model (the public keys, then details for the report and tables)."""

    name: str
    gated: bool
    gates: list[dict]
    sparsity: list[dict]
    attention: list[dict]
    m_act: float | None
    interventions: list[dict]
    layer_kinds: list[str]
    gate_layers: list[dict] = field(default_factory=list)
    sparsity_detail: list[dict] = field(default_factory=list)
    implicit_scale: list[dict] = field(default_factory=list)
    scale_histograms: dict = field(default_factory=dict)
    attention_heads: list[dict] = field(default_factory=list)
    m_act_layers: list[dict] = field(default_factory=list)
    selected_heads: list[list[int]] = field(default_factory=list)
    text: dict = field(default_factory=dict)
    skipped_layers: dict[int, str] = field(default_factory=dict)  # layer → what was not measured there and why

    def public(self) -> dict:
        return {key: getattr(self, key) for key in PUBLIC_KEYS}

    def details(self) -> dict:
        return {"layer_kinds": self.layer_kinds, "gate_layers": self.gate_layers,
                "sparsity_detail": self.sparsity_detail, "implicit_scale": self.implicit_scale,
                "attention_heads": self.attention_heads, "m_act_layers": self.m_act_layers,
                "selected_heads": self.selected_heads, "text": self.text, "skipped_layers": self.skipped_layers}


def text_set(model, config: Config):
    """The chunked text set for `model`'s tokenizer."""
    from interp.texts import chunk_texts, load_texts
    from interp.tokens import bos_id

    texts = load_texts(config.text_set, n_docs=config.n_docs, seed=config.seed, limit=config.limit)
    first = bos_id(model.tokenizer, config.bos) is not None
    return chunk_texts(model.tokenizer, texts, config.seq_len, config.n_chunks, bos=first, source=config.text_set)


def evaluate(model, layers, seqs, config: Config, desc: str) -> passes.TextPass:
    """Loss, sink metrics and M-Act on `seqs`: the text pass (`interp.passes`: one forward per batch, the pattern
    reduced as it is made, the loss a chunk of positions at a time). With no intervention active it is the stored
    baseline pass, read back where it was run on the same chunks (systematic_outliers' in `interp audit`)."""
    options = passes.SinkOptions(tuple(layers), eps=config.sink_epsilon)
    run = passes.measure if hooks_active(model) else passes.baseline
    return run(model, seqs, options, batch_size=config.batch_size, desc=desc, progress=config.progress)


def _select_heads(rows: list[dict], k: int, by: str) -> list[tuple[int, int]]:
    key = (lambda r: (r["mean"], r["layer"], r["head"])) if by == "low_mean" else \
          (lambda r: (-r["var_tokens"], r["layer"], r["head"]))
    return [(r["layer"], r["head"]) for r in sorted(rows, key=key)[:k]]


def sink_rate_ci(rate: float, n: int) -> list[float]:
    """Wilson 95 % interval (in %) of a sink rate given in % over `n` (head, sequence) pairs."""
    lo, hi = wilson(round(rate * n / 100), n)
    return [100 * lo, 100 * hi]


def push_rescale(selected: list[Head], draw: list[Head], push: dict[Head, float]) -> dict[Head, float]:
    """Per random head, the factor that gives it its paired selected head's push (pairs by rank of push, largest
    first): push[selected] / push[random]; 1 where the pushes are equal (to float precision)."""
    by_push = lambda heads: sorted(heads, key=lambda h: (-push[h], h))  # noqa: E731
    return {r: 1.0 if math.isclose(push[s], push[r], rel_tol=1e-6) else push[s] / push[r]
            for s, r in zip(by_push(selected), by_push(draw))}


def _random_row(what: str, draws: Draws, results: list[dict], selection: str, **extra) -> dict:
    values = {metric: [r[metric] for r in results] for metric in METRICS}
    return {"what": what, "heads": [[list(h) for h in d] for d in draws], "selection": selection,
            "n_heads": len(draws.sets[0]), **control_row(values, draws), **extra}


def gate_pass(model, seqs, config: Config, mean_gate: dict[int, float] | None = None) -> tuple:
    """`gates.measure` shard by shard of whole batches (`stages.shards`), each shard's (gate, sparsity, scale)
    statistics stored in the run directory (stage "gate_stats"), merged in the one-stream order (sums added shard
    by shard, counts, maxima and minima exact)."""
    parts = stages.shards([len(s) for s in seqs], config.batch_size)

    def shard_stats(_, shard: list[list[int]]) -> list[list[dict | None]]:
        return [[None if a is None else stages.state(a) for a in
                 gates.measure(model, [seqs[i] for i in idx], batch_size=config.batch_size,
                               theta=config.sparsity_threshold, mean_gate=mean_gate, progress=config.progress)]
                for idx in shard]

    key = {"version": 1, "model": stages.model_key(model), "sequences": stages.digest(seqs),
           "shards": stages.digest(parts), "theta": config.sparsity_threshold, "mean_gate": mean_gate}
    states = stages.current().items("gate_stats", key, parts, shard_stats, 1)
    classes = (gates.GateStats, gates.SparsityStats, gates.ScaleStats)
    merged = [None if a is None else stages.restore(c, a) for c, a in zip(classes, states[0])]
    for shard in states[1:]:
        merged = [None if m is None else m.merge(stages.restore(c, a)) for m, c, a in zip(merged, classes, shard)]
    return tuple(merged)


def _interventions(model, layers, fit, held, gate_fit: gates.GateStats, push: gates.PushStats,
                   config: Config) -> tuple[list[dict], list]:
    """Rows {what, heads, selection, n_heads, loss, first_token, sink_rate, m_act, loss_in_sample} (held-out
    part, loss also on the selection part). `random`: draws matched on the push (each random head rescaled to its
    paired selected head's push); `random_unmatched`: the same heads without the rescale (where pushes differ)."""
    means = gate_fit.element_means()
    all_heads = [(layer, h) for layer in gate_fit.layers for h in range(model.cfg.n_heads)]
    selected = _select_heads(gate_fit.head_rows(), n_selected(len(all_heads), config.head_fraction), config.select_by)
    draws = matched_draws(selected, all_heads, draws=config.random_draws, seed=config.seed, matched_on="push",
                          key="heads")
    factors = push.factors()
    kinds = [("gates=1", lambda hs: gates.force_gates_one(model, hs), factors["one"]),
             ("gates=mean", lambda hs: gates.gates_to_mean(model, means, hs), factors["mean"])]
    kinds += [(f"gates×{a:g}", lambda hs, a=a: gates.scale_gates(model, a, hs), {h: a for h in all_heads})
              for a in config.alphas]
    n_sink = len(held) * len(layers) * model.cfg.n_heads

    def measure(contexts, tag):
        with contextlib.ExitStack() as stack:
            for context in contexts:
                stack.enter_context(context)
            out = evaluate(model, layers, held, config, f"{tag} held-out").summary()
            out["loss_in_sample"] = evaluate(model, layers, fit, config, f"{tag} selection").loss()
        return {**out, "sink_rate_ci": sink_rate_ci(out["sink_rate"], n_sink)}

    rows = [{"what": "none", "heads": [], "selection": "none", "n_heads": 0, **measure([], "baseline")}]
    for what, make, push_of in kinds:
        rows.append({"what": what, "heads": [list(h) for h in all_heads], "selection": "all", "n_heads": len(all_heads),
                     **measure([make(None)], what)})
        rows.append({"what": what, "heads": [list(h) for h in selected], "selection": "selected",
                     "n_heads": len(selected), "push": [push_of[h] for h in selected],
                     **measure([make(selected)], what)})
        rescales = [push_rescale(selected, d, push_of) for d in draws]
        matched = [measure([make(d)] + ([gates.scale_outputs(model, r)] if set(r.values()) != {1.0} else []),
                           f"{what} random {i}") for i, (d, r) in enumerate(zip(draws, rescales))]
        rows.append(_random_row(what, draws, matched, "random",
                                push=sorted((push_of[h] for h in selected), reverse=True),
                                rescale=[[r[h] for h in d] for d, r in zip(draws, rescales)]))
        if any(set(r.values()) != {1.0} for r in rescales):
            plain = [measure([make(d)], f"{what} unmatched {i}") for i, d in enumerate(draws)]
            rows.append(_random_row(what, dataclasses.replace(draws, matched_on="none"), plain, "random_unmatched",
                                    push=[[push_of[h] for h in d] for d in draws]))
    return rows, selected


def analyse_model(model, config: Config, warnings: list[str]) -> ModelResult:
    """All measurements on one model (problems that do not stop the run go to `warnings`)."""
    name = model_info(model).name
    skipped: dict[int, str] = {}
    layers = attention_scope("gated_attention", model, skipped, warnings)  # softmax layers (gates, sinks, sparsity)
    kinds = gates.layer_kinds(model)
    gated = gates.is_gated(model)
    require(config.interventions != "on" or gated,
            f"--interventions on needs a gated-attention model; {name} has no attention output gate")
    chunks = text_set(model, config)
    require(len(chunks) >= 2, f"text set {config.text_set!r} gives {len(chunks)} chunk of {config.seq_len} tokens; "
                              "need 2 (one to select on, one held out): lower --seq-len or pass more text")
    if len(chunks) < config.n_chunks:
        warn(warnings, f"{name}: text set {config.text_set!r} gives only {len(chunks)} chunks of {config.seq_len} "
                       f"tokens (asked for {config.n_chunks})")
    halves = split(len(chunks), config.selection_fraction, config.seed)
    fit, held = [chunks.chunks[i] for i in halves.selection], [chunks.chunks[i] for i in halves.held_out]

    announce(f"{name}: gate, sparsity and implicit-scale pass (eager attention, one layer's pattern at a time)",
             *sequence_cost((fit if gated else []) + held), enabled=config.progress)
    gate_fit = None
    mean_gate = None
    if gated:
        gate_fit, _, _ = gate_pass(model, fit, config)
        mean_gate = {r["layer"]: r["mean"] for r in gate_fit.layer_rows()}
    gate_held, sparsity, scale = gate_pass(model, held, config, mean_gate)
    announce(f"{name}: sinks, M-Act and loss (logits in chunks of positions)", *sequence_cost(held),
             enabled=config.progress)
    evaluation = evaluate(model, layers, held, config, "sinks")
    per_layer = {r["layer"]: r for r in evaluation.attention.per_layer()}
    n_sink = len(held) * model.cfg.n_heads
    attention = [{"layer": layer, "first_token": per_layer[layer]["first_token"],
                  "sink_rate": per_layer[layer]["sink_rate"],
                  "sink_rate_ci": sink_rate_ci(per_layer[layer]["sink_rate"], n_sink),
                  "sink_rate_t64": per_layer[layer]["sink_rate_t64"]} if layer in per_layer else
                 {"layer": layer, "first_token": None, "sink_rate": None, "sink_rate_ci": None, "sink_rate_t64": None}
                 for layer in range(model.cfg.n_layers)]
    sparsity_rows = {r["layer"]: r for r in sparsity.rows(gated)}
    sparsity_out = [sparsity_rows.get(layer, {"layer": layer, "ungated": None, "gated": None})
                    for layer in range(model.cfg.n_layers)]

    interventions, selected = [], []
    if gated and config.interventions != "off":
        # the push pass on the selection part; then per setting held out + selection: the baseline, and per kind
        # (gates=1, gates=mean, each alpha) all heads, the selected heads, the matched and (where pushes differ)
        # the unmatched random draws
        settings = 1 + (2 + len(config.alphas)) * (2 + 2 * config.random_draws)
        (f0, t0, _), (f1, t1, longest) = sequence_cost(fit), sequence_cost(fit + held, settings)
        announce(f"{name}: gate interventions", f0 + f1, t0 + t1, longest,
                 "at most (unmatched draws only where pushes differ)", enabled=config.progress)
        push = gates.measure_push(model, fit, gate_fit.element_means(), batch_size=config.batch_size,
                                  progress=config.progress)
        interventions, selected = _interventions(model, layers, fit, held, gate_fit, push, config)
    first = chunks.first_token_summary()
    summary = evaluation.summary()
    t64 = evaluation.attention.overall()["sink_rate_t64"]  # Gu's T = 64: the first 64 rows (None if chunks are shorter)
    n_pairs = len(held) * len(layers) * model.cfg.n_heads
    return ModelResult(
        name=name, gated=gated, gates=gate_held.head_rows() if gated else [], sparsity=sparsity_out,
        attention=attention, m_act=evaluation.m_act(), interventions=interventions, layer_kinds=kinds,
        gate_layers=gate_held.layer_rows() if gated else [], sparsity_detail=sparsity.detail_rows(gated),
        implicit_scale=scale.head_rows(), scale_histograms=scale.histograms(),
        attention_heads=evaluation.attention.per_head(), m_act_layers=evaluation.m_act_layers(),
        selected_heads=[list(h) for h in selected], skipped_layers=skipped,
        text={"source": chunks.source, "seq_len": chunks.seq_len, "bos": chunks.bos, "n_selection": len(fit),
              "n_held_out": len(held), "first_token": first["token"], "first_token_share": first["share"],
              "loss": summary["loss"], "sink_rate": summary["sink_rate"],
              "sink_rate_ci": sink_rate_ci(summary["sink_rate"], n_pairs),
              "sink_rate_t64": t64, "sink_rate_t64_ci": sink_rate_ci(t64, n_pairs) if t64 is not None else None})


# ---------------------------------------------------------------- result

@dataclass
class Result:
    header: dict  # run_header: analysis, model, environment, config
    results: dict[str, ModelResult]  # model name → measurements (the run's model first)
    warnings: list[str] = field(default_factory=list)  # problems that did not stop the run (results.json, report)

    @property
    def primary(self) -> ModelResult:
        return next(iter(self.results.values()))

    @property
    def skipped_layers(self) -> dict[int, str]:
        """The run's model's skipped layers (results.json "skipped_layers"; each model's under "models" too)."""
        return self.primary.skipped_layers

    def to_dict(self) -> dict:
        if len(self.results) == 1:
            r = self.primary
            return {**self.header, "warnings": self.warnings, **r.public(), **r.details()}
        return {**self.header, "warnings": self.warnings, "skipped_layers": self.skipped_layers,
                "models": {name: {**r.public(), **r.details()} for name, r in self.results.items()}}

    def tables(self) -> dict[str, pd.DataFrame]:
        def frame(attr):
            rows = [{"model": name, **row} for name, r in self.results.items() for row in getattr(r, attr)]
            return pd.DataFrame(rows)

        interventions = frame("interventions")
        if not interventions.empty:
            interventions["heads"] = interventions["heads"].map(str)
        return {"gates": frame("gates"), "gate_layers": frame("gate_layers").drop(columns="histogram", errors="ignore"),
                "sparsity": frame("sparsity_detail"), "attention": frame("attention"),
                "attention_heads": frame("attention_heads"), "implicit_scale": frame("implicit_scale"),
                "interventions": interventions}


def run(model, config: Config) -> Result:
    """Measure `model` and the comparison model (loaded first, on the same device and dtype, so a bad
    name fails before any measurement)."""
    from interp.models import load_model

    config.validate(model)
    warnings: list[str] = []
    other = other_config = None
    other_name = compare_name(model, config)
    if other_name is not None:
        info = model_info(model)
        other = load_model(other_name, device=info.device, dtype=info.dtype)
        # `--interventions on` asks it of the gated model; an ungated comparison model just has none
        other_config = config
        if config.interventions == "on" and not gates.is_gated(other):
            warn(warnings, f"{other_name} has no attention output gate: no gate interventions on it")
            other_config = dataclasses.replace(config, interventions="auto")
        other_config.validate(other)
    header = run_header("gated_attention", model, config)
    first = analyse_model(model, config, warnings)
    results = {first.name: first}
    if other is not None:
        second = analyse_model(other, other_config, warnings)
        if second.name in results:
            second.name = f"{second.name} (compare)"
        results[second.name] = second
        header["compare_model"] = model_info(other).to_dict()
    return Result(header=header, results=results, warnings=warnings)


# ---------------------------------------------------------------- report

def _fmt_heads(heads) -> str:
    return " ".join(f"L{layer}H{h}" for layer, h in heads)


def _gate_histograms(r: ModelResult) -> go.Figure:
    centres = [(i + 0.5) * gates.BIN_WIDTH for i in range(gates.N_BINS)]
    fig = go.Figure()
    for row in r.gate_layers:
        fig.add_trace(go.Scatter(x=centres, y=row["histogram"], mode="lines+markers",
                                 name=f"gate, layer {row['layer']}"))
    for layer, hist in r.scale_histograms.items():
        fig.add_trace(go.Scatter(x=centres, y=hist, mode="lines", line=dict(dash="dot"),
                                 name=f"s(q) = 1 − A[q, first], layer {layer}",
                                 visible="legendonly" if r.gated else True))
    fig.update_layout(title=f"{r.name}: gate scores σ(z) per layer (bin 0.05)" if r.gated else
                      f"{r.name}: implicit scale s(q) per layer (bin 0.05)",
                      xaxis_title="score", yaxis_title="share of scores", xaxis_range=[0, 1])
    return fig


def _grid(rows: list[dict], n_layers: int, n_heads: int, key: str) -> np.ndarray:
    grid = np.full((n_layers, n_heads), np.nan)
    for row in rows:
        grid[row["layer"], row["head"]] = row[key]
    return grid


def _sparsity_figure(r: ModelResult) -> go.Figure:
    fig = go.Figure()
    rows = [row for row in r.sparsity_detail]
    x = [f"layer {row['layer']}" for row in rows]
    fig.add_trace(go.Bar(x=x, y=[row["ungated"] for row in rows], name="|Y| < θ (ungated, pattern · values)"))
    if r.gated:
        fig.add_trace(go.Bar(x=x, y=[row["gated"] for row in rows], name="|Y ⊙ σ(z)| < θ (gated)"))
        fig.add_trace(go.Bar(x=x, y=[row["mean_gate_scaled"] for row in rows], name="|ḡ·Y| < θ (mean-gate control)"))
    theta = rows[0]["theta"] if rows else None
    fig.update_layout(title=f"{r.name}: share of attention-output elements below θ = {theta:g}", barmode="group",
                      yaxis_title="share", yaxis_range=[0, 1])
    return fig


def uniform_first_token(seq_len: int) -> float:
    """F-Attn of a head attending uniformly (query q gives 1/(q+1) to the first token), queries 1..T−1."""
    return float(np.mean([1 / (q + 1) for q in range(1, seq_len)]))


def _sink_figure(results: dict[str, ModelResult]) -> go.Figure:
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=2, subplot_titles=["first-token attention (F-Attn)",
                                                        "sink rate (% of heads, α[0] > ε)"])
    for name, r in results.items():
        rows = [row for row in r.attention if row["first_token"] is not None]
        x = [row["layer"] for row in rows]
        fig.add_trace(go.Bar(x=x, y=[row["first_token"] for row in rows], name=name, legendgroup=name), row=1, col=1)
        fig.add_trace(go.Bar(x=x, y=[row["sink_rate"] for row in rows], name=name, legendgroup=name, showlegend=False),
                      row=1, col=2)
    fig.update_layout(title="Sink metrics per layer", barmode="group")
    fig.update_xaxes(title_text="layer")
    return fig


def _attention_table(r: ModelResult) -> pd.DataFrame:
    rows = []
    for row, kind in zip(r.attention, r.layer_kinds):
        if kind == "linear":
            rows.append({"layer": row["layer"], "first_token": "no softmax pattern", "sink_rate": "no softmax pattern"})
        else:
            rows.append({**row, "sink_rate_ci": _fmt_ci(row["sink_rate_ci"])})
    return pd.DataFrame(rows)


SELECTION_LABELS = {"random": "random heads, push matched", "random_unmatched": "random heads, push NOT matched"}


def intervention_table(r: ModelResult) -> pd.DataFrame:
    """One row per intervention row; random rows: mean and sd over the draws, the mean push they got."""
    rows = []
    for row in r.interventions:
        draws = row["selection"].startswith("random")
        heads = ("all gated heads" if row["selection"] == "all" else
                 f"{row['n_draws']} draws of {row['n_heads']}" if draws else _fmt_heads(row["heads"]))
        push = row.get("push")
        out = {"what": row["what"], "selection": SELECTION_LABELS.get(row["selection"], row["selection"]),
               "heads": heads, "mean push": float(np.mean(push)) if push else None}
        for metric in ("loss", "loss_in_sample", "first_token", "sink_rate", "m_act"):
            out[metric] = row[metric]
            if f"{metric}_sd" in row:
                out[f"{metric} sd"] = row[f"{metric}_sd"]
        out["sink_rate 95% CI"] = _fmt_ci(row.get("sink_rate_ci"))
        rows.append(out)
    return pd.DataFrame(rows)


def _fmt_ci(ci) -> str:
    return "" if ci is None else f"[{ci[0]:.1f}, {ci[1]:.1f}]"


SELECT_LABELS = {"low_mean": "lowest mean gate", "high_var": "highest gate variance across tokens"}


def _t64_text(text: dict) -> str:
    """The sink rate at Gu's T = 64 with its interval, or why there is none."""
    if text.get("sink_rate_t64") is None:
        return f"n/a (chunks of {text['seq_len']} < 64 tokens)"
    ci = _fmt_ci(text["sink_rate_t64_ci"])
    return f"{text['sink_rate_t64']:.1f} (95% CI {ci}); the row above: T = {text['seq_len']}"


def _model_section(rep, r: ModelResult, n_layers: int, n_heads: int, select_by: str) -> None:
    rep.add_heading(f"{r.name}: {'gated' if r.gated else 'ungated'} attention")
    linear = [i for i, kind in enumerate(r.layer_kinds) if kind == "linear"]
    overall_gate = float(np.mean([row["mean"] for row in r.gates])) if r.gates else None
    soft = [row for row in r.attention if row["first_token"] is not None]
    rep.add_metrics({
        "gated": r.gated, "mean gate score": overall_gate if r.gated else "no gates",
        "first-token attention": float(np.mean([row["first_token"] for row in soft])),
        "sink rate (%)": f"{r.text['sink_rate']:.1f} (95% CI {_fmt_ci(r.text['sink_rate_ci'])})",
        "sink rate at Gu's T = 64 (%)": _t64_text(r.text),
        "F-Attn if attention were uniform": uniform_first_token(r.text["seq_len"]),
        "M-Act": r.m_act, "held-out loss": r.text["loss"]})
    if linear:
        rep.add_paragraph(f"Layers {', '.join(map(str, linear))} are linear attention (Gated DeltaNet): no softmax "
                          "pattern, no sink metrics, no softmax gate; they are left out, not counted as zeros.")
    if not r.gated:
        rep.add_notice(f"{r.name} has no attention output gate: no gate statistics or gate interventions; the "
                       "implicit scale s(q) = 1 − attention to the first token stands in for a gate.", level="info")
    rep.add_figure(_gate_histograms(r), "Gated models: σ(z) over every token, head and dim of each layer "
                   "(held-out part); dotted (click the legend on gated models): the implicit scale s(q) of every "
                   "head and query ≥ 1.")
    if r.gated:
        rep.add_figure(layer_head_heatmap(_grid(r.gates, n_layers, n_heads, "mean"), f"{r.name}: mean gate score",
                                          "mean σ(z)", diverging=False))
        rep.add_figure(layer_head_heatmap(_grid(r.gates, n_layers, n_heads, "var_tokens"),
                                          f"{r.name}: gate variance across tokens (query dependence)", "variance",
                                          diverging=False))
        rep.add_table(pd.DataFrame(r.gate_layers).drop(columns="histogram"),
                      "Per layer: gate score mean, sd, min, max; var_heads = variance of the head means across heads.")
    rep.add_figure(layer_head_heatmap(_grid(r.implicit_scale, n_layers, n_heads, "mean"),
                                      f"{r.name}: implicit scale s(q) = 1 − A[q, first token], mean over queries ≥ 1",
                                      "mean s(q)", diverging=False))
    if r.gated:
        corr = _grid([row for row in r.implicit_scale if row["gate_corr"] is not None], n_layers, n_heads, "gate_corr")
        rep.add_figure(layer_head_heatmap(corr, f"{r.name}: correlation across queries of gate and first-token "
                                          "attention", "Pearson r"),
                       "Per head: r between the head's gate (mean over its dims) and its attention to the first token, "
                       "over held-out queries ≥ 1. If gates replace sinks, the relation should be weak (a toolkit "
                       "expectation, not a paper result).")
    rep.add_figure(_sparsity_figure(r), "Y rebuilt from pattern and values; the mean-gate control scales Y by the "
                   "layer's mean gate from the selection part (sparsity beyond down-scaling shows as gated > control).")
    rep.add_table(_attention_table(r), f"Sink metrics per layer (held-out part; first token: {r.text['first_token']!r} "
                  f"in {100 * r.text['first_token_share']:.0f}% of chunks). sink_rate_ci: Wilson 95 % interval, "
                  "treating (head, sequence) pairs as independent. sink_rate_t64: the sink rate on each chunk's first "
                  "64 tokens (Gu et al.'s T; the first 64 rows of a causal pattern are the 64-token prefix's).")
    if r.interventions:
        rep.add_heading("Gate interventions", level=3)
        rep.add_paragraph(f"Selected heads ({SELECT_LABELS[select_by]} on the selection part): "
                          f"{_fmt_heads(r.selected_heads)}. Loss, first-token attention and M-Act on the held-out "
                          "part; loss_in_sample on the selection part. Random rows: mean and sd over the draws. The "
                          "push of "
                          "an intervention on a head is how many times larger it makes the head's output (Σ|new| / "
                          "Σ|gated|, on the selection part): forcing a gate of mean ḡ to 1 pushes by about 1/ḡ, so "
                          "low-gate heads get the largest push. The matched random heads get the same intervention, "
                          "then a rescale to the push of their paired selected head (pairs by rank); if the selected "
                          "heads move the loss more than these, it is the heads, not the size of the push. The "
                          "unmatched row (no rescale) is shown for comparison only: it confounds the two.")
        base = r.interventions[0]
        bars = [{**row, "label": row["what"], "selection": SELECTION_LABELS.get(row["selection"], row["selection"])}
                for row in r.interventions if row["selection"] in ("selected", "random", "random_unmatched")]
        rep.add_figure(intervention_bars(bars, ["loss", "first_token", "m_act"], baseline=base,
                                         title=f"{r.name}: selected heads vs random heads"))
        rep.add_table(intervention_table(r), "Interventions (none = no intervention). Sink rate: % of (head, "
                      "sequence) pairs with α[0] > ε; its Wilson interval treats the pairs as independent.")


def build_report(result: Result, tokenizer=None):
    rep = analysis_report(result.header, result.warnings)
    names = list(result.results)
    rep.add_paragraph("Gated attention (Qiu et al. 2025): gate scores σ(z) of a sigmoid output gate per head, the "
                      "sparsity of the attention output before and after gating, the sink metrics (first-token "
                      "attention, sink rate) and M-Act, and what happens when the gates are forced to 1, set to "
                      "their mean or scaled. "
                      + (f"Models side by side: {', '.join(names)}." if len(names) > 1 else ""))
    if len(names) > 1:
        rep.add_heading("Side by side")
        rep.add_table(pd.DataFrame([{
            "model": name, "gated": r.gated,
            "mean gate score": float(np.mean([row["mean"] for row in r.gates])) if r.gates else "no gates",
            "first-token attention": float(np.mean([row["first_token"] for row in r.attention
                                                     if row["first_token"] is not None])),
            "sink rate (%)": float(np.mean([row["sink_rate"] for row in r.attention if row["sink_rate"] is not None])),
            "sink rate at T = 64 (%)": r.text.get("sink_rate_t64"),
            "M-Act": r.m_act, "held-out loss": r.text["loss"],
            "mean s(q)": float(np.mean([row["mean"] for row in r.implicit_scale]))}
            for name, r in result.results.items()]))
    rep.add_figure(_sink_figure(result.results), "F-Attn: mean attention to the first token over queries ≥ 1 and "
                   "heads; sink rate: share of heads whose first token gets α[0] > ε (Gu et al. 2024), in %.")
    models = [result.header["model"]] + ([result.header["compare_model"]] if "compare_model" in result.header else [])
    for r, info in zip(result.results.values(), models):
        _model_section(rep, r, info["n_layers"], info["n_heads"], result.header["config"]["select_by"])
    rep.add_run_section(result.header)
    return rep
