"""Hybrid models (Qwen3.5: Gated DeltaNet linear attention in layers 0 and 2, gated softmax attention in 1 and 3) and
multi-head latent attention (DeepSeek-V3): the analyses that read attention heads run on the softmax layers and list
the others in `skipped_layers`, or stop with `NotApplicable` before any work; never a traceback."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_user_error, run_cli, write_rollouts
from planted import planted_rollouts

from interp.analysis import config_for, load_analysis
from interp.errors import NotApplicable
from interp.tiny import write_family_checkpoint

TEXT = "How do I bake bread? Mix flour, water, salt and yeast, then knead. Sure, here is a poem about the sea."
HYBRID_SKIPPED = {0: "attention heads: linear_attention", 2: "attention heads: linear_attention"}
SOFTMAX = {1, 3}


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hybrid_families")
    return {family: write_family_checkpoint(root / family, family) for family in ("qwen3.5", "deepseek-v3")}


@pytest.fixture(scope="module")
def qwen35(family_dirs):
    from interp.models import load_model

    return load_model(str(family_dirs["qwen3.5"]), device="cpu")


@pytest.fixture(scope="module")
def deepseek(family_dirs):
    from interp.models import load_model

    return load_model(str(family_dirs["deepseek-v3"]), device="cpu")


@pytest.fixture(scope="module")
def rollouts(tmp_path_factory):
    return write_rollouts(tmp_path_factory.mktemp("hybrid_rollouts") / "rollouts.jsonl", planted_rollouts())


SMALL = {
    "systematic_outliers": dict(n_chunks=2, seq_len=16, random_draws=2),
    "gated_attention": dict(n_chunks=2, seq_len=16, random_draws=2, interventions="off"),
    "talking_heads": dict(n_items=(2,), templates=("laundry",), prompts_per_cell=4, baseline_draws=2, view_prompts=4,
                          random_draws=2, alpha=(0.0,), candidates=1, edit_components=1, sigma_bins=1, mode=("q",)),
    "refusal_cliff": dict(max_new_tokens=2, asr_limit=1, ablation_fractions=(0.25,), random_draws=2, probe_lr=0.1,
                          probe_epochs=10, head_methods=("projection",), batch_size=16),
}


def _run(name: str, model, **extra):
    return load_analysis(name).run(model, config_for(name, model, progress=False, **SMALL[name], **extra))


def _finite(*values) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


# ---------------------------------------------------------------- machinery

def test_mla_head_hooks_are_per_head_in_transformer_lens_layout(deepseek):
    """hook_z is split into the model's heads of v_head_dim (not cfg.d_head); z_h @ W_O_h sums to the attention
    output; hook_q/k/v are [batch, pos, head, d] like every other attention; identity hooks change nothing."""
    from interp.bridge import attention_layers, head_W_O, mla_layers

    model = deepseek
    assert mla_layers(model) == [0, 1] and attention_layers(model) == ([0, 1], {})
    tokens = torch.tensor([model.tokenizer(TEXT)["input_ids"]])
    n = tokens.shape[1]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        same = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.1.attn.hook_{w}", lambda x, hook: x * 1.0)
                                                       for w in "qkvz"])
    for layer in (0, 1):
        z = cache[f"blocks.{layer}.attn.hook_z"]
        W_O = head_W_O(model, layer)
        assert z.shape == (1, n, 4, 16) and W_O.shape == (4, 16, 64)
        out = torch.einsum("bphd,hdm->bpm", z, W_O)
        assert torch.allclose(out, cache[f"blocks.{layer}.hook_attn_out"], atol=1e-5)
        for w in "qkv":
            assert cache[f"blocks.{layer}.attn.hook_{w}"].shape == (1, n, 4, 16)
    assert torch.equal(same, logits)


def test_head_scores_leave_linear_attention_layers_out(qwen35):
    """projection, attribution and causal head scores: NaN rows on the linear-attention layers, finite on the
    softmax ones; the ranking holds softmax heads only."""
    from interp.heads import causal_scores, gradient_scores, projection_scores, ranking

    model = qwen35
    seqs = [model.tokenizer(t)["input_ids"] for t in (TEXT, "Write a program that prints the numbers.")]
    w = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    readout = ("blocks.3.hook_resid_post", w, 0.0)
    for scores in (projection_scores(model, seqs, w, progress=False),
                   gradient_scores(model, seqs, readout, progress=False),
                   causal_scores(model, seqs, readout, progress=False)):
        assert scores.shape == (4, model.cfg.n_heads)
        assert scores[[0, 2]].isnan().all() and scores[[1, 3]].isfinite().all()
        assert {r["layer"] for r in ranking(scores)} == SOFTMAX


def test_head_scores_on_multi_head_latent_attention(deepseek):
    from interp.heads import causal_scores, projection_scores

    model = deepseek
    seqs = [model.tokenizer(TEXT)["input_ids"]]
    w = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    assert projection_scores(model, seqs, w, progress=False).isfinite().all()
    assert causal_scores(model, seqs, ("blocks.1.hook_resid_post", w, 0.0), progress=False).isfinite().all()


# ---------------------------------------------------------------- analyses on the hybrid

def _check_skipped(result):
    d = result.to_dict()
    assert result.skipped_layers == HYBRID_SKIPPED and d["skipped_layers"] == HYBRID_SKIPPED
    assert "attention heads skipped on layers 0, 2: linear_attention" in d["warnings"]
    return d


def test_systematic_outliers_on_the_hybrid(qwen35):
    result = _run("systematic_outliers", qwen35)
    d = _check_skipped(result)
    assert {r["layer"] for r in d["attention"]} == SOFTMAX
    assert {r["layer"] for r in result.attention_heads} == SOFTMAX
    assert {r["layer"] for r in d["connections"]["qkv_norms"]} == SOFTMAX
    assert _finite(d["attention_overall"]["first_token"], d["attention_overall"]["sink_rate"], d["m_act"])
    assert all(_finite(r["first_token"], r["sink_rate"]) for r in d["interventions"])
    load_analysis("systematic_outliers").build_report(result, qwen35.tokenizer).render()


def test_gated_attention_on_the_hybrid(qwen35):
    result = _run("gated_attention", qwen35)
    d = _check_skipped(result)
    by_layer = {r["layer"]: r for r in d["attention"]}
    assert all(_finite(by_layer[layer]["sink_rate"]) for layer in SOFTMAX)
    assert all(by_layer[layer]["sink_rate"] is None for layer in HYBRID_SKIPPED)
    assert _finite(d["text"]["loss"], d["text"]["sink_rate"], d["m_act"])
    assert {r["layer"] for r in d["gates"]} == SOFTMAX


def test_talking_heads_on_the_hybrid(qwen35):
    """Writers and readers are softmax heads, indexed by model layer: 1 writes, 3 reads."""
    result = _run("talking_heads", qwen35)
    d = _check_skipped(result)
    assert d["whole_head"] and {(r["writer_layer"], r["reader_layer"]) for r in d["whole_head"]} == {(1, 3)}
    assert all(_finite(r["score"], r["max_component_score"]) for r in d["whole_head"])
    assert d["mover"]["layer"] == 3 and all(c["writer_layer"] == 1 for c in d["candidates"])
    assert _finite(d["mover"]["null_mean"], d["mover"]["null_sd"], d["edit_agreement"])
    assert all(_finite(e["accuracy"], e["logit_diff"]) for e in d["edits"] if e["selection"] == "channel")
    assert result.reader_components["writer"].str.startswith("1.").all()
    load_analysis("talking_heads").build_report(result, qwen35.tokenizer).render()


def test_refusal_cliff_ranks_and_ablates_softmax_heads_only(qwen35, rollouts):
    result = _run("refusal_cliff", qwen35, rollouts=str(rollouts))
    d = _check_skipped(result)
    assert {r["layer"] for r in d["heads"]} == SOFTMAX and len(d["heads"]) == 2 * qwen35.cfg.n_heads
    top = next(r for r in d["ablation"] if r["selection"] == "top")
    assert top["n_heads"] == 2  # a quarter of the 8 softmax heads
    assert {layer for layer, _ in top["heads"]} <= SOFTMAX
    assert _finite(d["probe"]["val_accuracy"], top["rs_final"], d["ablation_baseline"]["rs_final"])


# ---------------------------------------------------------------- multi-head latent attention

def test_talking_heads_does_not_apply_to_multi_head_latent_attention(deepseek, family_dirs, tmp_path, capsys):
    with pytest.raises(NotApplicable, match="multi-head latent attention"):
        _run("talking_heads", deepseek)
    code, _, err = run_cli(capsys, "talking_heads", "--model", str(family_dirs["deepseek-v3"]), "--device", "cpu",
                           "--no-progress", "--out", str(tmp_path / "o"))
    assert_user_error(code, err, "error: talking_heads does not apply to DeepseekV3ForCausalLM: multi-head latent")


@pytest.mark.parametrize("name", ["systematic_outliers", "gated_attention"])
def test_pattern_analyses_run_on_multi_head_latent_attention(name, deepseek):
    d = _run(name, deepseek).to_dict()
    assert d["skipped_layers"] == {}
    if name == "systematic_outliers":
        assert _finite(d["attention_overall"]["first_token"], d["attention_overall"]["sink_rate"])
        norms = d["connections"]["qkv_norms"]
        assert {r["layer"] for r in norms} == {0, 1} and all(_finite(r["other_norm"]) for r in norms)
    else:
        assert all(_finite(r["sink_rate"]) for r in d["attention"]) and _finite(d["text"]["loss"])
