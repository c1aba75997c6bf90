"""Tests for interp.report (escaping, offline HTML, headless Chromium) and interp.outputs."""

from __future__ import annotations

import dataclasses
import json
import re
from html import escape
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.offline
import pytest
import torch
from helpers import console_errors, load_with_probe, page_events

from interp.errors import UserError
from interp.outputs import environment_info, prepare_output_dir, to_jsonable, write_results
from interp.report import Report

PAYLOAD = "<script>alert(1)</script>"
ESCAPED = escape(PAYLOAD)
BREAKOUT = "</script><script>alert(1)</script>"

def _figure(title: str) -> go.Figure:
    fig = go.Figure(go.Bar(x=["a", PAYLOAD], y=[1.0, 2.0], hovertext=[BREAKOUT, "ok"]))
    fig.update_layout(title=title)
    return fig


def _render_one(add) -> str:
    rep = Report(title="t")
    add(rep)
    return rep.render()


@pytest.mark.parametrize(
    "add",
    [
        pytest.param(lambda r: r.add_paragraph(f"prompt: {PAYLOAD}"), id="paragraph"),
        pytest.param(lambda r: r.add_heading(PAYLOAD), id="heading"),
        pytest.param(lambda r: r.add_notice(PAYLOAD, level="warning"), id="notice"),
        pytest.param(lambda r: r.add_table(pd.DataFrame({"prompt": [PAYLOAD], "p": [0.5]})), id="table-cell"),
        pytest.param(lambda r: r.add_table(pd.DataFrame({PAYLOAD: [1]})), id="table-header"),
        pytest.param(lambda r: r.add_table(pd.DataFrame({"a": [1]}), caption=PAYLOAD), id="table-caption"),
        pytest.param(lambda r: r.add_metrics({PAYLOAD: 0.5}), id="metric-name"),
        pytest.param(lambda r: r.add_metrics({"m": PAYLOAD}), id="metric-value"),
        pytest.param(lambda r: r.add_config({"model": {"name": PAYLOAD}, PAYLOAD: [1, 2]}), id="config"),
        pytest.param(lambda r: r.add_token_view(["a", PAYLOAD], [0.1, 0.9]), id="token-view"),
        pytest.param(lambda r: r.add_token_view(["a"], [0.1], caption=PAYLOAD), id="token-caption"),
    ],
)
def test_untrusted_text_is_escaped(add) -> None:
    html = _render_one(add)
    assert PAYLOAD not in html
    assert ESCAPED in html
    assert "<script" not in html  # no figure, so no script at all


def test_title_is_escaped() -> None:
    html = Report(title=PAYLOAD).render()
    assert PAYLOAD not in html
    assert f"<title>{ESCAPED}</title>" in html


def test_figure_json_cannot_break_out_of_its_script() -> None:
    html = _render_one(lambda r: r.add_figure(_figure(BREAKOUT), caption=PAYLOAD))
    assert PAYLOAD not in html and BREAKOUT not in html
    assert html.count("<script") == 2  # plotly.js + the figure's newPlot call
    assert html.count("</script>") == 2
    assert f"<figcaption>{ESCAPED}</figcaption>" in html


def test_plotly_js_inlined_once_and_nothing_external() -> None:
    rep = Report(title="two figures")
    rep.add_figure(_figure("first"))
    rep.add_figure(_figure("second"))
    html = rep.render()
    plotly_js = plotly.offline.get_plotlyjs()
    assert html.count(plotly_js) == 1
    assert html.count("Plotly.newPlot(") == 2
    # plotly.js itself mentions CDN URLs (geo topojson, map icons) that only geo/map traces fetch.
    page = html.replace(plotly_js, "")
    for external in ('src="http', "src='http", 'href="http', "https://cdn", "@import", "url("):
        assert external not in page
    assert "http://" not in page and "https://" not in page


def test_no_plotly_js_without_figures() -> None:
    assert "<script" not in _render_one(lambda r: r.add_paragraph("x"))


def test_token_view_colours_scores_and_shows_whitespace() -> None:
    html = _render_one(lambda r: r.add_token_view(["lo", "\n", "hi", "\t"], [0.0, 0.5, 1.0, float("nan")]))
    spans = re.findall(r'<span class="tok" style="background:([^"]+)" title="([^"]+)">(.*?)</span>', html, re.S)
    assert spans == [
        ("rgb(255,255,255)", "0", "lo"),
        ("rgb(255,128,128)", "0.5", "↵\n"),
        ("rgb(255,0,0)", "1", "hi"),
        ("#d0d0d0", "nan", "⇥"),
    ]


def test_token_view_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError):
        Report(title="t").add_token_view(["a", "b"], [0.1])


def test_metrics_and_table_format_numbers() -> None:
    rep = Report(title="t")
    rep.add_metrics({"acc": np.float32(0.98123456), "n": torch.tensor(12)})
    rep.add_table(pd.DataFrame({"x": range(60)}), max_rows=5)
    html = rep.render()
    assert '<div class="value">0.9812</div>' in html and '<div class="value">12</div>' in html
    assert html.count('<td class="num">') == 5 and "Showing the first 5 of 60 rows." in html


def test_toc_links_level2_headings() -> None:
    rep = Report(title="t")
    rep.add_heading("Probe")
    rep.add_heading("Detail", level=3)
    rep.add_heading("Steering")
    html = rep.render()
    assert re.findall(r'<li><a href="#(sec-\d+)">', html) == re.findall(r'<h2 id="(sec-\d+)">', html)
    assert len(re.findall(r"<li>", html)) == 2


def test_write_creates_file(tmp_path: Path) -> None:
    out = Report(title="t").write(tmp_path / "sub" / "report.html")
    assert out.read_text(encoding="utf-8").startswith("<!DOCTYPE html>")


# --- interp.outputs -------------------------------------------------------------------------


def test_prepare_output_dir_default_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    out = prepare_output_dir(None, "refusal_cliff", "meta-llama/Llama 3.2:1B")
    assert not out.exists()  # write_run creates it whole
    assert re.fullmatch(r"runs/refusal_cliff-meta-llama_Llama_3\.2_1B-\d{8}-\d{6}", out.as_posix())


def test_prepare_output_dir_refuses_non_empty_without_force(tmp_path: Path) -> None:
    (tmp_path / "old.txt").write_text("keep")
    with pytest.raises(UserError) as info:
        prepare_output_dir(tmp_path, "a", "m")
    message = str(info.value)
    assert "\n" not in message and "--force" in message and "--out" in message
    assert prepare_output_dir(tmp_path, "a", "m", force=True) == tmp_path
    assert (tmp_path / "old.txt").read_text() == "keep"


def test_prepare_output_dir_accepts_new_or_empty_dir(tmp_path: Path) -> None:
    assert prepare_output_dir(tmp_path, "a", "m") == tmp_path
    assert prepare_output_dir(tmp_path / "x" / "y", "a", "m") == tmp_path / "x" / "y"


def test_prepare_output_dir_refuses_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(UserError):
        prepare_output_dir(tmp_path / "f", "a", "m", force=True)


@dataclasses.dataclass
class _Cfg:
    path: Path
    layers: tuple[int, ...]


def test_write_results_round_trip(tmp_path: Path) -> None:
    df = pd.DataFrame({"layer": [0, 1], "acc": [0.5, float("nan")], "prompt": ["a,b", 'say "hi"\n']})
    results = {
        "acc": np.float32(0.25),
        "nan": float("nan"),
        "inf": np.float64("inf"),
        "vec": torch.tensor([1.0, float("nan")]),
        "arr": np.arange(3),
        "cfg": _Cfg(Path("/x/y"), (1, 2)),
        "df": df,
        3: "int key",
    }
    paths = write_results(tmp_path, results, {"per layer": df})
    assert set(paths) == {"results.json", "per_layer.csv"}
    loaded = json.loads(paths["results.json"].read_text(encoding="utf-8"))
    assert loaded == {
        "acc": 0.25,
        "nan": None,
        "inf": None,
        "vec": [1.0, None],
        "arr": [0, 1, 2],
        "cfg": {"path": "/x/y", "layers": [1, 2]},
        "df": [
            {"layer": 0, "acc": 0.5, "prompt": "a,b"},
            {"layer": 1, "acc": None, "prompt": 'say "hi"\n'},
        ],
        "3": "int key",
    }
    pd.testing.assert_frame_equal(pd.read_csv(paths["per_layer.csv"]), df)


def test_to_jsonable_rejects_unknown_types() -> None:
    with pytest.raises(TypeError):
        to_jsonable(object())


def test_environment_info_is_json_ready() -> None:
    info = environment_info()
    assert {"python", "platform", "torch", "transformers", "transformer_lens", "interp", "cuda_available"} <= set(info)
    assert json.loads(json.dumps(info)) == info


# --- headless Chromium ------------------------------------------------------------------------


def test_chromium_probe_catches_scripts_and_errors(tmp_path: Path) -> None:
    page = f"<html><head></head><body>{PAYLOAD}<script>missing()</script></body></html>"
    dom, stderr = load_with_probe(page, tmp_path)
    events = page_events(dom)
    assert "alert:1|" in events and "error:" in events and "missing" in events
    assert any("Uncaught ReferenceError" in line for line in console_errors(stderr))


def test_report_renders_in_headlesschromium(tmp_path: Path) -> None:
    rep = Report(title=f"report {PAYLOAD}")
    rep.add_heading("Figures")
    rep.add_figure(_figure(f"first {BREAKOUT}"), caption="first")
    rep.add_figure(_figure("second"), caption=PAYLOAD)
    rep.add_heading("Data")
    rep.add_table(pd.DataFrame({"prompt": [f"How do I {PAYLOAD}?"], "score": [0.9]}))
    rep.add_token_view(["How", " do", " I", f" {PAYLOAD}", "\n", "?"], [0.1, 0.2, 0.3, 0.95, 0.5, 0.0])

    dom, stderr = load_with_probe(rep.render(), tmp_path)

    assert dom.count('class="main-svg"') >= 2 * 2  # plotly.js ran and drew both figures
    assert dom.count('class="plot-container plotly"') == 2
    assert f" {ESCAPED}</span>" in dom  # token shown as text
    assert f"How do I {ESCAPED}?</td>" in dom
    assert PAYLOAD not in dom and "alert(1)</script>" not in dom
    assert len(re.findall(r"<script\b", dom)) == 1 + 1 + 2  # probe, plotly.js, two figures
    assert page_events(dom) == ""
    assert console_errors(stderr) == []
