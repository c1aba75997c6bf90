"""interp.heads against independent computations: plain capture + ablate_heads (causal), autograd on
a separate eager HF model (gradient), o_proj pre-hooks (projection), and the planted mechanism."""

from __future__ import annotations

import pytest
import torch

from interp.capture import capture
from interp.heads import causal_scores, gradient_scores, projection_scores, ranking, rankings_table, readout_heads
from interp.interventions import ablate_heads

N_LAYERS, N_HEADS, D_HEAD, D_MODEL = 2, 4, 16, 64
READOUTS = ["ln_final.hook_out", "blocks.0.hook_resid_post"]
TEXTS = [
    "How do I bake bread? Mix flour, water, salt and yeast.",
    "Sure, here is a short poem.",
    "The user is asking for something dangerous. I should refuse politely, because it could cause harm.",
]


@pytest.fixture(scope="module")
def seqs(tiny_model):
    out = [tiny_model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert len({len(s) for s in out}) == 3  # different lengths: batching pads on the left
    return out


@pytest.fixture(scope="module")
def readout_w():
    g = torch.Generator().manual_seed(1234)
    return torch.randn(D_MODEL, generator=g), 0.3


@pytest.fixture(scope="module")
def hf_tiny(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager", dtype=torch.float32).eval()


def _hf_layers(hf):
    return hf.model.layers


# --- causal ---------------------------------------------------------------------------------

def _sigmoid_scores(model, seqs, hook, w, b):
    # batch_size=1: the reference sees no padding at all
    acts = capture(model, seqs, [hook], positions="last", batch_size=1, progress=False)[hook]
    return torch.sigmoid(acts @ w + b)


def _reference_causal(model, seqs, hook, w, b, rescale="none"):
    clean = _sigmoid_scores(model, seqs, hook, w, b)
    out = torch.zeros(N_LAYERS, N_HEADS)
    for layer in range(N_LAYERS):
        for h in range(N_HEADS):
            with ablate_heads(model, [(layer, h)], rescale=rescale):
                ablated = _sigmoid_scores(model, seqs, hook, w, b)
            out[layer, h] = -(ablated - clean).mean()
    return out


@pytest.mark.parametrize("hook", READOUTS)
def test_causal_scores_match_ablate_heads_reference(tiny_model, seqs, readout_w, hook):
    w, b = readout_w
    expected = _reference_causal(tiny_model, seqs, hook, w, b)
    got = {bs: causal_scores(tiny_model, seqs, (hook, w, b), batch_size=bs, progress=False) for bs in (1, 8)}
    for bs, scores in got.items():
        assert scores.shape == (N_LAYERS, N_HEADS)
        torch.testing.assert_close(scores, expected, atol=1e-5, rtol=0, msg=f"batch_size={bs}")
    torch.testing.assert_close(got[1], got[8], atol=1e-6, rtol=0)
    assert expected.abs().max() > 1e-3  # the test is not vacuous
    if hook == "blocks.0.hook_resid_post":
        assert torch.equal(got[8][1], torch.zeros(N_HEADS))  # later heads cannot change it


@pytest.mark.parametrize("rescale", ["frobenius", "per_token"])
def test_causal_scores_apply_the_sweeps_rescale(tiny_model, seqs, readout_w, rescale):
    """The causal scan ranks heads under the intervention the ablation sweep applies (same rescale)."""
    w, b = readout_w
    hook = "ln_final.hook_out"
    expected = _reference_causal(tiny_model, seqs, hook, w, b, rescale=rescale)
    for bs in (1, 8):
        got = causal_scores(tiny_model, seqs, (hook, w, b), rescale=rescale, batch_size=bs, progress=False)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0, msg=f"batch_size={bs}")
    plain = causal_scores(tiny_model, seqs, (hook, w, b), progress=False)
    assert (plain - expected).abs().max() > 1e-4  # the rescale matters here


# --- gradient -------------------------------------------------------------------------------

def _reference_gradient(hf, seqs, hook, w, b):
    """Σ_pos z·∂logit/∂z per head from HF autograd, one unpadded sequence at a time, mean over seqs.

    One forward per (sequence, layer), with only that layer's o_proj input replaced by a leaf: a
    leaf at every layer at once would cut the paths from early heads through later heads' z (the
    total derivative wanted here includes them).
    """
    total = torch.zeros(N_LAYERS, N_HEADS)
    readout_layer = N_LAYERS if hook == "ln_final.hook_out" else 1
    for s in seqs:
        for layer in range(readout_layer):  # heads after the readout point have no effect (stay 0)
            kept: dict[str, torch.Tensor] = {}

            def pre(module, args):
                x = args[0].detach().requires_grad_(True)
                kept["z"] = x
                return (x,) + tuple(args[1:])

            handle = _hf_layers(hf)[layer].self_attn.o_proj.register_forward_pre_hook(pre)
            try:
                with torch.enable_grad():
                    out = hf(torch.tensor([s]), output_hidden_states=True)
                    hidden = out.hidden_states[-1] if hook == "ln_final.hook_out" else out.hidden_states[1]
                    logit = hidden[0, -1].float() @ w + b
                    (g,) = torch.autograd.grad(logit, [kept["z"]])
            finally:
                handle.remove()
            contrib = (kept["z"].detach() * g).view(len(s), N_HEADS, D_HEAD).sum(-1)  # [pos, head]
            total[layer] += contrib.sum(0)
    return total / len(seqs)


def test_hf_hidden_states_last_is_final_norm(tiny_model, hf_tiny, seqs):
    """Guards the reference: HF's last hidden state is the final-norm output read by the bridge."""
    with torch.no_grad():
        hs = hf_tiny(torch.tensor([seqs[0]]), output_hidden_states=True).hidden_states
    acts = capture(tiny_model, seqs[:1], READOUTS, positions="last", batch_size=1, progress=False)
    torch.testing.assert_close(acts["ln_final.hook_out"][0], hs[-1][0, -1], atol=1e-5, rtol=0)
    torch.testing.assert_close(acts["blocks.0.hook_resid_post"][0], hs[1][0, -1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("hook", READOUTS)
def test_gradient_scores_match_hf_autograd(tiny_model, hf_tiny, seqs, readout_w, hook):
    w, b = readout_w
    expected = _reference_gradient(hf_tiny, seqs, hook, w, b)
    got = gradient_scores(tiny_model, seqs, (hook, w, b), batch_size=8, progress=False)
    assert got.shape == (N_LAYERS, N_HEADS)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(gradient_scores(tiny_model, seqs, (hook, w, b), batch_size=1, progress=False),
                               expected, atol=1e-4, rtol=0)
    assert expected.abs().max() > 1e-2
    if hook == "blocks.0.hook_resid_post":
        assert torch.equal(got[1], torch.zeros(N_HEADS))


def test_gradient_scores_leave_model_grads_untouched(tiny_model, seqs, readout_w):
    w, b = readout_w
    before = [(p.requires_grad, p.grad) for p in tiny_model.parameters()]
    gradient_scores(tiny_model, seqs, ("ln_final.hook_out", w, b), progress=False)
    after = [(p.requires_grad, p.grad) for p in tiny_model.parameters()]
    assert [r for r, _ in before] == [r for r, _ in after]
    assert all(g is None for _, g in after)


# --- projection -----------------------------------------------------------------------------

def _reference_projection(hf, seqs, direction):
    w_hat = direction / direction.norm()
    total = torch.zeros(N_LAYERS, N_HEADS)
    for s in seqs:
        kept: dict[int, torch.Tensor] = {}
        handles = []
        for layer, block in enumerate(_hf_layers(hf)):
            def pre(module, args, layer=layer):
                kept[layer] = args[0].detach().clone()
            handles.append(block.self_attn.o_proj.register_forward_pre_hook(pre))
        try:
            with torch.no_grad():
                hf(torch.tensor([s]))
        finally:
            for handle in handles:
                handle.remove()
        for layer, block in enumerate(_hf_layers(hf)):
            W = block.self_attn.o_proj.weight.detach()  # [d_model, n_heads * d_head]
            z_last = kept[layer][0, -1]
            for h in range(N_HEADS):
                sl = slice(h * D_HEAD, (h + 1) * D_HEAD)
                total[layer, h] += (W[:, sl] @ z_last[sl]) @ w_hat
    return total / len(seqs)


def test_projection_scores_match_hf_o_proj(tiny_model, hf_tiny, seqs, readout_w):
    w, _ = readout_w
    expected = _reference_projection(hf_tiny, seqs, w)
    for bs in (1, 8):
        got = projection_scores(tiny_model, seqs, w, batch_size=bs, progress=False)
        assert got.shape == (N_LAYERS, N_HEADS)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # scale-invariant in the direction
    torch.testing.assert_close(projection_scores(tiny_model, seqs, 5.0 * w, progress=False), expected,
                               atol=1e-5, rtol=0)
    assert expected.abs().max() > 3e-3  # random init: head outputs are small, but not this small


def test_projection_scores_only_score_heads_before_the_readout(tiny_model, hf_tiny, seqs, readout_w):
    """A readout after block 0 (HF hidden_states[1]) cannot see layer-1 heads: they get no score and
    no rank; layer 0 keeps the full computation's numbers."""
    w, _ = readout_w
    assert readout_heads(tiny_model, "blocks.0.hook_resid_post") == 1
    assert readout_heads(tiny_model, "ln_final.hook_out") == N_LAYERS
    assert readout_heads(tiny_model, "hook_embed") == 0
    got = projection_scores(tiny_model, seqs, w, n_layers=1, progress=False)
    torch.testing.assert_close(got[0], _reference_projection(hf_tiny, seqs, w)[0], atol=1e-5, rtol=0)
    assert torch.isnan(got[1]).all()
    assert {r["layer"] for r in ranking(got)} == {0} and len(ranking(got)) == N_HEADS


# --- ranking / table ------------------------------------------------------------------------

def test_ranking_ascending_ties_by_layer_then_head():
    scores = torch.tensor([[0.5, -1.0, 0.0, -1.0],
                           [-1.0, 2.0, 0.0, -3.0]])
    got = [(r["layer"], r["head"], r["score"]) for r in ranking(scores)]
    assert got == [(1, 3, -3.0), (0, 1, -1.0), (0, 3, -1.0), (1, 0, -1.0),
                   (0, 2, 0.0), (1, 2, 0.0), (0, 0, 0.5), (1, 1, 2.0)]
    assert all(isinstance(r["score"], float) for r in ranking(scores))
    scores[1, 3] = float("nan")  # not scored: left out
    assert (1, 3) not in [(r["layer"], r["head"]) for r in ranking(scores)] and len(ranking(scores)) == 7


def test_rankings_table_one_row_per_head():
    a = torch.tensor([[3.0, 1.0], [2.0, 0.0]])
    b = torch.tensor([[0.0, 1.0], [2.0, 3.0]])
    table = rankings_table({"alpha": ranking(a), "beta": ranking(b)})
    assert len(table) == 4
    assert {"layer", "head", "alpha_score", "alpha_rank", "beta_score", "beta_rank"} <= set(table.columns)
    assert sorted(zip(table["layer"], table["head"])) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for _, row in table.iterrows():
        layer, head = int(row["layer"]), int(row["head"])
        assert row["alpha_score"] == a[layer, head]
        assert row["beta_score"] == b[layer, head]
        # rank = 1 + number of heads with a strictly smaller score (no ties here)
        assert row["alpha_rank"] == 1 + int((a < a[layer, head]).sum())
        assert row["beta_rank"] == 1 + int((b < b[layer, head]).sum())


# --- planted mechanism ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def planted_setup(planted, planted_model):
    from planted import planted_rollouts

    from interp.chat import thinking_sequence

    tok = planted_model.tokenizer
    seqs = [thinking_sequence(tok, r["prompt"], r["thinking"]).input_ids
            for r in planted_rollouts(planted) if r["kind"] == "jailbreak_complied"]
    assert len(seqs) == 8
    return seqs, ("ln_final.hook_out", planted.refusal_direction, 0.0)


def _top(scores, k=1):
    return [(r["layer"], r["head"]) for r in ranking(scores)[:k]]


def test_planted_projection_ranks_suppressor_first(planted, planted_model, planted_setup):
    seqs, (_, w, _) = planted_setup
    scores = projection_scores(planted_model, seqs, w, progress=False)
    assert _top(scores) == [planted.suppressor]
    assert scores[planted.suppressor] < 0


def test_planted_gradient_ranks_suppressor_first(planted, planted_model, planted_setup):
    seqs, readout = planted_setup
    scores = gradient_scores(planted_model, seqs, readout, progress=False)
    assert _top(scores) == [planted.suppressor]
    assert scores[planted.suppressor] < 0


def test_planted_causal_ranks_suppressor_and_marker_top_two(planted, planted_model, planted_setup):
    seqs, readout = planted_setup
    scores = causal_scores(planted_model, seqs, readout, progress=False)
    assert set(_top(scores, 2)) == {planted.suppressor, planted.marker_head}
    assert scores[planted.suppressor] < 0 and scores[planted.marker_head] < 0


# --- readouts inside a block ----------------------------------------------------------------

def test_gradient_scores_resid_pre_readout_equals_previous_resid_post(tiny_model, seqs, readout_w):
    w, b = readout_w
    want = gradient_scores(tiny_model, seqs, ("blocks.0.hook_resid_post", w, b), progress=False)
    got = gradient_scores(tiny_model, seqs, ("blocks.1.hook_resid_pre", w, b), progress=False)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_causal_scores_resid_pre_readout_equals_previous_resid_post(tiny_model, seqs, readout_w):
    w, b = readout_w
    want = causal_scores(tiny_model, seqs, ("blocks.0.hook_resid_post", w, b), progress=False)
    got = causal_scores(tiny_model, seqs, ("blocks.1.hook_resid_pre", w, b), progress=False)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


# --- projection through the final norm ------------------------------------------------------

@pytest.fixture(scope="module")
def planted_with_gain(planted, tmp_path_factory):
    """The planted checkpoint with a random positive final-norm gain γ (the original has γ = 1)."""
    import shutil

    from transformers import AutoModelForCausalLM

    from interp.models import load_model

    out = tmp_path_factory.mktemp("planted-gain")
    for f in planted.path.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    hf = AutoModelForCausalLM.from_pretrained(planted.path, attn_implementation="eager", dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        hf.model.norm.weight.copy_(0.2 + 2 * torch.rand(hf.config.hidden_size, generator=g))
    hf.save_pretrained(out)
    return hf, load_model(str(out), device="cpu")


def _reference_folded_projection(hf, seqs, direction):
    """Each head's o_proj slice output · (γ ⊙ ŵ) / rms of the final norm's input, averaged over sequences."""
    w_hat = direction / direction.norm()
    gamma, eps = hf.model.norm.weight.detach(), hf.model.norm.variance_epsilon
    n_heads = hf.config.num_attention_heads
    d_head = getattr(hf.config, "head_dim", None) or hf.config.hidden_size // n_heads
    layers = hf.model.layers
    total = torch.zeros(len(layers), n_heads)
    for s in seqs:
        kept: dict = {}
        hooks = [block.self_attn.o_proj.register_forward_pre_hook(
            lambda m, args, layer=layer: kept.__setitem__(layer, args[0][0, -1].detach().clone()))
            for layer, block in enumerate(layers)]
        hooks.append(hf.model.norm.register_forward_pre_hook(lambda m, args: kept.__setitem__("x", args[0][0, -1])))
        try:
            with torch.no_grad():
                hf(torch.tensor([s]))
        finally:
            for handle in hooks:
                handle.remove()
        rms = (kept["x"].pow(2).mean() + eps).sqrt()
        for layer, block in enumerate(layers):
            W = block.self_attn.o_proj.weight.detach()
            for h in range(n_heads):
                sl = slice(h * d_head, (h + 1) * d_head)
                total[layer, h] += (W[:, sl] @ kept[layer][sl]) @ (gamma * w_hat) / rms
    return total / len(seqs)


def test_folded_projection_matches_an_independent_hf_computation(planted, planted_setup, planted_with_gain):
    hf, model = planted_with_gain
    seqs, (_, w, _) = planted_setup
    expected = _reference_folded_projection(hf, seqs, w)
    for bs in (1, 8):
        got = projection_scores(model, seqs, w, fold_norm=True, batch_size=bs, progress=False)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    unfolded = projection_scores(model, seqs, w, progress=False)
    assert not torch.allclose(unfolded, expected, atol=1e-3)  # the fold changes the numbers
    assert _top(got) == [planted.suppressor]


def test_final_norm_fold_reads_the_gain_and_eps_of_an_rms_norm(planted_with_gain):
    from interp.heads import final_norm_fold

    hf, model = planted_with_gain
    gain, eps, centres = final_norm_fold(model)
    torch.testing.assert_close(gain, hf.model.norm.weight.detach(), atol=1e-5, rtol=1e-5)
    assert eps == hf.model.norm.variance_epsilon and not centres




def test_gradient_scores_recompute_blocks_same_scores_smaller_graph(tmp_path):
    """Attribution with block checkpointing (the default) gives the full graph's scores, and what its autograd
    graph holds between the forward and the backward (every tensor saved for the backward, counted by a
    saved-tensor hook around the call) is a small fraction of the full graph's (8 layers, T = 256)."""
    from interp.models import load_model
    from interp.tiny import write_tiny_checkpoint

    model = load_model(str(write_tiny_checkpoint(tmp_path / "deep", n_layers=8, d_mlp=512, seed=3)), device="cpu")
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(5, 400, (256,), generator=g).tolist(), torch.randint(5, 400, (200,), generator=g).tolist()]
    readout = ("ln_final.hook_out", torch.randn(D_MODEL, generator=g), 0.1)
    out = {}
    for checkpoint in (True, False):
        saved = []

        def pack(t, saved=saved):
            saved.append(t.numel() * t.element_size())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            scores = gradient_scores(model, seqs, readout, batch_size=2, checkpoint=checkpoint, progress=False)
        out[checkpoint] = (scores, sum(saved))
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-6, rtol=1e-5)
    assert out[True][0].abs().max() > 1e-3
    block_mlp = 2 * 256 * 512 * 4  # one block's MLP activation for the batch, float32
    assert out[False][1] > 8 * block_mlp  # the full graph holds every block's internals
    assert out[True][1] < 0.05 * out[False][1], (out[True][1], out[False][1])
