"""Held-out splits, matched random controls and intervals: the toolkit's method promise, in one place.

Every analysis that selects something (heads, neurons, dims, channels, a probe) selects it on one part
of the data (`selection`) and measures it on the other (`held_out`), and runs every intervention beside
random sets of the same size, drawn away from the selection and matched on what could explain the effect
(the stratum: layer, σ bin, gate bin, norm bin …).

- `split(n, fraction, seed, groups=None, strata=None)` → `Split(selection, held_out)`: sorted index lists,
  whole groups on one side, balanced within each stratum; one rounding rule (`n_selected`).
- `matched_draws(selection, pool, stratum, draws, seed, matched_on)` → `Draws`: `draws` random sets,
  each disjoint from the selection and with the selection's count in every stratum.
- `quantile_bins(values, n_bins)` → a bin label per value: a stratum for a continuous quantity.
- `stratified_sample(strata, limit, seed)` → sorted indices of at most `limit` items, each stratum sampled in
  proportion to its size (largest remainder), seeded: a cap that keeps the mix (e.g. refused / complied prompts).
- `mean_sd(values)` → (mean, sd); sd is NaN for one value (it is undefined, not 0).
- `control_row(values_by_key, draws)`: the summary fields of a random-control row (mean, sd, draws, strata).
- `wilson(k, n)` → the 95 % Wilson score interval of a rate (ASR, accuracy, TPR, FPR).
- `bootstrap_ci(statistic, n, n_boot, seed, clusters=None, strata=None)` → percentile interval,
  resampling items, whole clusters (several samples of one question), or within strata (labels).
"""

from __future__ import annotations

import math
import random
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

MIN_DRAWS = 2  # a control of one draw has no spread to compare against
DEFAULT_DRAWS = 5


class Split(NamedTuple):
    """Index lists of the two halves: `selection` chooses, `held_out` measures."""

    selection: list[int]
    held_out: list[int]


class ControlUnavailable(Exception):
    """No random set can match the selection (too few candidates outside it in some stratum)."""


def n_selected(n: int, fraction: float) -> int:
    """How many of `n` units go to the selection: `fraction` of them rounded half up, and at least one on each side."""
    if n < 2:
        raise ValueError(f"need at least 2 units to split; got {n}")
    return min(max(1, math.floor(n * fraction + 0.5)), n - 1)


def split(n: int, fraction: float = 0.5, seed: int = 0, *, groups: Sequence[Hashable] | None = None,
          strata: Sequence[Hashable] | None = None) -> Split:
    """A seeded split of range(n) into (selection, held_out).

    `groups[i]`: items sharing a group (one prompt's rollouts, one question's samples, one behaviour) land on the
    same side, so nothing selected on is measured again. `strata[i]`: each stratum (a label, a kind) is split on
    its own with the same fraction, so both halves keep the mix (a stratum with one group goes to the selection).
    The same arguments give the same split whatever order the groups first appear in.
    """
    groups = list(range(n)) if groups is None else list(groups)
    strata = [None] * n if strata is None else list(strata)
    if len(groups) != n or len(strata) != n:
        raise ValueError(f"groups and strata must have {n} entries")
    group_stratum: dict[Hashable, Hashable] = {}
    for g, s in zip(groups, strata):
        if group_stratum.setdefault(g, s) != s:
            raise ValueError(f"group {g!r} spans two strata ({group_stratum[g]!r}, {s!r})")
    by_stratum: dict[Hashable, list] = defaultdict(list)
    for g, s in group_stratum.items():
        by_stratum[s].append(g)
    rng = random.Random(f"split:{seed}")
    chosen: set = set()
    for s in sorted(by_stratum, key=repr):
        members = sorted(by_stratum[s], key=repr)
        rng.shuffle(members)
        k = n_selected(len(members), fraction) if len(members) >= 2 else len(members)
        chosen.update(members[:k])
    selection = [i for i in range(n) if groups[i] in chosen]
    held_out = [i for i in range(n) if groups[i] not in chosen]
    return Split(selection, held_out)


@dataclass(frozen=True)
class Draws:
    """Random control sets: `sets[d]` is draw d (sorted); `strata` counts the selection (and so each draw)
    per stratum."""

    sets: list[list]
    matched_on: str
    strata: dict[str, int]

    def __iter__(self):
        return iter(self.sets)

    def __len__(self) -> int:
        return len(self.sets)


def matched_draws(selection: Sequence, pool: Sequence, *, stratum: Callable[[Any], Hashable] | Mapping | None = None,
                  draws: int = DEFAULT_DRAWS, seed: int = 0, matched_on: str = "none", key: str = "") -> Draws:
    """`draws` random sets with as many items as `selection` in every stratum, from `pool` minus the selection.

    `stratum` maps an item to its stratum (a function or a mapping; None: one stratum, plain size matching) and
    `matched_on` names it for `results.json`. Draws are seeded by (seed, key, selection size) over the pool in
    canonical (sorted) order, so they do not follow score noise and the same size draws the same sets.
    Raises `ControlUnavailable` when a stratum has fewer candidates outside the selection than it needs.
    """
    if draws < 1:
        raise ValueError(f"draws must be at least 1; got {draws}")
    of = (lambda item: None) if stratum is None else (stratum.__getitem__ if isinstance(stratum, Mapping) else stratum)
    chosen = set(selection)
    need = Counter(of(item) for item in selection)
    candidates: dict[Hashable, list] = defaultdict(list)
    for item in sorted(set(pool) - chosen):
        candidates[of(item)].append(item)
    short = {s: (c, len(candidates[s])) for s, c in need.items() if len(candidates[s]) < c}
    if short:
        detail = ", ".join(f"{_label(s)}: {have} of {c}" for s, (c, have) in sorted(short.items(), key=repr))
        raise ControlUnavailable(f"too few candidates outside the selection to match it on {matched_on} ({detail})")
    rng = random.Random(f"draws:{seed}:{key}:{len(chosen)}")
    sets = []
    for _ in range(draws):
        picked = [item for s in sorted(need, key=repr) for item in rng.sample(candidates[s], need[s])]
        sets.append(sorted(picked))
    return Draws(sets, matched_on, {_label(s): need[s] for s in sorted(need, key=repr)})


def _label(stratum: Hashable) -> str:
    return "all" if stratum is None else str(stratum)


def stratified_sample(strata: Sequence[Hashable], limit: int | None, seed: int = 0, salt: str = "sample"
                      ) -> list[int]:
    """Sorted indices of at most `limit` of the items (all when `limit` is None, 0 or not below their number): each
    stratum keeps its share (quota = limit × its size / total, rounded by largest remainder, ties by stratum), the
    members drawn at random (seeded by `seed` and `salt`), so the same arguments give the same sample."""
    n = len(strata)
    if not limit or limit >= n:
        return list(range(n))
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, s in enumerate(strata):
        members[s].append(i)
    keys = sorted(members, key=repr)
    exact = {s: limit * len(members[s]) / n for s in keys}
    quota = {s: math.floor(exact[s]) for s in keys}
    for s in sorted(keys, key=lambda s: (-(exact[s] - quota[s]), repr(s)))[: limit - sum(quota.values())]:
        quota[s] += 1
    rng = random.Random(f"{salt}:{seed}")
    return sorted(i for s in keys for i in rng.sample(members[s], quota[s]))


def quantile_bins(values: Sequence[float], n_bins: int = 4) -> list[str]:
    """A bin label per value, bins at the quantiles of `values` ("q1" lowest … "q{n}"): a stratum for σ, gate, norm."""
    x = np.asarray(values, dtype=float)
    if x.size == 0:
        return []
    edges = np.quantile(x, np.linspace(0, 1, n_bins + 1)[1:-1])
    return [f"q{int(b) + 1}" for b in np.searchsorted(edges, x, side="right")]


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample sd (ddof 1) of the draws; sd is NaN for one draw and both are NaN for none."""
    x = np.asarray([v for v in values if v is not None], dtype=float)
    if x.size == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan


def control_row(values: Mapping[str, Sequence[float]], draws: Draws) -> dict[str, Any]:
    """The fields every random-control row carries: `<name>` (mean), `<name>_sd`, `<name>_draws` for each
    measured quantity, and `n_draws`, `matched_on`, `strata`."""
    row: dict[str, Any] = {}
    for name, vals in values.items():
        row[name], row[f"{name}_sd"] = mean_sd(vals)
        row[f"{name}_draws"] = [float(v) if v is not None else None for v in vals]
    return {**row, "n_draws": len(draws), "matched_on": draws.matched_on, "strata": dict(draws.strata)}


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval (95 % by default) of the rate k / n; (NaN, NaN) when n is 0."""
    if n <= 0:
        return math.nan, math.nan
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (0.0 if k == 0 else centre - half), (1.0 if k == n else centre + half)


def bootstrap_ci(statistic: Callable[[np.ndarray], float], n: int, *, n_boot: int = 2000, seed: int = 0,
                 level: float = 0.95, clusters: Sequence[Hashable] | None = None,
                 strata: Sequence[Hashable] | None = None) -> tuple[float, float]:
    """Percentile bootstrap interval of `statistic(indices)` over items 0..n-1.

    `clusters[i]`: resample whole clusters (several samples of one question move together). `strata[i]`:
    resample within each stratum (e.g. wrong and right answers separately, keeping both present for an AUC);
    with clusters, clusters are resampled within strata. Resamples whose statistic is NaN are dropped.
    """
    clusters = list(range(n)) if clusters is None else list(clusters)
    strata = [None] * n if strata is None else list(strata)
    members: dict[Hashable, list[int]] = defaultdict(list)
    cluster_stratum: dict[Hashable, Hashable] = {}
    for i, (c, s) in enumerate(zip(clusters, strata)):
        members[c].append(i)
        cluster_stratum.setdefault(c, s)
    by_stratum: dict[Hashable, list] = defaultdict(list)
    for c in members:
        by_stratum[cluster_stratum[c]].append(c)
    groups = [[np.asarray(members[c]) for c in by_stratum[s]] for s in sorted(by_stratum, key=repr)]
    rng = np.random.default_rng(seed)
    stats = []
    for _ in range(n_boot):
        parts = [group[j] for group in groups for j in rng.integers(0, len(group), len(group))]
        value = statistic(np.concatenate(parts))
        if value is not None and not math.isnan(value):
            stats.append(value)
    if not stats:
        return math.nan, math.nan
    alpha = (1 - level) / 2
    lo, hi = np.quantile(stats, [alpha, 1 - alpha])
    return float(lo), float(hi)
