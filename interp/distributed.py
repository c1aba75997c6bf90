"""Data parallelism under `torchrun`: every rank runs the same analysis code, the loops over items run on a shard.

`torchrun --nproc-per-node N -m interp.run ANALYSIS ...` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT set; `init` joins them (NCCL on CUDA, gloo on CPU). Every rank computes the same cheap
parts (splits, random draws: same seed) and, where a stage loops over items, only its `shard` of them; the
per-item results are then gathered in the original order (`gather_objects`, `map_items`) or the stage's streaming
statistics merged (`all_reduce_sum`/`all_reduce_max`, `merge_objects`), so every rank continues with the numbers a
single process would have. Rank 0 alone writes and prints (`is_main`). Without torchrun all of this is a no-op.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place: `rank` of `size` processes, `local_rank` on its node, the collective `backend`
    (None in a single process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    def to_dict(self) -> dict:
        return {"world_size": self.size, "rank": self.rank, "backend": self.backend}


_WORLD = World()
_LOCAL = [0]  # > 0 while a sharded stage runs its shard: stages inside it run locally


def launched() -> bool:
    """True when torchrun (or another launcher) set the environment of a multi-process run."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init(device: str = "auto") -> World:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT): NCCL when this
    run's `device` is CUDA (each rank on cuda:LOCAL_RANK), gloo on CPU. A single process stays as it is."""
    global _WORLD
    if not launched() or dist.is_initialized():
        return _WORLD
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local)
    backend = "nccl" if cuda else "gloo"
    dist.init_process_group(backend)
    atexit.register(dist.destroy_process_group)  # the group serves every run in this process
    _WORLD = World(dist.get_rank(), dist.get_world_size(), local, backend)
    return _WORLD


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _WORLD.size > 1:
        dist.barrier()
_LOCAL = [0]  # > 0 while a sharded stage runs its shard: stages inside it run locally


def world() -> World:
    """This process's `World` (rank 0 of 1 without torchrun)."""
    return _WORLD


def is_main() -> bool:
    """True on rank 0, the rank that writes outputs and prints."""
    return _WORLD.rank == 0


def sharding() -> bool:
    """True where a stage should split its items over the ranks: several ranks, and not already inside a shard."""
    return _WORLD.size > 1 and not _LOCAL[0]


@contextlib.contextmanager
def _local() -> Iterator[None]:
    _LOCAL[0] += 1
    try:
        yield
    finally:
        _LOCAL[0] -= 1


def local_device(device: str, device_map: str | None = None) -> str:
    """The device this rank loads the model on: `auto`/`cuda` become cuda:LOCAL_RANK under torchrun with CUDA. Under
    torchrun with several ranks an explicit cuda:N (every rank on one GPU) or a device map (every rank over all GPUs)
    is a `UserError`."""
    if _WORLD.size > 1:
        from interp.errors import UserError

        if device.startswith("cuda:"):
            raise UserError(f"under torchrun each rank takes cuda:LOCAL_RANK; pass --device cuda (or auto), "
                            f"not {device}")
        if device_map is not None:
            raise UserError("--device-map splits one model over the GPUs in one process; under torchrun each rank "
                            "holds a whole copy: drop --device-map, or run without torchrun")
        if device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{_WORLD.local_rank}"
    return device


def shard(items: Sequence[T]) -> list[T]:
    """This rank's items: a strided split (rank r takes items r, r + N, r + 2N, ...), the same on every run."""
    return list(items[_WORLD.rank::_WORLD.size])


def shard_batches(lengths: Sequence[int], batch_size: int) -> list[int]:
    """This rank's item indices where items run in length-sorted batches (`interp.batching.length_batches`): whole
    batches, strided over the ranks, in item order. The shard's own batching then forms the very same batches (its
    items keep their sorted order), so every item is computed with the same padding, bit for bit, as in one
    process."""
    from interp.batching import length_batches

    return sorted(i for batch in shard(length_batches(lengths, batch_size)) for i in batch)


def batch_order(lengths: Sequence[int], batch_size: int) -> list[int]:
    """Per item, the place of its batch among the run's length-sorted batches: what one process met first sorts
    first, so records merged from several ranks keep the one-process order."""
    from interp.batching import length_batches

    order = [0] * len(lengths)
    for k, batch in enumerate(length_batches(lengths, batch_size)):
        for i in batch:
            order[i] = k
    return order


def gather_objects(mine: Sequence[Any], indices: Sequence[int] | None = None, n: int | None = None) -> list[Any]:
    """Every rank's per-item results put back in the original item order, on every rank. `indices`: the items
    `mine` belongs to (default: this rank's `shard(range(n))`); `n`: the number of items (default: all gathered)."""
    if _WORLD.size == 1:
        return list(mine)
    parts: list[Any] = [None] * _WORLD.size
    dist.all_gather_object(parts, (list(mine), None if indices is None else list(indices)))
    n = sum(len(values) for values, _ in parts) if n is None else n
    out: list[Any] = [None] * n
    for rank, (values, where) in enumerate(parts):
        for i, v in zip(range(rank, n, _WORLD.size) if where is None else where, values, strict=True):
            out[i] = v
    return out


def _mine(n: int, lengths: Sequence[int] | None, batch_size: int | None) -> list[int]:
    return shard_batches(lengths, batch_size) if lengths is not None else list(shard(range(n)))


def map_items(fn: Callable[[list[int]], Sequence[T]], n: int, *, lengths: Sequence[int] | None = None,
              batch_size: int | None = None) -> list[T]:
    """`fn(indices)` (one result per index, indices into the run's n items) on this rank's share of range(n),
    gathered in item order on every rank: a single process calls `fn(list(range(n)))`. With the items' `lengths` and
    the stage's `batch_size` the share is whole batches (`shard_batches`: same numbers as one process); else a
    strided `shard`. Inside `fn`, stages run locally (no nested sharding)."""
    if not sharding():
        return list(fn(list(range(n))))
    mine = _mine(n, lengths, batch_size)
    with _local():
        out = list(fn(mine)) if mine else []
    if len(out) != len(mine):
        raise ValueError(f"{len(out)} results for {len(mine)} items")
    return gather_objects(out, mine, n)


def map_stream(fn: Callable[[list[int]], T], n: int, merge: Callable[[T, T], T], *,
               lengths: Sequence[int] | None = None, batch_size: int | None = None) -> T:
    """`fn(indices)` (a streaming statistic over those of the run's n items) on this rank's share of range(n) (as in
    `map_items`), the ranks' statistics folded in rank order with `merge(a, b)` on every rank: a single process calls
    `fn(list(range(n)))`."""
    if not sharding():
        return fn(list(range(n)))
    with _local():
        mine = fn(_mine(n, lengths, batch_size))
    return merge_objects(mine, merge)


def merge_objects(obj: T, merge: Callable[[T, T], T]) -> T:
    """Every rank's `obj` (a streaming statistic over its shard), folded in rank order with `merge(a, b)`."""
    if _WORLD.size == 1:
        return obj
    parts: list[Any] = [None] * _WORLD.size
    dist.all_gather_object(parts, obj)
    out = parts[0]
    for other in parts[1:]:
        out = merge(out, other)
    return out


def add_fields(a: T, b: T, *, sums: Sequence[str] = (), maxima: Sequence[str] = (), minima: Sequence[str] = (),
               ors: Sequence[str] = ()) -> T:
    """Fold streaming statistic `b` into `a` (same class, other items) by named fields: `sums` add (tensors,
    numbers, or dicts of them folded key by key: sums and counts), `maxima`/`minima` take the elementwise max/min,
    `ors` or (flags); the other fields (settings, layer lists) stay `a`'s. Returns `a`."""
    def add(x, y):
        return {k: add(x[k], y[k]) if k in x and k in y else x.get(k, y.get(k)) for k in {**x, **y}} \
            if isinstance(x, dict) else x + y

    for name in sums:
        setattr(a, name, add(getattr(a, name), getattr(b, name)))
    for names, pick in ((maxima, torch.maximum), (minima, torch.minimum)):
        for name in names:
            setattr(a, name, pick(getattr(a, name), getattr(b, name)))
    for name in ors:
        setattr(a, name, getattr(a, name) or getattr(b, name))
    return a


def _all_reduce(x: Tensor, op) -> Tensor:
    if _WORLD.size == 1:
        return x
    on = x.to(f"cuda:{_WORLD.local_rank}") if _WORLD.backend == "nccl" else x
    dist.all_reduce(on, op=op)
    if on is not x:
        x.copy_(on)
    return x


def all_reduce_sum(x: Tensor) -> Tensor:
    """`x` summed over the ranks, in place (counts and sums are exact; float sums to rounding)."""
    return _all_reduce(x, dist.ReduceOp.SUM)


def all_reduce_max(x: Tensor) -> Tensor:
    """`x`'s elementwise maximum over the ranks, in place."""
    return _all_reduce(x, dist.ReduceOp.MAX)


def broadcast_object(obj: T) -> T:
    """Rank 0's `obj` on every rank."""
    if _WORLD.size == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
