"""benchmarks/paper_scale.py (issue 16 §2) on a tiny shape, so the harness keeps working: every requested
(analysis, T) cell in the JSON with its memory and time, the target check and the table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("paper_scale", ROOT / "benchmarks" / "paper_scale.py")
paper_scale = importlib.util.module_from_spec(_spec)
sys.modules["paper_scale"] = paper_scale
_spec.loader.exec_module(paper_scale)

TINY = ["--layers", "2", "--d-model", "64", "--heads", "4", "--kv-heads", "2", "--d-mlp", "128", "--vocab", "1000"]


def _run(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "paper_scale.json"
    result = paper_scale.main([*TINY, "--cache-dir", str(tmp_path / "cache"), "--out", str(out), *extra])
    written = json.loads(out.read_text())
    assert written == json.loads(json.dumps(result))  # what it returns is what it wrote
    return written


def _check_cells(result: dict, analyses: list[str], lengths: list[int]) -> None:
    want = {(a, None) if a in paper_scale.T_INDEPENDENT else (a, T) for a in analyses for T in lengths}
    cells = {(c["analysis"], c["T"]): c for c in result["cells"]}
    assert set(cells) == want and len(result["cells"]) == len(want)
    for key, c in cells.items():
        assert c["status"] == "ok", (key, c.get("error"))
        assert c["above_bytes"] >= 0 and c["peak_bytes"] >= c["base_bytes"] > c["weights_bytes"] > 0
        assert c["time_s"] >= 0 and c["git"]["commit"]
        if c["analysis"] != "forward":
            assert c["output_bytes"] > 0 and c["write_peak_bytes"] >= c["peak_bytes"]
    for name in analyses:
        if name in paper_scale.ANALYSES:
            t = result["targets"][name]
            assert t["cap_ok"] is True  # a tiny model is far below 1.5 GiB
            assert t["growth_ok"] in (True, None)
    table = paper_scale.table(result)
    assert all(f"| {a} |" in table for a in analyses)


def test_paper_scale_harness(tmp_path):
    """Three cells per length in this process (the reference forward, instability's replayed generation and
    its teacher-forced pass, gated_attention's text set): inputs, settings, memory, JSON, targets, --resume."""
    analyses, lengths = ["forward", "instability", "gated_attention"], [64, 128]
    result = _run(tmp_path, "--in-process", "--lengths", *map(str, lengths), "--analyses", *analyses)
    _check_cells(result, analyses, lengths)
    assert result["shape"]["layers"] == 2 and result["shape"]["vocab"] == 1000
    assert result["pattern_bytes"] == {"64": 4 * 64 * 64 * 4, "128": 4 * 128 * 128 * 4}
    first = {(c["analysis"], c["T"]): c["finished"] for c in result["cells"]}
    again = _run(tmp_path, "--in-process", "--resume", "--lengths", *map(str, lengths), "--analyses", *analyses)
    assert {(c["analysis"], c["T"]): c["finished"] for c in again["cells"]} == first  # nothing rerun
    rerun = _run(tmp_path, "--in-process", "--resume", "--rerun", "forward", "--lengths", *map(str, lengths),
                 "--analyses", *analyses)
    _check_cells(rerun, analyses, lengths)
    assert sorted((c["analysis"], c["T"]) for c in rerun["superseded"]) == [("forward", 64), ("forward", 128)]
    part = _run(tmp_path, "--in-process", "--resume", "--lengths", "64", "--analyses", "forward")
    _check_cells(part, analyses, lengths)  # the cells not asked for this time stay
    table = paper_scale.summary_table(part)
    assert table.count("\n") == 1 + len(analyses) and "| instability | " in table
    one = _run(tmp_path, "--in-process", "--resume", "--rerun", "instability@128", "--lengths", *map(str, lengths),
               "--analyses", *analyses)
    _check_cells(one, analyses, lengths)
    assert [(c["analysis"], c["T"]) for c in one["superseded"]][-1] == ("instability", 128)
    kept = {(c["analysis"], c["T"]): c["finished"] for c in one["cells"] if c["analysis"] == "instability"}
    assert kept[("instability", 64)] == first[("instability", 64)] != kept[("instability", 128)]


@pytest.mark.slow
def test_paper_scale_every_analysis(tmp_path):
    """Every analysis at T = 64 and 128 (talking_heads once) with the benchmark's small settings."""
    analyses = [*paper_scale.ANALYSES, *paper_scale.REFERENCES]
    result = _run(tmp_path, "--in-process", "--lengths", "64", "128")
    _check_cells(result, analyses, [64, 128])


@pytest.mark.slow
def test_paper_scale_fresh_process(tmp_path):
    """The real path: one fresh process per cell, its peak read from /proc (VmHWM) after the load."""
    result = _run(tmp_path, "--lengths", "64", "--analyses", "forward", "instability")
    _check_cells(result, ["forward", "instability"], [64])
    assert all(not c.get("in_process") and c["rss_loaded_bytes"] == c["base_bytes"] for c in result["cells"])
