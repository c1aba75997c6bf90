"""gated_attention: gate capture, statistics, sparsity, interventions (planted tiny Qwen3.5) and the analysis."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from interp import gates

D_MODEL, N_HEADS, N_KV, D_HEAD = 64, 4, 2, 16
GATE_CONSTANTS = (0.22, 0.42, 0.62, 0.82)  # planted gate score of each head, every layer, every token
EMB_CONST, EMB_REST = 2.0, 3.0            # embedding = EMB_CONST on dim 0 + a part of norm EMB_REST elsewhere


def _tiny_qwen35(path, layer_types, *, planted: bool, seed: int = 0, arch: str = "qwen3_5", same_output: bool = False):
    """A tiny Qwen3.5 (or, `arch="qwen3_next"`, Qwen3-Next with a small MoE) checkpoint. `planted`: every token
    embeds the same dim-0 value and a rest of
    fixed norm, so the normed input's dim 0 is the same at every token; gate rows read only dim 0, so
    head h's gate is GATE_CONSTANTS[h] everywhere. Layer 0's o_proj and MLP write nothing, so layer 1
    sees the embeddings too; the last layer's o_proj is random (no bias). `same_output`: every head of a layer
    has the same query, key and value weights and o_proj block W / c_h, so every head writes the same gated output
    c_h · Y · W / c_h: heads differ only in how far forcing their gate to 1 pushes them (1 / c_h)."""
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig, Qwen3NextConfig, Qwen3NextForCausalLM

    from interp.tiny import build_tokenizer

    tok = build_tokenizer(512, thinking=False)
    config_cls, model_cls = (Qwen3_5TextConfig, Qwen3_5ForCausalLM) if arch == "qwen3_5" else \
        (Qwen3NextConfig, Qwen3NextForCausalLM)
    extra = {} if arch == "qwen3_5" else dict(moe_intermediate_size=32, shared_expert_intermediate_size=32,
                                               num_experts=4, num_experts_per_tok=2)
    cfg = config_cls(**extra,
        vocab_size=len(tok), hidden_size=D_MODEL, intermediate_size=96, num_hidden_layers=len(layer_types),
        num_attention_heads=N_HEADS, num_key_value_heads=N_KV, head_dim=D_HEAD, max_position_embeddings=256,
        tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
        bos_token_id=tok.pad_token_id, layer_types=list(layer_types), linear_num_value_heads=2,
        linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0})
    cfg.architectures = [model_cls.__name__]
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()
    if planted:
        with torch.no_grad():
            emb = model.model.embed_tokens.weight
            rest = torch.randn(emb.shape[0], D_MODEL - 1)
            emb[:, 0] = EMB_CONST
            emb[:, 1:] = EMB_REST * rest / rest.norm(dim=-1, keepdim=True)
            x0 = EMB_CONST / math.sqrt((EMB_CONST ** 2 + EMB_REST ** 2) / D_MODEL + cfg.rms_norm_eps)
            for i, layer in enumerate(model.model.layers):
                layer.input_layernorm.weight.zero_()  # Qwen3.5 norms scale by (1 + w)
                attn = layer.self_attn
                for h, c in enumerate(GATE_CONSTANTS):
                    rows = slice(h * 2 * D_HEAD + D_HEAD, (h + 1) * 2 * D_HEAD)
                    attn.q_proj.weight[rows] = 0.0
                    attn.q_proj.weight[rows, 0] = math.log(c / (1 - c)) / x0
                if same_output:
                    for h in range(1, N_HEADS):
                        q0, qh = slice(0, D_HEAD), slice(h * 2 * D_HEAD, h * 2 * D_HEAD + D_HEAD)
                        attn.q_proj.weight[qh] = attn.q_proj.weight[q0]
                    for w in (attn.k_proj.weight, attn.v_proj.weight):
                        w[D_HEAD:] = w[:D_HEAD].repeat(N_KV - 1, 1)
                    block = attn.o_proj.weight[:, :D_HEAD].clone() * 16
                    for h, c in enumerate(GATE_CONSTANTS):
                        attn.o_proj.weight[:, h * D_HEAD:(h + 1) * D_HEAD] = block / c
                if i < len(layer_types) - 1:
                    attn.o_proj.weight.zero_()
                    layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def planted_gated_dir(tmp_path_factory):
    return _tiny_qwen35(tmp_path_factory.mktemp("planted_gated"), ["full_attention"] * 2, planted=True)


@pytest.fixture(scope="module")
def planted_gated(planted_gated_dir):
    from interp.models import load_model

    return load_model(str(planted_gated_dir), device="cpu")


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory):
    return _tiny_qwen35(tmp_path_factory.mktemp("hybrid"), ["linear_attention", "full_attention"], planted=False)


@pytest.fixture(scope="module")
def hybrid(hybrid_dir):
    from interp.models import load_model

    return load_model(str(hybrid_dir), device="cpu")


def _seqs(model, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = len(model.tokenizer) - 8
    return [torch.randint(8, vocab, (int(L),), generator=g).tolist()
            for L in torch.randint(5, 20, (n,), generator=g)]


def test_planted_gate_stats_equal_the_constants(planted_gated):
    assert gates.is_gated(planted_gated) and gates.softmax_layers(planted_gated) == [0, 1]
    stats, sparsity, _ = gates.measure(planted_gated, _seqs(planted_gated), batch_size=3, progress=False)
    rows = stats.head_rows()
    assert len(rows) == 2 * N_HEADS
    assert all(r["gate_corr"] is None for r in gates.measure(planted_gated, _seqs(planted_gated), progress=False)[2]
               .head_rows())  # constant gates: no correlation defined
    for r in rows:
        c = GATE_CONSTANTS[r["head"]]
        assert r["mean"] == pytest.approx(c, abs=1e-5)
        assert r["frac_below_0_1"] == 0.0
        assert r["var_tokens"] == pytest.approx(0.0, abs=1e-9)
    layer = stats.layer_rows()[0]
    assert layer["mean"] == pytest.approx(sum(GATE_CONSTANTS) / 4, abs=1e-5)
    assert layer["var_heads"] == pytest.approx(torch.tensor(GATE_CONSTANTS).var(unbiased=False).item(), abs=1e-5)
    # histogram: a quarter of the mass in each constant's 0.05 bin
    for c in GATE_CONSTANTS:
        assert layer["histogram"][int(c / gates.BIN_WIDTH)] == pytest.approx(0.25)
    # every element of Y' = c_h · Y: |Y'| < θ at least as often as |Y| < θ
    assert all(r["gated"] >= r["ungated"] for r in sparsity.rows(gated=True))


def test_forcing_gates_to_one_scales_attention_output_by_hand_factor(planted_gated):
    tokens = torch.tensor([_seqs(planted_gated, 1)[0]])
    _, base = planted_gated.run_with_cache(tokens, names_filter=lambda n: n.endswith(("hook_attn_out", "hook_z")))
    heads = [(1, 1), (1, 3)]
    with gates.force_gates_one(planted_gated, heads):
        _, forced = planted_gated.run_with_cache(tokens, names_filter=lambda n: n.endswith(("hook_attn_out", "hook_z")))
    z0, z1 = base["blocks.1.attn.hook_z"], forced["blocks.1.attn.hook_z"]
    for h in range(N_HEADS):
        factor = 1 / GATE_CONSTANTS[h] if (1, h) in heads else 1.0
        torch.testing.assert_close(z1[:, :, h], z0[:, :, h] * factor, rtol=1e-5, atol=1e-6)
    # all heads forced: o_proj is linear without bias, per-head factors 1/c_h go through it
    with gates.force_gates_one(planted_gated):
        _, allf = planted_gated.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_attn_out"))
    w_o = planted_gated.original_model.model.layers[1].self_attn.o_proj.weight
    scaled = torch.cat([z0[:, :, h] / GATE_CONSTANTS[h] for h in range(N_HEADS)], -1) @ w_o.T
    torch.testing.assert_close(allf["blocks.1.hook_attn_out"], scaled, rtol=1e-5, atol=1e-5)
    # layer 0 writes nothing (zero o_proj), so its attention output stays zero
    assert base["blocks.0.hook_attn_out"].abs().max() == 0


def test_mean_and_scale_interventions(planted_gated):
    tokens = torch.tensor([_seqs(planted_gated, 1)[0]])
    _, base = planted_gated.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_z"))
    means = {layer: torch.full((N_HEADS, D_HEAD), 0.5) for layer in (0, 1)}
    with gates.gates_to_mean(planted_gated, means, [(1, 0)]):
        _, m = planted_gated.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_z"))
    torch.testing.assert_close(m["blocks.1.attn.hook_z"][:, :, 0], base["blocks.1.attn.hook_z"][:, :, 0] * 0.5 / 0.22,
                               rtol=1e-5, atol=1e-6)
    with gates.scale_gates(planted_gated, 3.0, [(1, 2)]):
        _, s = planted_gated.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_z"))
    torch.testing.assert_close(s["blocks.1.attn.hook_z"][:, :, 2], base["blocks.1.attn.hook_z"][:, :, 2] * 3.0)
    torch.testing.assert_close(s["blocks.1.attn.hook_z"][:, :, 1], base["blocks.1.attn.hook_z"][:, :, 1])


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    return _tiny_qwen35(tmp_path_factory.mktemp("next"), ["linear_attention", "full_attention"], planted=False,
                        arch="qwen3_next")


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_next"])
def test_gate_hook_equals_hf_module(arch, request):
    """hook_q_gate fires on the full-attention layer only and equals σ⁻¹ of what HF multiplies by
    (hybrid Qwen3.5 and Qwen3-Next: layer 0 linear attention, layer 1 full attention)."""
    from transformers import AutoModelForCausalLM

    from interp.models import load_model

    hybrid_dir = request.getfixturevalue("hybrid_dir" if arch == "qwen3_5" else "next_dir")
    hybrid = request.getfixturevalue("hybrid") if arch == "qwen3_5" else load_model(str(hybrid_dir), device="cpu")
    assert gates.softmax_layers(hybrid) == [1] and gates.layer_kinds(hybrid) == ["linear", "softmax"]
    assert gates.gate_hook(0) not in hybrid.hook_dict and gates.gate_hook(1) in hybrid.hook_dict
    hf = AutoModelForCausalLM.from_pretrained(hybrid_dir).eval()
    seen = {}
    attn = hf.model.layers[1].self_attn
    attn.q_proj.register_forward_hook(lambda m, i, o: seen.__setitem__("q", o))
    attn.o_proj.register_forward_pre_hook(lambda m, i: seen.__setitem__("o_in", i[0]))
    tokens = torch.tensor([_seqs(hybrid, 1, seed=3)[0]])
    with torch.no_grad():
        hf(tokens)
    fired = []
    for layer in range(2):
        if gates.gate_hook(layer) in hybrid.hook_dict:
            hybrid.add_hook(gates.gate_hook(layer), lambda x, hook: fired.append(hook.name))
    _, cache = hybrid.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.1.attn.hook_")
                                     and n.endswith(("q_gate", "pattern", "_v")))
    hybrid.reset_hooks()
    assert fired == [gates.gate_hook(1)]
    hf_gate = seen["q"].view(1, tokens.shape[1], N_HEADS, 2 * D_HEAD)[..., D_HEAD:]
    torch.testing.assert_close(gates.split_heads(cache[gates.gate_hook(1)], N_HEADS), hf_gate, rtol=1e-5, atol=1e-6)
    # what HF feeds o_proj = rebuilt ungated Y ⊙ σ(gate)
    y = gates.rebuild_ungated(cache["blocks.1.attn.hook_pattern"], cache["blocks.1.attn.hook_v"])
    torch.testing.assert_close((y * torch.sigmoid(hf_gate)).flatten(-2), seen["o_in"], rtol=1e-4, atol=1e-6)


def test_rebuild_equals_hook_z_on_ungated(tiny_model):
    tokens = torch.tensor([_seqs(tiny_model, 1)[0]])
    _, cache = tiny_model.run_with_cache(tokens, names_filter=lambda n: n.startswith("blocks.0.attn.hook_")
                                         and n.endswith(("_z", "pattern", "_v")))
    y = gates.rebuild_ungated(cache["blocks.0.attn.hook_pattern"], cache["blocks.0.attn.hook_v"])
    torch.testing.assert_close(y, cache["blocks.0.attn.hook_z"], rtol=1e-5, atol=1e-6)
    assert not gates.is_gated(tiny_model)
    with pytest.raises(Exception, match="gated-attention model"):
        with gates.force_gates_one(tiny_model):
            pass


def test_measure_batch_invariant_and_independent(hybrid):
    seqs = _seqs(hybrid, 7, seed=5)
    a = gates.measure(hybrid, seqs, batch_size=1, progress=False, mean_gate={1: 0.5})
    b = gates.measure(hybrid, seqs, batch_size=8, progress=False, mean_gate={1: 0.5})
    for x, y in ((a[0].head_rows(), b[0].head_rows()), (a[1].detail_rows(True), b[1].detail_rows(True)),
                 (a[2].head_rows(), b[2].head_rows())):
        for rx, ry in zip(x, y, strict=True):
            for k in rx:
                if isinstance(rx[k], float):
                    assert rx[k] == pytest.approx(ry[k], abs=1e-5), k
    # independent: plain per-sequence computation of gate mean / var / share < 0.1, and the
    # correlation across queries q >= 1 of head gate and first-token attention (numpy corrcoef)
    import numpy as np

    per, per_q, first_attn = [], [], []
    for s in seqs:
        _, c = hybrid.run_with_cache(torch.tensor([s]), names_filter=lambda n: n in (gates.gate_hook(1),
                                                                                     "blocks.1.attn.hook_pattern"))
        g_seq = torch.sigmoid(gates.split_heads(c[gates.gate_hook(1)][0], N_HEADS)).double()
        per.append(g_seq)
        per_q.append(g_seq[1:].mean(-1))
        first_attn.append(c["blocks.1.attn.hook_pattern"][0, :, 1:, 0].T.double())
    g = torch.cat(per)  # [tokens, head, d]
    gq, fa = torch.cat(per_q).numpy(), torch.cat(first_attn).numpy()
    for r in a[2].head_rows():
        assert r["gate_corr"] == pytest.approx(np.corrcoef(gq[:, r["head"]], fa[:, r["head"]])[0, 1], abs=1e-5)
    for r in a[0].head_rows():
        h = r["head"]
        assert r["mean"] == pytest.approx(g[:, h].mean().item(), abs=1e-6)
        assert r["var_tokens"] == pytest.approx(g[:, h].var(0, unbiased=False).mean().item(), abs=1e-6)
        assert r["frac_below_0_1"] == pytest.approx((g[:, h] < 0.1).double().mean().item(), abs=1e-9)


# ---------------------------------------------------------------- the analysis

SMALL = dict(seq_len=16, n_chunks=8, random_draws=2, alphas=(2.0,), progress=False, compare="none")


def _run(model, **overrides):
    from interp.analyses import gated_attention as ga
    from interp.analysis import config_for

    config = config_for("gated_attention", model, **{**SMALL, **overrides})
    return ga, ga.run(model, config)


def test_analysis_on_planted_gated_model(planted_gated):
    ga, result = _run(planted_gated)
    d = result.to_dict()
    for key in ("gated", "gates", "sparsity", "attention", "m_act", "interventions"):
        assert key in d
    assert d["gated"] is True and d["analysis"] == "gated_attention"
    assert {tuple(sorted(r)) for r in d["gates"]} == {("frac_below_0_1", "head", "layer", "mean", "var_tokens")}
    for r in d["gates"]:
        assert r["mean"] == pytest.approx(GATE_CONSTANTS[r["head"]], abs=1e-5)
    assert [sorted(r) for r in d["sparsity"]] == [["gated", "layer", "ungated"]] * 2
    assert [sorted(r) for r in d["attention"]] == [["first_token", "layer", "sink_rate", "sink_rate_ci",
                                                    "sink_rate_t64"]] * 2
    rows = d["interventions"]
    assert all({"what", "heads", "loss", "first_token", "m_act"} <= set(r) for r in rows)
    assert rows[0]["what"] == "none"
    # head selection on the selection split: the lowest planted gate (head 0) in both layers
    selected = next(r for r in rows if r["selection"] == "selected")
    assert sorted(map(tuple, selected["heads"])) == [(0, 0), (1, 0)]
    random_row = next(r for r in rows if r["selection"] == "random" and r["what"] == selected["what"])
    assert random_row["n_draws"] == 2 and "loss_sd" in random_row
    for draw in random_row["heads"]:
        assert len(draw) == 2 and not {tuple(h) for h in draw} & {(0, 0), (1, 0)}
    # layer 0 writes nothing (zero o_proj): gates of layer-0 heads cannot change the loss; forcing
    # all gates to 1 changes it
    forced = next(r for r in rows if r["what"] == "gates=1" and r["selection"] == "all")
    assert forced["loss"] != pytest.approx(rows[0]["loss"], abs=1e-4)
    html = ga.build_report(result, planted_gated.tokenizer).render()
    assert "mean gate score" in html and "Gate interventions" in html
    assert set(result.tables()) >= {"gates", "sparsity", "attention", "interventions"}


@pytest.fixture(scope="module")
def same_output_gated(tmp_path_factory):
    from interp.models import load_model

    path = _tiny_qwen35(tmp_path_factory.mktemp("same_output"), ["full_attention"], planted=True, same_output=True)
    return load_model(str(path), device="cpu")


def test_push_matched_control_on_heads_that_differ_only_in_push(same_output_gated):
    """Planted: every head writes the same gated output, so no head is special; forcing the lowest gate (0.22) to 1
    pushes its head ×4.5, a random head's only ×1.2–2.4. The unmatched control makes the selected head look special;
    the push-matched control (random head forced to 1, then rescaled to ×4.5) gives exactly the selected effect."""
    _, result = _run(same_output_gated, head_fraction=0.25, random_draws=3, seed=3)
    rows = {(r["what"], r["selection"]): r for r in result.to_dict()["interventions"]}
    base, sel = rows[("none", "none")], rows[("gates=1", "selected")]
    matched, unmatched = rows[("gates=1", "random")], rows[("gates=1", "random_unmatched")]
    assert sel["heads"] == [[0, 0]] and sel["push"] == [pytest.approx(1 / 0.22, rel=1e-4)]
    assert matched["matched_on"] == "push" and matched["strata"] == {"all": 1} and matched["n_draws"] == 3
    assert unmatched["matched_on"] == "none" and unmatched["heads"] == matched["heads"]
    assert len({draw[0][1] for draw in matched["heads"]}) == 3  # three different random heads (seed 3)
    assert all(p[0] < 1 / 0.4 for p in unmatched["push"])
    for metric in ("loss", "m_act", "loss_in_sample"):
        effect = sel[metric] - base[metric]
        assert abs(effect) > 1e-3, metric
        assert matched[metric] == pytest.approx(sel[metric], rel=1e-4, abs=1e-5), metric
        assert abs(unmatched[metric] - base[metric]) < 0.6 * abs(effect), metric  # unmatched: "these heads matter"
    # gates × α pushes every head alike: the random row needs no rescale and has no unmatched twin
    assert rows[("gates×2", "random")]["rescale"] == [[1.0]] * 3 and ("gates×2", "random_unmatched") not in rows


def test_analysis_numbers_do_not_depend_on_batch_size(hybrid):
    _, a = _run(hybrid, batch_size=1)
    _, b = _run(hybrid, batch_size=8)

    def flat(x, path=""):
        if isinstance(x, dict):
            for k, v in x.items():
                if k not in ("config", "environment"):
                    yield from flat(v, f"{path}.{k}")
        elif isinstance(x, list):
            for i, v in enumerate(x):
                yield from flat(v, f"{path}[{i}]")
        else:
            yield path, x

    fa, fb = dict(flat(a.to_dict())), dict(flat(b.to_dict()))
    assert fa.keys() == fb.keys()
    for k, v in fa.items():
        if isinstance(v, float):
            assert v == pytest.approx(fb[k], rel=1e-4, abs=1e-5), k
        else:
            assert v == fb[k], k


def test_hybrid_linear_layers_are_not_zeros(hybrid):
    """Also: a short text set warns (results.json and the report), and the chunks split by `controls.split`'s one
    rounding rule (half up: 5 chunks → 3 to select on; the old `round` gave 2)."""
    from interp.controls import split

    ga, result = _run(hybrid, limit=1, n_chunks=1000)
    d = result.to_dict()
    n = d["text"]["n_selection"] + d["text"]["n_held_out"]
    assert n < 1000 and len(d["warnings"]) == 2 and f"only {n} chunks" in d["warnings"][1]
    assert d["warnings"][0] == "attention heads skipped on layer 0: linear_attention"
    assert d["skipped_layers"] == {0: "attention heads: linear_attention"}
    assert d["text"]["n_selection"] == len(split(n, 0.5, 0).selection)
    assert result.to_dict()["gated"] and _run(hybrid, n_chunks=5)[1].to_dict()["text"]["n_selection"] == 3
    assert d["layer_kinds"] == ["linear", "softmax"]
    assert d["attention"][0] == {"layer": 0, "first_token": None, "sink_rate": None, "sink_rate_ci": None,
                                 "sink_rate_t64": None}
    assert d["sparsity"][0] == {"layer": 0, "ungated": None, "gated": None}
    assert d["attention"][1]["first_token"] > 0 and {r["layer"] for r in d["gates"]} == {1}
    html = ga.build_report(result, hybrid.tokenizer).render()
    assert "no softmax pattern" in html and f"only {n} chunks" in html


def test_ungated_model_and_compare(tiny_model, planted_gated_dir):
    ga, result = _run(tiny_model, compare=str(planted_gated_dir))
    d = result.to_dict()
    assert set(d["models"]) == {str(planted_gated_dir), tiny_model._interp_info.name} or len(d["models"]) == 2
    ungated, gated = list(d["models"].values())
    assert ungated["gated"] is False and ungated["gates"] == [] and ungated["interventions"] == []
    assert all(r["gated"] is None and 0 <= r["ungated"] <= 1 for r in ungated["sparsity"])
    assert all(0 <= r["mean"] <= 1 and r["gate_corr"] is None for r in ungated["implicit_scale"])
    assert gated["gated"] is True and gated["gates"] and gated["interventions"]
    html = ga.build_report(result, tiny_model.tokenizer).render()
    assert "has no attention output gate" in html and "Side by side" in html


def test_old_option_names_still_work_and_warn(tiny_model, tmp_path, capsys):
    from interp.analysis import config_for
    from interp.run import main

    with pytest.warns(FutureWarning, match="'select_fraction' is now 'head_fraction'"):
        config = config_for("gated_attention", tiny_model, select_fraction=0.5, **SMALL)
    assert config.head_fraction == 0.5
    with pytest.warns(FutureWarning, match="'texts' is now 'text_set'"):
        assert config_for("gated_attention", tiny_model, texts="organism-plain").text_set == "organism-plain"
    with pytest.warns(FutureWarning):
        code = main(["gated_attention", "--model", "organism-sink-gated", "--out", str(tmp_path / "old"),
                     "--no-progress",
                     "--compare", "none", "--n-chunks", "4", "--random-draws", "2", "--alphas", "2",
                     "--select-fraction", "0.5", "--texts", "backcopy"])
    assert code == 0, capsys.readouterr().err
    import json

    d = json.loads((tmp_path / "old" / "results.json").read_text())
    assert d["config"]["head_fraction"] == 0.5 and d["config"]["text_set"] == "backcopy"
    assert len(d["selected_heads"]) == 4


def test_implicit_scale_matches_first_token_attention(tiny_model):
    """s(q) averaged over queries ≥ 1 is 1 − F-Attn of the shared sink metrics, head by head."""
    _, result = _run(tiny_model)
    d = result.to_dict()
    f_attn = {(r["layer"], r["head"]): r["first_token"] for r in d["attention_heads"]}
    for r in d["implicit_scale"]:
        assert r["mean"] == pytest.approx(1 - f_attn[(r["layer"], r["head"])], abs=1e-5)


def test_cli_runs_and_refuses_gate_interventions_on_ungated(tmp_path, capsys, tiny_dir, planted_gated_dir):
    from interp.run import main

    out = tmp_path / "run"
    code = main(["gated_attention", "--model", str(planted_gated_dir), "--out", str(out), "--no-progress",
                 "--seq-len", "16", "--n-chunks", "6", "--random-draws", "2", "--alphas", "0.5"])
    assert code == 0, capsys.readouterr().err
    import json

    d = json.loads((out / "results.json").read_text())
    assert d["gated"] is True and len(d["gates"]) == 2 * N_HEADS
    assert (out / "report.html").exists() and (out / "interventions.csv").exists()
    code = main(["gated_attention", "--model", str(tiny_dir), "--out", str(tmp_path / "x"), "--interventions", "on"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error:") and "gated-attention model" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    for bad in (["--head-fraction", "0.8"], ["--random-draws", "1"], ["--sparsity-threshold", "0"], ["--n-chunks", "1"],
                ["--compare", str(tmp_path / "no-such-model")], ["--dataset", str(tmp_path / "missing.txt")]):
        code = main(["gated_attention", "--model", str(tiny_dir), "--out", str(tmp_path / "y"), *bad])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error:") and "Traceback" not in err, bad


# ---------------------------------------------------------------- the sink organisms

def test_sink_trainer_is_deterministic_and_task_copies():
    from interp.organisms import sink

    x = sink.sample(8, sink.SEQ_LEN, torch.Generator().manual_seed(0), sink.bigram_table())
    assert (x[:, 0] == 0).all() and (x[:, 1:] >= 1).all()  # BOS only at position 0
    trig = (x[:, 1:-1] >= 1) & (x[:, 1:-1] <= sink.N_TRIGGERS)
    assert trig.float().mean() > 0.05
    assert (x[:, 2:][trig] == x[:, :-2][trig]).all()  # after a trigger: the token before it
    a, _ = sink.train("qwen3_5", steps=2)
    b, _ = sink.train("qwen3_5", steps=2)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_sink_organisms_shipped_behaviour():
    """The ungated sink organism has an attention sink in layer 1 and massive residuals; its gated twin
    has sparse gates and no massive residuals (measured by the analysis on held-out sequences)."""
    from interp.controls import wilson
    from interp.models import load_model

    model = load_model("organism-sink", device="cpu")
    ga, result = _run(model, compare="auto", n_chunks=16, seq_len=64, interventions="off")
    std, gated = result.results["organism-sink"], result.results["organism-sink-gated"]
    assert result.header["config"]["text_set"] == "backcopy" and std.text["first_token"] == "<|endoftext|>"
    assert std.attention[1]["first_token"] > 0.7 and std.attention[1]["sink_rate"] == 100.0
    assert std.m_act > 150 and gated.m_act < 40
    # the sink rate is a share of (head, sequence) pairs: 100 % of 8 held-out sequences × 4 heads, Wilson interval
    assert std.attention[1]["sink_rate_ci"] == pytest.approx([100 * wilson(32, 32)[0], 100.0])
    assert statistics.mean(r["mean"] for r in gated.gates) < 0.1


# ---------------------------------------------------------------- streamed per layer (issue 16)

@pytest.fixture(scope="module")
def random_gated(tmp_path_factory):
    from interp.models import load_model

    path = _tiny_qwen35(tmp_path_factory.mktemp("random_gated"), ["full_attention"] * 2, planted=False, seed=3)
    return load_model(str(path), device="cpu")


def _reference_layers(model, seqs, batch_size):
    """The previous gate pass: run_with_cache of every layer's pattern, values and gate logits at once."""
    from interp.batching import padded_batches

    layers, gated, n_heads = gates.softmax_layers(model), gates.is_gated(model), model.cfg.n_heads
    for _, tokens, mask in padded_batches(model, seqs, batch_size, progress=False):
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens, attention_mask=mask, names_filter=lambda n: n.endswith(
                ("hook_pattern", "hook_v", "hook_q_gate")))
        for layer in layers:
            pattern = cache[f"blocks.{layer}.attn.hook_pattern"].float()
            v = cache[f"blocks.{layer}.attn.hook_v"].float()
            y = torch.einsum("bhqk,bkhd->bqhd", pattern, v.repeat_interleave(pattern.shape[1] // v.shape[2], dim=2))
            logits = cache[gates.gate_hook(layer)].float() if gated else None
            g = torch.sigmoid(gates.split_heads(logits, n_heads)) if gated else None
            yield layer, pattern, y, g, logits, mask


@pytest.mark.parametrize("which", ["random_gated", "tiny_model"])
def test_streamed_gate_pass_equals_the_cached_pass(which, request):
    model = request.getfixturevalue(which)
    seqs = _seqs(model, n=5, seed=4)
    layers, n_heads, gated = gates.softmax_layers(model), model.cfg.n_heads, gates.is_gated(model)
    mean_gate = {layer: 0.3 for layer in layers}
    got_gates, got_sparsity, got_scale = gates.measure(model, seqs, batch_size=3, mean_gate=mean_gate, progress=False)
    ref_gates = gates.GateStats(layers, n_heads, model.cfg.d_head) if gated else None
    ref_sparsity, ref_scale = gates.SparsityStats(1e-2), gates.ScaleStats(layers, n_heads)
    for layer, pattern, y, g, logits, mask in _reference_layers(model, seqs, 3):
        if gated:
            ref_gates.update(layer, logits, mask)
        ref_sparsity.update(layer, y, mask, g, mean_gate[layer])
        ref_scale.update(layer, pattern, mask, g)
    pairs = [(got_sparsity.detail_rows(gated), ref_sparsity.detail_rows(gated)),
             (got_scale.head_rows(), ref_scale.head_rows())]
    if gated:
        pairs += [(got_gates.head_rows(), ref_gates.head_rows()), (got_gates.layer_rows(), ref_gates.layer_rows())]
    for got, ref in pairs:
        assert len(got) == len(ref)
        for a, b in zip(got, ref, strict=True):
            assert a.keys() == b.keys()
            for k in a:
                assert (a[k] is None and b[k] is None) or a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-7), k
    assert got_scale.histograms() == ref_scale.histograms()
    if gated:
        means = ref_gates.element_means()
        ref_push = gates.PushStats(layers, n_heads, means)
        for layer, _, y, g, _, mask in _reference_layers(model, seqs, 3):
            ref_push.update(layer, y, g, mask)
        got_push = gates.measure_push(model, seqs, means, batch_size=3, progress=False).factors()
        for kind, factors in ref_push.factors().items():
            assert got_push[kind] == pytest.approx(factors, rel=1e-5)


def test_gate_pass_drops_each_layers_pattern(random_gated):
    """When a layer's statistics are taken, the previous layer's pattern no longer exists (no cache of every layer)."""
    import gc
    import weakref

    seen: list[weakref.ref] = []
    alive_at: list[int] = []

    def consume(layer, pattern, y, g, logits, mask):
        gc.collect()
        alive_at.append(sum(ref() is not None for ref in seen))
        seen.append(weakref.ref(pattern))

    gates._stream_layers(random_gated, _seqs(random_gated, n=4), 2, False, "test", consume)
    assert len(seen) == 2 * len(gates.softmax_layers(random_gated)) and alive_at == [0] * len(seen)


def test_rebuild_ungated_in_blocks_of_queries(monkeypatch):
    """A pattern of another dtype than the values is cast a block of query rows at a time: same Y."""
    g = torch.Generator().manual_seed(0)
    pattern = torch.rand(2, 4, 9, 9, generator=g).softmax(-1)
    v = torch.randn(2, 9, 2, 5, generator=g, dtype=torch.float64)
    full = torch.einsum("bhqk,bkhd->bqhd", pattern.double(), v.repeat_interleave(2, dim=2))
    monkeypatch.setattr(gates, "QUERY_BLOCK_BYTES", 2 * 4 * 9 * 8 * 2)  # two query rows per block
    torch.testing.assert_close(gates.rebuild_ungated(pattern, v), full)
