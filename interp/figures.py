"""Plotly figure helpers every analysis report uses: mean ± s.e. bands, layer × head heatmaps,
intervention-vs-control bars. Each takes plain data and returns (or draws into) a `go.Figure`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

SELECTION_COLOURS = {"selected": "#d62728", "random": "#7f7f7f"}


def band(fig: go.Figure, x: Sequence[float], mean: Sequence[float], se: Sequence[float], name: str,
         colour: str, markers: bool = False) -> go.Figure:
    """Draw a mean line with a shaded ±1 s.e. band into `fig`; returns `fig`."""
    x, mean, se = list(x), np.asarray(mean, dtype=float), np.asarray(se, dtype=float)
    fig.add_trace(go.Scatter(x=x, y=mean, name=name, mode="lines+markers" if markers else "lines",
                             line=dict(color=colour)))
    fig.add_trace(go.Scatter(x=x + x[::-1], y=list(mean + se) + list(mean - se)[::-1], fill="toself",
                             fillcolor=colour, opacity=0.15, line=dict(width=0), showlegend=False, hoverinfo="skip"))
    return fig


def layer_head_heatmap(grid, title: str, colorbar_title: str = "score", diverging: bool = True,
                       x_title: str = "head", y_title: str = "layer") -> go.Figure:
    """A layer × head grid (rows = layers); diverging colours centred on 0, or sequential from 0."""
    grid = np.asarray(grid, dtype=float)
    finite = grid[np.isfinite(grid)]
    if diverging:
        bound = float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0
        scale = dict(colorscale="RdBu", zmin=-bound, zmax=bound)
    else:
        scale = dict(colorscale="Viridis")
    fig = go.Figure(go.Heatmap(z=grid, colorbar=dict(title=colorbar_title), **scale,
                               hovertemplate=f"{y_title} %{{y}} {x_title} %{{x}}: %{{z:.4g}}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title)
    return fig


def intervention_bars(rows: Sequence[Mapping], metrics: Sequence[str], baseline: Mapping[str, float] | None = None,
                      title: str = "Intervention vs random control", titles: Sequence[str] | None = None) -> go.Figure:
    """One panel per metric: a bar per `row["label"]` and `row["selection"]` ("selected" or "random");
    `<metric>_sd` in a row draws an error bar (± sd over the control's draws); `baseline[metric]` a dashed line."""
    fig = make_subplots(rows=1, cols=len(metrics), subplot_titles=list(titles or metrics))
    selections = list(dict.fromkeys(r["selection"] for r in rows))
    for col, metric in enumerate(metrics, start=1):
        for selection in selections:
            part = [r for r in rows if r["selection"] == selection]
            sd = [r.get(f"{metric}_sd") for r in part]
            has_sd = any(s is not None for s in sd)
            error = dict(type="data", array=[s or 0.0 for s in sd], visible=True) if has_sd else None
            fig.add_trace(go.Bar(x=[str(r["label"]) for r in part], y=[r[metric] for r in part], error_y=error,
                                 name=str(selection), marker_color=SELECTION_COLOURS.get(selection),
                                 showlegend=col == 1), row=1, col=col)
        if baseline is not None and baseline.get(metric) is not None:
            fig.add_hline(y=baseline[metric], line_dash="dash", annotation_text="no intervention", row=1, col=col)
    fig.update_layout(title=title, barmode="group")
    return fig
