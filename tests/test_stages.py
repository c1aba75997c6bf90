"""Resumable stages (interp.stages): the keyed per-item store, the run directory's rules, and a run killed during
generation and rerun (the same results.json as an uninterrupted run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_gated_attention import planted_gated, planted_gated_dir  # noqa: F401 (fixtures)
from test_skill_unlearning import planted_skills  # noqa: F401 (the fixture)

from interp.errors import UserError
from interp.outputs import prepare_output_dir, write_run
from interp.stages import EXIT_AFTER, Stages, key_hash

KEY = {"version": 1, "model": "m", "seed": 0}


class Counting:
    """A compute function that records which indices it was asked for; value of item x at index i: (i, x * 2)."""

    def __init__(self):
        self.calls: list[list[int]] = []

    def __call__(self, idx, items):
        self.calls.append(list(idx))
        return [{"i": i, "v": torch.tensor([x * 2.0])} for i, x in zip(idx, items)]


def _values(out):
    return [(o["i"], o["v"].item()) for o in out]


def test_items_computed_once_then_reused_chunk_by_chunk(tmp_path):
    items = list(range(7))
    first = Counting()
    expected = _values(Stages(tmp_path).items("s", KEY, items, first, chunk=3))
    assert first.calls == [[0, 1, 2], [3, 4, 5], [6]] and expected == [(i, 2.0 * i) for i in items]
    stage = tmp_path / "stages" / f"s-{key_hash(KEY)}"
    manifest = json.loads((stage / "manifest.json").read_text())
    assert manifest["key"] == KEY and manifest["n_items"] == 7 and len(manifest["sha256"]) == 7
    again = Counting()
    store = Stages(tmp_path)
    assert _values(store.items("s", KEY, items, again, chunk=3)) == expected and again.calls == []
    assert store.reused == {"s": (7, 7)}
    # no store: the same values, computed in the same chunks
    plain = Counting()
    assert _values(Stages(None).items("s", KEY, items, plain, chunk=3)) == expected and plain.calls == first.calls


def test_changed_key_recomputes_and_keeps_the_old_stage(tmp_path):
    Stages(tmp_path).items("s", KEY, [1, 2], Counting(), chunk=2)
    other = Counting()
    Stages(tmp_path).items("s", {**KEY, "seed": 1}, [1, 2], other, chunk=2)
    assert other.calls == [[0, 1]]
    assert len(list((tmp_path / "stages").iterdir())) == 2
    assert key_hash({"b": 1, "a": (1, 2)}) == key_hash({"a": [1, 2], "b": 1})  # canonical JSON: order, tuples


def test_partial_stage_reuses_whole_chunks_and_distrusts_bad_files(tmp_path, capsys):
    items = list(range(6))
    expected = _values(Stages(None).items("s", KEY, items, Counting(), chunk=2))
    stage = tmp_path / "stages" / f"s-{key_hash(KEY)}"
    Stages(tmp_path).items("s", KEY, items, Counting(), chunk=2)
    (stage / "manifest.json").unlink()                      # as if killed before the manifest
    (stage / "item-000003.pt").write_bytes((stage / "item-000003.pt").read_bytes()[:40])  # a truncated file
    (stage / "item-000004.pt").replace(stage / "item-000005.pt")  # a file holding another index
    (stage / ".item-000001.pt.partial").write_bytes(b"half")  # an interrupted write is never read
    again = Counting()
    store = Stages(tmp_path)
    assert _values(store.items("s", KEY, items, again, chunk=2)) == expected
    assert again.calls == [[2, 3], [4, 5]] and store.reused == {"s": (2, 6)}
    assert "stage s: reused 2 of 6 items" in capsys.readouterr().err
    # with the manifest, a file whose SHA-256 differs from the one listed is recomputed too
    torch.save({"key_hash": key_hash(KEY), "index": 0, "value": {"i": 0, "v": torch.tensor([99.0])}},
               stage / "item-000000.pt")
    third = Counting()
    assert _values(Stages(tmp_path).items("s", KEY, items, third, chunk=2)) == expected and third.calls == [[0, 1]]


class _Result:
    def to_dict(self):
        return {"analysis": "x", "value": 1}

    def tables(self):
        return {}


class _Report:
    def write(self, path):
        Path(path).write_text("<html></html>")


def test_run_directory_rules(tmp_path, capsys):
    out = tmp_path / "run"
    Stages(out).items("s", KEY, [1], Counting(), chunk=1)   # an unfinished run: stored stages only
    assert prepare_output_dir(out, "a", "m") == out
    assert "resuming the unfinished run" in capsys.readouterr().err
    write_run(out, _Result(), _Report())
    assert (out / "results.json").is_file() and (out / "stages").is_dir()  # the stages stay with the run
    with pytest.raises(UserError, match="holds a finished run; pass --force"):
        prepare_output_dir(out, "a", "m")
    assert prepare_output_dir(out, "a", "m", force=True) == out
    write_run(out, _Result(), _Report())                    # --force: replaced, its stages kept and reusable
    again = Counting()
    Stages(out).items("s", KEY, [1], again, chunk=1)
    assert again.calls == []


ARGS = ["instability", "--model", "organism", "--limit", "8", "--max-new-tokens", "6", "--batch-size", "1",
        "--n-boot", "100", "--windows", "8", "--no-progress"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_results(tmp_path, capfd):
    """A run killed hard after 4 generated traces, rerun: the 4 are reused, results.json equals an uninterrupted
    run's."""
    from interp.run import main

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    proc = subprocess.run([sys.executable, "-m", "interp.run", *ARGS, "--out", str(resumed)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, EXIT_AFTER: "generation:4"})
    assert proc.returncode == 3, proc.stderr[-2000:]
    [stage] = (resumed / "stages").glob("generation-*")
    assert sorted(p.name for p in stage.iterdir()) == [f"item-{i:06d}.pt" for i in range(4)]  # no manifest yet
    assert not (resumed / "results.json").exists()
    capfd.readouterr()
    assert main([*ARGS, "--out", str(resumed)]) == 0
    err = capfd.readouterr().err
    assert "resuming the unfinished run" in err and "stage generation: reused 4 of 8 items" in err
    assert "stage traces" not in err                          # killed before the traces: computed afresh
    assert main([*ARGS, "--out", str(full)]) == 0
    assert (resumed / "results.json").read_text() == (full / "results.json").read_text()
    assert (resumed / "traces.jsonl").read_text() == (full / "traces.jsonl").read_text()


def test_changed_option_recomputes_only_its_stage(tmp_path, capsys):
    from interp.analysis import run_analysis
    from interp.models import load_model

    model = load_model("organism", device="cpu")
    kw = dict(limit=4, max_new_tokens=12, batch_size=2, n_boot=100, windows=(8,), progress=False)

    def run(**changed):
        res = run_analysis("instability", model, run_dir=tmp_path, **{**kw, **changed})
        return res.to_dict(), capsys.readouterr().err

    base, err = run()
    assert "reused" not in err
    again, err = run(n_boot=200)                              # no stage depends on it: both reused
    assert "stage generation: reused 4 of 4" in err and "stage traces: reused 4 of 4" in err
    assert again["traces"] == base["traces"]
    _, err = run(seed=1)                                      # generation recomputed; greedy: the same traces
    assert "stage generation" not in err and "stage traces: reused 4 of 4" in err
    longer, err = run(max_new_tokens=16)                      # generation and the longer traces recomputed
    assert "stage generation" not in err and "stage traces" not in err
    assert [t["length"] for t in longer["traces"]] != [t["length"] for t in base["traces"]]
    assert len(list((tmp_path / "stages").glob("generation-*"))) == 3


class FakeEngine:
    """A generation engine (`interp.engines` interface) that records the seed ids it was asked for."""

    def __init__(self, temperature: float = 0.0):
        self.temperature, self.calls = temperature, []

    def describe(self):
        return {"engine": "fake", "sampling": {"temperature": self.temperature}, "concurrency": 4}

    def generate(self, seqs, *, seed_ids=None):
        self.calls.append(list(seed_ids))
        return [[len(s), i] for s, i in zip(seqs, seed_ids)]


def test_refusal_cliff_rollouts_are_stored_and_keyed_on_the_engine(tiny_model, tmp_path):
    from interp import stages
    from interp.analyses import refusal_cliff as rc

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(f"how do I do thing {i}" for i in range(5)) + "\n")
    config = rc.Config(batch_size=1, progress=False)

    def roll(engine):
        with stages.using(tmp_path / "run"):
            return rc.generate_rollouts(tiny_model, config, {"harmful": str(prompts)}, engine)

    first, engine = FakeEngine(), FakeEngine()
    expected = roll(first)
    assert first.calls == [[0, 1, 2, 3], [4]]                # chunks of CHUNK_BATCHES × batch size, global seed ids
    assert roll(engine) == expected and engine.calls == []
    sampled = FakeEngine(temperature=0.7)                    # other sampling: generated again
    roll(sampled)
    assert sampled.calls == first.calls


def test_skill_unlearning_rerun_reuses_its_stages(planted_skills, tmp_path, capsys):  # noqa: F811 (the fixture)  # noqa: F811
    """Statistics and every generation (before, under Neuron Adjust, under each random draw) are reused; the
    abstention flags and Neuron Adjust's replaced count come back with them."""
    from test_skill_unlearning import PLANTED_PERCENT

    from interp.analysis import run_analysis

    model, path = planted_skills
    options = dict(forget=f"{path}:alpha", retain=f"{path}:words", top_percent=PLANTED_PERCENT, n_probe=10,
                   n_eval=6, random_draws=2, max_new_tokens=3, progress=False, batch_size=4)
    first = run_analysis("skill_unlearning", model, run_dir=tmp_path, **options).to_dict()
    assert "reused" not in capsys.readouterr().err
    again = run_analysis("skill_unlearning", model, run_dir=tmp_path, **options).to_dict()
    err = capsys.readouterr().err
    assert err.count("stage generation: reused") == 4 and "stage statistics: reused 2 of 2" in err
    assert json.dumps(again, sort_keys=True) == json.dumps(first, sort_keys=True)


def test_residual_statistics_by_shard_equal_one_stream_and_are_reused(tiny_model, tmp_path, capsys):
    from interp import outliers as out
    from interp import stages
    from interp.analyses import systematic_outliers as so

    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 200, (n,), generator=g).tolist() for n in (12, 9, 12, 7, 5, 12, 3, 8, 10, 11)]
    config = so.Config(batch_size=2, progress=False, massive_abs=0.05, massive_ratio=1.5, token_tau=1.5)
    one = out.residual_stats(tiny_model, seqs, batch_size=2, down=True, abs_thr=0.05, ratio=1.5, tau=1.5,
                             progress=False)
    assert len(stages.shards([len(s) for s in seqs], 2)) == 2   # 5 batches: shards of 4 and 1
    with stages.using(tmp_path):
        sharded = so.residual_statistics(tiny_model, seqs, config)
    assert one.n_hits > 0 and one.token_hits and one.down_hits
    for name in ("hits", "token_hits", "down_hits", "hit_counts", "hit_positions", "hit_dims", "n_hits", "down_seen"):
        assert getattr(sharded, name) == getattr(one, name), name
    for kind in ("resid", "down"):
        assert torch.equal(sharded.dim_max[kind], one.dim_max[kind]) and torch.equal(sharded.global_max[kind],
                                                                                      one.global_max[kind])
        assert torch.equal(sharded.dim_where[kind], one.dim_where[kind])
        torch.testing.assert_close(sharded.sums[kind], one.sums[kind], rtol=1e-12, atol=0)  # added per shard
    assert torch.equal(sharded.n_seqs, one.n_seqs)
    capsys.readouterr()
    with stages.using(tmp_path):
        again = so.residual_statistics(tiny_model, seqs, config)
    assert "stage residual_stats: reused 2 of 2" in capsys.readouterr().err
    assert again.hits == sharded.hits and torch.equal(again.sums["resid"], sharded.sums["resid"])


def test_gate_pass_by_shard_equals_one_stream_and_is_reused(planted_gated, tmp_path, capsys):  # noqa: F811
    from interp import gates, stages
    from interp.analyses import gated_attention as ga

    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(3, 200, (n,), generator=g).tolist() for n in (10, 6, 9, 4, 8, 10, 7, 5, 9)]
    config = ga.Config(batch_size=2, progress=False)
    one = gates.measure(planted_gated, seqs, batch_size=2, theta=config.sparsity_threshold, progress=False)
    with stages.using(tmp_path):
        sharded = ga.gate_pass(planted_gated, seqs, config)
    assert one[0] is not None                                   # a gated model: all three statistics
    for a, b in zip(sharded, one):
        for name, value in vars(b).items():
            mine = getattr(a, name)
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(mine, value, rtol=1e-12, atol=1e-12, msg=name)
            elif isinstance(value, dict):
                assert mine.keys() == value.keys() and all(
                    mine[k][f] == pytest.approx(value[k][f], rel=1e-12) for k in value for f in value[k]), name
            else:
                assert mine == value, name
    capsys.readouterr()
    with stages.using(tmp_path):
        ga.gate_pass(planted_gated, seqs, config)
    assert "stage gate_stats: reused 2 of 2" in capsys.readouterr().err


def test_refusal_cliff_ablation_settings_are_stored_and_reused(planted, planted_model, tmp_path, capsys):
    """Each ablation setting (scores and ASR regenerations under ablated heads) is a stage: a rerun reuses them all,
    the probe features too, and gives the same results; another --asr-limit measures every setting again."""
    from helpers import write_rollouts
    from planted import planted_rollouts

    from interp import stages
    from interp.analyses import refusal_cliff as rc

    rollouts = write_rollouts(tmp_path / "rollouts.jsonl", planted_rollouts(planted))
    options = dict(rollouts=str(rollouts), max_new_tokens=4, asr_limit=2, ablation_fractions=(0.1,), progress=False,
                   asr_regenerate="response", random_draws=2)

    def run(**changed):
        with stages.using(tmp_path / "run"):
            res = rc.run(planted_model, rc.Config(**{**options, **changed})).to_dict()
        return res, capsys.readouterr().err

    first, err = run()
    assert "reused" not in err
    again, err = run()
    settings = len(list((tmp_path / "run" / "stages").glob("ablation-*")))  # baseline, top heads, random draws
    assert settings >= 3 and err.count("stage ablation: reused 1 of 1") == settings
    assert "stage probe_features: reused" in err
    assert json.dumps(again, sort_keys=True) == json.dumps(first, sort_keys=True)
    _, err = run(asr_limit=3)
    assert "stage ablation" not in err and "stage probe_features: reused" in err
