"""The refusal_cliff notebook runs top to bottom through the Python API."""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "refusal_cliff.ipynb"


def test_refusal_cliff_notebook_executes(tmp_path, monkeypatch, planted):
    from planted import planted_rollouts
    from test_refusal_cliff import write_rollouts

    rollouts = write_rollouts(tmp_path / "rollouts.jsonl", planted_rollouts(planted))
    monkeypatch.setenv("INTERP_MODEL", str(planted.path))
    monkeypatch.setenv("INTERP_ROLLOUTS", str(rollouts))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    report = tmp_path / "refusal_cliff_report.html"
    assert report.exists() and "plotly" in report.read_text()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    probe_cell = nb.cells[2]["outputs"][-1]["data"]["text/plain"]
    assert "val_accuracy" in probe_cell
