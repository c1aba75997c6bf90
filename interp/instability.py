"""Dynamic instability of next-token distributions along a reasoning trace (Chen et al. 2026,
"I May Not Have Articulated Myself Clearly", arXiv 2602.02863).

Per decoding step t, from the top-k next-token log-probabilities (API logprobs, or a local
model's log-softmax cut to its k largest entries):

- renormalised top-k distribution  p̃_t(v) = exp ℓ_t(v) / Σ_{u ∈ S_t} exp ℓ_t(u),  v ∈ S_t;
- entropy  H_t = −Σ p̃_t log p̃_t  (natural log, ≤ log k; `normalise_entropy` divides by log k_t);
- shift  D_t = JSD(p̃_t, p̃_{t−1}) on the union S_t ∪ S_{t−1} (≤ log 2), D_1 = 0. Tokens outside a
  distribution's own top-k: `union_zero` gives them probability 0 (the reconstruction's default);
  `residual_bin` keeps the un-renormalised top-k probabilities and puts each distribution's
  remaining mass 1 − Σ_{S_t} p_t into one shared "other" outcome;
- combined signal  I_t = D_t + λ·H_t, optionally a trailing moving average over `smooth` steps
  (trailing, so a prefix's signal never sees later tokens).

Per trace: peak strength S = max_t I_t, peak step t* (first maximum), relative position r = t*/T
(T generated tokens, t* counted from 1); early if r ≤ 0.25, late if r > 0.5.
Across traces: ROC-AUC of S for predicting a wrong answer (Mann-Whitney, ties count ½) with a
stratified percentile bootstrap CI, accuracy per S quantile bucket, early vs late accuracy within
S strata. All functions are plain torch / numpy; no scikit-learn or scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

PAD_ID = -1      # top-k slot with no token (a step that has fewer than k entries)
OTHER_ID = -2    # the shared "other" outcome of the residual-bin JSD
LOG2 = math.log(2.0)


# --------------------------------------------------------------------------- per-step signals

def _plogp(logp: Tensor) -> Tensor:
    """p·log p elementwise with 0·log 0 = 0 (logp may be −inf)."""
    p = logp.exp()
    return torch.where(p > 0, p * logp, torch.zeros_like(p))


def renormalise(logprobs: Float[Tensor, "*step k"]) -> Float[Tensor, "*step k"]:
    """Log-probabilities renormalised over the listed entries (−inf entries stay −inf)."""
    return logprobs - torch.logsumexp(logprobs, dim=-1, keepdim=True)


def entropy(logprobs: Float[Tensor, "*step k"]) -> Float[Tensor, "*step"]:
    """Shannon entropy in nats of normalised log-probabilities, 0·log 0 = 0."""
    return -_plogp(logprobs).sum(-1)


def full_jsd(lp_a: Float[Tensor, "*step vocab"], lp_b: Float[Tensor, "*step vocab"]) -> Float[Tensor, "*step"]:
    """Jensen-Shannon divergence (nats) between distributions on the same support, from log-probs."""
    log_m = torch.logaddexp(lp_a, lp_b) - LOG2
    kl_a = (_plogp(lp_a) - lp_a.exp() * torch.where(lp_a.isinf(), 0.0, log_m)).sum(-1)
    kl_b = (_plogp(lp_b) - lp_b.exp() * torch.where(lp_b.isinf(), 0.0, log_m)).sum(-1)
    return (0.5 * (kl_a + kl_b)).clamp_min(0.0)


def _on_support(ids: Int[Tensor, "step k"], other_ids: Int[Tensor, "step j"], other_p: Tensor) -> Tensor:
    """For each (step, slot) of `ids`, the probability `other_p` puts on that token (0 if absent)."""
    match = (ids[:, :, None] == other_ids[:, None, :]) & (ids[:, :, None] != PAD_ID)
    return (match * other_p[:, None, :]).sum(-1)


def topk_jsd(ids: Int[Tensor, "step k"], logprobs: Float[Tensor, "step k"],
             support: str = "union_zero") -> Float[Tensor, "step"]:
    """JSD between consecutive steps' top-k distributions on the union of their supports; D_1 = 0.

    `logprobs` are the raw top-k log-probabilities (not renormalised). `union_zero`: renormalised
    top-k, probability 0 outside a step's own top-k. `residual_bin`: raw probabilities plus one
    shared "other" outcome holding 1 − Σ top-k (the unknown tail, lumped).
    """
    logprobs = logprobs.double()
    if support == "union_zero":
        p = renormalise(logprobs).exp()
    elif support == "residual_bin":
        p = logprobs.exp()
        rest = (1.0 - p.sum(-1, keepdim=True)).clamp_min(0.0)
        p = torch.cat([p, rest], -1)
        ids = torch.cat([ids, torch.full_like(ids[:, :1], OTHER_ID)], -1)
    else:
        raise ValueError(f"unknown JSD support handling {support!r}")
    out = torch.zeros(ids.shape[0], dtype=p.dtype)
    if ids.shape[0] < 2:
        return out
    p_cur, p_prev, ids_cur, ids_prev = p[1:], p[:-1], ids[1:], ids[:-1]
    q_at_cur = _on_support(ids_cur, ids_prev, p_prev)    # p_{t-1} on S_t
    p_at_prev = _on_support(ids_prev, ids_cur, p_cur)    # p_t on S_{t-1}

    def half_kl(p_own: Tensor, p_other: Tensor) -> Tensor:
        m = 0.5 * (p_own + p_other)
        return torch.where(p_own > 0, p_own * (p_own.clamp_min(1e-300).log() - m.clamp_min(1e-300).log()),
                           torch.zeros_like(p_own)).sum(-1)

    out[1:] = (0.5 * (half_kl(p_cur, q_at_cur) + half_kl(p_prev, p_at_prev))).clamp_min(0.0)
    return out


def cut_topk(ids: Int[Tensor, "step j"], logprobs: Float[Tensor, "step j"], k: int) -> tuple[Tensor, Tensor]:
    """The `k` largest entries per step, in descending order (fewer kept when fewer are listed)."""
    k = min(k, logprobs.shape[-1])
    values, order = torch.topk(logprobs, k, dim=-1)
    return torch.gather(ids, -1, order), values


def topk_entropy(logprobs: Float[Tensor, "step k"], normalise: bool = False) -> Float[Tensor, "step"]:
    """Entropy of the renormalised top-k; `normalise` divides by log k_t (k_t = entries at step t)."""
    h = entropy(renormalise(logprobs))
    if normalise:
        k = torch.isfinite(logprobs).sum(-1).to(h.dtype)
        h = torch.where(k > 1, h / k.clamp_min(2).log(), torch.zeros_like(h))
    return h


def trailing_mean(x: Float[Tensor, "step"], window: int) -> Float[Tensor, "step"]:
    """Mean of the last `window` values at each step (fewer at the start); window 1 = unchanged."""
    if window <= 1 or x.numel() == 0:
        return x
    c = torch.cat([x.new_zeros(1), x.cumsum(0)])
    t = torch.arange(1, x.numel() + 1)
    lo = (t - window).clamp_min(0)
    return (c[t] - c[lo]) / (t - lo).to(x.dtype)


def combine(shift: Tensor, ent: Tensor, lam: float = 1.0, smooth: int = 1) -> Tensor:
    """I_t = D_t + λ·H_t, then the trailing moving average."""
    return trailing_mean(shift + lam * ent, smooth)


@dataclass
class TraceDists:
    """One trace's next-token distributions: raw top-k log-probs per generated token (padded with
    −inf / PAD_ID), and, from a local model, full-vocabulary entropy and consecutive JSD."""

    id: str
    correct: bool
    tokens: list[str]                                   # the generated tokens, as text
    topk_ids: Int[Tensor, "step k"]
    topk_logprobs: Float[Tensor, "step k"]
    full_entropy: Float[Tensor, "step"] | None = None
    full_jsd: Float[Tensor, "step"] | None = None       # D_1 = 0
    vocab_size: int | None = None

    @property
    def length(self) -> int:
        return int(self.topk_logprobs.shape[0])


def step_signals(trace: TraceDists, *, top_k: int = 20, lam: float = 1.0, support: str = "union_zero",
                 normalise_entropy: bool = False, smooth: int = 1, distribution: str = "topk") -> dict[str, Tensor]:
    """Per-step H, D and I of one trace (float64): the top-k path (the paper's) or the full vocabulary."""
    if distribution == "full":
        if trace.full_entropy is None or trace.full_jsd is None:
            raise ValueError("full-vocabulary signals need a local model's distributions")
        h, d = trace.full_entropy.double(), trace.full_jsd.double()
        if normalise_entropy:
            h = h / math.log(trace.vocab_size)
    else:
        ids, lp = cut_topk(trace.topk_ids, trace.topk_logprobs, top_k)
        h = topk_entropy(lp.double(), normalise_entropy)
        d = topk_jsd(ids, lp, support)
    return {"H": h, "D": d, "I": combine(d, h, lam, smooth)}


# --------------------------------------------------------------------------- per-trace summaries

@dataclass(frozen=True)
class Peak:
    strength: float   # S = max_t I_t
    step: int         # t*, 1-based
    position: float   # r = t*/T

    @property
    def early(self) -> bool:
        return self.position <= EARLY_MAX

    @property
    def late(self) -> bool:
        return self.position > LATE_MIN


EARLY_MAX, LATE_MIN = 0.25, 0.5


def peak(signal: Float[Tensor, "step"], start: int = 0) -> Peak:
    """Peak of a trace's signal (first maximum), ignoring the first `start` steps."""
    T = signal.numel()
    if T <= start:
        raise ValueError(f"a trace of {T} steps has no step after the first {start}")
    i = start + int(torch.argmax(signal[start:]))
    return Peak(float(signal[i]), i + 1, (i + 1) / T)


def prefix_peak(signal: Float[Tensor, "step"], window: int, start: int = 0) -> float:
    """S_{≤W} = max over the first `window` steps (the whole trace when shorter)."""
    return float(signal[start:max(window, start + 1)].max())


# --------------------------------------------------------------------------- across traces

def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x))
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and xs[j + 1] == xs[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """ROC-AUC of `scores` (higher = positive) via the Mann-Whitney U statistic, ties count ½.
    NaN when one class is absent."""
    s, y = np.asarray(scores, float), np.asarray(positive, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores: Sequence[float], positive: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) at every distinct threshold, from (0, 0) to (1, 1)."""
    s, y = np.asarray(scores, float), np.asarray(positive, bool)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.diff(s) != 0, True]       # the last index of each run of tied scores
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    tpr = np.r_[0.0, tp / max(1, y.sum())]
    fpr = np.r_[0.0, fp / max(1, (~y).sum())]
    return fpr, tpr


def bootstrap_auc_ci(scores: Sequence[float], positive: Sequence[bool], n_boot: int = 2000,
                     level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap CI of the ROC-AUC, resampling positives and negatives separately
    (stratified, so every resample has both classes). O(n_boot·n) via cumulative counts."""
    s, y = np.asarray(scores, float), np.asarray(positive, bool)
    pos, neg = s[y], np.sort(s[~y])
    if len(pos) == 0 or len(neg) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    w_pos = _counts(rng.integers(0, len(pos), (n_boot, len(pos))), len(pos))
    w_neg = _counts(rng.integers(0, len(neg), (n_boot, len(neg))), len(neg))
    cum = np.concatenate([np.zeros((n_boot, 1)), np.cumsum(w_neg, 1)], 1)   # negatives below index
    below = cum[:, np.searchsorted(neg, pos, "left")]
    at_or_below = cum[:, np.searchsorted(neg, pos, "right")]
    aucs = (w_pos * (below + at_or_below) / 2).sum(1) / (len(pos) * len(neg))
    alpha = (1 - level) / 2
    return float(np.quantile(aucs, alpha)), float(np.quantile(aucs, 1 - alpha))


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    rows = np.repeat(np.arange(idx.shape[0]), idx.shape[1])
    out = np.zeros((idx.shape[0], n))
    np.add.at(out, (rows, idx.ravel()), 1)
    return out


def quantile_edges(scores: Sequence[float], n_buckets: int) -> np.ndarray:
    """Distinct quantile edges of `scores` (min to max) for `n_buckets` buckets."""
    return np.unique(np.quantile(np.asarray(scores, float), np.linspace(0, 1, n_buckets + 1)))


def bucket_of(scores: Sequence[float], edges: np.ndarray) -> np.ndarray:
    """Bucket index per score: bucket b holds (edges[b], edges[b+1]], the first also its low edge."""
    inner = edges[1:-1]
    return np.searchsorted(inner, np.asarray(scores, float), side="left")


def accuracy_buckets(scores: Sequence[float], correct: Sequence[bool], n_buckets: int = 5) -> list[dict]:
    """Accuracy per quantile bucket of `scores`: rows {low, high, accuracy, n} (empty buckets dropped;
    tied scores always share a bucket, so there can be fewer than `n_buckets`)."""
    s, c = np.asarray(scores, float), np.asarray(correct, bool)
    if len(s) == 0:
        return []
    edges = quantile_edges(s, n_buckets)
    if len(edges) == 1:
        edges = np.array([edges[0], edges[0]])
    b = bucket_of(s, edges)
    rows = []
    for k in range(len(edges) - 1):
        sel = b == k
        if sel.any():
            rows.append({"low": float(edges[k]), "high": float(edges[k + 1]),
                         "accuracy": float(c[sel].mean()), "n": int(sel.sum())})
    return rows


def early_late(scores: Sequence[float], positions: Sequence[float], correct: Sequence[bool],
               n_strata: int = 3) -> tuple[dict, list[dict]]:
    """Accuracy of early-peak (r ≤ 0.25) vs late-peak (r > 0.5) traces at comparable peak strength.

    Traces are stratified by quantiles of S; strata holding both early and late traces are kept and
    each group's accuracy is averaged over them weighted by the stratum's early + late count (direct
    standardisation). Returns ({early_accuracy, late_accuracy, n_early, n_late}, per-stratum rows
    with the raw counts of every stratum).
    """
    s, r, c = np.asarray(scores, float), np.asarray(positions, float), np.asarray(correct, bool)
    early, late = r <= EARLY_MAX, r > LATE_MIN
    edges = quantile_edges(s, n_strata) if len(s) else np.zeros(1)
    if len(edges) == 1:
        edges = np.array([edges[0], edges[0]])
    b = bucket_of(s, edges)
    rows, acc_e, acc_l, weights, n_e, n_l = [], [], [], [], 0, 0
    for k in range(len(edges) - 1):
        e, la = (b == k) & early, (b == k) & late
        row = {"low": float(edges[k]), "high": float(edges[k + 1]), "n_early": int(e.sum()), "n_late": int(la.sum()),
               "early_accuracy": float(c[e].mean()) if e.any() else None,
               "late_accuracy": float(c[la].mean()) if la.any() else None}
        rows.append(row)
        if e.any() and la.any():
            acc_e.append(row["early_accuracy"])
            acc_l.append(row["late_accuracy"])
            weights.append(e.sum() + la.sum())
            n_e += int(e.sum())
            n_l += int(la.sum())
    if weights:
        w = np.asarray(weights, float) / sum(weights)
        summary = {"early_accuracy": float(np.dot(w, acc_e)), "late_accuracy": float(np.dot(w, acc_l)),
                   "n_early": n_e, "n_late": n_l}
    else:
        summary = {"early_accuracy": None, "late_accuracy": None, "n_early": 0, "n_late": 0}
    return summary, rows


# --------------------------------------------------------------------------- a local model's distributions

@torch.no_grad()
def teacher_forced(model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *,
                   top_k: int = 20, batch_size: int = 8, progress: bool = True) -> list[dict[str, Tensor]]:
    """One teacher-forced forward over prompt + completion per trace: the T next-token distributions
    `logits[P−1 : P+T−1]` (temperature 1, whatever the sampling temperature was).

    Per trace, on the CPU: `topk_ids`, `topk_logprobs` [T, k] (log-softmax over the full vocabulary,
    then its k largest), `chosen` [T] (log-prob of the generated token), `full_entropy` [T] and `full_jsd` [T] (consecutive steps, D_1 = 0), computed
    batch by batch on the model's device so no [T, vocab] tensor outlives its trace.
    """
    from interp.batching import padded_batches
    from interp.bridge import sdpa_attention

    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    if any(len(c) == 0 for c in completions):
        raise ValueError("every completion needs at least one token")
    out: list[dict[str, Tensor] | None] = [None] * len(seqs)
    with sdpa_attention(model):
        for idx, tokens, mask in padded_batches(model, seqs, batch_size, desc="teacher-forced", progress=progress):
            logits = model(tokens, attention_mask=mask, return_type="logits")
            width = tokens.shape[1]
            for row, i in enumerate(idx):
                start = width - len(seqs[i]) + len(prompts[i]) - 1
                lp = torch.log_softmax(logits[row, start:start + len(completions[i])].float(), -1)
                values, ids = torch.topk(lp, min(top_k, lp.shape[-1]), -1)
                jsd = torch.zeros(lp.shape[0], device=lp.device)
                jsd[1:] = full_jsd(lp[1:], lp[:-1])
                chosen = lp.gather(-1, torch.as_tensor(list(completions[i]), device=lp.device)[:, None])[:, 0]
                out[i] = {"topk_ids": ids.cpu(), "topk_logprobs": values.double().cpu(), "chosen": chosen.cpu(),
                          "full_entropy": entropy(lp).cpu(), "full_jsd": jsd.cpu()}
            del logits
    return out  # type: ignore[return-value]
