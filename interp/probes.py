"""Linear probes on activations: logistic probes (RefusalCliff's Adam recipe, or L-BFGS to convergence) and
Arditi et al.'s difference of means."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interp.errors import UserError


@dataclass
class LogisticProbe:
    """A trained logistic probe: score(h) = sigmoid(weight . h + bias).

    `recipe` says how it was trained (`train_logistic_probe`: "paper", `fit_logistic_probe`: "lbfgs").
    `train_idx` / `val_idx` index rows of the `X` the probe was trained on; when the data were
    too small for a validation split, `val_is_train` is True and `val_idx` equals `train_idx`.
    `epoch_val_accuracy[e]` / `epoch_val_loss[e]` are the validation accuracy / BCE loss after
    epoch e+1; the kept checkpoint is
    epoch `best_epoch` (1-based).
    """

    weight: Float[Tensor, " d_model"]
    bias: float
    train_accuracy: float
    val_accuracy: float
    n_train: int
    n_val: int
    val_is_train: bool
    train_idx: Int[Tensor, " n_train"]
    val_idx: Int[Tensor, " n_val"]
    epoch_val_accuracy: list[float]
    epoch_val_loss: list[float]
    best_epoch: int
    recipe: str = "paper"  # "paper" (Adam, best-validation epoch) or "lbfgs" (to convergence, L2 picked on validation)
    l2: float | None = None  # lbfgs: the chosen L2 strength
    # lbfgs: {l2, val_accuracy, val_loss, converged, n_iter} per strength tried
    l2_search: list[dict] = field(default_factory=list)
    converged: bool | None = None  # lbfgs: the kept fit stopped on a tolerance before max_iter (None: paper recipe)
    n_iter: int | None = None  # lbfgs: L-BFGS iterations of the kept fit

    @property
    def direction(self) -> Float[Tensor, " d_model"]:
        """The weight scaled to unit norm."""
        return self.weight / self.weight.norm()

    def logits(self, acts: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch"]:
        """weight . acts + bias, in float32 on the acts' device, for any leading shape."""
        if acts.shape[-1] != self.weight.shape[0]:
            raise UserError(
                f"activations have d_model={acts.shape[-1]} but the probe expects {self.weight.shape[0]}"
            )
        w = self.weight.to(device=acts.device, dtype=torch.float32)
        return acts.float() @ w + self.bias

    def scores(self, acts: Float[Tensor, "*batch d_model"]) -> Float[Tensor, "*batch"]:
        """Probe probabilities sigmoid(logits)."""
        return torch.sigmoid(self.logits(acts))


def _accuracy(w: Tensor, b: Tensor, X: Tensor, y: Tensor) -> float:
    preds = (X @ w + b) >= 0  # sigmoid(z) >= 0.5, as in the reference
    return (preds == y.bool()).float().mean().item()


def _checked(X: Tensor, y: Tensor, groups: Tensor | None, val_fraction: float) -> tuple[Tensor, Tensor]:
    """Validate probe inputs; returns (X as detached float32, y as CPU long)."""
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise UserError(f"expected X of shape [n, d] and y of shape [n]; got {tuple(X.shape)} and {tuple(y.shape)}")
    if groups is not None and (groups.ndim != 1 or groups.shape[0] != y.shape[0]):
        raise UserError(f"groups must hold one id per row, shape [{y.shape[0]}]; got {tuple(groups.shape)}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1); got {val_fraction}")
    if not bool(((y == 0) | (y == 1)).all()):
        raise UserError("labels must be 0/1 (or booleans)")
    y_cpu = y.detach().to("cpu", torch.long)
    n_pos, n_neg = int(y_cpu.sum()), int((y_cpu == 0).sum())
    if min(n_pos, n_neg) < 2:
        raise UserError(f"need at least 2 examples of each class; got {n_pos} positive and {n_neg} negative")
    X = X.detach().float()
    if not torch.isfinite(X).all():
        raise UserError("activations contain NaN or infinite values")
    return X, y_cpu


def _split(y_cpu: Tensor, gen: torch.Generator, val_fraction: float, balance: bool,
           groups: Tensor | None) -> tuple[Tensor, Tensor, bool]:
    """(train_idx, val_idx, val_is_train): optionally balance the classes by subsampling the larger one
    (in units of groups when given), shuffle, hold out the last `val_fraction` of the units."""
    unit_of_row = torch.arange(len(y_cpu)) if groups is None else torch.unique(groups.cpu(), return_inverse=True)[1]
    n_units = int(unit_of_row.max()) + 1
    unit_label = torch.zeros(n_units, dtype=torch.long).scatter_reduce(0, unit_of_row, y_cpu, "amax")
    if groups is not None and not bool((unit_label[unit_of_row] == y_cpu).all()):
        raise UserError("every row of a group must have the same label")
    units = torch.arange(n_units)
    if balance:
        pos, neg = units[unit_label == 1], units[unit_label == 0]
        m = min(len(pos), len(neg))
        pos = pos[torch.randperm(len(pos), generator=gen)[:m]]
        neg = neg[torch.randperm(len(neg), generator=gen)[:m]]
        units = torch.cat([neg, pos])
    units = units[torch.randperm(len(units), generator=gen)]
    n_val_units = int(len(units) * val_fraction)
    val_is_train = n_val_units == 0

    def rows_of(us):
        return torch.cat([torch.nonzero(unit_of_row == u).flatten() for u in us.tolist()])

    train_idx = rows_of(units[: len(units) - n_val_units])
    val_idx = train_idx if val_is_train else rows_of(units[len(units) - n_val_units :])
    return train_idx, val_idx, val_is_train


def train_logistic_probe(
    X: Float[Tensor, "n d_model"],
    y: Int[Tensor, " n"] | Bool[Tensor, " n"],
    *,
    val_fraction: float = 0.2,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 42,
    balance: bool = True,
    weight_decay: float = 0.0,
    groups: Int[Tensor, " n"] | None = None,
    tie_break: str = "val_loss",
) -> LogisticProbe:
    """Train nn.Linear(d, 1) with BCE-with-logits and Adam, as the RefusalCliff "Refusal Prober".

    Steps (RefusalCliff's probe code): optionally balance the classes by randomly subsampling the larger one,
    shuffle, split off the last `val_fraction` as validation, train for `epochs` (minibatches
    reshuffled each epoch), and keep the checkpoint with the best validation accuracy. Ties go to
    the lower validation loss (`tie_break="val_loss"`); the reference keeps the earlier epoch
    (`tie_break="earliest"`), which on a small validation set that is separated after one epoch
    keeps a barely trained probe. All randomness comes from one generator seeded with `seed`; the global
    torch RNG is untouched. Training runs in float32 on X's device.
    `groups` (one id per row, e.g. the example a token came from) makes balancing and the
    train/val split operate on whole groups, so rows of one example never straddle the split.
    """
    if tie_break not in ("val_loss", "earliest"):
        raise UserError(f"tie_break must be 'val_loss' or 'earliest'; got {tie_break!r}")
    if epochs < 1 or batch_size < 1:
        raise UserError(f"epochs and batch_size must be >= 1; got {epochs} and {batch_size}")
    X, y_cpu = _checked(X, y, groups, val_fraction)
    device = X.device
    gen = torch.Generator().manual_seed(seed)
    train_idx, val_idx, val_is_train = _split(y_cpu, gen, val_fraction, balance, groups)

    X_tr, y_tr = X[train_idx.to(device)], y_cpu[train_idx].float().to(device)
    X_va, y_va = X[val_idx.to(device)], y_cpu[val_idx].float().to(device)

    # nn.Linear's default init (uniform in +-1/sqrt(d)), drawn from our generator.
    d = X.shape[1]
    bound = 1.0 / math.sqrt(d)
    w = ((torch.rand(d, generator=gen) * 2 - 1) * bound).to(device).requires_grad_()
    b = ((torch.rand(1, generator=gen) * 2 - 1) * bound).to(device).requires_grad_()
    opt = torch.optim.Adam([w, b], lr=lr, weight_decay=weight_decay)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    best_acc, best_loss, best_epoch = -1.0, float("inf"), 0
    best_w, best_b = w.detach().clone(), b.detach().clone()
    history: list[float] = []
    losses: list[float] = []
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(train_idx), generator=gen).to(device)
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            opt.zero_grad()
            loss_fn(X_tr[batch] @ w + b, y_tr[batch]).backward()
            opt.step()
        with torch.no_grad():
            acc = _accuracy(w, b, X_va, y_va)
            val_loss = loss_fn(X_va @ w + b, y_va).item()
        history.append(acc)
        losses.append(val_loss)
        if acc > best_acc or (acc == best_acc and tie_break == "val_loss" and val_loss < best_loss):
            best_acc, best_loss, best_epoch = acc, val_loss, epoch
            best_w, best_b = w.detach().clone(), b.detach().clone()

    return LogisticProbe(
        weight=best_w.cpu(),
        bias=best_b.item(),
        train_accuracy=_accuracy(best_w, best_b, X_tr, y_tr),
        val_accuracy=best_acc,
        n_train=len(train_idx),
        n_val=len(val_idx),
        val_is_train=val_is_train,
        train_idx=train_idx,
        val_idx=val_idx,
        epoch_val_accuracy=history,
        epoch_val_loss=losses,
        best_epoch=best_epoch,
    )


L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _lbfgs_logistic(X: Tensor, y: Tensor, l2: float, max_iter: int) -> tuple[Tensor, Tensor, bool, int]:
    """Minimise mean BCE(X w + b, y) + l2/2 ‖w‖² (bias unpenalised) with full-batch L-BFGS, in float64.
    Returns (w, b, converged, n_iter): converged when it stopped on a tolerance before its iteration and
    evaluation caps."""
    w = torch.zeros(X.shape[1], dtype=X.dtype, device=X.device, requires_grad=True)
    b = torch.zeros(1, dtype=X.dtype, device=X.device, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(X @ w + b, y) + 0.5 * l2 * (w @ w)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    state = opt.state[w]
    n_iter = int(state["n_iter"])
    stopped_early = n_iter < max_iter and state["func_evals"] < opt.param_groups[0]["max_eval"]
    return w.detach(), b.detach(), stopped_early, n_iter


def fit_logistic_probe(
    X: Float[Tensor, "n d_model"],
    y: Int[Tensor, " n"] | Bool[Tensor, " n"],
    *,
    val_fraction: float = 0.2,
    l2_grid: tuple[float, ...] = L2_GRID,
    seed: int = 42,
    balance: bool = True,
    groups: Int[Tensor, " n"] | None = None,
    max_iter: int = 500,
) -> LogisticProbe:
    """L2-regularised logistic regression trained to convergence (full-batch L-BFGS, float64).

    The same balancing and train/validation split as `train_logistic_probe` (same `seed` → same
    split). Features are centred on the training rows' mean and divided by one common scale (their
    root-mean-square per feature), which keeps the geometry isotropic; for each strength in
    `l2_grid` the penalised loss mean BCE + l2/2 ‖w‖² (on those features) is minimised on the training
    rows, and the strength with the lowest validation BCE is kept (ties: the stronger penalty). The
    returned weight and bias act on raw activations. Without a validation split (tiny data) the
    strongest penalty is kept, since the training loss cannot choose.
    `converged` / `n_iter` record whether the kept fit stopped on a tolerance before `max_iter` iterations.
    """
    if not l2_grid or min(l2_grid) <= 0:
        raise UserError(f"l2 strengths must be positive; got {tuple(l2_grid)}")
    X, y_cpu = _checked(X, y, groups, val_fraction)
    gen = torch.Generator().manual_seed(seed)
    train_idx, val_idx, val_is_train = _split(y_cpu, gen, val_fraction, balance, groups)
    X64 = X.double()
    y64 = y_cpu.double().to(X.device)
    X_tr, y_tr = X64[train_idx.to(X.device)], y64[train_idx.to(X.device)]
    X_va, y_va = X64[val_idx.to(X.device)], y64[val_idx.to(X.device)]
    # centre, and one common scale (per-feature scaling would blow up near-constant features, which
    # then dominate wherever the probe is applied off its training positions)
    mean = X_tr.mean(0)
    std = (X_tr - mean).pow(2).sum(1).mean().sqrt().clamp_min(1e-12) / math.sqrt(X.shape[1])

    def standard(A):
        return (A - mean) / std

    search, fits = [], {}
    for l2 in sorted(set(l2_grid), reverse=True):
        w, b, converged, n_iter = _lbfgs_logistic(standard(X_tr), y_tr, l2, max_iter)
        # back to raw activations: w·(x − mean)/std + b
        w_raw, b_raw = w / std, b - (w / std) @ mean
        with torch.no_grad():
            val_loss = torch.nn.functional.binary_cross_entropy_with_logits(X_va @ w_raw + b_raw, y_va).item()
        fits[l2] = (w_raw, b_raw)
        search.append({"l2": l2, "val_accuracy": _accuracy(w_raw, b_raw, X_va, y_va), "val_loss": val_loss,
                       "converged": converged, "n_iter": n_iter})
    best = search[0] if val_is_train else min(search, key=lambda r: (r["val_loss"], -r["l2"]))
    w_raw, b_raw = fits[best["l2"]]
    return LogisticProbe(
        weight=w_raw.float().cpu(),
        bias=float(b_raw),
        train_accuracy=_accuracy(w_raw, b_raw, X_tr, y_tr),
        val_accuracy=best["val_accuracy"],
        n_train=len(train_idx),
        n_val=len(val_idx),
        val_is_train=val_is_train,
        train_idx=train_idx,
        val_idx=val_idx,
        epoch_val_accuracy=[],
        epoch_val_loss=[],
        best_epoch=0,
        recipe="lbfgs",
        l2=best["l2"],
        l2_search=sorted(search, key=lambda r: r["l2"]),
        converged=best["converged"],
        n_iter=best["n_iter"],
    )


def diff_of_means(
    X_pos: Float[Tensor, "n_pos *rest"], X_neg: Float[Tensor, "n_neg *rest"]  # noqa: F821 (jaxtyping dims)
) -> Float[Tensor, "*rest"]:
    """mean(X_pos) - mean(X_neg) over the first axis, computed in float64 and cast back to X_pos's dtype."""
    if X_pos.shape[0] == 0 or X_neg.shape[0] == 0:
        raise UserError(f"need at least 1 example of each class; got {X_pos.shape[0]} and {X_neg.shape[0]}")
    if X_pos.shape[1:] != X_neg.shape[1:]:
        raise UserError(f"shape mismatch: {tuple(X_pos.shape[1:])} vs {tuple(X_neg.shape[1:])}")
    diff = X_pos.double().mean(0) - X_neg.to(X_pos.device).double().mean(0)
    return diff.to(X_pos.dtype)
