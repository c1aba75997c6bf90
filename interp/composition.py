"""Composition between attention heads from weights alone: whole-head scores and per-SVD-component scores.

Talking Heads (Merullo, Eickhoff & Pavlick, NeurIPS 2024) decomposes a writer head's OV matrix
``OV_s = Σ_i σ_i u_i v_iᵀ`` (TransformerLens row-vector convention: ``x @ OV``; ``u_i`` reads,
``v_i`` writes) and scores each rank-1 component against a reader head in a later layer:

- ``q``: the reader's query side, ``CS_i = ‖v_iᵀ QK_d‖ / ‖QK_d‖_F`` (``QK = W_Q W_Kᵀ``);
- ``k``: the reader's key side, ``CS_i = ‖QK_d v_i‖ / ‖QK_d‖_F``;
- ``v``: the reader's OV, ``CS_i = ‖v_iᵀ OV_d‖ / ‖OV_d‖_F``.

σ_i cancels, so only the write direction counts. The whole-head composition score of Elhage et al.
(2021), ``‖OV_s M_d‖_F / (‖OV_s‖_F ‖M_d‖_F)``, is the σ²-weighted RMS of the component scores,
``CS² = Σ_i σ_i² CS_i² / Σ_i σ_i²``: one strong component with a small σ is diluted in it.

Every reader matrix M is reduced to a factor ``R = U_M S_M / ‖S_M‖`` (its SVD), so that ``CS_i = ‖v_iᵀ R‖``;
the scan is one einsum per (reader layer, chunk of writer layers), so memory stays bounded on 7B-size models.
Norm folding (``fold_norms``, `head_weights`): the reader's input-norm gain and the q/k-norm gains (Qwen3,
Gemma-3, OLMo-2) are multiplied into W_Q / W_K / W_V, which LayerNorm models also centre over d_model, and
LayerNorm models' writer outputs are centred, as TransformerLens' ``fold_ln`` + ``center_writing_weights`` do;
a post-attention norm's gain (Gemma-2/3, OLMo-2) goes into W_O. The per-token 1/rms of a q/k norm or
post-attention norm is not linear and is left out (q/k-side scores are pre-norm). The gains are read by
evaluating each norm module on a vector of ones, so zero-centred RMSNorms (Gemma, Qwen3.5) fold too. Rotary:
``QK`` is the bilinear form at relative offset 0; ``rotary_invariant`` scores use W_Q (mode q) or W_K (mode k)
alone, which rotary (orthogonal, applied after the projection) cannot change. GQA: a reader's key/value side
is its KV group's, expanded to every query head of the group (per query head in q and v modes; the k-mode
``rotary_invariant`` score is the group's).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import FactoredMatrix

from interp.errors import UserError

MODES = ("q", "k", "v")


@dataclass
class HeadWeights:
    """Attention weights in TransformerLens layout (K/V not expanded under GQA)."""

    W_Q: Float[Tensor, "layer head d_model d_head"]
    W_K: Float[Tensor, "layer kv d_model d_head"]
    W_V: Float[Tensor, "layer kv d_model d_head"]
    W_O: Float[Tensor, "layer head d_head d_model"]
    processing: dict[str, str] = field(default_factory=dict)  # what `head_weights` folded in (results.json)
    notes: list[str] = field(default_factory=list)  # where the weights are not the exact map the model applies
    layers: list[int] | None = None  # the model layer of each index (hybrids: the softmax layers); None: all

    @property
    def n_layers(self) -> int:
        return self.W_Q.shape[0]

    @property
    def n_heads(self) -> int:
        return self.W_Q.shape[1]

    @property
    def group(self) -> int:
        return self.W_Q.shape[1] // self.W_K.shape[1]

    def expand(self, w: Tensor) -> Tensor:
        """KV-head tensor [.., kv, ...] → one copy per query head (head h uses kv head h // group)."""
        return w.repeat_interleave(self.group, dim=-3)


def _norm_gain(norm, width: int | None = None) -> Tensor:
    """The per-dim gain of an RMSNorm module (its output on a vector of ones, eps aside; a (1 + w) parametrisation
    folds too). `width` defaults to the norm's own (its weight's length)."""
    with torch.no_grad():
        p = next(norm.parameters())
        width = p.shape[-1] if width is None else width
        return norm(torch.ones(1, 1, width, dtype=p.dtype, device=p.device))[0, 0].float().cpu()


def _head_gain(norm, n_heads: int, d_head: int) -> Tensor:
    """A q/k norm's gain as [heads, 1, d_head] (broadcasts on W [heads, d_model, d_head]): per head (Qwen3, Gemma-3:
    the norm's width is d_head) or over all heads at once (OLMo-2: width heads · d_head)."""
    gain = _norm_gain(norm)
    if gain.numel() not in (d_head, n_heads * d_head):
        raise UserError(f"a q/k norm of width {gain.numel()} fits neither d_head ({d_head}) nor heads × d_head "
                        f"({n_heads * d_head})")
    return gain.reshape(-1, 1, d_head)  # [1 or heads, 1, d_head]


def _child(module, name: str):
    return getattr(module, name, None) if hasattr(module, name) else None


def head_weights(model, fold_norms: bool = True, layers: Sequence[int] | None = None) -> HeadWeights:
    """The bridge's W_Q, W_K, W_V, W_O (float32, CPU); with `fold_norms`, the norms around attention folded in
    wherever they are linear, as TransformerLens' processed weights (`fold_ln` + `center_writing_weights`):

    - reader side: the pre-attention norm's gain multiplied into W_Q/W_K/W_V, and on LayerNorm models W_Q/W_K/W_V
      centred over d_model (LayerNorm removes the all-ones direction of its input: `fold_ln`'s centring); no
      pre-attention norm (OLMo-2) leaves them as they are (the reader reads the un-normalised residual);
    - q/k norms (Qwen3, Gemma-3 per head; OLMo-2 over all heads): their gains folded into W_Q/W_K; their per-token
      1/rms cannot be, so q/k-side scores are of the query/key before the norm's scaling (pre-norm);
    - writer side: LayerNorm models' W_O centred over d_model (`center_writing_weights`); a post-attention norm on
      the attention output (Gemma-2/3, OLMo-2) gets its gain multiplied into W_O, its per-token 1/rms (one scalar
      for all heads of the layer) not: write directions and scores are exact, singular values up to that scale.

    `HeadWeights.processing` says what was folded (results.json), `HeadWeights.notes` where the result is not the
    exact linear map the model applies. `layers` (e.g. a hybrid's softmax-attention layers) takes those layers
    only, index j holding layer `layers[j]` (`HeadWeights.layers`)."""
    cfg = model.cfg
    index = list(range(cfg.n_layers) if layers is None else layers)
    try:
        W_Q, W_K, W_V, W_O = (torch.stack([getattr(model.blocks[layer].attn, name).detach().float().cpu()
                                           for layer in index]) for name in ("W_Q", "W_K", "W_V", "W_O"))
    except (AttributeError, RuntimeError, ValueError) as exc:
        raise UserError(f"this model's attention weights cannot be stacked per layer ({type(exc).__name__}); "
                        "talking_heads needs attention in every layer") from None
    given = None if layers is None else index
    if not fold_norms:
        return HeadWeights(W_Q, W_K, W_V, W_O, processing={"norms": "not folded (raw weights, fold_norms off)"},
                           layers=given)
    if getattr(cfg, "attention_dir", "causal") == "bidirectional":  # BERT-style: LayerNorm after the residual add
        note = ("norm gains not folded: this encoder normalises the residual after each sublayer (post-LayerNorm), "
                "which does not fold into the weights; scores are of the raw weights")
        return HeadWeights(W_Q, W_K, W_V, W_O, processing={"norms": note}, notes=[note], layers=given)
    layer_norm = getattr(cfg, "normalization_type", "RMS") in ("LN", "LNPre")
    n_kv = W_K.shape[1]
    kinds: dict[str, set[str]] = {"reader": set(), "qk": set(), "writer": set()}
    for layer, block in enumerate(model.blocks[i] for i in index):  # `layer`: the index into W_Q … W_O
        ln1, attn = _child(block, "ln1"), block.attn
        if ln1 is None:
            kinds["reader"].add("none")
        else:
            gain = ln1.weight.detach().float().cpu() if layer_norm else _norm_gain(ln1, cfg.d_model)
            for w in (W_Q, W_K, W_V):
                w[layer] *= gain[:, None]
                if layer_norm:
                    w[layer] -= w[layer].mean(-2, keepdim=True)
            kinds["reader"].add("ln" if layer_norm else "rms")
        if _child(attn, "q_norm") is not None:
            W_Q[layer] *= _head_gain(attn.q_norm, cfg.n_heads, cfg.d_head)
            kinds["qk"].add("q")
        if _child(attn, "k_norm") is not None:
            W_K[layer] *= _head_gain(attn.k_norm, n_kv, cfg.d_head)
            kinds["qk"].add("k")
        post = _child(block, "ln1_post")
        if post is not None:
            W_O[layer] *= _norm_gain(post, cfg.d_model)
            kinds["writer"].add("post")
    if layer_norm:
        W_O = W_O - W_O.mean(-1, keepdim=True)
        kinds["writer"].add("centred")
    return HeadWeights(W_Q, W_K, W_V, W_O, *_describe(kinds), layers=given)


def _describe(kinds: dict[str, set[str]]) -> tuple[dict[str, str], list[str]]:
    """(processing, notes) for `head_weights`' folds."""
    reader = {"ln": "LayerNorm gain folded into W_Q/W_K/W_V, which are centred over d_model (TransformerLens fold_ln)",
              "rms": "RMSNorm gain folded into W_Q/W_K/W_V (TransformerLens fold_ln)",
              "none": "no pre-attention norm: W_Q/W_K/W_V read the un-normalised residual stream"}
    processing = {"reader_norm": "; ".join(reader[k] for k in sorted(kinds["reader"]))}
    notes = []
    if kinds["qk"]:
        processing["qk_norm"] = ("q/k-norm gains folded into W_Q/W_K; the norm's per-token 1/rms is not: q- and "
                                 "k-mode scores read the query/key before the q/k norm's scaling (pre-norm)")
        notes.append("this model normalises queries and keys (q/k norm): q- and k-mode scores are of the pre-norm "
                     "query/key (gains folded, the per-token 1/rms not), exact up to a positive scale per token")
    writer = []
    if "centred" in kinds["writer"]:
        writer.append("W_O centred over d_model (TransformerLens center_writing_weights)")
    if "post" in kinds["writer"]:
        writer.append("post-attention norm gain folded into W_O; its per-token 1/rms (one scalar per layer and token) "
                      "is not: write directions and scores exact, singular values up to that scale")
        notes.append("this model normalises the attention output before the residual add (post-attention norm): its "
                     "gain is in the writers' W_O, its per-token 1/rms is not (singular values are up to that scale; "
                     "the scores do not depend on it)")
    if writer:
        processing["writer_norm"] = "; ".join(writer)
    return processing, notes


def writer_svd(w: HeadWeights, layers: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Per-head SVD of OV = W_V W_O: (S [layer, head, r], V [layer, head, d_model, r]), σ descending;
    the columns of V are the write directions v_i."""
    layers = list(range(w.n_layers) if layers is None else layers)
    n, d, r = w.n_heads, w.W_O.shape[-1], w.W_O.shape[-2]
    S, V = torch.empty(len(layers), n, r), torch.empty(len(layers), n, d, r)  # filled in place: no stacked copy
    for j, layer in enumerate(layers):
        _, S[j], V[j] = FactoredMatrix(w.expand(w.W_V[layer]), w.W_O[layer]).svd()
    return S, V


def reader_factor(w: HeadWeights, layer: int, mode: str, rotary_invariant: bool = False
                  ) -> Float[Tensor, "head d_model rank"]:
    """R with ‖vᵀ R‖ = ‖vᵀ M‖ / ‖M‖_F for the reader matrix M of `mode` (q: QK, k: QKᵀ, v: OV);
    `rotary_invariant` uses W_Q (q) or W_K (k) alone."""
    Q, K = w.W_Q[layer], w.expand(w.W_K[layer])
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}")
    if rotary_invariant:
        if mode == "v":
            raise ValueError("the rotary-invariant score is for modes q and k")
        A = Q if mode == "q" else K
        return A / A.flatten(-2).norm(dim=-1)[:, None, None]
    if mode == "q":
        fm = FactoredMatrix(Q, K.transpose(-1, -2))
    elif mode == "k":
        fm = FactoredMatrix(K, Q.transpose(-1, -2))
    else:
        fm = FactoredMatrix(w.expand(w.W_V[layer]), w.W_O[layer])
    U, S, _ = fm.svd()
    return U * (S / S.norm(dim=-1, keepdim=True))[:, None, :]


@dataclass
class Scan:
    """Per-component composition scores of one mode. `scores[lw, hw, i, lr, hr]` is NaN unless lw < lr."""

    mode: str
    scores: Float[Tensor, "layer head comp layer head"]
    sigma: Float[Tensor, "layer head comp"]
    rotary_invariant: Tensor | None = None
    reads: str = ""  # what the reader side is: "query", "key" (" before the q/k norm" on q/k-norm models), "OV"

    def whole_head(self) -> Float[Tensor, "layer head layer head"]:
        """Elhage et al.'s whole-head score from the identity CS² = Σ σ_i² CS_i² / Σ σ_i²."""
        weight = (self.sigma ** 2 / (self.sigma ** 2).sum(-1, keepdim=True))[..., None, None]
        return (weight * self.scores ** 2).sum(2).sqrt()

    def null(self) -> tuple[Tensor, Tensor]:
        """Empirical null per reader head: (mean, sd) of all components of all earlier heads."""
        n_layers, n_heads = self.scores.shape[3:]
        mu = torch.full((n_layers, n_heads), float("nan"))
        sd = torch.full((n_layers, n_heads), float("nan"))
        for lr in range(1, n_layers):
            pool = self.scores[:lr, :, :, lr].flatten(0, 2)   # [n_components, reader head]
            mu[lr], sd[lr] = pool.mean(0), pool.std(0)
        return mu, sd

    def z(self) -> Tensor:
        mu, sd = self.null()
        return (self.scores - mu) / sd.clamp_min(1e-12)

    def channel_rank(self, energy: float = 0.8) -> Tensor:
        """Smallest k whose top-k components by σ_i² CS_i² hold ≥ `energy` of Σ_i σ_i² CS_i², per head pair."""
        e = (self.sigma ** 2)[..., None, None] * self.scores ** 2
        e = e.sort(dim=2, descending=True).values
        share = e.cumsum(2) / e.sum(2, keepdim=True)
        return (share < energy - 1e-9).sum(2) + 1


def scan(w: HeadWeights, mode: str, *, S: Tensor | None = None, V: Tensor | None = None,
         rotary_invariant: bool = True, chunk_layers: int = 4, progress: bool = False,
         reader_layers: Sequence[int] | None = None) -> Scan:
    """Score every writer component against every reader head in a later layer, one reader layer at a
    time and `chunk_layers` writer layers per einsum (memory ∝ chunk_layers · heads² · rank²).
    `reader_layers` limits the readers scored (default: all; others stay NaN)."""
    if S is None or V is None:
        S, V = writer_svd(w)
    n_layers, n_heads, r = S.shape
    scores = torch.full((n_layers, n_heads, r, n_layers, n_heads), float("nan"))
    rot = scores.clone() if rotary_invariant and mode != "v" else None
    readers = [lr for lr in (range(1, n_layers) if reader_layers is None else reader_layers) if lr >= 1]
    for lr in tqdm(readers, desc=f"composition {mode}", disable=not progress, leave=False):
        factors = [(scores, reader_factor(w, lr, mode))]
        if rot is not None:
            factors.append((rot, reader_factor(w, lr, mode, rotary_invariant=True)))
        for out, R in factors:
            for start in range(0, lr, chunk_layers):
                stop = min(lr, start + chunk_layers)
                C = torch.einsum("lhdi,gdj->lhigj", V[start:stop], R)
                out[start:stop, :, :, lr] = C.norm(dim=-1)
    return Scan(mode, scores, S, rot, reads(w, mode))


def reads(w: HeadWeights, mode: str) -> str:
    """The reader quantity a `mode` score is about; q/k on a q/k-norm model: the query/key before the norm's
    per-token 1/rms ("pre-norm", `head_weights`)."""
    side = {"q": "query", "k": "key", "v": "OV"}[mode]
    return f"{side} (pre-norm: before the q/k norm's 1/rms)" if mode != "v" and "qk_norm" in w.processing else side


def gaussian_baseline(d_model: int, d_head: int, n_draws: int = 20, seed: int = 0) -> dict[str, float]:
    """Scores of Gaussian random writer/reader heads of this size (QK reader, rank d_head):
    mean per-component score, mean of the max over a head's components, mean whole-head score."""
    g = torch.Generator().manual_seed(seed)
    comp, top, whole = [], [], []
    for _ in range(n_draws):
        a, b, q, k = (torch.randn(d_model, d_head, generator=g) for _ in range(4))
        _, s, v = FactoredMatrix(a, b.T).svd()          # writer OV
        U, S, _ = FactoredMatrix(q, k.T).svd()          # reader QK
        R = U * (S / S.norm())
        cs = (v.T @ R).norm(dim=-1)
        comp.append(cs.mean())
        top.append(cs.max())
        whole.append(((s ** 2 * cs ** 2).sum() / (s ** 2).sum()).sqrt())
    return {"component_mean": _mean(comp), "component_max": _mean(top), "whole_head": _mean(whole),
            "n_draws": n_draws, "d_model": d_model, "d_head": d_head}


def _mean(xs: list[Tensor]) -> float:
    return float(torch.stack(xs).mean())


def channel_mask(s: Scan, z: Tensor, *, min_z: float, min_score: float) -> Tensor:
    """Components that clear both thresholds: z against the reader's empirical null and an absolute score."""
    return (z > min_z) & (s.scores > min_score)


def channel_rows(s: Scan, z: Tensor, *, min_z: float, min_score: float, limit: int | None = None) -> list[dict]:
    """Components that clear both thresholds (`channel_mask`), strongest first, as `channels` rows; with `limit`,
    only the `limit` strongest (chosen on the tensor, so no row is built for the others)."""
    keep = channel_mask(s, z, min_z=min_z, min_score=min_score)
    n = int(keep.sum())
    if limit and n > limit:
        flat = torch.where(keep, s.scores, torch.tensor(float("-inf"), dtype=s.scores.dtype)).flatten()
        top = torch.topk(flat, limit).indices
        idx = torch.stack(torch.unravel_index(top, keep.shape), 1).tolist()
    else:
        idx = keep.nonzero().tolist()
    rows = []
    for lw, hw, i, lr, hr in idx:
        row = {"writer_layer": lw, "writer_head": hw, "component": i, "reader_layer": lr, "reader_head": hr,
               "mode": s.mode, "reads": s.reads, "score": float(s.scores[lw, hw, i, lr, hr]),
               "z": float(z[lw, hw, i, lr, hr]), "singular_value": float(s.sigma[lw, hw, i])}
        if s.rotary_invariant is not None:
            row["rotary_invariant"] = float(s.rotary_invariant[lw, hw, i, lr, hr])
        rows.append(row)
    rows.sort(key=lambda r: -r["score"])
    return rows[:limit] if limit else rows


def pair_mask(n_layers: int, n_heads: int) -> Tensor:
    """[writer layer, writer head, reader layer, reader head]: True where the writer's layer is earlier."""
    earlier = torch.arange(n_layers)[:, None] < torch.arange(n_layers)[None, :]
    return earlier[:, None, :, None].expand(n_layers, n_heads, n_layers, n_heads)


def whole_head_rows(s: Scan, energy: float = 0.8, limit: int | None = None) -> list[dict]:
    """`whole_head` rows for every (earlier writer, reader) pair, with the best component's score
    and the channel rank beside the diluted whole-head score. With `limit`, only the pairs among the `limit`
    highest whole-head scores or the `limit` highest best-component scores (at most 2 × `limit` rows, in the
    same order), chosen on the tensors."""
    whole, best, rank = s.whole_head(), s.scores.amax(2), s.channel_rank(energy)
    n_layers, n_heads = whole.shape[:2]
    valid = pair_mask(n_layers, n_heads)
    if limit and int(valid.sum()) > limit:
        keep = torch.zeros_like(valid)
        for x in (whole, best):
            flat = torch.where(valid & ~x.isnan(), x, torch.tensor(float("-inf"), dtype=x.dtype)).flatten()
            keep.view(-1)[torch.topk(flat, limit).indices] = True
        keep &= valid
    else:
        keep = valid
    # reader-major order, as before: (reader layer, reader head, writer layer, writer head)
    idx = keep.permute(2, 3, 0, 1).nonzero().tolist()
    return [{"writer_layer": lw, "writer_head": hw, "reader_layer": lr, "reader_head": hr, "mode": s.mode,
             "score": float(whole[lw, hw, lr, hr]), "max_component_score": float(best[lw, hw, lr, hr]),
             "channel_rank": int(rank[lw, hw, lr, hr])}
            for lr, hr, lw, hw in idx]
