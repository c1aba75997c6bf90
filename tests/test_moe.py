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
