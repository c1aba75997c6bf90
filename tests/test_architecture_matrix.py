"""Every analysis on a tiny random checkpoint of every family: it runs to the end with finite headline numbers, or
stops before the heavy work with `<analysis> does not apply to <family>: <reason>`; the README's table says which.

The cells and their small settings are benchmarks/architecture_matrix.py's (which also prints the README table)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from interp.tiny import FAMILIES

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("architecture_matrix", ROOT / "benchmarks" / "architecture_matrix.py")
matrix = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(matrix)


def readme_table() -> dict[str, dict[str, str]]:
    """family → analysis → cell text of the README's family × analysis table."""
    lines = ROOT.joinpath("README.md").read_text().splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("| family | `"))
    analyses = re.findall(r"`(\w+)`", lines[header])
    table = {}
    for line in lines[header + 2:]:
        if not line.startswith("| `"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        table[cells[0].strip("`")] = dict(zip(analyses, cells[1:]))
    return table


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_analysis_runs_or_says_why_not(family, family_models, tmp_path):
    table = readme_table()
    assert family in table, f"README's architecture table has no row for {family}"
    for analysis in matrix.SMALL:
        status, detail = matrix.run_cell(family_models[family], analysis, tmp_path)
        assert status != "error", f"{analysis} on {family}: {detail}"
        assert table[family][analysis] == ("✓" if status == "ok" else detail), (
            f"README cell {family} × {analysis} is {table[family][analysis]!r}; the run says {status} {detail}")


def test_the_readme_table_has_every_family_and_analysis():
    table = readme_table()
    assert list(table) == list(FAMILIES)
    assert all(list(row) == list(matrix.SMALL) for row in table.values())
