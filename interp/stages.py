"""Resumable stages: a keyed, atomic, per-item store of a run's expensive results in its run directory.

`Stages(run_dir).items(name, key, items, compute)` returns one value per item, computing only those not
already stored under `key` (a dict of everything that determines the stage: model identity, dtype, engine,
sampling parameters and seed, chat template, prompt set, the stage's version). The key's hash names the
stage's directory, `<run_dir>/stages/<name>-<hash>/`: one `item-NNNNNN.pt` per item, each written under a
temporary name and renamed (a killed run leaves whole files or none), and `manifest.json` written last (the
key in readable form, one SHA-256 per item file). Items are computed in fixed chunks of the full item list,
whether stored or not, so a resumed stage sees exactly the batches of an uninterrupted one; a chunk with any
item missing, unreadable or stored under another key is computed again whole. `Stages(None)` stores
nothing. Analyses reach the run's store through `current()`; `using(run_dir)` sets it around a run. A stage that
several analyses compute alike (`interp.passes`: the text pass) goes to `shared()`: the store `sharing(dir)` sets
(`interp audit`: one per model, so the first analysis computes it and the others read it), else `current()`. Under
torchrun every rank reads the store and rank 0 alone writes it (the ranks hold the same gathered values).

Test hook: `INTERP_STAGES_EXIT_AFTER=NAME:K` ends the process hard (`os._exit(3)`) once K items of stage
NAME have been written.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from interp.outputs import STAGES_DIR, atomic_write_text, to_jsonable

EXIT_AFTER = "INTERP_STAGES_EXIT_AFTER"
CHUNK_BATCHES = 4  # analyses compute a stage's items in chunks of this many batches (a kill loses at most one)
_SAMPLED_VALUES = 256  # per parameter tensor, in the weights fingerprint

Compute = Callable[[list[int], list[Any]], Sequence[Any]]


def shards(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """The items of a streamed statistic in shards of `CHUNK_BATCHES` whole batches, in the order one stream meets
    them (`interp.batching.length_batches`): each shard's statistics are stored and merged in that order."""
    from interp.batching import length_batches

    batches = length_batches(lengths, batch_size)
    return [[i for b in batches[k:k + CHUNK_BATCHES] for i in b] for k in range(0, len(batches), CHUNK_BATCHES)]


def state(accumulator: Any) -> dict:
    """A streamed statistic's attributes (tensors and plain data): what a stage stores of it (`restore` rebuilds)."""
    return dict(vars(accumulator))


def restore(cls: type, saved: dict) -> Any:
    """The `cls` accumulator whose attributes `state` returned."""
    accumulator = cls.__new__(cls)
    vars(accumulator).update(saved)
    return accumulator


def canonical_json(key: Any) -> str:
    """The key as canonical JSON: sorted keys, no spaces, ASCII (the same dict always gives the same text)."""
    return json.dumps(to_jsonable(key), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def key_hash(key: Any) -> str:
    """16 hex digits of the SHA-256 of `canonical_json(key)`."""
    return hashlib.sha256(canonical_json(key).encode()).hexdigest()[:16]


def digest(value: Any) -> str:
    """A stable fingerprint of a large key part (a prompt set, token ids, a chat template): `key_hash` of it."""
    return key_hash(value)


def weights_fingerprint(model) -> str:
    """A hash over every parameter's name, shape, dtype and up to 256 evenly spaced values (cheap on a 70B model;
    a fine-tune or another seed changes it)."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        n = min(_SAMPLED_VALUES, flat.numel())  # integer spacing: a float32 linspace overshoots past 2^24 values
        idx = torch.arange(n, device=flat.device) * (flat.numel() - 1) // max(n - 1, 1)
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        if not flat.is_meta:  # a parameter offloaded by a device map has no values here (its name and shape count)
            h.update(flat[idx].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def model_key(model) -> dict:
    """What of the model determines a stage: its name and source, architecture, dtype, device type, a weights
    fingerprint, the tokenizer's chat template and vocabulary size, and the engine that runs it."""
    from interp.models import model_info

    info = model_info(model)
    tok = getattr(model, "tokenizer", None)
    return {"name": info.name, "source": info.source, "architecture": info.architecture, "dtype": info.dtype,
            "device_type": info.device.split(":")[0],
            "weights": weights_fingerprint(model),
            "chat_template": digest(getattr(tok, "chat_template", None)) if tok is not None else None,
            "vocab": len(tok) if tok is not None else None, "engine": "bridge"}


def engine_key(engine) -> dict:
    """What of a generation engine's `describe()` (`interp.engines`) determines its output: all of it but the
    request concurrency, the text round-trip counts, which grow as it generates, and the server's URL (a server
    restarted on another port resumes the run)."""
    return {k: v for k, v in engine.describe().items() if k not in ("concurrency", "text_only", "url")}


class Stages:
    """The stage store of one run directory (None: compute everything, store nothing)."""

    def __init__(self, run_dir: str | Path | None, log: Callable[[str], None] | None = None):
        self.root = Path(run_dir) / STAGES_DIR if run_dir is not None else None
        self.log = log or _print_on_main
        self.reused: dict[str, tuple[int, int]] = {}  # stage name → (items reused, items in the stage)
        self.events: list[dict] = []  # per `items` call: {stage, key_hash, items, reused}
        self._written: dict[str, int] = {}
        self._made: set[str] = set()  # stage directories this store wrote (reading them back is not news)

    def items(self, name: str, key: dict, items: Sequence[Any], compute: Compute, chunk: int) -> list[Any]:
        """One value per item: stored ones read back, the others from `compute(indices, items)` (indices into
        `items`; one value per item, in order), called on fixed chunks of `chunk` items of the full list."""
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}")
        items = list(items)
        stage = self._stage_dir(name, key)
        stored, sums = self._load(stage, key_hash(key), len(items)) if stage is not None else ({}, {})
        writing = stage is not None and _is_main()  # under torchrun rank 0 writes (every rank holds the same values)
        values: list[Any] = [None] * len(items)
        reused = 0
        for start in range(0, len(items), chunk):
            idx = list(range(start, min(start + chunk, len(items))))
            if all(i in stored for i in idx):
                for i in idx:
                    values[i] = stored[i]
                reused += len(idx)
                continue
            out = list(compute(idx, [items[i] for i in idx]))
            if len(out) != len(idx):
                raise ValueError(f"stage {name}: compute returned {len(out)} values for {len(idx)} items")
            for i, v in zip(idx, out):
                values[i] = v
                if writing:
                    sums[i] = self._write_item(stage, name, key_hash(key), i, v)
        self.events.append({"stage": name, "key_hash": key_hash(key), "items": len(items), "reused": reused})
        if writing:
            self._write_manifest(stage, name, key, sums)
            self.reused[name] = (reused, len(items))
            if reused and stage.name not in self._made:
                self.log(f"stage {name}: reused {reused} of {len(items)} items from {stage}")
            self._made.add(stage.name)
        return values

    def _stage_dir(self, name: str, key: dict) -> Path | None:
        return None if self.root is None else self.root / f"{name}-{key_hash(key)}"

    @staticmethod
    def _item_path(stage: Path, i: int) -> Path:
        return stage / f"item-{i:06d}.pt"

    def _load(self, stage: Path, khash: str, n: int) -> tuple[dict[int, Any], dict[int, str]]:
        """The stored items that can be trusted (readable, stored under this key and index, and, where the
        manifest exists, with the SHA-256 it lists) and their files' SHA-256."""
        manifest = _read_json(stage / "manifest.json")
        listed = manifest.get("sha256", {}) if manifest.get("key_hash") == khash else {}
        out, sums = {}, {}
        for i in range(n):
            path = self._item_path(stage, i)
            if not path.is_file():
                continue
            try:
                data = path.read_bytes()
                sha = hashlib.sha256(data).hexdigest()
                if path.name in listed and sha != listed[path.name]:
                    continue
                record = torch.load(io.BytesIO(data), weights_only=True)
            except Exception:  # a corrupt or foreign file is recomputed, never trusted
                continue
            if isinstance(record, dict) and record.get("key_hash") == khash and record.get("index") == i:
                out[i], sums[i] = record["value"], sha
        return out, sums

    def _write_item(self, stage: Path, name: str, khash: str, i: int, value: Any) -> str:
        """Write item `i` atomically (temporary name, then rename); returns its file's SHA-256."""
        stage.mkdir(parents=True, exist_ok=True)
        path = self._item_path(stage, i)
        buffer = io.BytesIO()
        torch.save({"key_hash": khash, "index": i, "value": value}, buffer)
        data = buffer.getvalue()
        tmp = path.with_name(f".{path.name}.partial")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        self._written[name] = self._written.get(name, 0) + 1
        exit_after = os.environ.get(EXIT_AFTER, "")
        if exit_after.rpartition(":")[0] == name and self._written[name] >= int(exit_after.rpartition(":")[2]):
            self.log(f"{EXIT_AFTER}: exiting after {self._written[name]} items of stage {name}")
            sys.stderr.flush()
            os._exit(3)
        return hashlib.sha256(data).hexdigest()

    def _write_manifest(self, stage: Path, name: str, key: dict, sums: dict[int, str]) -> None:
        """The stage's manifest, written last: the key (readable and hashed), the item count, each file's SHA-256."""
        stage.mkdir(parents=True, exist_ok=True)
        atomic_write_text(stage / "manifest.json", json.dumps(
            {"stage": name, "key_hash": key_hash(key), "key": to_jsonable(key), "n_items": len(sums),
             "sha256": {self._item_path(stage, i).name: sums[i] for i in sorted(sums)}}, indent=1) + "\n")


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_main() -> bool:
    """Rank 0 under torchrun (`interp.distributed`), the one process otherwise."""
    from interp.distributed import is_main

    return is_main()


def _print_on_main(line: str) -> None:
    """A line on stderr, from rank 0 only under torchrun."""
    if _is_main():
        print(line, file=sys.stderr)


_CURRENT: contextvars.ContextVar[Stages | None] = contextvars.ContextVar("interp_stages", default=None)
_SHARED: contextvars.ContextVar[Stages | None] = contextvars.ContextVar("interp_shared_stages", default=None)


def current() -> Stages:
    """The running analysis's store (`using`), or one that stores nothing."""
    return _CURRENT.get() or Stages(None)


@contextlib.contextmanager
def _store_in(var: contextvars.ContextVar, run_dir: str | Path | None) -> Iterator[Stages]:
    store = Stages(run_dir)
    token = var.set(store)
    try:
        yield store
    finally:
        var.reset(token)


def using(run_dir: str | Path | None) -> contextlib.AbstractContextManager[Stages]:
    """Make `Stages(run_dir)` the store `current()` returns inside the block."""
    return _store_in(_CURRENT, run_dir)


def shared() -> Stages:
    """The store of stages that several analyses compute alike: the one `sharing` sets, else `current()`."""
    return _SHARED.get() or current()


def sharing(run_dir: str | Path | None) -> contextlib.AbstractContextManager[Stages]:
    """Make `Stages(run_dir)` the store `shared()` returns inside the block (`interp audit`: one per model)."""
    return _store_in(_SHARED, run_dir)
