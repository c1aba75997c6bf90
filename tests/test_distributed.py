"""Data parallelism under torchrun (`interp.distributed`): two CPU ranks (gloo) give one process's results.

The end-to-end test launches `python -m torch.distributed.run --nproc-per-node 2` on tests/distributed_runs.py (every
analysis on the organisms, small settings, several batches per stage) while the same runs go through the CLI in this
process; every number of results.json must agree (1e-6, integers and strings exactly)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from interp import distributed

ROOT = Path(__file__).resolve().parents[1]


def test_single_process_is_a_no_op():
    assert distributed.world() == distributed.World() and distributed.is_main() and not distributed.sharding()
    assert distributed.map_items(lambda idx: [i * 10 for i in idx], 4) == [0, 10, 20, 30]
    assert distributed.shard(list("abcd")) == list("abcd")
    assert distributed.world().to_dict() == {"world_size": 1, "rank": 0, "backend": None}


def test_shard_batches_keep_the_one_process_batches(monkeypatch):
    """Each rank's share is whole batches of the one-process batching; re-batched alone it forms the same batches."""
    from interp.batching import length_batches

    lengths = [5, 9, 2, 9, 7, 3, 3, 8, 1, 6, 4]
    whole = length_batches(lengths, 3)
    seen = []
    for rank in range(3):
        monkeypatch.setattr(distributed, "_WORLD", distributed.World(rank, 3))
        mine = distributed.shard_batches(lengths, 3)
        again = [[mine[i] for i in b] for b in length_batches([lengths[i] for i in mine], 3)]
        assert again == whole[rank::3]
        seen += mine
    assert sorted(seen) == list(range(len(lengths)))
    order = distributed.batch_order(lengths, 3)
    assert all(order[i] == k for k, b in enumerate(whole) for i in b)


def test_each_rank_takes_its_own_device(monkeypatch):
    from interp.errors import UserError

    monkeypatch.setattr(distributed, "_WORLD", distributed.World(1, 2, local_rank=1, backend="gloo"))
    assert distributed.local_device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert distributed.local_device("auto") == distributed.local_device("cuda") == "cuda:1"
    with pytest.raises(UserError, match="each rank takes cuda:LOCAL_RANK"):
        distributed.local_device("cuda:0")
    with pytest.raises(UserError, match="drop --device-map"):
        distributed.local_device("auto", "balanced")


def test_add_fields_merges_named_statistics():
    from interp.gates import SparsityStats

    class Stats:
        def __init__(self, s, hi, lo, flag):
            self.s, self.hi, self.lo, self.flag, self.setting = torch.tensor(s), torch.tensor(hi), torch.tensor(lo), \
                flag, "x"

    a = distributed.add_fields(Stats([1.0, 2.0], [3.0, 1.0], [0.0, 5.0], False), Stats([1.0, 1.0], [2.0, 4.0],
                               [1.0, 2.0], True), sums=("s",), maxima=("hi",), minima=("lo",), ors=("flag",))
    assert a.s.tolist() == [2.0, 3.0] and a.hi.tolist() == [3.0, 4.0] and a.lo.tolist() == [0.0, 2.0] and a.flag
    one, two = SparsityStats(0.1), SparsityStats(0.1)
    one.acc = {0: {"n": 2.0, "ungated": 1.0}}
    two.acc = {0: {"n": 3.0, "ungated": 0.0}, 1: {"n": 1.0, "ungated": 1.0}}
    assert one.merge(two).acc == {0: {"n": 5.0, "ungated": 1.0}, 1: {"n": 1.0, "ungated": 1.0}} and one.theta == 0.1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _differences(one, two, path: str = "") -> list[str]:
    """Where two results.json values differ: floats beyond 1e-6 (relative and absolute), anything else at all."""
    if isinstance(one, dict) and isinstance(two, dict):
        if set(one) != set(two):
            return [f"{path}: keys {sorted(set(one) ^ set(two))}"]
        return [d for k in one for d in _differences(one[k], two[k], f"{path}/{k}")]
    if isinstance(one, list) and isinstance(two, list):
        if len(one) != len(two):
            return [f"{path}: {len(one)} vs {len(two)} entries"]
        return [d for i, (a, b) in enumerate(zip(one, two)) for d in _differences(a, b, f"{path}[{i}]")]
    if isinstance(one, float) and isinstance(two, float):
        return [] if math.isclose(one, two, rel_tol=1e-6, abs_tol=1e-6) else [f"{path}: {one} vs {two}"]
    return [] if one == two and type(one) is type(two) else [f"{path}: {one!r} vs {two!r}"]


@pytest.mark.slow  # ~15 CPU-seconds in all: two ranks and one process running all six analyses
def test_two_gloo_ranks_give_one_process_results(tmp_path):
    from distributed_runs import RUNS, run_all

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    ranks = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(_free_port()), str(ROOT / "tests" / "distributed_runs.py"), str(tmp_path / "two")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run_all(str(tmp_path / "one"))  # meanwhile, the same runs in this process
    finally:
        log = ranks.communicate(timeout=600)[0]
    assert ranks.returncode == 0, "\n".join(line for line in log.splitlines() if "Error" in line or "rank1]" in line)
    assert log.count("wrote ") == len(RUNS)  # rank 0 alone prints (and writes)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(RUNS)
    for name in RUNS:
        one = json.loads((tmp_path / "one" / name / "results.json").read_text())
        two = json.loads((tmp_path / "two" / name / "results.json").read_text())
        assert one["environment"]["world_size"] == 1
        assert {k: two["environment"][k] for k in ("world_size", "rank", "backend")} == \
            {"world_size": 2, "rank": 0, "backend": "gloo"}
        one.pop("environment"), two.pop("environment")
        assert not _differences(one, two), f"{name}: {_differences(one, two)[:5]}"
