"""Mixture-of-experts and mixed dense/MoE stacks (interp.mlp): per-layer detection, per-expert down-projection inputs,
systematic_outliers per expert, skill_unlearning on the dense neurons; encoders and generating analyses."""

from __future__ import annotations

import pytest
import torch

from interp import mlp, outliers
from interp.tiny import write_family_checkpoint

MOE_FAMILIES = ("mixtral", "qwen2-moe", "deepseek-v3", "qwen3-next")
TEXT = "How do I bake bread? Mix flour, water, salt and yeast, then knead. Sure, here is a poem about the sea."


@pytest.fixture(scope="module")
def moe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {family: write_family_checkpoint(root / family, family) for family in (*MOE_FAMILIES, "llama-3")}


def _load(path):
    from interp.models import load_model

    return load_model(str(path), device="cpu")


@pytest.fixture(scope="module")
def moe_models(moe_dirs):
    return {family: _load(path) for family, path in moe_dirs.items()}


# ------------------------------------------------------------------------------------------------ per-layer kinds

def test_mlp_kind_is_read_per_layer(moe_models):
    kinds = {family: mlp.mlp_kinds(model) for family, model in moe_models.items()}
    assert kinds["qwen2-moe"] == ["dense", "moe"]  # mlp_only_layers=[0]
    assert kinds["deepseek-v3"] == ["dense", "moe"]  # first_k_dense_replace=1
    assert kinds["mixtral"] == ["moe", "moe"] and kinds["qwen3-next"] == ["moe"] * 4
    assert kinds["llama-3"] == ["dense", "dense"]
    # block 0 is dense in a mixed stack: the model is still MoE
    assert outliers.is_moe(moe_models["qwen2-moe"]) and outliers.is_moe(moe_models["deepseek-v3"])
    assert not outliers.is_moe(moe_models["llama-3"])


def test_dense_layer_of_a_mixed_stack_reads_its_own_projections(moe_models):
    for family in ("qwen2-moe", "deepseek-v3"):
        model = moe_models[family]
        dense = mlp.dense_mlp(model, 0)
        assert dense is not None and dense.down_name == "dense_out" and dense.width == model.cfg.d_mlp
        assert mlp.dense_mlp(model, 1) is None  # the sparse layer's `gate` is the router, never a gate neuron
        shared = mlp.shared_expert(model, 1)
        assert shared is not None and shared.gate_hook in model.hook_dict and shared.width == 32
        hf_down = model.original_model.model.layers[0].mlp.down_proj.weight
        assert torch.equal(outliers.down_projection(model, 0), hf_down.detach().float())
    assert mlp.shared_expert(moe_models["mixtral"], 0) is None


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_routed_down_inputs_rebuild_the_experts_output(family, moe_models):
    """Σ over routed experts of router weight × W_down_e · x_e equals the HF experts module's output."""
    model = moe_models[family]
    layer = mlp.moe_layers(model)[-1]
    experts = mlp.routed_experts(model, layer)
    seen = {}
    handle = experts.module.register_forward_hook(lambda mod, args, out: seen.update(args=args, out=out))
    got = []
    tokens = torch.tensor([model.tokenizer(TEXT)["input_ids"]] * 2)
    try:
        with mlp.routed_down_inputs(model, [layer], lambda lay, idx, e, x: got.append((lay, idx, e, x))), \
                torch.no_grad():
            model(tokens)
    finally:
        handle.remove()
    _, index, weights = seen["args"]
    rebuilt = torch.zeros_like(seen["out"])
    for lay, idx, e, x in got:
        assert lay == layer and x.shape[1] == experts.width
        rebuilt.index_add_(0, idx, (x @ experts.down_weight(e).T) * weights[idx][index[idx] == e][:, None])
    assert {e for _, _, e, _ in got} == set(index.unique().tolist())
    torch.testing.assert_close(rebuilt, seen["out"], atol=1e-7, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ systematic_outliers

def _plant(model, layer: int, expert: int, neuron: int, dim: int, scale: float = 20.0) -> None:
    """Expert `expert`'s neuron `neuron` fires ≈ scale² (x·u)² on the tokens with x·u > 0, which the router sends to
    it; its down-projection column writes only into residual dim `dim`."""
    experts = mlp.routed_experts(model, layer)
    module, width = experts.module, experts.width
    g = torch.Generator().manual_seed(1)
    u = torch.randn(model.cfg.d_model, generator=g)
    u /= u.norm()
    with torch.no_grad():
        module.gate_up_proj[expert, neuron] = scale * u  # gate row
        module.gate_up_proj[expert, width + neuron] = scale * u  # up row
        module.down_proj[expert, :, neuron] = 0.0
        module.down_proj[expert, dim, neuron] = 1.0
        router = model.blocks[layer].mlp.original_component.gate
        router = getattr(router, "original_component", router)
        router.weight[expert] = 10 * u


@pytest.mark.parametrize("family", ["mixtral", "qwen2-moe"])
def test_systematic_outliers_finds_a_massive_activation_planted_in_one_expert(family, moe_dirs):
    from interp.analyses import systematic_outliers as so
    from interp.analysis import config_for

    model = _load(moe_dirs[family])
    expert, neuron, dim = 2, 5, 17
    _plant(model, 1, expert, neuron, dim)
    res = so.run(model, config_for("systematic_outliers", model, seq_len=16, n_chunks=4, random_draws=2,
                                   weight_ratio=30.0, progress=False))
    assert res.skipped_layers == {}
    assert {(h["layer"], h["dim"]) for h in res.massive_activations} == {(1, dim)}
    row = next(r for r in res.connections["neurons"] if r["layer"] == 1)
    assert (row["mlp"], row["expert"], row["neuron"], row["writes_to"][0], row["massive"]) == \
        ("moe", expert, neuron, dim, True)
    life = next(r for r in res.connections["lifecycle"] if r["dim"] == dim)
    assert (life["emerges_at"], life["creator_expert"], life["creator_neuron"], life["creator_same_sign"]) == \
        (1, expert, neuron, True)
    down = {r["expert"]: r for r in res.weight_outliers if r["layer"] == 1 and r["module"] == "down"}
    assert down[expert]["outlier"] and down[expert]["top_columns"][0] == neuron
    assert down[expert]["max_ratio"] == pytest.approx(model.cfg.d_model, rel=1e-3)  # one non-zero entry of d_model
    assert not any(r["outlier"] for e, r in down.items() if e != expert)
    profile = {r["layer"]: r for r in res.down_input}
    assert (profile[1]["mlp"], profile[1]["top_experts"][0], profile[1]["top_dims"][0]) == ("moe", expert, neuron)
    assert profile[0]["mlp"] == ("dense" if family == "qwen2-moe" else "moe")
    assert all(r["median_abs"] > 0 and r["top1"] >= r["median_abs"] for r in res.down_input)


def test_unreadable_expert_layout_is_skipped_and_reported(moe_dirs, monkeypatch, capsys):
    """An MoE layer whose experts interp cannot read: the down-projection parts skip it (skipped_layers, one
    warning), the residual and attention parts still run on every layer."""
    from interp.analyses import systematic_outliers as so
    from interp.analysis import config_for

    model = _load(moe_dirs["qwen2-moe"])
    def reason(model, layer):
        return "experts in a layout interp does not read" if layer == 1 else None

    monkeypatch.setattr(mlp, "unreadable_reason", reason)
    monkeypatch.setattr(outliers, "unreadable_reason", reason)
    res = so.run(model, config_for("systematic_outliers", model, seq_len=16, n_chunks=4, random_draws=2,
                                   progress=False))
    assert list(res.skipped_layers) == [1] and "layout interp does not read" in res.skipped_layers[1]
    assert [r["layer"] for r in res.down_input] == [0] and [r["layer"] for r in res.connections["neurons"]] == [0]
    assert len(res.residual) == 2 and sum("skipped on layer 1" in w for w in res.warnings) == 1
    assert "skipped on layer 1" in capsys.readouterr().err
    assert "skipped_layers" in res.to_dict()


# ------------------------------------------------------------------------------------------------ skill_unlearning

def test_shared_expert_hooks_see_positions_and_numbers_do_not_change(moe_models):
    """Qwen2-MoE calls its shared expert on the flattened tokens; under `shared_experts_by_position` its hooks see
    [batch, pos, ·] and the logits are the same."""
    model = moe_models["qwen2-moe"]
    tokens = torch.tensor([model.tokenizer(TEXT)["input_ids"]] * 2)
    shared = mlp.shared_expert(model, 1)
    shapes = []
    with torch.no_grad():
        ref = model(tokens)
        with mlp.shared_experts_by_position(model):
            out = model.run_with_hooks(tokens, fwd_hooks=[(shared.gate_hook, lambda x, hook: shapes.append(x.shape))])
        flat = model.run_with_hooks(tokens, fwd_hooks=[(shared.gate_hook, lambda x, hook: shapes.append(x.shape))])
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    torch.testing.assert_close(flat, ref, atol=0, rtol=0)
    assert shapes[0] == (*tokens.shape, shared.width) and shapes[1] == (tokens.numel(), shared.width)


@pytest.mark.parametrize("family", ["qwen2-moe", "deepseek-v3"])
def test_skill_unlearning_reads_the_dense_layer_and_shared_expert_neurons(family, moe_models):
    """Mixed stack: Neuron Adjust's statistics, selection and control cover the dense layer 0 (d_mlp neurons) and
    the MoE layer 1's shared expert (32); layer 1's routed experts are reported skipped; KSD reads layer 1's
    shared expert."""
    import math

    from interp.analyses import skill_unlearning as su
    from interp.analysis import config_for

    model = moe_models[family]
    res = su.run(model, config_for("skill_unlearning", model, forget="strings", retain="comprehension", n_probe=8,
                                   n_eval=4, random_draws=2, max_new_tokens=3, progress=False))
    assert list(res.skipped_layers) == [1] and "routed experts skipped" in res.skipped_layers[1]
    assert sum("skipped on layer 1" in w for w in res.warnings) == 1
    per_layer = res.selected_neurons["mlp_per_layer"]
    assert [(r["mlp"], r["neurons"]) for r in per_layer] == [("dense", model.cfg.d_mlp), ("shared_expert", 32)]
    assert res.selected_neurons["n_total"] == model.cfg.d_mlp + 32
    assert res.selected_neurons["n_selected"] == math.ceil(0.03 * (model.cfg.d_mlp + 32))
    assert all(r["neuron"] < (32 if r["layer"] == 1 else model.cfg.d_mlp) for r in res.selected_neurons["neurons"])
    assert res.statistics["gate_hook_max_abs_diff_vs_hf"] < 1e-6
    assert all(math.isfinite(r["logprob_before"]) for r in res.evaluation)
    assert math.isfinite(res.key_space["k"]) and res.to_dict()["skipped_layers"] == res.skipped_layers


def test_neuron_adjust_on_a_shared_expert_neuron_fires(moe_models):
    from interp.unlearning import AdjustSpec, neuron_adjust

    model = moe_models["qwen2-moe"]
    shared = mlp.shared_expert(model, 1)
    one = torch.ones(1)
    spec = AdjustSpec(torch.tensor([[1, 3]]), mu_f=one * 0, sd_f=one, mu_r=one * 5, sd_r=one,
                      hooks={1: shared.gate_hook})
    tokens = torch.tensor([model.tokenizer(TEXT)["input_ids"]])
    with torch.no_grad(), mlp.shared_experts_by_position(model):
        ref = model(tokens)
        with neuron_adjust(model, spec):
            out = model(tokens)
    assert spec.replaced[1] == tokens.shape[1] and spec.replaced[0] > 0
    assert not torch.allclose(out, ref)


def test_skill_unlearning_does_not_apply_without_a_neuron_every_token_sees(moe_models):
    """Mixtral: every MLP is routed experts only, no shared expert."""
    from interp.analyses import skill_unlearning as su
    from interp.analysis import config_for
    from interp.errors import NotApplicable

    model = moe_models["mixtral"]
    with pytest.raises(NotApplicable) as err:
        su.run(model, config_for("skill_unlearning", model, forget="strings", retain="comprehension", n_probe=8,
                                 n_eval=4, progress=False))
    assert err.value.family == "MixtralForCausalLM" and "shared expert" in err.value.reason


# ------------------------------------------------------------------------------------------------ encoders

@pytest.mark.parametrize("analysis", ["refusal_cliff", "instability", "skill_unlearning"])
def test_an_encoder_does_not_generate_one_line_exit_2(analysis, tmp_path_factory, capsys):
    from helpers import assert_user_error, run_cli

    root = tmp_path_factory.getbasetemp() / "bert-encoder"
    if not (root / "config.json").exists():
        write_family_checkpoint(root, "bert")
    capsys.readouterr()
    code, _, err = run_cli(capsys, analysis, "--model", str(root), "--device", "cpu", "--no-progress",
                           "--out", str(tmp_path_factory.mktemp("o") / "out"))
    assert_user_error(code, err, f"{analysis} does not apply to BertForMaskedLM: an encoder (masked LM) does not "
                                 "generate text")


def _sentence_transformers_dir(path):
    """A MiniLM-style sentence-transformers checkpoint: BertModel (no LM head), tokenizer.json padding and truncating
    to 128, modules.json, sentence_bert_config.json, 1_Pooling/config.json."""
    import json

    from transformers import BertConfig, BertModel

    from interp.tiny import build_wordpiece_tokenizer

    tokenizer = build_wordpiece_tokenizer(pad_to=128)
    tokenizer.save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=512, architectures=["BertModel"]),
              add_pooling_layer=True).save_pretrained(path)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 128, "do_lower_case": False}))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64,
                                                                "pooling_mode_mean_tokens": True}))
    return path


def test_systematic_outliers_runs_on_a_sentence_transformers_checkpoint(tmp_path, capsys):
    """issue 15's done-when: `python -m interp.run systematic_outliers --model <sentence-transformers dir>`."""
    import json
    import math

    from helpers import run_cli

    model_dir = _sentence_transformers_dir(tmp_path / "minilm")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "systematic_outliers", "--model", str(model_dir), "--device", "cpu",
                           "--no-progress", "--seq-len", "16", "--n-chunks", "4", "--random-draws", "2",
                           "--out", str(out))
    assert code == 0, err
    assert "note: the checkpoint is a BertModel (no LM head); it is loaded as BertForMaskedLM" in err
    res = json.loads((out / "results.json").read_text())
    assert res["skipped_layers"] == {} and len(res["residual"]) == 2 and len(res["down_input"]) == 2
    assert all(math.isfinite(r["max_abs"]) and r["max_abs"] > 0 for r in res["residual"])
    assert math.isfinite(res["m_act"]) and 0 < res["attention_overall"]["first_token"] < 1
    assert res["interventions"][0]["loss"] is None  # an encoder: no next-token loss
    assert any("Bidirectional" in n for n in res["notes"])
