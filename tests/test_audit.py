"""interp audit: the organism twins side by side, a planted pair, resume, the index in Chromium, bad input."""

from __future__ import annotations

import json
import re
import shutil
from html import escape

import numpy as np
import pytest
from helpers import assert_user_error, console_errors, load_with_probe, page_events, run_cli, write_rollouts

import interp
from interp import joins
from interp.errors import UserError
from interp.report import format_value

TEXT = dict(n_chunks=16, random_draws=2)  # systematic_outliers' text options; gated_attention reads the same chunks
TWINS = {"systematic_outliers": TEXT, "gated_attention": dict(random_draws=2),
         # 16 prompts per set: the causal scan still ranks each twin's jailbreak head in its top two
         "refusal_cliff": dict(limit=16, asr_limit=4, ablation_fractions=(0.1,), random_draws=2)}
JAILBREAK_HEAD = {"organism": (0, 2), "organism-gated": (1, 1)}  # interp/organisms/README.md


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "twins"
    interp.audit("organism", compare="organism-gated", analyses=list(TWINS), out=out, options=TWINS,
                 progress=False, device="cpu")
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.slow  # ~20 s: three analyses on both twins
def test_twins_show_what_their_card_measures(twins):
    out, res = twins
    cmp = res["compare"]
    assert cmp["same_shape"] and res["model"]["name"] == "organism" and cmp["model"]["name"] == "organism-gated"
    rows = {r["analysis"]: r for r in cmp["differences"]}
    # lower M-Act in the gated twin (card: 48.9 vs 27.3), measured by both analyses on the same chunks
    for name in ("systematic_outliers", "gated_attention"):
        assert rows[name]["m_act_b"] < 0.8 * rows[name]["m_act_a"]
    # sparser attention output (card: 8-13 % of gated elements below 0.01 against 1-4 % before gating)
    assert rows["gated_attention"]["value_b"] > 2 * rows["gated_attention"]["value_a"]
    assert rows["gated_attention"]["verdict_b"] == "found"
    # the jailbreak head among each twin's refusal-suppression heads
    assert list(JAILBREAK_HEAD["organism"]) in res["joins"]["head_sets"]["refusal_suppression"]
    assert list(JAILBREAK_HEAD["organism-gated"]) in cmp["joins"]["head_sets"]["refusal_suppression"]
    assert "lowest_gate" in cmp["joins"]["head_sets"] and "lowest_gate" not in res["joins"]["head_sets"]
    # every analysis's own outputs, under its name in results.json too
    for name in TWINS:
        assert (out / "organism" / name / "report.html").is_file() and (out / "organism-gated" / name).is_dir()
        assert res[name]["analysis"] == name and cmp["analyses"][name]["analysis"] == name
    assert res["shared"]["text_chunks"] == ["systematic_outliers", "gated_attention"]
    assert res["systematic_outliers"]["text_set"]["n_chunks"] == TEXT["n_chunks"]
    assert res["gated_attention"]["text"]["n_selection"] + res["gated_attention"]["text"]["n_held_out"] == 16
    # one capture pass: systematic_outliers' held-out text pass is read back by gated_attention (and on the gated
    # twin, whose gate interventions measure the selection part too, its selection pass)
    for passes, n_shared in ((res["shared"]["passes"], 1), (cmp["passes"], 2)):
        shared = [p for p in passes if p["read_by"]]
        assert len(shared) == n_shared and all(p["computed_by"] == ["systematic_outliers"] and p["read_by"] ==
                                        ["gated_attention"] for p in shared)
    for results in (res, cmp["analyses"]):  # hence the same held-out numbers, to the bit
        base = next(r for r in results["systematic_outliers"]["interventions"]
                    if r["what"] == "baseline" and r["split"] == "held_out")
        gated = results["gated_attention"]
        assert (base["loss"], base["sink_rate"], base["m_act"]) == (gated["text"]["loss"], gated["text"]["sink_rate"],
                                                                    gated["m_act"])
    # the joins' chance levels: permutation p-values of the overlaps match the hypergeometric tail
    for row in res["joins"]["head_overlaps"]:
        exact = _hypergeometric_tail(row["size_a"], row["size_b"], row["overlap"], res["joins"]["n_heads_total"])
        assert row["p_value"] == pytest.approx(exact, abs=0.02)


def _hypergeometric_tail(a: int, b: int, k: int, n: int) -> float:
    """P(|A ∩ B| ≥ k) for a random b-subset B of n items and a fixed a-subset A (exact)."""
    from math import comb

    return sum(comb(a, j) * comb(n - a, b - j) for j in range(k, min(a, b) + 1)) / comb(n, b) if a and b else 1.0


@pytest.mark.slow  # shares the twins' audit
def test_twins_index_renders_in_chromium(twins, tmp_path):
    out, res = twins
    html = (out / "index.html").read_text()
    dom, stderr = load_with_probe(html, tmp_path)
    assert page_events(dom) == "" and console_errors(stderr) == []
    sections = re.findall(r'<h2 id="[^"]+">([^<]+)</h2>', dom)
    assert sections == ["Analyses", "Joins", "organism against organism-gated", "Run"]
    assert dom.count('class="plot-container plotly"') == 2  # the layer strip of each model
    m_act = next(h for h in res["compare"]["headlines"] if h["analysis"] == "gated_attention")["m_act"]
    assert f"M-Act {m_act:.3g}" in dom
    gated = next(h for h in res["compare"]["headlines"] if h["analysis"] == "gated_attention")["value"]
    assert f">{format_value(gated)}</div>" in dom  # the gated twin's output sparsity card
    for name in TWINS:
        assert f'href="organism/{name}/report.html"' in dom and f'href="organism-gated/{name}/report.html"' in dom


@pytest.mark.slow  # shares the twins' audit
def test_resume_reads_complete_outputs_back_and_refuses_other_options(twins):
    out, res = twins
    before = (out / "organism" / "refusal_cliff" / "results.json").stat().st_mtime_ns
    interp.audit("organism", compare="organism-gated", analyses=list(TWINS), out=out, options=TWINS,
                 progress=False, device="cpu")
    again = json.loads((out / "results.json").read_text())
    assert {r["status"] for r in again["status"] + again["compare"]["status"]} == {"resumed"}
    assert (out / "organism" / "refusal_cliff" / "results.json").stat().st_mtime_ns == before
    assert again["joins"] == res["joins"] and again["compare"]["items"] == res["compare"]["items"]
    with pytest.raises(UserError, match="other options"):
        interp.audit("organism", analyses="systematic_outliers", out=out,
                     options={"systematic_outliers": {**TEXT, "random_draws": 3}}, progress=False, device="cpu")


def test_planted_pair_shows_the_zeroed_head_vanish(planted, tmp_path):
    """A planted model and its copy with the suppressor head's output zeroed (o_proj columns), saved and loaded by
    path: the head vanishes from the refusal-suppression heads; nothing else appears, vanishes or moves."""
    import torch
    from planted import D_HEAD, planted_rollouts
    from transformers import AutoModelForCausalLM

    layer, head = planted.suppressor
    copy = tmp_path / "zeroed <img src=x onerror=alert(1)>"  # a model name the index must escape
    shutil.copytree(planted.path, copy)
    model = AutoModelForCausalLM.from_pretrained(planted.path)
    with torch.no_grad():
        model.model.layers[layer].self_attn.o_proj.weight[:, head * D_HEAD:(head + 1) * D_HEAD] = 0
    model.save_pretrained(copy)
    rollouts = write_rollouts(tmp_path / "rollouts.jsonl", planted_rollouts(planted))
    options = {"refusal_cliff": dict(rollouts=str(rollouts), max_new_tokens=4, asr_limit=2, ablation_fractions=(0.1,),
                                     asr_regenerate="response", head_method="projection", random_draws=2),
               "systematic_outliers": dict(seq_len=16, n_chunks=6, random_draws=2)}
    out = interp.audit(str(planted.path), compare=str(copy), out=tmp_path / "pair", options=options,
                       analyses="refusal_cliff,systematic_outliers,gated_attention", progress=False, device="cpu")
    cmp = json.loads((out / "results.json").read_text())["compare"]
    changes = {(r["finding"], r["change"], r["item"]) for r in cmp["findings"]}
    assert ("refusal_suppression", "vanishes", str(planted.suppressor)) in changes
    # the set keeps its size (the analysis ablates the top 10 % of heads): one head takes the suppressor's place
    assert {c for c in changes if c[1] != "appears"} == {("refusal_suppression", "vanishes", str(planted.suppressor))}
    assert {c[0] for c in changes} == {"refusal_suppression"}
    items = {r["analysis"]: r for r in cmp["items"]}
    assert items["refusal_cliff"]["paired"] and items["refusal_cliff"]["moved"]  # the cliff goes with the head
    assert items["refusal_cliff"]["difference"] > 0  # the jailbroken answers' final refusal score stays up
    assert set(cmp["no_item_values"]) == {"systematic_outliers", "gated_attention"}
    html = (out / "index.html").read_text()
    assert "<img src=x" not in html and escape(copy.name) in html


def test_compare_items_paired_and_unpaired():
    a = joins.Items("q", ["x", "y", "z", "w"], np.array([0.0, 1.0, 2.0, 3.0]))
    b = joins.Items("q", ["w", "z", "y", "x"], np.array([3.5, 2.5, 1.5, 0.5]))  # same items, other order: +0.5 each
    paired = joins.compare_items(a, b)
    assert paired["paired"] and paired["difference"] == pytest.approx(0.5) and paired["ci"] == pytest.approx([0.5, 0.5])
    c = joins.Items("q", ["p", "q", "r"], np.array([10.0, 11.0, 12.0]))
    unpaired = joins.compare_items(a, c)
    assert not unpaired["paired"] and unpaired["difference"] == pytest.approx(11 - 1.5) and unpaired["moved"]
    assert unpaired["ci"][0] <= 11 - 1.5 <= unpaired["ci"][1]


def test_bad_input_gives_one_line_errors(capsys, tmp_path):
    code, _, err = run_cli(capsys, "audit", "--analyses", "refusal_cliff,nonsense")
    assert_user_error(code, err, "unknown analysis 'nonsense'")
    code, _, err = run_cli(capsys, "audit", "--compare", "no-such-model-xyz", "--analyses", "instability",
                           "--out", str(tmp_path / "a"), "--no-progress", "--device", "cpu")
    assert_user_error(code, err, "unknown model 'no-such-model-xyz'")
    assert not (tmp_path / "a").exists()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="holds no audit"):
        interp.audit("tiny", analyses="instability", out=tmp_path / "b", device="cpu")
    code, out, _ = run_cli(capsys, "--list")
    assert "python -m interp.run audit --model M" in out


def test_failed_and_unfit_analyses_are_listed_and_the_others_run(tmp_path, capsys, monkeypatch):
    """A one-layer model: talking_heads' options check rejects it (listed not applicable with the check's message),
    instability raises (listed failed, traceback kept), systematic_outliers runs with --options; exit 2, one line."""
    from interp.analysis import load_analysis
    from interp.tiny import write_tiny_checkpoint

    def planted_failure(model, config):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(load_analysis("instability"), "run", planted_failure)
    path = write_tiny_checkpoint(tmp_path / "one-layer", n_layers=1)
    options = tmp_path / "options.json"
    options.write_text(json.dumps({"systematic_outliers": {"seq_len": 16, "n_chunks": 4, "random_draws": 2}}))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "audit", "--model", str(path), "--analyses",
                           "systematic_outliers,talking_heads,instability", "--options", str(options),
                           "--out", str(out), "--no-progress", "--device", "cpu")
    assert_user_error(code, err, "1 analysis failed (instability: RuntimeError: planted failure)")
    res = json.loads((out / "results.json").read_text())
    status = {r["analysis"]: r for r in res["status"]}
    assert status["systematic_outliers"]["status"] == "ran" and res["systematic_outliers"]["text_set"]["seq_len"] == 16
    assert status["talking_heads"]["status"] == "not_applicable"
    assert "talking_heads needs a model with at least 2 layers" in status["talking_heads"]["reason"]
    assert status["instability"]["status"] == "failed"
    assert "planted_failure" in (out / status["instability"]["error"]).read_text()  # the traceback
    html = (out / "index.html").read_text()
    assert ">failed</div>" in html and ">not applicable</div>" in html
    assert f'href="{status["instability"]["error"]}"' in html
    options.write_text(json.dumps({"systematic_outliers": {"seq_lenn": 16}}))
    code, _, err = run_cli(capsys, "audit", "--model", str(path), "--options", str(options), "--out", str(out))
    assert_user_error(code, err, "systematic_outliers has no option 'seq_lenn'")
    options.write_text("{not json")
    code, _, err = run_cli(capsys, "audit", "--options", str(options))
    assert_user_error(code, err, "is not valid JSON")


def test_not_applicable_analysis_is_listed_with_its_reason(tmp_path):
    from interp.tiny import write_family_checkpoint

    path = write_family_checkpoint(tmp_path / "mla", "deepseek-v3")  # multi-head latent attention: no per-head W_Q/K/V
    out = interp.audit(str(path), analyses="talking_heads", out=tmp_path / "out", progress=False, device="cpu")
    res = json.loads((out / "results.json").read_text())
    assert [(r["analysis"], r["status"]) for r in res["status"]] == [("talking_heads", "not_applicable")]
    assert "latent attention" in res["status"][0]["reason"]
    assert "talking_heads" not in res and res["headlines"] == []
    html = (out / "index.html").read_text()
    assert ">not applicable</div>" in html and escape(res["status"][0]["reason"]) in html


def test_compare_lists_the_settings_the_second_models_card_would_change():
    from interp.audit import card_differences, configs
    from interp.models import load_model

    a, b = load_model("organism", device="cpu"), load_model("organism-sink", device="cpu")
    names = ["systematic_outliers", "refusal_cliff"]
    changed = card_differences(configs(names, a, {}, False), configs(names, b, {}, False))
    # the sink twin's card reads its Bigram-Backcopy task, and it has no chat-organism card for refusal_cliff
    assert changed["systematic_outliers"] == {"text_set": {"used": "organism-plain", "own_card": "backcopy"}}
    assert changed["refusal_cliff"]["harmful"] == {"used": "organism-harmful", "own_card": "builtin-harmful"}
    assert card_differences(configs(names, a, {}, False), configs(names, a, {}, False)) == {}


def test_models_of_different_shapes_are_compared_on_what_needs_no_matching(tmp_path):
    from interp.tiny import write_tiny_checkpoint

    a = write_tiny_checkpoint(tmp_path / "two-layers", n_layers=2)
    b = write_tiny_checkpoint(tmp_path / "three-layers", n_layers=3, seed=1)
    out = interp.audit(str(a), compare=str(b), analyses="systematic_outliers", out=tmp_path / "out",
                       options={"systematic_outliers": dict(seq_len=16, n_chunks=4, random_draws=2)},
                       progress=False, device="cpu")
    res = json.loads((out / "results.json").read_text())
    cmp = res["compare"]
    assert not cmp["same_shape"] and cmp["shape_a"]["n_layers"] == 2 and cmp["shape_b"]["n_layers"] == 3
    assert "findings" not in cmp and "differ in shape" in cmp["not_compared"]
    row, = cmp["differences"]
    assert row["difference"] == pytest.approx(row["value_b"] - row["value_a"])
    assert row["value_a"] == res["headlines"][0]["value"] and row["value_b"] == cmp["headlines"][0]["value"]
    assert escape(cmp["not_compared"]) in (out / "index.html").read_text()
