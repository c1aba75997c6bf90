"""benchmarks/gpu_check.sh and its Python pieces, as far as a CPU goes (no GPU here): every piece accepts the options
the script passes, the out-of-memory and device-map pieces pass on the tiny model, the table reads every step."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
sys.modules["gpu_check"] = gpu_check
_spec.loader.exec_module(gpu_check)


@pytest.mark.slow
def test_every_piece_accepts_the_options_the_script_passes():
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--check-flags"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout + done.stderr
    steps = [line.split()[1] for line in done.stdout.splitlines() if line.startswith("ok ")]
    assert steps == ["env", "paper_scale", "capture", "generation", "oom", "device_map", "vllm", "paper_scale_7b",
                     "table"]


def test_oom_and_device_map_pieces_on_the_cpu(tiny_dir, tmp_path, capsys):
    common = ["--checkpoint", str(tiny_dir), "--dtype", "float32", "--length", "12"]
    oom = gpu_check.main(["oom", *common, "--device", "cpu", "--seqs", "6", "--inject", "2",
                          "--out", str(tmp_path / "oom.json")])
    assert oom["status"] == "ok" and oom["fitted"]["capture"] and oom["fitted"]["residual"]
    assert oom["capture_max_rel_diff"] < 1e-5 and oom["stats_max_rel_diff"] < 1e-5
    split = gpu_check.main(["device-map", *common, "--new", "4", "--out", str(tmp_path / "map.json")])
    assert split["status"] == "ok" and split["n_devices"] == 2 and "disk" in split["placed"].values()
    (tmp_path / "vllm.json").write_text(json.dumps({"piece": "vllm", "status": "skipped", "why": "no vllm"}))
    (tmp_path / "capture.log").write_text("max relative difference interp vs HF: 1.2e-07 (ok); eager path vs HF: 0\n"
                                          "interp capture / HF SDPA = 1.050 (target <= 1.10): PASS\n")
    gpu_check.main(["capture-log", str(tmp_path / "capture.log"), "--out", str(tmp_path / "capture_vs_hf.json")])
    (tmp_path / "generation_failed.json").write_text(json.dumps({"piece": "generation", "status": "FAIL",
                                                                 "why": "exit 124"}))
    capsys.readouterr()
    text = gpu_check.main(["table", str(tmp_path)])
    lines = text.splitlines()[2:]
    assert len(lines) == 5 and all(" | " in line for line in lines)
    assert any("OOM backoff" in line and "| ok " in line for line in lines)
    assert any("capture / HF" in line and "1.050" in line and "| ok " in line for line in lines)
    assert any("generation" in line and "FAIL" in line for line in lines)
