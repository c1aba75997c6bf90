"""Regenerate the figures the README shows, from example runs on the shipped organisms.

    python figures/make_figures.py          # needs `chromium` on PATH to render PNGs

Each figure is the report's own plotly figure, rendered to PNG by headless Chromium.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent


def render_png(fig, path: Path, width: int = 900, height: int = 450) -> None:
    """Write `fig` as a PNG through headless Chromium (no kaleido, no network)."""
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("error: chromium is needed to render PNGs (apt-get install chromium)")
    fig.update_layout(width=width, height=height, margin=dict(l=60, r=20, t=50, b=50))
    with tempfile.TemporaryDirectory() as tmp:
        page = Path(tmp) / "figure.html"
        fig.write_html(page, include_plotlyjs=True, full_html=True, config={"displayModeBar": False})
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync",
                        f"--user-data-dir={tmp}/profile", "--hide-scrollbars", f"--window-size={width},{height}",
                        f"--screenshot={path}", page.as_uri()], check=True, capture_output=True, timeout=120)


def main() -> None:
    from interp.analyses import refusal_cliff as rc
    from interp.analysis import config_for
    from interp.models import load_model

    model = load_model("organism", device="cpu")
    result = rc.run(model, config_for("refusal_cliff", model, progress=False))
    render_png(rc.curve_figure(result.curves, result.config.curve_method), HERE / "refusal_cliff_organism_curve.png")
    render_png(rc.tail_figure(result.tail), HERE / "refusal_cliff_organism_tail.png")
    print(f"wrote figures to {HERE}")


if __name__ == "__main__":
    main()
