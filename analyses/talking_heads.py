"""Talking Heads (Merullo, Eickhoff & Pavlick, NeurIPS 2024): low-rank communication channels between heads.

1. Weights alone: every rank-1 SVD component of every writer head's OV is scored against every
   reader head in a later layer (query side, key side or OV; `interp.composition`), beside the
   whole-head composition score of Elhage et al. (2021) that dilutes a strong small-σ component.
   A component is a channel when it clears the empirical null of its reader (z) and twice the
   Gaussian random baseline of the model's size; the channel rank of a head pair is the 80 %
   energy rule.
2. The Laundry List task (`interp.laundry`): accuracy among the list items, full-vocabulary top-1
   and the logit difference to the strongest distractor, by list length and answer position.
3. On the selection half of the Laundry List prompts (its own templates and items): the mover head (END
   attends to the answer item rather than the repeated ones), the components writing into it (top
   composition scores), each screened by ablating it (its effect on the mover's attention; Fig. 2's
   "inhibition score"); the strongest form the edit set. On the held-out half (other templates, other
   items): scale them by α (hook on hook_z; the W_O weight edit gives the same logits, `edit_agreement`)
   against random components of the same heads and σ bins (`interp.controls.matched_draws`, several
   draws, mean ± sd), plus the in-sample numbers.
4. Activation view: the residual stream at END, read where the mover reads, projected on the channel
   directions, and their PCA coloured by the answer's list position (the paper's positional index).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp import composition as comp
from interp import laundry as ll
from interp.analysis import CommonConfig, attention_scope, not_applicable, require, run_header, warn
from interp.bridge import mla_layers
from interp.capture import capture
from interp.channels import scale_components
from interp.controls import ControlUnavailable, Draws, control_row, matched_draws, mean_sd, quantile_bins
from interp.cost import announce, describe, sequence_cost
from interp.figures import band
from interp.report import analysis_report

TEMPLATES = Literal["laundry", "bag", "market", "park"]
MAX_HEATMAP_HEADS = 256  # larger models get layer × layer heatmaps (max over heads)


@dataclass
class Config(CommonConfig):
    """Defaults follow the paper where it is known; the rest are the method note's proposals (docs/talking_heads.md)."""

    # composition modes scanned (q: reader's query side, k: key side, v: OV); the edit uses the first
    mode: tuple[Literal["q", "k", "v"], ...] = ("q", "k", "v")
    fold_norms: bool = True  # fold the norm gains into the weights before scoring (the paper's processed GPT-2 weights)
    min_z: float = 3.0  # a channel's score must exceed the reader's empirical null mean + this many sd
    # a channel's score must also exceed this multiple of the Gaussian baseline's max over a head's components
    min_baseline_ratio: float = 2.0
    energy: float = 0.8  # channel rank: fewest components holding this share of σ²·score² (80 % rule)
    # channel rows written (results.json, channels.csv), strongest first; every channel is still counted
    # (channel_counts); 0: all (hundreds of thousands on a 7B model)
    max_channels: int = 1000
    # whole-head rows written per mode: the head pairs among the N highest whole-head scores or the N highest
    # best-component scores; 0: every (earlier writer, reader) pair (about 500k per mode on a 7B model)
    max_whole_head: int = 1000
    baseline_draws: int = 20  # Gaussian random heads drawn for the baseline
    n_items: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8, 9, 10)  # Laundry List lengths N (2-10)
    # Laundry List surface templates (objects, objects, food, names)
    templates: tuple[TEMPLATES, ...] = ("laundry", "bag", "market", "park")
    # prompts per (N, answer position) cell in each half (--limit caps it): 20 keeps a 7B run at minutes (1,080
    # prompts per half at N = 2-10); the method note's setting is --prompts-per-cell 200 (10,800 per half, ~10x the
    # forwards)
    prompts_per_cell: int = 20
    # share of the templates (and of the items of a vocabulary both halves use) that selects the mover and the edit
    # set; the held-out half measures on the other templates and items
    selection_fraction: float = 0.5
    alpha: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0)  # factors the edited components are scaled by
    edit_components: int = 2  # components in the edit set (the paper's channels are 1-2 components per head)
    candidates: int = 8  # top components into the mover screened on the selection split
    random_draws: int = 5  # random-control draws: components of the same heads and σ bins, disjoint from the edit set
    sigma_bins: int = 4  # σ quantile bins (within a head) the random components are matched on
    edit_method: Literal["hook", "weight"] = "hook"  # the sweep's edit: hook_z hook or W_O weight edit (same logits)
    view_prompts: int = 200  # held-out prompts in the activation view
    # activation view at END (the paper's claim) or at the first list's item tokens
    view_tokens: Literal["end", "items"] = "end"
    # a BOS first in every Laundry List prompt: unset, where the model's own tokenizer adds one (as trained); --bos
    # always (a BOS-like token where it adds none; TransformerLens' to_tokens, which the paper's GPT-2 code used,
    # prepends one); --no-bos never
    bos: bool | None = None

    def validate(self, model=None) -> None:
        super().validate(model)
        require(len(self.mode) > 0, "mode needs at least one of q, k, v")
        require(len(self.templates) > 0, "templates needs at least one template")
        require(all(2 <= n <= 10 for n in self.n_items) and self.n_items, "n-items must be between 2 and 10")
        require(len(self.alpha) > 0 and all(a >= 0 for a in self.alpha), "alpha needs values >= 0")
        require(0 < self.energy <= 1, f"energy must be in (0, 1]; got {self.energy}")
        require(self.min_baseline_ratio >= 0, f"min-baseline-ratio must be >= 0; got {self.min_baseline_ratio}")
        require(0 < self.selection_fraction < 1, f"selection-fraction must be in (0, 1); got {self.selection_fraction}")
        counts = ("baseline_draws", "prompts_per_cell", "edit_components", "candidates", "sigma_bins", "view_prompts")
        require(self.max_channels >= 0, f"max-channels must be >= 0 (0: all); got {self.max_channels}")
        require(self.max_whole_head >= 0, f"max-whole-head must be >= 0 (0: all); got {self.max_whole_head}")
        for name in counts:
            require(getattr(self, name) >= 1, f"{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        require(self.candidates >= self.edit_components, "candidates must be at least edit-components")
        if model is not None:
            require(model.cfg.n_layers >= 2, "talking_heads needs a model with at least 2 layers")
            require(self.edit_components < model.cfg.d_head,
                    f"edit-components must be below d_head ({model.cfg.d_head}) to leave random components")
            require(self.sigma_bins <= model.cfg.d_head, f"sigma-bins must be at most d_head ({model.cfg.d_head})")


@dataclass
class Result:
    header: dict
    config: Config
    baseline: dict
    channels: list[dict]
    whole_head: list[dict]
    laundry_list: list[dict]
    mover: dict
    candidates: list[dict]
    edits: list[dict]
    edit_agreement: float
    first_token_scoring: bool
    activation_view: dict
    view_points: pd.DataFrame
    reader_components: pd.DataFrame  # every component's score into the mover (report bars)
    grids: dict  # mode -> (whole-head grid, best-component grid), writer × reader
    split: dict  # the templates and items of each half
    warnings: list[str] = field(default_factory=list)
    # what head_weights folded into the weights (reader norm, q/k norm, writer norm): `HeadWeights.processing`
    weight_processing: dict = field(default_factory=dict)
    skipped_layers: dict[int, str] = field(default_factory=dict)  # layer → what was not measured there and why
    # every channel counted (found, per mode) and how many rows were kept (--max-channels); the same for head pairs
    channel_counts: dict = field(default_factory=dict)
    whole_head_counts: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**self.header, "warnings": self.warnings, "channels": self.channels, "whole_head": self.whole_head,
                "laundry_list": self.laundry_list, "edits": self.edits, "edit_agreement": self.edit_agreement,
                "baseline": self.baseline, "mover": self.mover, "candidates": self.candidates,
                "first_token_scoring": self.first_token_scoring, "activation_view": self.activation_view,
                "split": self.split, "weight_processing": self.weight_processing,
                "skipped_layers": self.skipped_layers, "channel_counts": self.channel_counts,
                "whole_head_counts": self.whole_head_counts}

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"channels": pd.DataFrame(self.channels), "whole_head": pd.DataFrame(self.whole_head),
                "laundry_list": pd.DataFrame(self.laundry_list), "edits": pd.DataFrame(self.edits),
                "candidates": pd.DataFrame(self.candidates), "activation_view": self.view_points}


# ---------------------------------------------------------------- pieces

MLA_REASON = ("multi-head latent attention reads queries, keys and values from RMS-normalised compressed latents "
              "(keys partly from a shared rope part), so there are no per-head W_Q/W_K/W_V for weight-based "
              "composition scores")


def on_layers(x: Tensor, layers: list[int], n_layers: int, dims: tuple[int, ...]) -> Tensor:
    """`x` indexed by position in `layers` along `dims` → indexed by model layer (size `n_layers`), NaN on the
    layers not in `layers` (a hybrid's skipped linear-attention layers)."""
    index = torch.tensor(layers)
    for d in dims:
        shape = list(x.shape)
        shape[d] = n_layers
        x = torch.full(shape, float("nan"), dtype=x.dtype).index_copy_(d, index, x)
    return x


def spearman(x: list[float], y: list[float]) -> float:
    """Rank correlation (ties broken by order; fine for continuous scores)."""
    if len(x) < 3:
        return float("nan")
    rx, ry = (np.argsort(np.argsort(np.asarray(v, dtype=float))) for v in (x, y))
    return float(np.corrcoef(rx, ry)[0, 1])


def pick_mover(attention: torch.Tensor, layers: list[int]) -> dict:
    """The head whose END attention prefers the answer item over the repeated ones the most."""
    mean = attention.mean(0)  # [layer, head]
    j, h = divmod(int(mean.argmax()), mean.shape[1])
    return {"layer": layers[j], "head": h, "attention_preference": float(mean[j, h]),
            "per_head": {f"{layers[a]}.{b}": float(mean[a, b])
                         for a in range(mean.shape[0]) for b in range(mean.shape[1])}}


def candidate_components(s: comp.Scan, z: torch.Tensor, layer: int, head: int, k: int, min_z: float,
                         min_score: float) -> list[dict]:
    """The k components with the highest score into reader (layer, head)."""
    block = s.scores[:layer, :, :, layer, head]
    flat_scores = block.flatten()
    order = flat_scores.nan_to_num(float("-inf")).argsort(descending=True)
    out = []
    for flat in [i for i in order.tolist() if not torch.isnan(flat_scores[i])][:k]:  # NaN: a skipped layer
        lw, rest = divmod(flat, block.shape[1] * block.shape[2])
        hw, i = divmod(rest, block.shape[2])
        score, zz = float(block[lw, hw, i]), float(z[lw, hw, i, layer, head])
        out.append({"writer_layer": lw, "writer_head": hw, "component": i, "score": score, "z": zz,
                    "singular_value": float(s.sigma[lw, hw, i]), "channel": zz > min_z and score > min_score})
    return out


def directions(V: torch.Tensor, components: list[tuple[int, int, int]]) -> dict[tuple[int, int], torch.Tensor]:
    """(layer, head) → [d_model, k] write directions of the given (layer, head, component) triples."""
    by_head: dict[tuple[int, int], list[int]] = {}
    for layer, head, i in components:
        by_head.setdefault((layer, head), []).append(i)
    return {lh: V[lh[0], lh[1]][:, idx] for lh, idx in by_head.items()}


Component = tuple[int, int, int]  # (writer layer, writer head, component index)


def sigma_strata(S: Float[Tensor, "layer head rank"], heads: list[tuple[int, int]], n_bins: int
                 ) -> dict[Component, str]:
    """Every component of `heads` → "layer.head:q<bin>", its σ quantile bin among its head's components."""
    out = {}
    for layer, head in heads:
        bins = quantile_bins(S[layer, head].tolist(), n_bins)
        out.update({(layer, head, i): f"{layer}.{head}:{b}" for i, b in enumerate(bins)})
    return out


def random_control(chosen: list[Component], S: Float[Tensor, "layer head rank"], n_bins: int, draws: int,
                   seed: int) -> Draws:
    """Random components of the edit set's heads, as many per σ bin as the edit set, none of them chosen
    (scaling a component by α moves a head's output by |α − 1| σ: the effect follows σ)."""
    strata = sigma_strata(S, list(dict.fromkeys((lw, hw) for lw, hw, _ in chosen)), n_bins)
    return matched_draws(chosen, list(strata), stratum=strata, draws=draws, seed=seed, matched_on="sigma",
                         key="talking_heads")


def position_eta2(x: Float[Tensor, "n k"], labels: Int[Tensor, " n"], within: Int[Tensor, " n"] | None = None) -> float:
    """Share of the variance of `x` explained by the group means of `labels`; with `within` (e.g. N), of the
    variance left within each `within` group (partial η²: `labels` should nest in `within`)."""
    x = x - x.mean(0)
    if within is not None:
        x = x - _group_means(x, within)
    total = float((x ** 2).sum())
    return float((_group_means(x, labels) ** 2).sum()) / total if total > 0 else float("nan")


def _group_means(x: Float[Tensor, "n k"], labels: Int[Tensor, " n"]) -> Float[Tensor, "n k"]:
    """Each row replaced by the mean of its group."""
    _, inverse = labels.unique(return_inverse=True)
    sums = torch.zeros(int(inverse.max()) + 1, x.shape[1], dtype=x.dtype).index_add_(0, inverse, x)
    counts = torch.bincount(inverse).to(x.dtype)[:, None]
    return (sums / counts)[inverse]


def view_activations(model, enc: ll.Encoded, prompts: list[ll.LaundryPrompt], hook: str, config: Config
                     ) -> tuple[Float[Tensor, "n d_model"], Int[Tensor, " n"], Int[Tensor, " n"]]:
    """Residual vectors at `hook` with their list position and N: one per prompt at END (labelled by the
    answer's position) for `view_tokens` "end", one per first-list item token (its own position) for "items"."""
    end = config.view_tokens == "end"
    acts = capture(model, enc.ids, [hook], positions="last" if end else enc.item_positions,
                   batch_size=config.batch_size, progress=config.progress)[hook]
    if end:
        return (acts, torch.tensor([p.position for p in prompts]), torch.tensor([p.n_items for p in prompts]))
    return (torch.cat(acts), torch.cat([torch.arange(p.n_items) for p in prompts]),
            torch.cat([torch.full((p.n_items,), p.n_items) for p in prompts]))


def activation_view(model, enc: ll.Encoded, prompts: list[ll.LaundryPrompt], layer: int,
                    basis_dirs: Float[Tensor, "d_model k"], config: Config) -> tuple[dict, pd.DataFrame]:
    """The residual stream at the mover's input (blocks.<layer>.hook_resid_pre), at END by default, projected on
    the orthonormalised channel directions; their PCA and how much of them list position explains within each N,
    beside random subspaces of the same size (`random_draws`, mean ± sd) and the whole residual."""
    hook = f"blocks.{layer}.hook_resid_pre"
    X, pos, n_items = view_activations(model, enc, prompts, hook, config)
    cells = n_items * 100 + pos  # (N, position): positions nest in N
    B, _ = torch.linalg.qr(basis_dirs)
    proj = X @ B
    centred = proj - proj.mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    k = min(3, vh.shape[0])
    pcs = centred @ vh[:k].T
    g = torch.Generator().manual_seed(config.seed)
    rand, rand_sd = mean_sd([position_eta2(X @ torch.linalg.qr(torch.randn(X.shape[1], B.shape[1], generator=g))[0],
                                           cells, n_items) for _ in range(config.random_draws)])
    view = {"hook": hook, "tokens": config.view_tokens, "dimensions": B.shape[1],
            "explained_variance": [float(v) for v in (s[:k] ** 2 / (s ** 2).sum())],
            "position_eta2": position_eta2(proj, cells, n_items), "position_eta2_random_subspace": rand,
            "position_eta2_random_subspace_sd": rand_sd,
            "position_eta2_full_residual": position_eta2(X, cells, n_items), "n_tokens": int(X.shape[0])}
    points = pd.DataFrame({"n_items": n_items.numpy(), "position": pos.numpy(),
                           **{f"pc{i + 1}": pcs[:, i].numpy() for i in range(k)}})
    return view, points


# ---------------------------------------------------------------- run

def run(model, config: Config) -> Result:
    config.validate(model)
    cfg, tok = model.cfg, model.tokenizer
    torch.manual_seed(config.seed)
    warnings: list[str] = []
    if mla_layers(model):
        raise not_applicable("talking_heads", model, MLA_REASON)
    skipped: dict[int, str] = {}
    soft = attention_scope("talking_heads", model, skipped, warnings)  # hybrids: the softmax-attention layers
    if len(soft) < 2:
        raise not_applicable("talking_heads", model, "it has one softmax-attention layer: no writer before a reader")

    # 1. weights (on a hybrid, of the softmax layers: index j is layer soft[j] until `on_layers` below)
    w = comp.head_weights(model, fold_norms=config.fold_norms, layers=soft if skipped else None)
    for note in w.notes:
        warn(warnings, note)
    n_soft, rank = len(soft), min(cfg.d_head, cfg.d_model)
    describe("composition scan", f"{len(dict.fromkeys(config.mode))} mode(s) × {n_soft * cfg.n_heads * rank:,} writer "
             f"components × the reader heads of later layers ({n_soft} softmax layers × {cfg.n_heads} heads); score "
             f"tensors of {n_soft ** 2 * cfg.n_heads ** 2 * rank * 4 / 2 ** 30:.2f} GiB each", enabled=config.progress)
    S, V = comp.writer_svd(w)
    scans = {m: comp.scan(w, m, S=S, V=V, progress=config.progress) for m in dict.fromkeys(config.mode)}
    baseline = comp.gaussian_baseline(cfg.d_model, cfg.d_head, config.baseline_draws, config.seed)
    min_score = config.min_baseline_ratio * baseline["component_max"]
    baseline["channel_min_score"] = min_score
    zs = {m: s.z() for m, s in scans.items()}
    limit = config.max_channels or None
    found = {m: int(comp.channel_mask(s, zs[m], min_z=config.min_z, min_score=min_score).sum())
             for m, s in scans.items()}
    channels = sorted((r for m, s in scans.items()
                       for r in comp.channel_rows(s, zs[m], min_z=config.min_z, min_score=min_score, limit=limit)),
                      key=lambda r: -r["score"])[:limit]
    channel_counts = {"found": sum(found.values()), "per_mode": found, "kept": len(channels),
                      "max_channels": config.max_channels}
    whole = [r for s in scans.values() for r in comp.whole_head_rows(s, config.energy, config.max_whole_head or None)]
    pairs = int(comp.pair_mask(n_soft, cfg.n_heads).sum())
    whole_counts = {"pairs_per_mode": pairs, "kept": len(whole), "max_whole_head": config.max_whole_head}
    nulls = {m: s.null() for m, s in scans.items()}
    W_O = w.W_O
    if skipped:  # from here on every tensor is indexed by model layer, NaN on the skipped ones
        for r in channels + whole:
            r["writer_layer"], r["reader_layer"] = soft[r["writer_layer"]], soft[r["reader_layer"]]
        full = lambda x, *dims: on_layers(x, soft, cfg.n_layers, dims)  # noqa: E731
        scans = {m: dataclasses.replace(s, scores=full(s.scores, 0, 3), sigma=full(s.sigma, 0),
                                        rotary_invariant=None if s.rotary_invariant is None
                                        else full(s.rotary_invariant, 0, 3)) for m, s in scans.items()}
        zs = {m: full(z, 0, 3) for m, z in zs.items()}
        nulls = {m: (full(mu, 0), full(sd, 0)) for m, (mu, sd) in nulls.items()}
        S, V, W_O = full(S, 0), full(V, 0), full(W_O, 0)
    grids = {m: (_pair_grid(s.whole_head()), _pair_grid(s.scores.amax(2))) for m, s in scans.items()}

    # 2. Laundry List: selection and held-out halves with disjoint templates and items
    template_ids = sorted({ll.TEMPLATE_NAMES.index(t) for t in config.templates})
    pools, _ = ll.item_pools(tok, template_ids, config.bos)
    sel_pools, held_pools = ll.split_pools(pools, config.selection_fraction, config.seed)
    if len(template_ids) == 1:
        warn(warnings, "one template: the held-out half has other items but the same template as the selection half")
    per_cell = config.prompts_per_cell if config.limit is None else min(config.prompts_per_cell, config.limit)
    sel = ll.make_prompts(sel_pools, config.n_items, per_cell, config.seed)
    held = ll.make_prompts(held_pools, config.n_items, per_cell, config.seed)
    enc_sel, enc_held = ll.encode(tok, sel, config.bos), ll.encode(tok, held, config.bos)
    if enc_held.multi_token or enc_sel.multi_token:
        warn(warnings, "some list items are several tokens for this tokenizer: every item is scored by its first "
                       "token (items sharing a first token were dropped from the pools)")

    def evaluate(ps: list[ll.LaundryPrompt], enc: ll.Encoded, desc: str) -> dict[str, Tensor]:
        return ll.evaluate(model, ps, enc, batch_size=config.batch_size, progress=config.progress, desc=desc)

    n_alpha = sum(a != 1.0 for a in config.alpha)
    for stage, enc, times, note in (
            ("Laundry List baselines", None, 1, "both halves, last position unembedded"),
            ("mover and candidate screening", enc_sel, 1 + config.candidates,
             f"selection half, eager attention on {len(soft) - 1} layers, 1 + {config.candidates} candidates"),
            ("α sweep", None, n_alpha, f"{n_alpha} α ≠ 1 × (both halves + {config.random_draws} random draws on the "
                                       "held-out half)")):
        if enc is None:
            seqs = enc_held.ids + enc_sel.ids if stage != "α sweep" else \
                enc_held.ids * (1 + config.random_draws) + enc_sel.ids
        else:
            seqs = enc.ids
        forwards, tokens, longest = sequence_cost(seqs, times)
        announce(stage, forwards, tokens, longest, f"{note}, batch {config.batch_size}", enabled=config.progress)

    base_held = evaluate(held, enc_held, "laundry list (held-out)")
    base_sel = evaluate(sel, enc_sel, "laundry list (selection)")
    laundry_rows = ll.table(held, base_held)

    # 3. mover, candidates and their screening on the selection split
    layers = soft[1:]  # readers: softmax layers with an earlier one
    attention = ll.item_attention(model, enc_sel, sel, layers, batch_size=config.batch_size, progress=config.progress)
    mover = pick_mover(attention, layers)
    ml, mh = mover["layer"], mover["head"]
    edit_mode = config.mode[0]
    cands = candidate_components(scans[edit_mode], zs[edit_mode], ml, mh, config.candidates, config.min_z, min_score)
    base_pref = attention[:, layers.index(ml), mh].mean()
    for c in cands:
        dirs = directions(V, [(c["writer_layer"], c["writer_head"], c["component"])])
        with scale_components(model, dirs, 0.0, W_O=W_O):
            ablated = ll.item_attention(model, enc_sel, sel, [ml], batch_size=config.batch_size)[:, 0, mh].mean()
        c["ablation_effect"] = float(base_pref - ablated)  # > 0: removing it lowers the mover's preference
    ranked = sorted(cands, key=lambda c: -c["ablation_effect"])
    chosen = [(c["writer_layer"], c["writer_head"], c["component"]) for c in ranked[:config.edit_components]]
    for c in cands:
        c["edited"] = (c["writer_layer"], c["writer_head"], c["component"]) in chosen
    mover.update({"mode": edit_mode, "edit_set": [list(c) for c in chosen],
                  "score_effect_spearman": spearman([c["score"] for c in cands],
                                                    [c["ablation_effect"] for c in cands])})

    # 4. α sweep: the edit set against random components of the same heads and σ bins
    try:
        draws = random_control(chosen, S, config.sigma_bins, config.random_draws, config.seed)
    except ControlUnavailable as e:
        draws = None
        warn(warnings, f"no σ-matched random control: {e}; lower --sigma-bins or --edit-components")

    def scaled(components: list[Component], alpha: float, ps, enc, base, desc: str) -> dict[str, Tensor]:
        if alpha == 1.0:
            return base
        with scale_components(model, directions(V, components), alpha, config.edit_method, W_O=W_O):
            return evaluate(ps, enc, desc)

    edits = []
    for alpha in config.alpha:
        for half, ps, enc, base in (("held_out", held, enc_held, base_held), ("selection", sel, enc_sel, base_sel)):
            sc = scaled(chosen, alpha, ps, enc, base, f"edit α={alpha:g} ({half})")
            edits.append({"alpha": alpha, "components": len(chosen), **ll.rates(sc),
                          "logit_diff": float(sc["logit_diff"].mean()), "selection": "channel", "split": half})
        if draws is not None:
            runs = [scaled(draw, alpha, held, enc_held, base_held, f"random α={alpha:g}") for draw in draws]
            values = {"accuracy": [float(sc["correct"].mean()) for sc in runs],
                      "top1_accuracy": [float(sc["top1"].mean()) for sc in runs],
                      "logit_diff": [float(sc["logit_diff"].mean()) for sc in runs]}
            edits.append({"alpha": alpha, "components": len(chosen), **control_row(values, draws),
                          "selection": "random", "split": "held_out"})

    agreement = edit_agreement(model, directions(V, chosen), enc_held.ids[:16], [0.0, max(config.alpha)],
                               config.batch_size, W_O)

    # 5. activation view at the mover's input (held-out half)
    view_n = min(config.view_prompts, len(held))
    view_idx = sorted(random.Random(config.seed).sample(range(len(held)), view_n))
    view_prompts = [held[i] for i in view_idx]
    view_enc = ll.Encoded([enc_held.ids[i] for i in view_idx], [enc_held.item_positions[i] for i in view_idx],
                          [enc_held.candidates[i] for i in view_idx], enc_held.multi_token)
    screened = [(c["writer_layer"], c["writer_head"], c["component"]) for c in cands]
    basis = torch.cat(list(directions(V, screened).values()), dim=1)
    view, points = activation_view(model, view_enc, view_prompts, ml, basis, config)

    s = scans[edit_mode]
    mu, sd = nulls[edit_mode]
    bars = pd.DataFrame([{"writer": f"{lw}.{hw}", "component": i, "score": float(s.scores[lw, hw, i, ml, mh]),
                          "singular_value": float(S[lw, hw, i])}
                         for lw in soft if lw < ml for hw in range(cfg.n_heads) for i in range(S.shape[-1])])
    mover["null_mean"], mover["null_sd"] = float(mu[ml, mh]), float(sd[ml, mh])
    halves = {"selection_templates": [ll.TEMPLATE_NAMES[t] for t in sel_pools],
              "held_out_templates": [ll.TEMPLATE_NAMES[t] for t in held_pools],
              "selection_items": sorted({w for p in sel_pools.values() for w in p}),
              "held_out_items": sorted({w for p in held_pools.values() for w in p}),
              "selection_prompts": len(sel), "held_out_prompts": len(held)}
    return Result(header=run_header("talking_heads", model, config), config=config, baseline=baseline,
                  channels=channels, whole_head=whole, laundry_list=laundry_rows, mover=mover, candidates=cands,
                  edits=edits, edit_agreement=agreement,
                  first_token_scoring=enc_held.multi_token or enc_sel.multi_token, activation_view=view,
                  view_points=points, reader_components=bars, grids=grids, split=halves, warnings=warnings,
                  weight_processing={**w.processing, "reads": {m: sc.reads for m, sc in scans.items()}},
                  skipped_layers=skipped, channel_counts=channel_counts, whole_head_counts=whole_counts)


def _pair_grid(x: torch.Tensor) -> np.ndarray:
    """[Lw, Hw, Lr, Hr] → [(Lw·Hw), (Lr·Hr)] with NaN where the writer is not earlier."""
    n_layers, n_heads = x.shape[:2]
    return x.reshape(n_layers * n_heads, n_layers * n_heads).numpy()


def edit_agreement(model, dirs, ids, alphas, batch_size: int, W_O=None) -> float:
    """max |logit difference| between the hook_z edit and the W_O weight edit (last-token logits)."""
    worst = 0.0
    for alpha in alphas:
        with scale_components(model, dirs, alpha, "hook", W_O=W_O):
            hook = ll.last_logits(model, ids, batch_size=batch_size)
        with scale_components(model, dirs, alpha, "weight", W_O=W_O):
            weight = ll.last_logits(model, ids, batch_size=batch_size)
        worst = max(worst, float((hook - weight).abs().max()))
    return worst


# ---------------------------------------------------------------- report

def _labels(n_layers: int, n_heads: int) -> list[str]:
    return [f"{layer}.{h}" for layer in range(n_layers) for h in range(n_heads)]


def pair_heatmap(grid: np.ndarray, labels: list[str], title: str) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=grid, x=labels, y=labels, colorscale="Viridis", colorbar=dict(title="score"),
                               hovertemplate="writer %{y} → reader %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="reader head (layer.head)", yaxis_title="writer head (layer.head)",
                      yaxis_autorange="reversed")
    return fig


def component_bars(result: Result) -> go.Figure:
    df, m, b = result.reader_components, result.mover, result.baseline
    df = df.sort_values("score", ascending=False).reset_index(drop=True)
    fig = go.Figure(go.Bar(x=list(range(len(df))), y=df["score"], marker_color="#1f77b4",
                           customdata=np.stack([df["writer"], df["component"], df["singular_value"]], axis=1),
                           hovertemplate="writer %{customdata[0]} component %{customdata[1]} "
                                         "(σ=%{customdata[2]:.3g}): %{y:.3f}<extra></extra>"))
    min_z = result.config.min_z
    for y, text, dash in [(b["component_mean"], "Gaussian mean", "dot"),
                          (b["channel_min_score"], f"{result.config.min_baseline_ratio:g}× Gaussian max", "dash"),
                          (m["null_mean"] + min_z * m["null_sd"], f"null + {min_z:g} sd", "dashdot")]:
        fig.add_hline(y=y, line_dash=dash, annotation_text=text)
    fig.update_layout(title=f"Every earlier component's {m['mode']}-composition score into the mover "
                            f"{m['layer']}.{m['head']}, sorted", xaxis_title="component rank", yaxis_title="score")
    return fig


def accuracy_figure(rows: list[dict]) -> go.Figure:
    df = pd.DataFrame([r for r in rows if r["position"] is None])
    fig = go.Figure()
    for col, name in (("accuracy", "accuracy among items"), ("top1_accuracy", "full-vocabulary top-1")):
        fig.add_trace(go.Scatter(x=df["n_items"], y=df[col], mode="lines+markers", name=name))
    fig.add_trace(go.Scatter(x=df["n_items"], y=1 / df["n_items"], mode="lines", name="chance (1/N)",
                             line=dict(dash="dash")))
    fig.update_layout(title="Laundry List accuracy vs number of items (held-out split)", xaxis_title="N items",
                      yaxis_title="accuracy")
    return fig


def position_heatmap(rows: list[dict]) -> go.Figure:
    df = pd.DataFrame([r for r in rows if r["position"] is not None])
    grid = df.pivot(index="n_items", columns="position", values="accuracy")
    fig = go.Figure(go.Heatmap(z=grid.values, x=[int(c) + 1 for c in grid.columns], y=grid.index,
                               colorscale="Viridis", colorbar=dict(title="accuracy")))
    fig.update_layout(title="Accuracy by answer position × N", xaxis_title="answer position (1 = first)",
                      yaxis_title="N items")
    return fig


def pca_figure(points: pd.DataFrame, view: dict) -> go.Figure:
    fig = go.Figure()
    sample = points.sample(min(len(points), 3000), random_state=0) if len(points) else points
    for pos in sorted(sample["position"].unique()):
        part = sample[sample["position"] == pos]
        fig.add_trace(go.Scatter(x=part["pc1"], y=part["pc2"] if "pc2" in part else 0 * part["pc1"], mode="markers",
                                 name=f"{'answer at ' if view['tokens'] == 'end' else ''}position {pos + 1}",
                                 marker=dict(size=4, opacity=0.6)))
    what = "END residuals" if view["tokens"] == "end" else "List-item residuals"
    fig.update_layout(title=f"{what} ({view['hook']}) on the channel directions: PC1 vs PC2",
                      xaxis_title="PC1", yaxis_title="PC2")
    return fig


def sweep_figure(edits: list[dict], metric: str, label: str) -> go.Figure:
    fig = go.Figure()
    for split, colour in (("held_out", "#d62728"), ("selection", "#ff9896")):
        part = [r for r in edits if r["selection"] == "channel" and r["split"] == split]
        fig.add_trace(go.Scatter(x=[r["alpha"] for r in part], y=[r[metric] for r in part], mode="lines+markers",
                                 name=f"edit set ({split.replace('_', '-')})", line=dict(color=colour)))
    rand = [r for r in edits if r["selection"] == "random"]
    if rand:
        band(fig, [r["alpha"] for r in rand], [r[metric] for r in rand], [r[f"{metric}_sd"] for r in rand],
             "random components, σ-matched (held-out, mean ± sd)", "#7f7f7f", markers=True)
    fig.update_layout(title=f"{label} vs α", xaxis_title="α (component scale)", yaxis_title=label)
    return fig


def _ci(row: dict) -> str:
    lo, hi = row["accuracy_ci"]
    return f"[{lo:.2f}, {hi:.2f}]"


def _processing_text(processing: dict) -> str:
    """The weight processing (`HeadWeights.processing`) and what each mode's reader side is, as report prose."""
    folds = "; ".join(f"{k.replace('_', ' ')}: {v}" for k, v in processing.items() if k != "reads")
    sides = ", ".join(f"{m}: {r}" for m, r in processing.get("reads", {}).items())
    return f"Weights: {folds}." + (f" Reader side per mode: {sides}." if sides else "")


def build_report(result: Result, tokenizer=None):
    cfg, m = result.config, result.mover
    rep = analysis_report(result.header, result.warnings)
    held = {r["alpha"]: r for r in result.edits if r["selection"] == "channel" and r["split"] == "held_out"}
    rand = {r["alpha"]: r for r in result.edits if r["selection"] == "random"}
    insample = {r["alpha"]: r for r in result.edits if r["selection"] == "channel" and r["split"] == "selection"}
    best = max(insample, key=lambda a: insample[a]["accuracy"])  # α chosen on the selection split
    per_n = {r["n_items"]: r for r in result.laundry_list if r["position"] is None}
    base = f"{held[1.0]['accuracy']:.3f}" if 1.0 in held else "nan"
    control = f"{rand[best]['accuracy']:.3f} ± {rand[best]['accuracy_sd']:.3f}" if best in rand else "unavailable"
    counts = result.channel_counts or {"found": len(result.channels), "kept": len(result.channels)}
    headline = {"channels found": counts["found"],
                "Gaussian baseline (component mean / max)":
                    f"{result.baseline['component_mean']:.3f} / {result.baseline['component_max']:.3f}",
                "mover head": f"{m['layer']}.{m['head']}",
                "edit set": ", ".join(f"{a}.{b}#{c}" for a, b, c in m["edit_set"]),
                **{f"accuracy N={n}": f"{r['accuracy']:.2f} {_ci(r)} (chance {1 / n:.2f})"
                   for n, r in list(per_n.items())[:4]},
                f"held-out accuracy α=1 → α={best:g} (best in-sample)":
                    f"{base} → {held[best]['accuracy']:.3f} {_ci(held[best])}",
                f"σ-matched random control at α={best:g}": control,
                "hook vs weight edit, max |Δlogit|": f"{result.edit_agreement:.2e}"}
    rep.add_metrics(headline)
    rep.add_heading("Composition from weights")
    rep.add_paragraph("Each writer head's OV is split into rank-1 SVD components σ u vᵀ; a component's score against a "
                      "reader is ‖vᵀ M‖/‖M‖_F with M the reader's QK (q: query side, k: key side, offset-0 rotary) or "
                      "OV (v). The whole-head score (Elhage et al.) is the σ²-weighted RMS of the component scores, so "
                      "a strong component with a small σ is diluted in it: compare the two heatmaps of each mode. "
                      + _processing_text(result.weight_processing))
    n_layers, n_heads = result.header["model"]["n_layers"], result.header["model"]["n_heads"]
    for mode, (whole_grid, best_grid) in result.grids.items():
        for grid, what in ((whole_grid, "whole head"), (best_grid, "best single component")):
            if n_layers * n_heads <= MAX_HEATMAP_HEADS:
                rep.add_figure(pair_heatmap(grid, _labels(n_layers, n_heads), f"{mode}-composition, {what}"))
            else:  # thousands of heads: the max over the heads of each layer pair
                g = grid.reshape(n_layers, n_heads, n_layers, n_heads)
                g = np.where(np.isnan(g), -np.inf, g).max(axis=(1, 3))
                rep.add_figure(pair_heatmap(np.where(np.isinf(g), np.nan, g), [str(x) for x in range(n_layers)],
                                            f"{mode}-composition, {what} (max over heads of each layer pair)"))
    rep.add_figure(component_bars(result))
    if result.channels:
        kept = (f" ({counts['kept']:,} of {counts['found']:,} written to channels.csv, the strongest; --max-channels "
                f"{cfg.max_channels}, 0 writes all)") if counts["kept"] < counts["found"] else ""
        rep.add_table(pd.DataFrame(result.channels).head(30), caption=f"Channels: components above both thresholds "
                      f"(z > {cfg.min_z:g} against the reader's null and > {result.baseline['channel_min_score']:.3f}),"
                      f" strongest first{kept}")
    else:
        rep.add_paragraph("No component clears both channel thresholds.")
    wh = pd.DataFrame(result.whole_head).sort_values("max_component_score", ascending=False).head(20)
    rep.add_table(wh, caption="Head pairs with the strongest single component, beside their diluted whole-head score "
                              "and channel rank")
    rep.add_heading("Laundry List")
    sp = result.split
    rep.add_paragraph("Accuracy = the answer's logit is the largest among the N list items (95 % Wilson interval in "
                      "the tables); top-1 = largest over the vocabulary; logit difference = answer − strongest other "
                      f"item. Held-out half: templates {', '.join(sp['held_out_templates'])}, "
                      f"{len(sp['held_out_items'])} items, {sp['held_out_prompts']} prompts; the selection half "
                      f"(templates {', '.join(sp['selection_templates'])}, {len(sp['selection_items'])} other items) "
                      "chose the mover and the edit set.")
    rep.add_figure(accuracy_figure(result.laundry_list))
    rep.add_figure(position_heatmap(result.laundry_list))
    rep.add_heading("Positional index in the channel subspace")
    v = result.activation_view
    where = ("at END, labelled by the answer's list position" if v["tokens"] == "end"
             else "at the first-list item tokens, labelled by their list position")
    rep.add_paragraph(f"Residual streams {where} ({v['hook']}, held-out half), projected on the "
                      f"{v['dimensions']} orthonormalised write directions of the components screened into the mover. "
                      f"Within each N, list position explains {v['position_eta2']:.1%} of their variance (random "
                      f"subspaces of the same size: {v['position_eta2_random_subspace']:.1%} ± "
                      f"{v['position_eta2_random_subspace_sd']:.1%}; the whole residual: "
                      f"{v['position_eta2_full_residual']:.1%}).")
    rep.add_figure(pca_figure(result.view_points, v))
    rep.add_heading("Editing the channel")
    rep.add_paragraph(f"Mover head {m['layer']}.{m['head']}: END attends to the answer item more than to the repeated "
                      f"ones (selection split, {m['attention_preference']:.3f}). Its top {cfg.candidates} "
                      f"{m['mode']}-composition components were each ablated on the selection split; the "
                      f"{cfg.edit_components} that lowered the mover's preference most form the edit set, scaled by α "
                      f"({cfg.edit_method} edit) on the held-out split. Control: random components of the same heads, "
                      f"as many in each of the head's {cfg.sigma_bins} σ quantile bins as the edit set (scaling a "
                      f"component moves the output by |α − 1| σ), disjoint from it, {cfg.random_draws} draws.")
    rep.add_table(pd.DataFrame(result.candidates),
                  caption="Screened components (ablation_effect > 0: removing it lowers the mover's preference for the "
                          f"answer). Spearman ρ(composition score, ablation effect) = {m['score_effect_spearman']:.2f} "
                          "(the paper's Fig. 2 relation: weights predict the data-side effect)")
    rep.add_figure(sweep_figure(result.edits, "accuracy", "Laundry List accuracy"))
    rep.add_figure(sweep_figure(result.edits, "logit_diff", "logit difference"))
    rep.add_table(pd.DataFrame(result.edits), caption="Edit sweep")
    rep.add_run_section(result.header)
    return rep
