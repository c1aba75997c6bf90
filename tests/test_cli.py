"""The command line: user errors are one line + exit 2; a full run writes report, results and tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from helpers import XSS, assert_user_error, console_errors, load_with_probe, page_events, run_cli, write_rollouts

from interp.run import main


@pytest.fixture(scope="module")
def rollouts_file(planted, tmp_path_factory):
    from planted import planted_rollouts

    rows = planted_rollouts(planted)
    rows[8] = {**rows[8], "prompt": rows[8]["prompt"] + " " + XSS}  # a complied-harmful example
    return write_rollouts(tmp_path_factory.mktemp("cli") / "rollouts.jsonl", rows)


@pytest.fixture(scope="module")
def cli_run(planted, rollouts_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_out") / "run"
    code = main(["refusal_cliff", "--model", str(planted.path), "--rollouts", str(rollouts_file), "--out", str(out),
                 "--device", "cpu", "--probe-lr", "0.1", "--probe-epochs", "40", "--max-new-tokens", "4",
                 "--asr-limit", "2", "--ablation-fractions", "0.1", "--head-methods", "projection", "attribution",
                 "--no-progress"])
    assert code == 0
    return out


def test_list_prints_analyses_models_and_datasets(capsys):
    code, out, _ = run_cli(capsys, "--list")
    assert code == 0
    for name in ("refusal_cliff", "tiny", "qwen", "r1-8b", "builtin-harmful"):
        assert name in out


def test_full_run_writes_everything(cli_run, planted):
    names = {p.name for p in cli_run.iterdir()}
    assert {"report.html", "results.json", "examples.csv", "curves.csv", "tail.csv", "head_rankings.csv",
            "ablation.csv", "cliff_as_a_judge.jsonl"} <= names
    results = json.loads((cli_run / "results.json").read_text())
    assert results["analysis"] == "refusal_cliff"
    assert (results["heads"][0]["layer"], results["heads"][0]["head"]) == planted.suppressor
    assert results["config"]["probe_lr"] == 0.1 and results["config"]["ablation_fractions"] == [0.1]
    assert len(pd.read_csv(cli_run / "examples.csv")) == 24


def test_report_escapes_prompts(cli_run):
    html = (cli_run / "report.html").read_text()
    assert XSS not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html


def test_report_opens_in_chromium_without_errors(cli_run, tmp_path):

    dom, stderr = load_with_probe((cli_run / "report.html").read_text(), tmp_path)
    assert dom.count('class="plot-container plotly"') == 5  # curves, tail, 2 heatmaps, ablation: all drawn
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in dom and XSS not in dom
    assert page_events(dom) == "" and console_errors(stderr) == []


def test_existing_output_is_never_overwritten(capsys, cli_run, planted, rollouts_file):
    before = (cli_run / "results.json").read_bytes()
    code, _, err = run_cli(capsys, "refusal_cliff", "--model", str(planted.path), "--rollouts", str(rollouts_file),
                           "--out", str(cli_run))
    assert_user_error(code, err, "--force")
    assert (cli_run / "results.json").read_bytes() == before


@pytest.mark.parametrize("argv, fragment", [
    (["no_such_analysis"], "unknown analysis"),
    (["--model", "organism", "refusal_cliff", "--batch-size", "0"], "batch-size must be at least 1"),
    ([], "name an analysis"),
    (["refusal_cliff", "--model", "notamodel"], "unknown model"),
    (["refusal_cliff", "--model", "./no/such/dir"], "not found"),
    (["refusal_cliff", "--limit", "abc"], "invalid int"),
    (["refusal_cliff", "--no-such-option"], "unrecognized"),
    (["refusal_cliff", "--dtype", "int3"], "dtype"),
])
def test_user_errors_are_one_line(capsys, tmp_path, argv, fragment):
    code, _, err = run_cli(capsys, *argv, "--out", str(tmp_path / "o"))
    assert_user_error(code, err, fragment)


def test_data_errors_are_one_line(capsys, tmp_path, planted):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "thinking": "b", "response": "c"}\nnot json\n')
    common = ["--model", str(planted.path), "--device", "cpu", "--no-progress"]
    code, _, err = run_cli(capsys, "refusal_cliff", *common, "--rollouts", str(bad), "--out", str(tmp_path / "a"))
    assert_user_error(code, err, "line 2")
    code, _, err = run_cli(capsys, "refusal_cliff", *common, "--harmful", "no-such-set", "--out", str(tmp_path / "b"))
    assert_user_error(code, err, "no-such-set")
    good = tmp_path / "good.jsonl"
    good.write_text(bad.read_text().splitlines()[0] + "\n")
    code, _, err = run_cli(capsys, "refusal_cliff", *common, "--rollouts", str(good), "--probe-layer", "7",
                           "--out", str(tmp_path / "c"))
    assert_user_error(code, err, "out of range")


def test_prompt_longer_than_context_is_a_user_error(capsys, tmp_path, planted):
    long = tmp_path / "long.jsonl"
    row = {"prompt": "word " * 3000, "thinking": "x", "response": "I'm sorry", "kind": "harmful"}
    harmless = {"prompt": "hi", "thinking": "x", "response": "Sure", "kind": "harmless"}
    long.write_text(json.dumps(row) + "\n" + json.dumps(harmless) + "\n")
    code, _, err = run_cli(capsys, "refusal_cliff", "--model", str(planted.path), "--device", "cpu",
                           "--rollouts", str(long), "--out", str(tmp_path / "o"), "--no-progress")
    assert_user_error(code, err, "context")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_cuda_requested_without_cuda(capsys, tmp_path, planted):
    code, _, err = run_cli(capsys, "refusal_cliff", "--model", str(planted.path), "--device", "cuda",
                           "--out", str(tmp_path / "o"), "--no-progress")
    assert_user_error(code, err, "CUDA")


@pytest.mark.slow
def test_real_process_exit_code_and_stderr(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "interp.run", "refusal_cliff", "--model", "nobody-xyz/not-a-model",
                           "--out", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert_user_error(proc.returncode, proc.stderr, "local directory")
