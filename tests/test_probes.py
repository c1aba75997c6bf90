import numpy as np
import pytest
import torch

from interp.errors import UserError
from interp.probes import LogisticProbe, diff_of_means, fit_logistic_probe, train_logistic_probe


def planted(n_pos=200, n_neg=200, d=32, margin=3.0, seed=0):
    """Gaussian blobs separated along a known unit direction."""
    g = torch.Generator().manual_seed(seed)
    direction = torch.randn(d, generator=g)
    direction /= direction.norm()
    y = torch.cat([torch.ones(n_pos, dtype=torch.long), torch.zeros(n_neg, dtype=torch.long)])
    X = torch.randn(n_pos + n_neg, d, generator=g) + margin * (2 * y[:, None].float() - 1) * direction
    return X, y, direction


def test_planted_direction_recovered():
    X, y, direction = planted(n_pos=400, n_neg=400, margin=2.5)
    probe = train_logistic_probe(X, y, epochs=10, lr=5e-2, batch_size=16)
    assert probe.val_accuracy >= 0.95
    assert probe.train_accuracy >= 0.95
    assert torch.cosine_similarity(probe.weight, direction, dim=0) > 0.9
    assert torch.allclose(probe.direction.norm(), torch.tensor(1.0))
    assert (probe.n_train, probe.n_val) == (640, 160)
    assert not probe.val_is_train


def test_defaults_match_reference_split():
    X, y, _ = planted(n_pos=250, n_neg=150)
    probe = train_logistic_probe(X, y)
    assert len(probe.epoch_val_accuracy) == 5
    # balanced to 150 + 150, then int(300 * 0.2) = 60 held out
    assert (probe.n_train, probe.n_val) == (240, 60)
    assert set(probe.train_idx.tolist()).isdisjoint(probe.val_idx.tolist())


def test_deterministic_and_global_rng_untouched():
    X, y, _ = planted()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = train_logistic_probe(X, y, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    b = train_logistic_probe(X, y, seed=7)
    c = train_logistic_probe(X, y, seed=8)
    assert torch.equal(a.weight, b.weight) and a.bias == b.bias
    assert torch.equal(a.val_idx, b.val_idx)
    assert not torch.equal(a.weight, c.weight)


def test_best_checkpoint_selected():
    # Noisy, overlapping classes and a large lr so val accuracy moves between epochs.
    X, y, _ = planted(n_pos=120, n_neg=120, d=16, margin=0.4, seed=3)
    probe = train_logistic_probe(X, y, epochs=12, lr=0.3, batch_size=8)
    assert probe.val_accuracy == max(probe.epoch_val_accuracy)
    assert probe.best_epoch == probe.epoch_val_accuracy.index(probe.val_accuracy) + 1
    assert probe.best_epoch < 12  # the last epoch is worse, so selection matters here
    # The returned weights reproduce the reported accuracies on the exposed splits.
    for idx, acc in [(probe.val_idx, probe.val_accuracy), (probe.train_idx, probe.train_accuracy)]:
        preds = torch.sigmoid(X[idx] @ probe.weight + probe.bias) >= 0.5
        assert (preds == y[idx].bool()).float().mean().item() == pytest.approx(acc)


def test_ties_keep_earliest_epoch_in_reference_mode():
    X, y, _ = planted(margin=6.0)
    probe = train_logistic_probe(X, y, lr=0.1, batch_size=16, tie_break="earliest")
    assert probe.epoch_val_accuracy.count(1.0) > 1
    assert probe.best_epoch == probe.epoch_val_accuracy.index(1.0) + 1


def test_ties_go_to_the_lowest_validation_loss_by_default():
    X, y, _ = planted(margin=6.0)
    probe = train_logistic_probe(X, y, lr=0.1, batch_size=16)
    best = max(probe.epoch_val_accuracy)
    tied = [e for e, a in enumerate(probe.epoch_val_accuracy) if a == best]
    assert len(tied) > 1
    assert probe.best_epoch == min(tied, key=lambda e: probe.epoch_val_loss[e]) + 1
    # and the returned weights are that epoch's: recompute the val loss independently
    Xv, yv = X[probe.val_idx], y[probe.val_idx].float()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(Xv @ probe.weight + probe.bias, yv)
    assert loss.item() == pytest.approx(probe.epoch_val_loss[probe.best_epoch - 1], rel=1e-5)


def test_balance_subsamples_to_smaller_class():
    X, y, _ = planted(n_pos=30, n_neg=90)
    probe = train_logistic_probe(X, y, epochs=1)
    used = torch.cat([probe.train_idx, probe.val_idx])
    assert len(used) == 60 and len(set(used.tolist())) == 60
    assert int(y[used].sum()) == 30
    unbalanced = train_logistic_probe(X, y, epochs=1, balance=False)
    assert unbalanced.n_train + unbalanced.n_val == 120


def test_bool_labels_and_tiny_data_uses_train_as_val():
    X, y, _ = planted(n_pos=2, n_neg=2, d=4)
    probe = train_logistic_probe(X, y.bool(), epochs=2)
    assert probe.val_is_train
    assert torch.equal(probe.val_idx, probe.train_idx)
    assert probe.n_val == probe.n_train == 4


@pytest.mark.parametrize(
    "labels", [[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 1, 1]], ids=["all-pos", "all-neg", "one-pos", "one-neg"]
)
def test_too_few_per_class_raises(labels):
    X = torch.randn(4, 3)
    with pytest.raises(UserError, match="need at least 2 examples of each class"):
        train_logistic_probe(X, torch.tensor(labels))


def test_bad_labels_raise():
    with pytest.raises(UserError, match="0/1"):
        train_logistic_probe(torch.randn(4, 3), torch.tensor([0, 1, 2, 1]))


def test_scores_match_independent_computation():
    X, y, _ = planted(d=8)
    probe = train_logistic_probe(X, y, epochs=2)
    acts = torch.randn(3, 5, 8, dtype=torch.float64)
    expected = torch.sigmoid(acts.float() @ probe.weight + probe.bias)
    assert probe.scores(acts).shape == (3, 5)
    assert probe.scores(acts).dtype == torch.float32
    torch.testing.assert_close(probe.scores(acts), expected)
    torch.testing.assert_close(probe.logits(acts[0, 0]), acts[0, 0].float() @ probe.weight + probe.bias)
    with pytest.raises(UserError, match="d_model"):
        probe.scores(torch.randn(2, 7))


def test_probe_is_plain_container():
    probe = LogisticProbe(
        weight=torch.tensor([3.0, 4.0]), bias=-1.0, train_accuracy=1.0, val_accuracy=1.0, n_train=2, n_val=2,
        val_is_train=True, train_idx=torch.arange(2), val_idx=torch.arange(2), epoch_val_accuracy=[1.0],
        epoch_val_loss=[0.1], best_epoch=1,
    )
    torch.testing.assert_close(probe.direction, torch.tensor([0.6, 0.8]))
    torch.testing.assert_close(probe.logits(torch.tensor([[1.0, 1.0]], dtype=torch.bfloat16)), torch.tensor([6.0]))


def test_diff_of_means_against_numpy():
    g = torch.Generator().manual_seed(0)
    pos = (torch.randn(17, 3, 6, generator=g) * 100 + 1e4).to(torch.bfloat16)
    neg = (torch.randn(11, 3, 6, generator=g) * 100 + 1e4).to(torch.bfloat16)
    got = diff_of_means(pos, neg)
    want = pos.float().numpy().astype(np.float64).mean(0) - neg.float().numpy().astype(np.float64).mean(0)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 6)
    torch.testing.assert_close(got, torch.from_numpy(want).to(torch.bfloat16))
    with pytest.raises(UserError):
        diff_of_means(pos[:0], neg)


# --- groups: whole examples on one side of the split ----------------------------------------

def _grouped_data(seed=0, d=8):
    """10 one-row positive groups and 4 six-row negative groups, rows interleaved, odd group ids."""
    g = torch.Generator().manual_seed(seed)
    pos_ids = [100 + 3 * i for i in range(10)]       # 10 groups x 1 row
    neg_ids = [7, 55, 2, 1000]                        # 4 groups x 6 rows
    groups = torch.tensor(pos_ids + [gid for gid in neg_ids for _ in range(6)])
    labels = torch.tensor([1] * 10 + [0] * 24)
    perm = torch.randperm(len(groups), generator=g)   # rows of a group are not adjacent
    groups, labels = groups[perm], labels[perm]
    X = torch.randn(len(groups), d, generator=g) + 2.0 * (2 * labels[:, None].float() - 1)
    return X, labels, groups


def _groups_of(idx, groups):
    return set(groups[idx].tolist())


def test_groups_never_straddle_the_split():
    X, y, groups = _grouped_data()
    for seed in range(5):
        probe = train_logistic_probe(X, y, groups=groups, epochs=1, seed=seed, val_fraction=0.25)
        train_g, val_g = _groups_of(probe.train_idx, groups), _groups_of(probe.val_idx, groups)
        assert train_g.isdisjoint(val_g)
        for gid in train_g | val_g:  # every used group is present with all its rows, on one side
            rows = set(torch.nonzero(groups == gid).flatten().tolist())
            side = set(probe.train_idx.tolist()) if gid in train_g else set(probe.val_idx.tolist())
            assert rows <= side
        assert len(set(probe.train_idx.tolist())) == len(probe.train_idx)
        assert set(probe.train_idx.tolist()).isdisjoint(probe.val_idx.tolist())
        # int(8 groups * 0.25) = 2 groups held out
        assert len(val_g) == 2 and len(train_g) == 6
        assert (probe.n_train, probe.n_val) == (len(probe.train_idx), len(probe.val_idx))


def test_groups_balance_counts_groups_not_rows():
    X, y, groups = _grouped_data()
    probe = train_logistic_probe(X, y, groups=groups, epochs=1, val_fraction=0.25)
    used = torch.cat([probe.train_idx, probe.val_idx])
    pos_groups = _groups_of(used[y[used] == 1], groups)
    neg_groups = _groups_of(used[y[used] == 0], groups)
    # 4 negative groups (the smaller class in groups) -> 4 of the 10 positive groups
    assert len(neg_groups) == 4 and len(pos_groups) == 4
    assert len(used) == 4 * 1 + 4 * 6  # rows follow from the groups: unequal per class
    assert int(y[used].sum()) == 4
    # without balancing every group is used
    full = train_logistic_probe(X, y, groups=groups, epochs=1, balance=False)
    assert full.n_train + full.n_val == len(y)


def test_groups_with_mixed_labels_raise():
    X = torch.randn(8, 3)
    y = torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])
    groups = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    train_logistic_probe(X, y, groups=groups, epochs=1)  # consistent groups are fine
    bad = torch.tensor([0, 0, 1, 1, 2, 3, 3, 3])        # group 3 holds a 0 and two 1s
    with pytest.raises(UserError, match="same label"):
        train_logistic_probe(X, y, groups=bad, epochs=1)


def _reference_row_split(y, seed, val_fraction):
    """The ungrouped RefusalCliff split written out: subsample the larger class, shuffle, hold out the tail."""
    gen = torch.Generator().manual_seed(seed)
    pos, neg = torch.nonzero(y == 1).flatten(), torch.nonzero(y == 0).flatten()
    m = min(len(pos), len(neg))
    pos = pos[torch.randperm(len(pos), generator=gen)[:m]]
    neg = neg[torch.randperm(len(neg), generator=gen)[:m]]
    rows = torch.cat([neg, pos])
    rows = rows[torch.randperm(len(rows), generator=gen)]
    n_val = int(len(rows) * val_fraction)
    return rows[: len(rows) - n_val], rows[len(rows) - n_val:]


@pytest.mark.parametrize("seed", [0, 42])
def test_no_groups_unchanged_and_equal_to_singleton_groups(seed):
    X, y, _ = planted(n_pos=70, n_neg=50, d=12)
    plain = train_logistic_probe(X, y, seed=seed, epochs=3, lr=1e-2, batch_size=16)
    train_ref, val_ref = _reference_row_split(y, seed, 0.2)
    assert torch.equal(plain.train_idx, train_ref)
    assert torch.equal(plain.val_idx, val_ref)
    singleton = train_logistic_probe(X, y, seed=seed, epochs=3, lr=1e-2, batch_size=16, groups=torch.arange(len(y)))
    assert torch.equal(plain.weight, singleton.weight) and plain.bias == singleton.bias
    assert torch.equal(plain.train_idx, singleton.train_idx) and torch.equal(plain.val_idx, singleton.val_idx)
    assert plain.epoch_val_accuracy == singleton.epoch_val_accuracy
    assert (plain.best_epoch, plain.train_accuracy, plain.val_accuracy) == \
        (singleton.best_epoch, singleton.train_accuracy, singleton.val_accuracy)


# --- L-BFGS probe trained to convergence (the analysis default) ------------------------------

def offset_blobs(seed=0, n=200, d=32, margin=2.5, offset=10.0):
    """Two classes ±margin along a clean unit direction, around a large common offset (like real
    activations: big mean, small class difference)."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(d, generator=g)
    u /= u.norm()
    y = torch.cat([torch.ones(n, dtype=torch.long), torch.zeros(n, dtype=torch.long)])
    X = (torch.randn(2 * n, d, generator=g) + offset * torch.randn(d, generator=g)
         + margin * (2 * y[:, None].float() - 1) * u)
    return X, y, u


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_recipe_fits_a_clean_direction_the_paper_recipe_misses(seed):
    X, y, u = offset_blobs(seed)
    paper = train_logistic_probe(X, y)  # Adam 1e-3, 5 epochs, batch 64
    fitted = fit_logistic_probe(X, y)
    assert paper.val_accuracy < 0.7  # near chance
    assert fitted.val_accuracy >= 0.95 and fitted.train_accuracy >= 0.95
    assert torch.cosine_similarity(fitted.weight, u, dim=0) > 0.8
    assert fitted.recipe == "lbfgs" and paper.recipe == "paper"
    assert torch.equal(fitted.train_idx, paper.train_idx) and torch.equal(fitted.val_idx, paper.val_idx)


def test_lbfgs_reaches_the_penalised_optimum():
    """At the returned weights the gradient of mean BCE + l2/2 ‖w‖² on the centred, commonly scaled
    training features, written out in numpy, vanishes."""
    X, y, _ = offset_blobs(3, n=80, d=12, margin=1.0)
    probe = fit_logistic_probe(X, y)
    Xt = X[probe.train_idx].double().numpy()
    yt = y[probe.train_idx].double().numpy()
    mean = Xt.mean(0)
    std = np.sqrt(((Xt - mean) ** 2).sum(1).mean() / Xt.shape[1])  # one scale for every feature
    w_std = probe.weight.double().numpy() * std  # the weight on standardised features
    b_std = probe.bias + float(probe.weight.double().numpy() @ mean)
    Xs = (Xt - mean) / std
    p = 1 / (1 + np.exp(-(Xs @ w_std + b_std)))
    grad_w = Xs.T @ (p - yt) / len(yt) + probe.l2 * w_std
    grad_b = (p - yt).mean()
    assert np.abs(grad_w).max() < 1e-4 and abs(grad_b) < 1e-4
    assert np.abs(w_std).max() > 0.1  # not a trivial solution


def test_l2_strength_is_picked_on_validation_loss():
    X, y, _ = offset_blobs(4, n=60, d=24, margin=0.8)
    probe = fit_logistic_probe(X, y, l2_grid=(1e-3, 1e-1, 10.0))
    assert [r["l2"] for r in probe.l2_search] == [1e-3, 1e-1, 10.0]
    assert probe.l2 == min(probe.l2_search, key=lambda r: r["val_loss"])["l2"]
    chosen = next(r for r in probe.l2_search if r["l2"] == probe.l2)
    Xv, yv = X[probe.val_idx], y[probe.val_idx]
    logits = Xv @ probe.weight + probe.bias
    assert ((logits >= 0) == yv.bool()).float().mean().item() == pytest.approx(probe.val_accuracy)
    assert chosen["val_accuracy"] == probe.val_accuracy
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yv.float()).item()
    assert loss == pytest.approx(chosen["val_loss"], rel=1e-4)
    # the strengths give different probes: a stronger penalty shrinks the weight
    norms = [fit_logistic_probe(X, y, l2_grid=(l2,)).weight.norm() for l2 in (1e-3, 10.0)]
    assert norms[0] > 2 * norms[1]


def test_lbfgs_without_validation_split_keeps_the_strongest_penalty():
    X, y, _ = planted(n_pos=2, n_neg=2, d=4)
    probe = fit_logistic_probe(X, y, l2_grid=(0.01, 1.0))
    assert probe.val_is_train and probe.l2 == 1.0


def test_lbfgs_bad_l2_is_a_user_error():
    X, y, _ = planted(d=4)
    with pytest.raises(UserError, match="l2"):
        fit_logistic_probe(X, y, l2_grid=(0.0,))


def test_lbfgs_records_convergence_and_iterations():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(80, 6, generator=g)
    y = (X[:, 0] + 0.3 * torch.randn(80, generator=g) > 0).long()
    probe = fit_logistic_probe(X, y)
    assert probe.converged is True and 1 <= probe.n_iter < 500
    kept = next(r for r in probe.l2_search if r["l2"] == probe.l2)
    assert kept["converged"] is True and kept["n_iter"] == probe.n_iter
    assert all(isinstance(r["converged"], bool) and r["n_iter"] >= 1 for r in probe.l2_search)
    capped = fit_logistic_probe(X, y, max_iter=2)  # stopped by the cap, not by a tolerance
    assert capped.converged is False and capped.n_iter <= 2
    assert train_logistic_probe(X, y, epochs=1).converged is None  # the Adam recipe has no such flag
