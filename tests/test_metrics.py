"""interp.metrics against values computed by hand (and numpy, independently of the module)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from interp.metrics import cliff_metrics, interpolate_curve, mean_interpolated, mean_tail, reference_aggregate

# --- cliff_metrics --------------------------------------------------------------------------

def test_cliff_metrics_hand_computed():
    s = torch.tensor([0.1, 0.5, 0.9, 0.7, 0.8, 0.2])
    m = cliff_metrics(s, (1, 5), robust_k=2, drop_window=8)
    # plateau = s[1:5] = [0.5, 0.9, 0.7, 0.8]; robust = mean(0.7, 0.8); final = 0.2
    assert m["plateau_max"] == pytest.approx(0.9)
    assert m["plateau_mean"] == pytest.approx(0.725)
    assert m["plateau_robust"] == pytest.approx(0.75)
    assert m["rs_final"] == pytest.approx(0.2)
    assert m["cliff"] == pytest.approx(0.7)
    assert m["cliff_robust"] == pytest.approx(0.55)
    # steps: +0.4, +0.4, -0.2, +0.1, -0.6 -> steepest fall is onto the last token
    assert m["drop_position"] == -1
    assert set(m) == {"plateau_max", "plateau_mean", "plateau_robust", "rs_final", "cliff", "cliff_robust",
                      "drop_position"}
    assert all(isinstance(v, float) for k, v in m.items() if k != "drop_position")
    assert isinstance(m["drop_position"], int)


def test_cliff_metrics_robust_k_longer_than_span_uses_whole_span():
    s = torch.tensor([0.0, 0.2, 0.4, 0.9, 0.1])
    m = cliff_metrics(s, (1, 4), robust_k=32)
    assert m["plateau_robust"] == pytest.approx((0.2 + 0.4 + 0.9) / 3)
    assert m["plateau_robust"] == pytest.approx(m["plateau_mean"])


@pytest.mark.parametrize("span", [(3, 3), (4, 2), (0, 0)], ids=["empty", "reversed", "zero"])
def test_cliff_metrics_empty_span_falls_back_to_all_but_last(span):
    s = torch.tensor([0.3, 0.6, 0.95, 0.4, 0.05])
    m = cliff_metrics(s, span, robust_k=2)
    # plateau = s[0:4]
    assert m["plateau_max"] == pytest.approx(0.95)
    assert m["plateau_mean"] == pytest.approx((0.3 + 0.6 + 0.95 + 0.4) / 4)
    assert m["plateau_robust"] == pytest.approx((0.95 + 0.4) / 2)
    assert m["rs_final"] == pytest.approx(0.05)
    assert m["cliff"] == pytest.approx(0.9)


def test_cliff_metrics_single_token():
    m = cliff_metrics(torch.tensor([0.7]), (0, 0))
    assert m["plateau_max"] == pytest.approx(0.7) and m["rs_final"] == pytest.approx(0.7)
    assert m["cliff"] == pytest.approx(0.0)
    assert m["drop_position"] == -1


@pytest.mark.parametrize("after", [1, 2, 3, 5, 8])
def test_drop_position_on_step_function(after):
    """1.0 for 12 tokens, then `after` tokens of 0.0: the fall lands on offset −after from the end."""
    s = torch.cat([torch.ones(12), torch.zeros(after)])
    m = cliff_metrics(s, (0, 12), drop_window=8)
    assert m["drop_position"] == -after
    # the step position matches the definition: s[len + drop] - s[len + drop - 1] is the steepest fall
    i = len(s) + m["drop_position"]
    assert float(s[i] - s[i - 1]) == -1.0


def test_drop_position_only_looks_inside_window():
    # a big fall 6 tokens from the end and a small one onto the last token
    s = torch.tensor([1.0] * 10 + [0.2] * 5 + [0.1])
    assert cliff_metrics(s, (0, 10), drop_window=8)["drop_position"] == -6
    assert cliff_metrics(s, (0, 10), drop_window=3)["drop_position"] == -1


def test_cliff_metrics_accepts_bfloat16():
    s = torch.tensor([0.25, 0.75, 0.5], dtype=torch.bfloat16)
    m = cliff_metrics(s, (0, 2))
    assert m["cliff"] == pytest.approx(0.25)


# --- mean_interpolated ----------------------------------------------------------------------

def _by_hand_bins(y: list[float], n_bins: int) -> np.ndarray:
    """Token i owns [i/L, (i+1)/L); bin j = [j/n, (j+1)/n) gets the overlap-weighted mean, written out."""
    L = len(y)
    out = np.zeros(n_bins)
    for j in range(n_bins):
        lo, hi = j / n_bins, (j + 1) / n_bins
        for i, v in enumerate(y):
            overlap = max(0.0, min(hi, (i + 1) / L) - max(lo, i / L))
            out[j] += v * overlap * n_bins
    return out


CURVES = [[0.0, 1.0, 0.5], [0.2, 0.4, 0.8, 1.0, 0.0], [0.6], [1.0, 0.0]]


def test_interpolate_curve_matches_hand_binning():
    for c in CURVES:
        np.testing.assert_allclose(interpolate_curve(torch.tensor(c), 7), _by_hand_bins(c, 7), atol=1e-7)
    # a long sequence: each bin is the plain mean of its tokens; a short one repeats its tokens
    y = torch.arange(8.0)
    np.testing.assert_allclose(interpolate_curve(y, 4), [0.5, 2.5, 4.5, 6.5], atol=1e-6)
    np.testing.assert_allclose(interpolate_curve(torch.tensor([1.0, 3.0, 5.0]), 6), [1, 1, 3, 3, 5, 5], atol=1e-6)


def test_interpolate_curve_averages_instead_of_sampling():
    """A one-token spike in a long sequence lands in its bin with weight 1/tokens-per-bin and the curve
    keeps the sequence's mean; sampling 100 points of 1000 would miss it."""
    y = torch.zeros(1000)
    y[505] = 1.0
    curve = interpolate_curve(y, 100)
    assert curve[50] == pytest.approx(0.1) and np.count_nonzero(curve) == 1
    assert curve.mean() == pytest.approx(float(y.mean()))


def test_mean_interpolated_matches_numpy_by_hand():
    n_bins = 7
    stack = np.stack([_by_hand_bins(c, n_bins) for c in CURVES])
    want_mean = stack.mean(0)
    dev = stack - want_mean
    want_se = np.sqrt((dev ** 2).sum(0) / (len(CURVES) - 1)) / np.sqrt(len(CURVES))  # ddof=1
    mean, se = mean_interpolated([torch.tensor(c) for c in CURVES], n_bins)
    assert mean.shape == se.shape == (n_bins,)
    np.testing.assert_allclose(mean, want_mean, atol=1e-6)
    np.testing.assert_allclose(se, want_se, atol=1e-6)
    # bin 3 = [3/7, 4/7) by hand: inside the middle token of the first three curves; half 1.0, half 0.0 in the last
    assert mean[3] == pytest.approx((1.0 + 0.8 + 0.6 + (0.5 * 1.0 + 0.5 * 0.0)) / 4, abs=1e-6)


def test_mean_interpolated_single_curve_has_zero_error():
    mean, se = mean_interpolated([torch.tensor([0.0, 1.0])], 4)
    np.testing.assert_allclose(mean, [0.0, 0.0, 1.0, 1.0], atol=1e-7)
    np.testing.assert_array_equal(se, np.zeros(4))


# --- mean_tail ------------------------------------------------------------------------------

def test_mean_tail_masks_short_sequences():
    curves = [torch.tensor([5.0, 6.0]), torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([9.0, 0.0, 2.0, 4.0, 8.0])]
    k = 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, se = mean_tail(curves, k)
    # columns aligned at the final token (index k-1):
    #   idx0: [-, 1, 0]   idx1: [-, 2, 2]   idx2: [5, 3, 4]   idx3: [6, 4, 8]
    cols = [[1.0, 0.0], [2.0, 2.0], [5.0, 3.0, 4.0], [6.0, 4.0, 8.0]]
    np.testing.assert_allclose(mean, [np.mean(c) for c in cols], atol=1e-7)
    want_se = [np.std(c, ddof=1) / np.sqrt(len(c)) for c in cols]
    np.testing.assert_allclose(se, want_se, atol=1e-7)
    assert mean[-1] == pytest.approx(6.0)  # index k-1 is the last token of each sequence


def test_mean_tail_single_contributor_has_zero_error():
    curves = [torch.tensor([1.0]), torch.tensor([3.0, 7.0])]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, se = mean_tail(curves, 3)
    # idx0: nobody; idx1: [3]; idx2: [1, 7]
    assert np.isnan(mean[0])
    assert mean[1] == pytest.approx(3.0) and mean[2] == pytest.approx(4.0)
    assert se[0] == 0.0 and se[1] == 0.0
    assert se[2] == pytest.approx(np.std([1.0, 7.0], ddof=1) / np.sqrt(2))


def test_mean_tail_one_sequence():
    mean, se = mean_tail([torch.tensor([1.0, 2.0, 3.0])], 2)
    np.testing.assert_allclose(mean, [2.0, 3.0])
    np.testing.assert_array_equal(se, np.zeros(2))


# --- reference_aggregate --------------------------------------------------------------------

def test_reference_aggregate_reproduces_zero_padding_artefact():
    curves = [torch.ones(4), torch.ones(10)]
    n_bins = 10
    ref = reference_aggregate(curves, n_bins)
    interp_mean, _ = mean_interpolated(curves, n_bins)
    np.testing.assert_allclose(interp_mean, np.ones(n_bins))  # no artefact when interpolating
    # by hand: tail-aligned, zero left-padded mean = [0.5]*6 + [1]*4, resampled onto 10 bins (identity)
    np.testing.assert_allclose(ref, [0.5] * 6 + [1.0] * 4, atol=1e-7)
    assert (ref[:6] < interp_mean[:6]).all()
    assert ref[-1] == pytest.approx(1.0)


def test_reference_aggregate_resamples_padded_mean():
    curves = [torch.tensor([2.0, 4.0]), torch.tensor([1.0, 1.0, 1.0])]
    # padded: [0, 2, 4] and [1, 1, 1] -> mean [0.5, 1.5, 2.5]; 5 bins at t = 0, .25, .5, .75, 1
    np.testing.assert_allclose(reference_aggregate(curves, 5), [0.5, 1.0, 1.5, 2.0, 2.5], atol=1e-7)
    # equal lengths: no padding, the plain mean [1, 1, 1.5] resampled linearly at t = 0, 1/8, ..., 1
    same = [torch.tensor([0.0, 1.0, 3.0]), torch.tensor([2.0, 1.0, 0.0])]
    np.testing.assert_allclose(reference_aggregate(same, 9), [1, 1, 1, 1, 1, 1.125, 1.25, 1.375, 1.5], atol=1e-7)
