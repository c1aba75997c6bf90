"""Helpers the test modules share (test modules never import each other)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from interp.run import main

XSS = "<script>alert(1)</script>"


def write_rollouts(path, rollouts):
    """Write planted rollouts as a refusal_cliff rollout file (kinds folded to harmful / harmless)."""
    with open(path, "w") as f:
        for r in rollouts:
            kind = "harmless" if r["kind"].startswith("harmless") else "harmful"
            f.write(json.dumps({**r, "kind": kind}) + "\n")
    return path


# --- the command line ---------------------------------------------------------------------------


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(code: int, err: str, fragment: str) -> None:
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert fragment in lines[0]
    assert "Traceback" not in err


# --- headless Chromium ------------------------------------------------------------------------

# Prepended to the page under test: records alerts, uncaught errors and console.error calls in an
# attribute of <html>, so that --dump-dom shows them (and a real alert() cannot block the browser).
_PROBE = """<script>
(function () {
  var root = document.documentElement;
  function note(msg) {
    root.setAttribute("data-test-events", (root.getAttribute("data-test-events") || "") + msg + "|");
  }
  window.alert = function (m) { note("alert:" + m); };
  window.addEventListener("error", function (e) { note("error:" + e.message); });
  window.addEventListener("unhandledrejection", function (e) { note("rejection:" + e.reason); });
  var consoleError = console.error;
  console.error = function () {
    note("console.error:" + Array.prototype.join.call(arguments, " "));
    consoleError.apply(console, arguments);
  };
})();
</script>"""


def chromium() -> str:
    """Path of `chromium`; skip when missing, except under CI where it must be installed."""
    path = shutil.which("chromium")
    if path is None:
        reason = "chromium not on PATH (apt-get install -y chromium)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; CI must install it")
        pytest.skip(reason)
    return path


def _dump_dom(html_file: Path, profile: Path) -> tuple[str, str]:
    """Load `html_file` in headless Chromium; return (serialised DOM after load, stderr)."""
    cmd = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--dump-dom", html_file.as_uri(),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout, proc.stderr


def load_with_probe(html: str, tmp_path: Path) -> tuple[str, str]:
    """Write `html` with the probe prepended to <head>, load it; return (DOM, Chromium stderr)."""
    page = tmp_path / "page.html"
    page.write_text(html.replace("<head>", "<head>\n" + _PROBE, 1), encoding="utf-8")
    return _dump_dom(page, tmp_path / "profile")


def page_events(dom: str) -> str:
    """What the probe recorded on <html>: alerts, uncaught errors, console.error calls."""
    html_tag = re.search(r"<html[^>]*>", dom)
    assert html_tag is not None
    events = re.search(r'data-test-events="([^"]*)"', html_tag.group(0))
    return events.group(1) if events else ""


def console_errors(stderr: str) -> list[str]:
    """Page console lines in Chromium's log that report an uncaught exception or an error."""
    console = (line for line in stderr.splitlines() if ":CONSOLE" in line)
    return [line for line in console if "Uncaught" in line or "rror" in line]
