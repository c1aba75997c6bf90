"""Linear probes on activations: the RefusalCliff logistic probe and Arditi et al.'s difference of means."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interp.errors import UserError


@dataclass
class LogisticProbe:
    """A trained logistic probe: score(h) = sigmoid(weight . h + bias).

    `train_idx` / `val_idx` index rows of the `X` the probe was trained on; when the data were
    too small for a validation split, `val_is_train` is True and `val_idx` equals `train_idx`.
    `epoch_val_accuracy[e]` / `epoch_val_loss[e]` are the validation accuracy / BCE loss after
    epoch e+1; the kept checkpoint is
    epoch `best_epoch` (1-based).
    """

    weight: Float[Tensor, "d_model"]
    bias: float
    train_accuracy: float
    val_accuracy: float
    n_train: int
    n_val: int
    val_is_train: bool
    train_idx: Int[Tensor, "n_train"]
    val_idx: Int[Tensor, "n_val"]
    epoch_val_accuracy: list[float]
    epoch_val_loss: list[float]
    best_epoch: int

    @property
    def direction(self) -> Float[Tensor, "d_model"]:
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


def train_logistic_probe(
    X: Float[Tensor, "n d_model"],
    y: Int[Tensor, "n"] | Bool[Tensor, "n"],
    *,
    val_fraction: float = 0.2,
    epochs: int = 5,
    lr: float = 1e-3,
    batch_size: int = 64,
    seed: int = 42,
    balance: bool = True,
    weight_decay: float = 0.0,
    groups: Int[Tensor, "n"] | None = None,
    tie_break: str = "val_loss",
) -> LogisticProbe:
    """Train nn.Linear(d, 1) with BCE-with-logits and Adam, as the RefusalCliff "Refusal Prober".

    Steps (spec section 4): optionally balance the classes by randomly subsampling the larger one,
    shuffle, split off the last `val_fraction` as validation, train for `epochs` (minibatches
    reshuffled each epoch), and keep the checkpoint with the best validation accuracy. Ties go to
    the lower validation loss (`tie_break="val_loss"`); the reference keeps the earlier epoch
    (`tie_break="earliest"`), which on a small validation set that is separated after one epoch
    keeps a barely trained probe. All randomness comes from one generator seeded with `seed`; the global
    torch RNG is untouched. Training runs in float32 on X's device.
    `groups` (one id per row, e.g. the example a token came from) makes balancing and the
    train/val split operate on whole groups, so rows of one example never straddle the split.
    """
    if X.ndim != 2 or y.ndim != 1 or X.shape[0] != y.shape[0]:
        raise UserError(f"expected X of shape [n, d] and y of shape [n]; got {tuple(X.shape)} and {tuple(y.shape)}")
    if groups is not None and (groups.ndim != 1 or groups.shape[0] != y.shape[0]):
        raise UserError(f"groups must hold one id per row, shape [{y.shape[0]}]; got {tuple(groups.shape)}")
    if tie_break not in ("val_loss", "earliest"):
        raise UserError(f"tie_break must be 'val_loss' or 'earliest'; got {tie_break!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise UserError(f"val_fraction must be in [0, 1); got {val_fraction}")
    if epochs < 1 or batch_size < 1:
        raise UserError(f"epochs and batch_size must be >= 1; got {epochs} and {batch_size}")
    if not bool(((y == 0) | (y == 1)).all()):
        raise UserError("labels must be 0/1 (or booleans)")
    y_cpu = y.detach().to("cpu", torch.long)
    n_pos, n_neg = int(y_cpu.sum()), int((y_cpu == 0).sum())
    if min(n_pos, n_neg) < 2:
        raise UserError(f"need at least 2 examples of each class; got {n_pos} positive and {n_neg} negative")
    device = X.device
    X = X.detach().float()
    if not torch.isfinite(X).all():
        raise UserError("activations contain NaN or infinite values")

    gen = torch.Generator().manual_seed(seed)
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
    rows_of = lambda us: torch.cat([torch.nonzero(unit_of_row == u).flatten() for u in us.tolist()])
    train_idx = rows_of(units[: len(units) - n_val_units])
    val_idx = train_idx if val_is_train else rows_of(units[len(units) - n_val_units :])

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


def diff_of_means(
    X_pos: Float[Tensor, "n_pos *rest"], X_neg: Float[Tensor, "n_neg *rest"]
) -> Float[Tensor, "*rest"]:
    """mean(X_pos) - mean(X_neg) over the first axis, computed in float64 and cast back to X_pos's dtype."""
    if X_pos.shape[0] == 0 or X_neg.shape[0] == 0:
        raise UserError(f"need at least 1 example of each class; got {X_pos.shape[0]} and {X_neg.shape[0]}")
    if X_pos.shape[1:] != X_neg.shape[1:]:
        raise UserError(f"shape mismatch: {tuple(X_pos.shape[1:])} vs {tuple(X_neg.shape[1:])}")
    diff = X_pos.double().mean(0) - X_neg.to(X_pos.device).double().mean(0)
    return diff.to(X_pos.dtype)
