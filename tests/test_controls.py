"""interp.controls: splits, matched random draws, mean ± sd, Wilson intervals, the bootstrap."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from interp.controls import (
    ControlUnavailable,
    bootstrap_ci,
    control_row,
    matched_draws,
    mean_sd,
    n_selected,
    quantile_bins,
    split,
    wilson,
)


def test_one_rounding_rule_and_both_sides_non_empty():
    assert n_selected(10, 0.5) == 5
    assert n_selected(5, 0.5) == 3  # half up, not banker's rounding (round(2.5) == 2)
    assert n_selected(7, 0.25) == 2
    assert n_selected(2, 0.01) == 1 and n_selected(2, 0.99) == 1
    with pytest.raises(ValueError):
        n_selected(1, 0.5)


def test_split_is_seeded_disjoint_and_covers_everything():
    a = split(20, 0.5, seed=3)
    assert a == split(20, 0.5, seed=3)
    assert a != split(20, 0.5, seed=4)
    assert sorted(a.selection + a.held_out) == list(range(20))
    assert not set(a.selection) & set(a.held_out)
    assert len(a.selection) == 10


def test_split_keeps_groups_together_and_balances_strata():
    groups = [i // 3 for i in range(30)]  # ten prompts, three rollouts each
    strata = ["harmful" if g < 6 else "harmless" for g in groups]
    s = split(30, 0.5, seed=1, groups=groups, strata=strata)
    sel_groups = {groups[i] for i in s.selection}
    held_groups = {groups[i] for i in s.held_out}
    assert not sel_groups & held_groups
    assert sum(g < 6 for g in sel_groups) == 3 and sum(g >= 6 for g in sel_groups) == 2
    with pytest.raises(ValueError, match="spans two strata"):
        split(4, 0.5, groups=[0, 0, 1, 1], strata=["a", "b", "a", "a"])


def test_split_does_not_depend_on_item_order_of_groups():
    groups = ["x", "y", "z", "w", "v", "u"]
    a = split(6, 0.5, seed=0, groups=groups)
    b = split(6, 0.5, seed=0, groups=list(reversed(groups)))
    assert {groups[i] for i in a.selection} == {list(reversed(groups))[i] for i in b.selection}


def test_matched_draws_match_every_stratum_and_avoid_the_selection():
    heads = [(layer, h) for layer in range(4) for h in range(8)]
    selection = [(3, 0), (3, 1), (3, 2), (1, 5)]
    draws = matched_draws(selection, heads, stratum=lambda x: x[0], draws=6, seed=0, matched_on="layer")
    assert len(draws) == 6 and draws.matched_on == "layer" and draws.strata == {"1": 1, "3": 3}
    for d in draws:
        assert not set(d) & set(selection)
        assert sorted(x[0] for x in d) == [1, 3, 3, 3]
    again = matched_draws(selection, list(reversed(heads)), stratum=lambda x: x[0], draws=6, seed=0, matched_on="layer")
    assert again.sets == draws.sets  # canonical pool order
    assert matched_draws(selection, heads, draws=3).strata == {"all": 4}


def test_matched_draws_say_when_a_stratum_is_too_small():
    pool = [(0, h) for h in range(4)] + [(1, h) for h in range(4)]
    with pytest.raises(ControlUnavailable, match="layer"):
        matched_draws([(1, 0), (1, 1), (1, 2)], pool, stratum=lambda x: x[0], matched_on="layer")


def test_a_layer_matched_control_removes_a_layer_confound():
    """The effect lives in the last layer, not in the selected neurons: the unmatched control makes the selection
    look special; the layer-matched one does not."""
    neurons = [(layer, i) for layer in range(4) for i in range(50)]
    effect = {n: (1.0 if n[0] == 3 else 0.0) + random.Random(str(n)).gauss(0, 0.05) for n in neurons}
    selection = [(3, i) for i in range(10)]
    sel_effect = np.mean([effect[n] for n in selection])
    unmatched = matched_draws(selection, neurons, draws=20, seed=0)
    matched = matched_draws(selection, neurons, stratum=lambda n: n[0], draws=20, seed=0, matched_on="layer")
    unmatched_mean, _ = mean_sd([np.mean([effect[n] for n in d]) for d in unmatched])
    matched_mean, matched_sd = mean_sd([np.mean([effect[n] for n in d]) for d in matched])
    assert sel_effect / unmatched_mean > 2.5
    assert abs(sel_effect - matched_mean) < 3 * matched_sd + 0.05


def test_quantile_bins_split_values_evenly():
    labels = quantile_bins(list(range(100)), 4)
    assert [labels.count(f"q{i}") for i in range(1, 5)] == [25, 25, 25, 25]
    assert labels[0] == "q1" and labels[-1] == "q4"


def test_mean_sd_is_nan_for_one_draw():
    assert mean_sd([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    m, s = mean_sd([2.0])
    assert m == 2.0 and math.isnan(s)
    assert all(math.isnan(v) for v in mean_sd([]))


def test_control_row_carries_matching():
    draws = matched_draws([(0, 1)], [(0, h) for h in range(4)], stratum=lambda x: x[0], draws=2, matched_on="layer")
    row = control_row({"asr": [0.5, 0.7]}, draws)
    assert row["asr"] == pytest.approx(0.6) and row["asr_draws"] == [0.5, 0.7]
    assert row["n_draws"] == 2 and row["matched_on"] == "layer" and row["strata"] == {"0": 1}


def test_wilson_matches_the_textbook_value():
    lo, hi = wilson(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)  # the textbook value for 8 / 10
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    assert all(math.isnan(v) for v in wilson(0, 0))


def test_bootstrap_matches_the_normal_approximation_and_resamples_clusters():
    x = np.random.default_rng(0).normal(size=400)
    lo, hi = bootstrap_ci(lambda idx: float(x[idx].mean()), len(x), n_boot=2000, seed=1)
    se = x.std(ddof=1) / math.sqrt(len(x))
    assert abs((hi - lo) - 2 * 1.96 * se) < 0.25 * 2 * 1.96 * se
    # 20 questions, 10 identical samples each: clusters must widen the interval by about sqrt(10)
    q = np.repeat(np.random.default_rng(1).normal(size=20), 10)
    clusters = np.repeat(np.arange(20), 10)
    naive = bootstrap_ci(lambda idx: float(q[idx].mean()), len(q), n_boot=1000, seed=0)
    clustered = bootstrap_ci(lambda idx: float(q[idx].mean()), len(q), n_boot=1000, seed=0, clusters=clusters)
    ratio = (clustered[1] - clustered[0]) / (naive[1] - naive[0])
    assert 2.0 < ratio < 4.5


def test_bootstrap_within_strata_keeps_both_labels():
    labels = np.array([1] * 3 + [0] * 50)
    seen = []
    bootstrap_ci(lambda idx: seen.append(labels[idx].sum()) or 0.0, len(labels), n_boot=200, strata=labels)
    assert set(seen) == {3}
