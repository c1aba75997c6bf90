"""A self-contained, offline HTML report: headings, text, metrics, tables, plotly figures, token views.

Every string added to a report is HTML-escaped; plotly.js is inlined once, so the file needs no network.
"""

from __future__ import annotations

import datetime as dt
import math
import numbers
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.offline

from interp.outputs import to_jsonable

NOTICE_LEVELS = ("info", "warning", "error")

_CSS = """
:root { --fg: #1f2328; --muted: #59636e; --line: #d1d9e0; --bg-soft: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--fg); background: #fff; line-height: 1.5;
       font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 1.5rem 1rem 3rem; }
h1 { font-size: 1.7rem; margin: 0 0 1rem; overflow-wrap: anywhere; }
h2 { font-size: 1.3rem; margin: 2rem 0 .6rem; padding-bottom: .25rem; border-bottom: 1px solid var(--line); }
h3, h4 { margin: 1.4rem 0 .5rem; }
p.text { white-space: pre-line; overflow-wrap: anywhere; }
nav.toc { background: var(--bg-soft); border: 1px solid var(--line); border-radius: 6px; padding: .5rem 1rem; }
nav.toc ol { margin: .3rem 0; padding-left: 1.4rem; }
.notice { border-left: 4px solid; border-radius: 4px; padding: .6rem .9rem; margin: 1rem 0; white-space: pre-line; }
.notice.info { background: #ddf4ff; border-color: #0969da; }
.notice.warning { background: #fff8c5; border-color: #bf8700; font-weight: 600; }
.notice.error { background: #ffebe9; border-color: #cf222e; font-weight: 600; }
.metrics { display: grid; grid-template-columns: repeat(auto-fill, minmax(180px, 1fr)); gap: .6rem; margin: 1rem 0; }
.metric { border: 1px solid var(--line); border-radius: 6px; padding: .6rem .8rem; background: var(--bg-soft); }
.metric .name { color: var(--muted); font-size: .85rem; overflow-wrap: anywhere; }
.metric .value { font-size: 1.4rem; font-weight: 600; font-variant-numeric: tabular-nums; overflow-wrap: anywhere; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-size: .9rem; margin: .5rem 0; }
th, td { border: 1px solid var(--line); padding: .25rem .55rem; text-align: left; vertical-align: top; }
th { background: var(--bg-soft); }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.config td:first-child { font-weight: 600; white-space: nowrap; }
figure { margin: 1.2rem 0; }
figcaption, .note { color: var(--muted); font-size: .9rem; margin-top: .3rem; }
.tokens { white-space: pre-wrap; font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace;
          font-size: .9rem; line-height: 1.9; border: 1px solid var(--line); border-radius: 6px; padding: .6rem; }
.tok { border: 1px solid #e3e3e3; border-radius: 3px; padding: 0 1px; }
.legend { display: flex; align-items: center; gap: .4rem; color: var(--muted); font-size: .8rem; margin-top: .3rem; }
.legend .bar { width: 120px; height: .8rem; border: 1px solid var(--line);
               background: linear-gradient(to right, #fff, #f00); }
footer { margin-top: 3rem; color: var(--muted); font-size: .8rem; }
"""

_VISIBLE_WHITESPACE = {"\r\n": "↵\n", "\n": "↵\n", "\r": "␍", "\t": "⇥"}


def _scalar(value: Any) -> Any:
    """Unwrap 0-d numpy/torch values into Python scalars."""
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
        return value.item()
    return value


def format_value(value: Any) -> str:
    """Human-readable text for a metric or table cell (not escaped): floats get 4 significant digits."""
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral):
        return str(int(value))
    return f"{float(value):.4g}"


def _is_number(value: Any) -> bool:
    value = _scalar(value)
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _score_colour(score: float, vmin: float, vmax: float) -> str:
    """White at `vmin` to red at `vmax` (clipped); grey for NaN."""
    if math.isnan(score):
        return "#d0d0d0"
    t = min(1.0, max(0.0, (score - vmin) / (vmax - vmin)))
    g = round(255 * (1 - t))
    return f"rgb(255,{g},{g})"


def _visible_token(token: str) -> str:
    """Escaped token with newlines shown as ↵ (keeping the line break) and tabs/CRs as symbols."""
    text = escape(token)
    for raw, shown in _VISIBLE_WHITESPACE.items():
        text = text.replace(raw, shown)
    return text


def _config_html(value: Any) -> str:
    """Escaped HTML for JSON-like config data; dicts and lists of non-scalars become nested tables."""
    if isinstance(value, dict):
        rows = "".join(f"<tr><td>{escape(str(k))}</td><td>{_config_html(v)}</td></tr>" for k, v in value.items())
        return f'<table class="config">{rows}</table>'
    if isinstance(value, list):
        if any(isinstance(v, (dict, list)) for v in value):
            return _config_html(dict(enumerate(value)))
        return escape(", ".join(str(v) for v in value))
    return escape(str(value))


class Report:
    """Builds one self-contained HTML page; add blocks in order, then `write`."""

    def __init__(self, title: str) -> None:
        self.title = title
        self._blocks: list[str] = []
        self._sections: list[tuple[str, str]] = []
        self._has_figure = False

    def add_heading(self, text: str, level: int = 2) -> None:
        """A section heading (level 2-4); level-2 headings make the table of contents."""
        if level not in (2, 3, 4):
            raise ValueError(f"heading level must be 2, 3 or 4, not {level}")
        anchor = f"sec-{len(self._blocks)}"
        if level == 2:
            self._sections.append((anchor, text))
        self._blocks.append(f'<h{level} id="{anchor}">{escape(text)}</h{level}>')

    def add_paragraph(self, text: str) -> None:
        """A paragraph of plain text (escaped; line breaks kept)."""
        self._blocks.append(f'<p class="text">{escape(text)}</p>')

    def add_notice(self, text: str, level: str = "warning") -> None:
        """A highlighted banner, e.g. that the weights are random."""
        if level not in NOTICE_LEVELS:
            raise ValueError(f"notice level must be one of {NOTICE_LEVELS}, not {level!r}")
        self._blocks.append(f'<div class="notice {level}" role="note">{escape(text)}</div>')

    def add_metrics(self, metrics: Mapping[str, Any]) -> None:
        """A grid of headline numbers."""
        cells = "".join(
            f'<div class="metric"><div class="name">{escape(str(name))}</div>'
            f'<div class="value">{escape(format_value(value))}</div></div>'
            for name, value in metrics.items()
        )
        self._blocks.append(f'<div class="metrics">{cells}</div>')

    def add_link(self, text: str, href: str) -> None:
        """A link to a relative path (another file of the run, e.g. an analysis's report); both are escaped."""
        if href.startswith(("/", "\\")) or ":" in href.split("/", 1)[0]:
            raise ValueError(f"links must be relative paths, not {href!r}")
        self._blocks.append(f'<p class="text"><a href="{escape(href, quote=True)}">{escape(text)}</a></p>')

    def add_config(self, config: Any, caption: str | None = None) -> None:
        """A key/value table of run configuration (dicts, dataclasses, nested data)."""
        table = _config_html(to_jsonable(config))
        self._blocks.append(f'<div class="scroll">{table}{_note(caption)}</div>')

    def add_figure(self, fig: go.Figure, caption: str | None = None) -> None:
        """A plotly figure, rendered by the inlined plotly.js."""
        div = fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})
        self._has_figure = True
        self._blocks.append(f"<figure>{div}{_figcaption(caption)}</figure>")

    def add_table(self, df: pd.DataFrame, caption: str | None = None, max_rows: int = 50) -> None:
        """A table of the first `max_rows` rows of `df` (a non-default index is shown as columns)."""
        if not isinstance(df.index, pd.RangeIndex):
            df = df.reset_index()
        shown = df.head(max_rows)
        head = "".join(f"<th>{escape(str(c))}</th>" for c in shown.columns)
        body = "".join(f"<tr>{''.join(_cell(v) for v in row)}</tr>" for row in shown.itertuples(index=False))
        note = f"Showing the first {max_rows} of {len(df)} rows." if len(df) > max_rows else None
        self._blocks.append(
            f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
            f"{_note(caption)}{_note(note)}</div>"
        )

    def add_token_view(
        self,
        tokens: Sequence[str],
        scores: Sequence[float],
        caption: str | None = None,
        vmin: float = 0.0,
        vmax: float = 1.0,
    ) -> None:
        """Tokens as spans coloured white (`vmin`) to red (`vmax`) by score; hover shows the score."""
        if len(tokens) != len(scores):
            raise ValueError(f"{len(tokens)} tokens but {len(scores)} scores")
        if not vmax > vmin:
            raise ValueError(f"vmax ({vmax}) must be greater than vmin ({vmin})")
        spans = "".join(
            f'<span class="tok" style="background:{_score_colour(float(s), vmin, vmax)}" '
            f'title="{escape(format_value(float(s)))}">{_visible_token(t)}</span>'
            for t, s in zip(tokens, scores)
        )
        legend = (
            f'<div class="legend">{escape(format_value(vmin))}<span class="bar"></span>'
            f"{escape(format_value(vmax))}</div>"
        )
        self._blocks.append(f'<figure><div class="tokens">{spans}</div>{legend}{_figcaption(caption)}</figure>')

    def add_run_section(self, header: Mapping[str, Any]) -> None:
        """The closing "Run" section: model, tokenization (BOS), config and environment from the run header."""
        self.add_heading("Run")
        keys = ("model", "tokenization", "config", "environment") if header.get("tokenization") else \
            ("model", "config", "environment")
        self.add_config({k: header.get(k) for k in keys})

    def render(self) -> str:
        """The complete HTML document."""
        plotly_js = f"<script>{plotly.offline.get_plotlyjs()}</script>" if self._has_figure else ""
        stamp = dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        return (
            '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{escape(self.title)}</title>\n<style>{_CSS}</style>\n{plotly_js}\n</head>\n"
            f"<body>\n<main>\n<h1>{escape(self.title)}</h1>\n{self._toc()}\n"
            + "\n".join(self._blocks)
            + f"\n<footer>Generated by interp on {stamp}.</footer>\n</main>\n</body>\n</html>\n"
        )

    def _repr_html_(self) -> str:
        """Inline display in Jupyter: the whole document in a sandboxed frame (its styles and scripts stay inside)."""
        return (f'<iframe srcdoc="{escape(self.render())}" style="width:100%;height:800px;border:1px solid #d1d9e0" '
                'sandbox="allow-scripts"></iframe>')

    def write(self, path: str | Path) -> Path:
        """Write the report to `path` (parent directories created) and return it."""
        from interp.outputs import atomic_write_text

        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        return atomic_write_text(out, self.render())

    def _toc(self) -> str:
        if len(self._sections) < 2:
            return ""
        items = "".join(f'<li><a href="#{anchor}">{escape(text)}</a></li>' for anchor, text in self._sections)
        return f'<nav class="toc"><strong>Contents</strong><ol>{items}</ol></nav>'


def analysis_report(header: Mapping[str, Any], warnings: Sequence[str] = ()) -> Report:
    """A report framed for one run: "<analysis> — <model>" title, a notice when the weights are random, and the
    run's warnings (`Result.warnings`) at the top."""
    model = header.get("model") or {}
    title = header["analysis"] + (f" — {model['name']}" if model.get("name") else "")
    rep = Report(title=title)
    if model.get("random_weights"):
        rep.add_notice("This model has random weights: it was built by the package, not trained. Nothing below "
                       "says anything about a real model; it only shows the pipeline working.", level="warning")
    for message in warnings:
        rep.add_notice(message, level="warning")
    return rep


def _cell(value: Any) -> str:
    cls = ' class="num"' if _is_number(value) else ""
    return f"<td{cls}>{escape(format_value(value))}</td>"


def _note(text: str | None) -> str:
    return f'<div class="note">{escape(text)}</div>' if text else ""


def _figcaption(text: str | None) -> str:
    return f"<figcaption>{escape(text)}</figcaption>" if text else ""
