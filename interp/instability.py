"""Dynamic instability of next-token distributions along a reasoning trace (Chen et al. 2026,
"I May Not Have Articulated Myself Clearly", arXiv 2602.02863).

Per decoding step t, from the top-k next-token log-probabilities (API logprobs, or a local
model's log-softmax cut to its k largest entries):

- renormalised top-k distribution  p̃_t(v) = exp ℓ_t(v) / Σ_{u ∈ S_t} exp ℓ_t(u),  v ∈ S_t;
- entropy  H_t = −Σ p̃_t log p̃_t  (natural log, ≤ log k; `normalise_entropy` divides by log k_t);
- shift  D_t = JSD(p̃_t, p̃_{t−1}) on the union S_t ∪ S_{t−1} (≤ log 2), D_1 = 0. Tokens outside a
  distribution's own top-k: `union_zero` gives them probability 0 (the reconstruction's default);
  `residual_bin` keeps the raw probabilities of the tokens listed at both steps (S_t ∩ S_{t−1}) and
  lumps everything else of each distribution into one "rest" outcome: the same partition of the
  vocabulary for both, so it is a lower bound of the full-vocabulary JSD (data processing);
- combined signal  I_t = D_t + λ·H_t, optionally a trailing moving average over `smooth` steps
  (trailing, so a prefix's signal never sees later tokens).

Per trace: peak strength S = max_t I_t, peak step t* (first maximum), relative position r = t*/T
(T generated tokens, t* counted from 1); early if r ≤ 0.25, late if r > 0.5.
Across traces: ROC-AUC of S for predicting a wrong answer (Mann-Whitney, ties count ½) with a
percentile bootstrap CI over questions (several samples of one question move together), accuracy per
S quantile bucket and early vs late accuracy within S strata, with Wilson intervals. Plain torch /
numpy; no scikit-learn or scipy.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp.controls import bootstrap_ci, wilson

PAD_ID = -1      # top-k slot with no token (a step that has fewer than k entries)
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
             support: str = "union_zero") -> Float[Tensor, " step"]:
    """JSD between consecutive steps' top-k distributions; D_1 = 0.

    `logprobs` are the raw top-k log-probabilities (not renormalised). `union_zero`: renormalised
    top-k on the union of the supports, probability 0 outside a step's own top-k. `residual_bin`: raw
    probabilities of the tokens listed at both steps plus one "rest" outcome holding the remaining mass
    of each (a lower bound of the full-vocabulary JSD).
    """
    if support not in ("union_zero", "residual_bin"):
        raise ValueError(f"unknown JSD support handling {support!r}")
    logprobs = logprobs.double()
    out = torch.zeros(ids.shape[0], dtype=logprobs.dtype)
    if ids.shape[0] < 2:
        return out
    p = renormalise(logprobs).exp() if support == "union_zero" else logprobs.exp()
    p_cur, p_prev, ids_cur, ids_prev = p[1:], p[:-1], ids[1:], ids[:-1]
    q_at_cur = _on_support(ids_cur, ids_prev, p_prev)    # p_{t-1} on S_t
    p_at_prev = _on_support(ids_prev, ids_cur, p_cur)    # p_t on S_{t-1}
    if support == "union_zero":
        out[1:] = 0.5 * (_half_kl(p_cur, q_at_cur) + _half_kl(p_prev, p_at_prev))
    else:
        shared = _on_support(ids_cur, ids_prev, torch.ones_like(p_prev)) > 0    # slots of S_t also in S_{t-1}
        a, b = torch.where(shared, p_cur, 0.0), q_at_cur
        a, b = _with_rest(a), _with_rest(b)
        out[1:] = 0.5 * (_half_kl(a, b) + _half_kl(b, a))
    return out.clamp_min(0.0)


def _with_rest(p: Float[Tensor, "step k"]) -> Float[Tensor, "step k_plus_1"]:
    """`p` plus one outcome holding the mass it leaves (1 − Σ p, at least 0)."""
    return torch.cat([p, (1.0 - p.sum(-1, keepdim=True)).clamp_min(0.0)], -1)


def _half_kl(p_own: Float[Tensor, "step k"], p_other: Float[Tensor, "step k"]) -> Float[Tensor, " step"]:
    """Σ p_own·log(p_own / m), m = ½(p_own + p_other), 0·log 0 = 0: one half of the JSD."""
    m = 0.5 * (p_own + p_other)
    return torch.where(p_own > 0, p_own * (p_own.clamp_min(1e-300).log() - m.clamp_min(1e-300).log()),
                       torch.zeros_like(p_own)).sum(-1)


def cut_topk(ids: Int[Tensor, "step j"], logprobs: Float[Tensor, "step j"], k: int) -> tuple[Tensor, Tensor]:
    """The `k` largest entries per step, in descending order (fewer kept when fewer are listed)."""
    k = min(k, logprobs.shape[-1])
    values, order = torch.topk(logprobs, k, dim=-1)
    return torch.gather(ids, -1, order), values


def topk_entropy(logprobs: Float[Tensor, "step k"], normalise: bool = False) -> Float[Tensor, " step"]:
    """Entropy of the renormalised top-k; `normalise` divides by log k_t (k_t = entries at step t)."""
    h = entropy(renormalise(logprobs))
    if normalise:
        k = torch.isfinite(logprobs).sum(-1).to(h.dtype)
        h = torch.where(k > 1, h / k.clamp_min(2).log(), torch.zeros_like(h))
    return h


def trailing_mean(x: Float[Tensor, " step"], window: int) -> Float[Tensor, " step"]:
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
    full_entropy: Float[Tensor, " step"] | None = None
    full_jsd: Float[Tensor, " step"] | None = None       # D_1 = 0
    vocab_size: int | None = None
    question: str | None = None                         # the question it answers (its samples share it); None: id
    truncated: bool | None = None                       # hit the token limit without ending; None: not known

    @property
    def length(self) -> int:
        return int(self.topk_logprobs.shape[0])

    @property
    def cluster(self) -> str:
        """What the bootstrap resamples: the question, or the trace itself."""
        return self.id if self.question is None else self.question


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


def peak(signal: Float[Tensor, " step"], start: int = 0) -> Peak:
    """Peak of a trace's signal (first maximum), ignoring the first `start` steps."""
    T = signal.numel()
    if T <= start:
        raise ValueError(f"a trace of {T} steps has no step after the first {start}")
    i = start + int(torch.argmax(signal[start:]))
    return Peak(float(signal[i]), i + 1, (i + 1) / T)


def prefix_peak(signal: Float[Tensor, " step"], window: int, start: int = 0) -> float:
    """S_{≤W} = max over the first `window` steps (the whole trace when shorter)."""
    return float(signal[start:max(window, start + 1)].max())


# --------------------------------------------------------------------------- across traces

def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged."""
    order = np.argsort(x, kind="mergesort")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    return ranks


TIE_DECIMALS = 9  # scores equal to 1e-9 tie: float round-off (D_t ≈ log 2 to the last bit) must not rank traces


def _scores(scores: Sequence[float]) -> np.ndarray:
    """Scores rounded to `TIE_DECIMALS`, so values that differ only by round-off count as ties."""
    return np.round(np.asarray(scores, float), TIE_DECIMALS)


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """ROC-AUC of `scores` (higher = positive) via the Mann-Whitney U statistic, ties (to 1e-9) count ½.
    NaN when one class is absent."""
    s, y = _scores(scores), np.asarray(positive, bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    r = _ranks(s)
    return float((r[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores: Sequence[float], positive: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rate, true-positive rate) at every distinct threshold, from (0, 0) to (1, 1)."""
    s, y = _scores(scores), np.asarray(positive, bool)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.diff(s) != 0, True]       # the last index of each run of tied scores
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    tpr = np.r_[0.0, tp / max(1, y.sum())]
    fpr = np.r_[0.0, fp / max(1, (~y).sum())]
    return fpr, tpr


def label_strata(clusters: Sequence[Hashable], positive: Sequence[bool]) -> list[str]:
    """Each item's cluster kind: "positive", "negative" or "mixed" (its cluster holds both labels).
    Resampling clusters within these kinds keeps both labels in every resample; with one item per
    cluster the kinds are the labels themselves."""
    seen: dict[Hashable, set[bool]] = defaultdict(set)
    for c, y in zip(clusters, positive):
        seen[c].add(bool(y))
    kind = {c: "mixed" if len(v) == 2 else ("positive" if True in v else "negative") for c, v in seen.items()}
    return [kind[c] for c in clusters]


def auc_interval(scores: Sequence[float], positive: Sequence[bool], clusters: Sequence[Hashable] | None = None, *,
                 n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of the ROC-AUC, resampling whole clusters (the samples of one
    question; None: every item its own) within `label_strata`; NaN when one label is absent."""
    s, y = np.asarray(scores, float), np.asarray(positive, bool)
    if y.all() or not y.any():
        return math.nan, math.nan
    clusters = list(range(len(s))) if clusters is None else list(clusters)
    return bootstrap_ci(lambda idx: roc_auc(s[idx], y[idx]), len(s), n_boot=n_boot, seed=seed, clusters=clusters,
                        strata=label_strata(clusters, y))


def length_strata(lengths: Sequence[int], n_strata: int) -> tuple[np.ndarray, np.ndarray]:
    """(stratum index per trace, the distinct quantile edges) of trace lengths in `n_strata` quantile bins
    (tied lengths share a bin, so there can be fewer)."""
    x = np.asarray(lengths, float)
    edges = quantile_edges(x, n_strata) if len(x) else np.zeros(1)
    if len(edges) == 1:
        edges = np.array([edges[0], edges[0]])
    return bucket_of(x, edges), edges


def stratified_auc(scores: Sequence[float], positive: Sequence[bool], strata: Sequence[Hashable]) -> float:
    """ROC-AUC pooled within strata: the share of (positive, negative) pairs *of the same stratum* in which the
    positive scores higher (ties ½), i.e. Σ_s U_s / Σ_s n⁺_s·n⁻_s. Comparing only traces of similar length takes
    out what length alone predicts. NaN when no stratum holds both labels."""
    s, y, g = _scores(scores), np.asarray(positive, bool), np.asarray(strata)
    u = pairs = 0.0
    for key in np.unique(g):
        sel = g == key
        n_pos, n_neg = int(y[sel].sum()), int((~y[sel]).sum())
        if n_pos and n_neg:
            r = _ranks(s[sel])
            u += r[y[sel]].sum() - n_pos * (n_pos + 1) / 2
            pairs += n_pos * n_neg
    return float(u / pairs) if pairs else float("nan")


def stratified_auc_interval(scores: Sequence[float], positive: Sequence[bool], strata: Sequence[Hashable],
                            clusters: Sequence[Hashable] | None = None, *, n_boot: int = 2000,
                            seed: int = 0) -> tuple[float, float]:
    """95 % percentile bootstrap interval of `stratified_auc` (whole clusters resampled within `label_strata`,
    each trace keeping its stratum); NaN when one label is absent."""
    s, y, g = np.asarray(scores, float), np.asarray(positive, bool), np.asarray(strata)
    if y.all() or not y.any():
        return math.nan, math.nan
    clusters = list(range(len(s))) if clusters is None else list(clusters)
    return bootstrap_ci(lambda idx: stratified_auc(s[idx], y[idx], g[idx]), len(s), n_boot=n_boot, seed=seed,
                        clusters=clusters, strata=label_strata(clusters, y))


def rate(correct: np.ndarray) -> dict:
    """`accuracy` and its Wilson `accuracy_ci` of a boolean array (None for an empty one)."""
    if correct.size == 0:
        return {"accuracy": None, "accuracy_ci": None}
    return {"accuracy": float(correct.mean()), "accuracy_ci": list(wilson(int(correct.sum()), correct.size))}


def quantile_edges(scores: Sequence[float], n_buckets: int) -> np.ndarray:
    """Distinct quantile edges of `scores` (min to max) for `n_buckets` buckets."""
    return np.unique(np.quantile(np.asarray(scores, float), np.linspace(0, 1, n_buckets + 1)))


def bucket_of(scores: Sequence[float], edges: np.ndarray) -> np.ndarray:
    """Bucket index per score: bucket b holds (edges[b], edges[b+1]], the first also its low edge."""
    inner = edges[1:-1]
    return np.searchsorted(inner, np.asarray(scores, float), side="left")


def accuracy_buckets(scores: Sequence[float], correct: Sequence[bool], n_buckets: int = 5) -> list[dict]:
    """Accuracy per quantile bucket of `scores`: rows {low, high, accuracy, accuracy_ci, n} (empty buckets dropped;
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
            rows.append({"low": float(edges[k]), "high": float(edges[k + 1]), **rate(c[sel]), "n": int(sel.sum())})
    return rows


def early_late(scores: Sequence[float], positions: Sequence[float], correct: Sequence[bool],
               n_strata: int = 3) -> tuple[dict, list[dict]]:
    """Accuracy of early-peak (r ≤ 0.25) vs late-peak (r > 0.5) traces at comparable peak strength.

    Traces are stratified by quantiles of S; strata holding both early and late traces are kept and
    each group's accuracy is averaged over them weighted by the stratum's early + late count (direct
    standardisation). Returns ({early_accuracy, late_accuracy, n_early, n_late, early_accuracy_ci,
    late_accuracy_ci}, per-stratum rows with the raw counts and Wilson intervals of every stratum).
    The summary's interval is Wilson's at the standardised rate with the group's count.
    """
    s, r, c = np.asarray(scores, float), np.asarray(positions, float), np.asarray(correct, bool)
    early, late = r <= EARLY_MAX, r > LATE_MIN
    edges = quantile_edges(s, n_strata) if len(s) else np.zeros(1)
    if len(edges) == 1:
        edges = np.array([edges[0], edges[0]])
    b = bucket_of(s, edges)
    rows, kept = [], []
    for k in range(len(edges) - 1):
        e, la = c[(b == k) & early], c[(b == k) & late]
        (acc_e, ci_e), (acc_l, ci_l) = rate(e).values(), rate(la).values()
        rows.append({"low": float(edges[k]), "high": float(edges[k + 1]), "n_early": e.size, "n_late": la.size,
                     "early_accuracy": acc_e, "late_accuracy": acc_l, "early_accuracy_ci": ci_e,
                     "late_accuracy_ci": ci_l})
        if e.size and la.size:
            kept.append(rows[-1])
    if not kept:
        return {"early_accuracy": None, "late_accuracy": None, "n_early": 0, "n_late": 0,
                "early_accuracy_ci": None, "late_accuracy_ci": None}, rows
    w = np.asarray([x["n_early"] + x["n_late"] for x in kept], float)
    summary = {}
    for group in ("early", "late"):
        acc = float(np.dot(w / w.sum(), [x[f"{group}_accuracy"] for x in kept]))
        n = sum(x[f"n_{group}"] for x in kept)
        summary |= {f"{group}_accuracy": acc, f"n_{group}": n, f"{group}_accuracy_ci": list(wilson(acc * n, n))}
    return {k: summary[k] for k in ("early_accuracy", "late_accuracy", "n_early", "n_late", "early_accuracy_ci",
                                    "late_accuracy_ci")}, rows


# --------------------------------------------------------------------------- a local model's distributions

def distribution_stats(logits_of, n_pos: int, targets: Sequence[int] | Tensor, *, top_k: int = 20,
                       chunk: int | None = None) -> dict[str, Tensor]:
    """Next-token statistics of `n_pos` positions, computed `chunk` positions at a time (None: all at once).

    `logits_of(start, stop)` returns the logits `[stop − start, vocab]` of those positions. Per chunk: log-softmax
    in float32, its `top_k` largest entries, the full-vocabulary entropy, the log-probability of `targets` (the
    generated tokens) and the JSD between consecutive positions; the last row of each chunk's distribution is
    carried to the next chunk for the JSD across the boundary, so the result does not depend on `chunk` (D_1 = 0).
    Memory: a few `[chunk, vocab]` float32 tensors at a time. Returns topk_ids, topk_logprobs (float64), chosen,
    full_entropy, full_jsd, on the CPU."""
    from interp.logits import position_chunks

    targets = torch.as_tensor(targets, dtype=torch.long)
    parts: dict[str, list[Tensor]] = defaultdict(list)
    prev = None
    for start, stop in position_chunks(n_pos, chunk or max(1, n_pos)):
        lp = torch.log_softmax(logits_of(start, stop).float(), -1)
        values, ids = torch.topk(lp, min(top_k, lp.shape[-1]), -1)
        jsd = torch.zeros(lp.shape[0], device=lp.device)
        if lp.shape[0] > 1:
            jsd[1:] = full_jsd(lp[1:], lp[:-1])
        if prev is not None:
            jsd[0] = full_jsd(lp[:1], prev)[0]
        chosen = lp.gather(-1, targets[start:stop].to(lp.device)[:, None])[:, 0]
        for key, value in (("topk_ids", ids), ("topk_logprobs", values.double()), ("chosen", chosen),
                           ("full_entropy", entropy(lp)), ("full_jsd", jsd)):
            parts[key].append(value.cpu())
        prev = lp[-1:].clone()
        del lp
    return {k: torch.cat(v) for k, v in parts.items()}


@torch.no_grad()
def teacher_forced(model, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], *,
                   top_k: int = 20, batch_size: int = 8, progress: bool = True,
                   chunk: int | None = None) -> list[dict[str, Tensor]]:
    """One teacher-forced forward over prompt + completion per trace: the T next-token distributions
    `logits[P−1 : P+T−1]` (temperature 1, whatever the sampling temperature was).

    Per trace, on the CPU: `topk_ids`, `topk_logprobs` [T, k] (log-softmax over the full vocabulary,
    then its k largest), `chosen` [T] (log-prob of the generated token), `full_entropy` [T] and `full_jsd` [T]
    (consecutive steps, D_1 = 0). The forward stops after the last block (`interp.logits.final_residual`); the
    final norm and the unembedding then run on `chunk` positions of one trace at a time (`distribution_stats`,
    default `interp.logits.LOGIT_CHUNK`), so no [T, vocab] tensor exists for a whole trace or batch: memory is the
    batch's residual stream plus a few [chunk, vocab] float32 tensors. Under torchrun each rank runs its shard of
    the traces (whole batches) and every rank gets all traces' statistics, in order (`interp.distributed`).
    """
    from interp import distributed
    from interp.batching import run_batches

    if distributed.sharding():
        return distributed.map_items(
            lambda idx: teacher_forced(model, [prompts[i] for i in idx], [completions[i] for i in idx], top_k=top_k,
                                       batch_size=batch_size, progress=progress, chunk=chunk),
            len(prompts), lengths=[len(p) + len(c) for p, c in zip(prompts, completions)], batch_size=batch_size)
    from interp.bridge import sdpa_attention
    from interp.logits import LOGIT_CHUNK, final_residual, logits_at

    chunk = chunk or LOGIT_CHUNK
    seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
    if any(len(c) == 0 for c in completions):
        raise ValueError("every completion needs at least one token")
    out: list[dict[str, Tensor] | None] = [None] * len(seqs)

    def step(idx: list[int], tokens: Tensor, mask: Tensor) -> None:  # per-trace results: safe to repeat
        resid = final_residual(model, tokens, mask)
        width = tokens.shape[1]
        for row, i in enumerate(idx):
            start = width - len(seqs[i]) + len(prompts[i]) - 1
            states = resid[row, start:start + len(completions[i])]
            out[i] = distribution_stats(lambda a, b: logits_at(model, states[a:b]), len(completions[i]),
                                        completions[i], top_k=top_k, chunk=chunk)

    with sdpa_attention(model):  # out of memory: the batch is halved (interp.batching.run_batches)
        run_batches(model, seqs, batch_size, step, desc="teacher-forced", progress=progress)
    return out  # type: ignore[return-value]
