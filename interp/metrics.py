"""Per-sequence score summaries: plateau/cliff metrics and curve aggregation without padding artefacts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def cliff_metrics(scores: Tensor, span: tuple[int, int], robust_k: int = 32, drop_window: int = 8) -> dict[str, float]:
    """Refusal-cliff summaries of one sequence's per-token scores (the paper's metrics).

    plateau over `span` (the thinking tokens; the whole sequence but the last token when empty):
    `plateau_max` (paper's MS uses it), `plateau_mean`, `plateau_robust` (mean of the last
    `robust_k` span tokens); `rs_final` = score at the last token; `cliff = plateau_max − rs_final`,
    `cliff_robust = plateau_robust − rs_final`; `drop_position` = offset from the end (−1 = last
    token) of the steepest one-step fall within the last `drop_window` tokens.
    """
    s = scores.float()
    start, end = span
    if end <= start:
        start, end = 0, max(1, len(s) - 1)
    plateau = s[start:end]
    final = float(s[-1])
    robust = float(plateau[-robust_k:].mean())
    tail = s[-(drop_window + 1):]
    drop = int(torch.argmin(tail[1:] - tail[:-1])) - (len(tail) - 1) if len(tail) > 1 else -1
    return {
        "plateau_max": float(plateau.max()),
        "plateau_mean": float(plateau.mean()),
        "plateau_robust": robust,
        "rs_final": final,
        "cliff": float(plateau.max()) - final,
        "cliff_robust": robust - final,
        "drop_position": drop,
    }


def interpolate_curve(scores: Tensor, n_bins: int = 100) -> np.ndarray:
    """One sequence's scores averaged over `n_bins` equal bins of normalised position.

    Token i owns the interval [i/len, (i+1)/len); bin j covers [j/n_bins, (j+1)/n_bins) and gets the
    overlap-weighted mean of the tokens' scores. A long sequence's bin is the mean of its tokens
    (no token is skipped, as sampling would); a short one repeats each token over the bins it covers.
    Bin j's centre is (j + 0.5) / n_bins.
    """
    y = scores.float().cpu().numpy().astype(np.float64)
    # integral of the step function from 0 to each token boundary, then at each bin edge
    cumulative = np.concatenate([[0.0], np.cumsum(y) / len(y)])
    at_edges = np.interp(np.linspace(0, 1, n_bins + 1), np.linspace(0, 1, len(y) + 1), cumulative)
    return np.diff(at_edges) * n_bins


def _resample_linear(y: np.ndarray, n_bins: int) -> np.ndarray:
    """Linear interpolation of `y` onto `n_bins` evenly spaced points from its first to its last value."""
    if len(y) == 1:
        return np.full(n_bins, y[0])
    return np.interp(np.linspace(0, 1, n_bins), np.linspace(0, 1, len(y)), y)


def mean_interpolated(curves: Sequence[Tensor], n_bins: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error over sequences of per-sequence bin-averaged curves (`interpolate_curve`)."""
    stack = np.stack([interpolate_curve(c, n_bins) for c in curves])
    return stack.mean(0), stack.std(0, ddof=1) / np.sqrt(len(stack)) if len(stack) > 1 else np.zeros(n_bins)


def mean_tail(curves: Sequence[Tensor], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of the last `k` raw scores, aligned at the final token (masked: shorter sequences
    contribute only where they have tokens). Index k−1 is the last token."""
    values = np.full((len(curves), k), np.nan)
    for i, c in enumerate(curves):
        tail = c.float().cpu().numpy()[-k:]
        values[i, k - len(tail):] = tail
    present = ~np.isnan(values)
    counts = present.sum(0)
    mean = np.divide(np.where(present, values, 0.0).sum(0), counts, out=np.full(k, np.nan), where=counts > 0)
    deviation = np.where(present, values - mean, 0.0)
    var = np.divide((deviation ** 2).sum(0), counts - 1, out=np.zeros(k), where=counts > 1)
    return mean, np.sqrt(var / np.maximum(counts, 1))


def reference_aggregate(curves: Sequence[Tensor], n_bins: int = 100) -> np.ndarray:
    """The RefusalCliff figure code: tail-align with zero left-padding, average, then
    resample to `n_bins` (linearly; the figure code used cubic interpolation). The zero padding drags
    early bins down; offered for comparison only."""
    width = max(len(c) for c in curves)
    padded = np.zeros((len(curves), width))
    for i, c in enumerate(curves):
        padded[i, width - len(c):] = c.float().cpu().numpy()
    return _resample_linear(padded.mean(0), n_bins)
