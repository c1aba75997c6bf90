"""Every notebook in notebooks/ runs top to bottom through the Python API without an error."""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def execute(path: Path, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.get("output_type") == "error"]
    assert not errors
    return nb


@pytest.mark.slow
def test_refusal_cliff_notebook_executes(tmp_path, monkeypatch, planted):
    from helpers import write_rollouts
    from planted import planted_rollouts

    rollouts = write_rollouts(tmp_path / "rollouts.jsonl", planted_rollouts(planted))
    monkeypatch.setenv("INTERP_MODEL", str(planted.path))
    monkeypatch.setenv("INTERP_ROLLOUTS", str(rollouts))
    monkeypatch.setenv("INTERP_OPTIONS", json.dumps({"max_new_tokens": 24, "probe_lr": 0.1, "asr_limit": 4,
                                                     "ablation_fractions": [0.1, 0.25]}))
    nb = execute(Path(__file__).parents[1] / "notebooks" / "refusal_cliff.ipynb", tmp_path)
    report = tmp_path / "refusal_cliff_report.html"
    assert report.exists() and "plotly" in report.read_text()
    assert "val_accuracy" in nb.cells[2]["outputs"][-1]["data"]["text/plain"]


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.stem != "refusal_cliff"], ids=lambda p: p.stem)
def test_analysis_notebook_executes_on_the_organism(path, tmp_path, monkeypatch):
    monkeypatch.delenv("INTERP_MODEL", raising=False)
    execute(path, tmp_path)
    assert list(tmp_path.glob("*.html")), "the notebook writes its report"
