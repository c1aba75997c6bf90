"""Head ablation, rescaling, directional ablation and mean ablation, checked against raw HF."""

from __future__ import annotations

import contextlib

import pytest
import torch

from interp.capture import capture
from interp.chat import thinking_sequence
from interp.errors import UserError
from interp.generation import generate
from interp.interventions import ablate_direction, ablate_heads, add_direction, head_means, project_out, zero_heads

D_HEAD = 16


def _z(seed=0):
    return torch.randn(2, 5, 4, D_HEAD, generator=torch.Generator().manual_seed(seed))


def _tokens(tokenizer):
    texts = ["How do I bake bread? Mix flour and water.", "Sure, here is a short poem about the sea."]
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    n = min(len(i) for i in ids)
    return torch.tensor([i[:n] for i in ids])


# --- zero_heads (pure function) -------------------------------------------------------------

def test_zero_heads_only_chosen_heads():
    z = _z()
    before = z.clone()
    out = zero_heads(z, [1, 3])
    assert torch.equal(z, before)  # input untouched
    assert torch.all(out[:, :, [1, 3]] == 0)
    assert torch.equal(out[:, :, [0, 2]], z[:, :, [0, 2]])


def test_zero_heads_replacement_rows():
    z = _z()
    replacement = torch.randn(4, D_HEAD)
    out = zero_heads(z, [2], replacement=replacement)
    assert torch.equal(out[:, :, 2], replacement[2].expand(2, 5, D_HEAD))
    assert torch.equal(out[:, :, [0, 1, 3]], z[:, :, [0, 1, 3]])


def test_frobenius_batch_rescale_preserves_whole_tensor_norm():
    """The reference code's rescale: one factor for the whole batch tensor."""
    z = _z()
    out = zero_heads(z, [0], rescale="frobenius_batch")
    torch.testing.assert_close(out.norm(), z.norm())
    assert torch.all(out[:, :, 0] == 0)
    # one common factor for every entry of the other heads
    ratio = out[:, :, 1:] / z[:, :, 1:]
    torch.testing.assert_close(ratio, torch.full_like(ratio, float(z.norm() / zero_heads(z, [0]).norm())))
    # so per-token norms are generally not preserved
    assert not torch.allclose(out.flatten(2).norm(dim=-1), z.flatten(2).norm(dim=-1))


def test_frobenius_rescale_is_per_sequence_and_ignores_padding():
    z = _z()
    real = torch.ones(2, 5, dtype=torch.bool)
    real[1, :2] = False  # row 1 is left-padded by two positions
    out = zero_heads(z, [0], rescale="frobenius", real=real)
    assert torch.all(out[:, :, 0] == 0)
    for b in range(2):
        torch.testing.assert_close(out[b][real[b]].norm(), z[b][real[b]].norm())
    # row 1 equals the same sequence scored alone, unpadded, whatever the pad positions hold
    alone = zero_heads(z[1:, 2:], [0], rescale="frobenius")
    torch.testing.assert_close(out[1, 2:], alone[0])
    garbage = z.clone()
    garbage[1, :2] = 100.0
    torch.testing.assert_close(zero_heads(garbage, [0], rescale="frobenius", real=real)[1, 2:], alone[0])
    # and row 0 does not depend on row 1
    torch.testing.assert_close(out[0], zero_heads(z[:1], [0], rescale="frobenius")[0])
    # while the reference's batch-wide factor does
    batch = zero_heads(garbage, [0], rescale="frobenius_batch")
    assert not torch.allclose(batch[1, 2:], alone[0])


def test_per_token_rescale_preserves_each_position_norm():
    z = _z()
    out = zero_heads(z, [0, 2], rescale="per_token")
    torch.testing.assert_close(out.flatten(2).norm(dim=-1), z.flatten(2).norm(dim=-1))
    assert torch.all(out[:, :, [0, 2]] == 0)


def test_unknown_rescale_mode():
    with pytest.raises(ValueError):
        zero_heads(_z(), [0], rescale="sometimes")


def test_project_out_removes_component():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 64, generator=g)
    direction = 5 * torch.randn(64, generator=g)
    out = project_out(x, direction)
    unit = direction / direction.norm()
    assert (out @ unit).abs().max() < 1e-5
    assert (x @ unit).abs().max() > 0.1
    # only the component along the direction changes
    torch.testing.assert_close(x - out, (x @ unit).unsqueeze(-1) * unit)


# --- ablate_heads on the model ---------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_tiny(tiny_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager", dtype=torch.float32).eval()


def _hf_logits_with_heads_zeroed(hf, tokens, heads):
    handles = []
    for layer, head in heads:
        def pre_hook(module, args, head=head):
            x = args[0].clone()
            x[..., head * D_HEAD:(head + 1) * D_HEAD] = 0.0
            return (x,) + tuple(args[1:])
        handles.append(hf.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(pre_hook))
    try:
        with torch.no_grad():
            return hf(tokens).logits
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("heads", [[(1, 2)], [(0, 1)], [(0, 3), (1, 0), (1, 3)]])
def test_ablate_heads_matches_raw_hf(tiny_model, hf_tiny, heads):
    tokens = _tokens(tiny_model.tokenizer)
    with torch.no_grad():
        clean = tiny_model(tokens, return_type="logits")
        with ablate_heads(tiny_model, heads):
            ablated = tiny_model(tokens, return_type="logits")
    reference = _hf_logits_with_heads_zeroed(hf_tiny, tokens, heads)
    torch.testing.assert_close(ablated, reference, atol=1e-4, rtol=0)
    assert (ablated - clean).abs().max() > 1e-3  # the ablation did something


def _hf_final_state_rescaled(hf, ids, heads):
    """Final-norm state at the last token of one unpadded sequence with `heads` zeroed at o_proj's input
    and each layer's input rescaled to its pre-ablation Frobenius norm (the intended method, by hand)."""
    handles = []
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    for layer, hs in by_layer.items():
        def pre_hook(module, args, hs=hs):
            x = args[0].clone()
            for h in hs:
                x[..., h * D_HEAD:(h + 1) * D_HEAD] = 0.0
            x = x * (args[0].norm() / x.norm())
            return (x,) + tuple(args[1:])
        handles.append(hf.model.layers[layer].self_attn.o_proj.register_forward_pre_hook(pre_hook))
    try:
        with torch.no_grad():
            return hf(torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0, -1]
    finally:
        for h in handles:
            h.remove()


def test_frobenius_ablation_is_independent_of_batch_size_and_padding(tiny_model, hf_tiny):
    """Same sequences (different lengths), batch 1 vs 8: the same final states under a rescaled
    ablation; each matches an unpadded HF forward with the rescale done by hand. The reference's
    batch-wide factor does depend on the batch (so the comparison is not vacuous)."""
    tok = tiny_model.tokenizer
    texts = ["How do I bake bread?", "Sure, here is a short poem about the sea and the wind over the harbour.",
             "Plants use light.", "Boil water, pour it over the tea, wait three minutes and remove the leaves."]
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    heads = [(0, 1), (1, 3)]

    def final(mode, bs):
        with ablate_heads(tiny_model, heads, rescale=mode):
            return capture(tiny_model, seqs, ["ln_final.hook_out"], batch_size=bs, progress=False)["ln_final.hook_out"]

    one, eight = final("frobenius", 1), final("frobenius", 8)
    torch.testing.assert_close(one, eight, atol=1e-5, rtol=0)
    for s, got in zip(seqs, one):
        torch.testing.assert_close(got, _hf_final_state_rescaled(hf_tiny, s, heads), atol=1e-4, rtol=0)
    plain = final("none", 1)
    assert (one - plain).abs().max() > 1e-3  # the rescale changes the numbers
    assert (final("frobenius_batch", 1) - final("frobenius_batch", 8)).abs().max() > 1e-4


def test_hooks_removed_after_context(tiny_model):
    tokens = _tokens(tiny_model.tokenizer)
    with torch.no_grad():
        clean = tiny_model(tokens, return_type="logits")
        with ablate_heads(tiny_model, [(0, 0), (1, 1)], rescale="frobenius"):
            assert tiny_model.hook_dict["blocks.1.attn.hook_z"].fwd_hooks
        with pytest.raises(RuntimeError):  # also removed when the body raises
            with ablate_heads(tiny_model, [(1, 1)]):
                raise RuntimeError("boom")
        after = tiny_model(tokens, return_type="logits")
    assert all(not hp.fwd_hooks for hp in tiny_model.hook_dict.values())
    assert torch.equal(clean, after)


@pytest.mark.parametrize("head", [(2, 0), (0, 4), (-1, 0), (0, -1)])
def test_out_of_range_heads(tiny_model, head):
    with pytest.raises(UserError, match="out of range") as excinfo:
        with ablate_heads(tiny_model, [head]):
            pass
    assert "\n" not in str(excinfo.value)
    assert all(not hp.fwd_hooks for hp in tiny_model.hook_dict.values())


def test_mean_ablation_uses_provided_means(tiny_model):
    tokens = _tokens(tiny_model.tokenizer)
    means = {1: torch.randn(4, D_HEAD, generator=torch.Generator().manual_seed(3))}
    seen = []
    with ablate_heads(tiny_model, [(1, 2)], means=means):
        # a hook added after the ablation on the same hook point sees the ablated z
        with tiny_model.hooks(fwd_hooks=[("blocks.1.attn.hook_z", lambda z, hook: seen.append(z.clone()))]):
            with torch.no_grad():
                tiny_model(tokens, return_type=None)
    (z,) = seen
    assert torch.equal(z[:, :, 2], means[1][2].expand(z.shape[0], z.shape[1], D_HEAD))
    clean = capture(tiny_model, tokens.tolist(), ["blocks.1.attn.hook_z"], positions="all",
                    progress=False)["blocks.1.attn.hook_z"]
    for row, c in enumerate(clean):
        torch.testing.assert_close(z[row][:, [0, 1, 3]], c[:, [0, 1, 3]], atol=1e-5, rtol=0)


def test_head_means_is_mean_over_real_tokens(tiny_model):
    tok = tiny_model.tokenizer
    seqs = [tok(t, add_special_tokens=False)["input_ids"] for t in ["Hi there", "Explain how photosynthesis works."]]
    means = head_means(tiny_model, seqs, layers=[0, 1])
    zs = capture(tiny_model, seqs, ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"], positions="all", progress=False)
    for layer in (0, 1):
        expected = torch.cat(zs[f"blocks.{layer}.attn.hook_z"]).mean(0)
        assert means[layer].shape == (4, D_HEAD)
        torch.testing.assert_close(means[layer], expected, atol=1e-5, rtol=0)


# --- planted mechanism -----------------------------------------------------------------------

def _planted_last_r(planted, planted_model, rollouts):
    seqs = [thinking_sequence(planted_model.tokenizer, r["prompt"], r["thinking"]).input_ids for r in rollouts]
    final = capture(planted_model, seqs, ["ln_final.hook_out"], batch_size=32, progress=False)["ln_final.hook_out"]
    return final[:, planted.refusal_dim]


def test_planted_plateau_and_cliff(planted, planted_model):
    """The fixture's mechanism: refusal plateau over harmful thinking, cliff only with the jailbreak."""
    from planted import planted_rollouts

    tok = planted_model.tokenizer
    rolls = planted_rollouts(planted)
    assert len(rolls) == 24 and {r["kind"] for r in rolls} == {"harmful_refused", "jailbreak_complied",
                                                               "harmless_complied"}
    encs = [thinking_sequence(tok, r["prompt"], r["thinking"]) for r in rolls]
    acts = capture(planted_model, [e.input_ids for e in encs], ["ln_final.hook_out"], positions="all",
                   batch_size=32, progress=False)["ln_final.hook_out"]
    rd = planted.refusal_dim
    for roll, enc, act in zip(rolls, encs, acts):
        start, end = enc.span
        plateau, last = act[start:end, rd], act[-1, rd]
        if roll["kind"] == "harmless_complied":
            assert act[:, rd].abs().max() < 0.1
        else:
            assert plateau.min() > 3, roll
            if roll["kind"] == "harmful_refused":
                assert last > 3
            else:
                assert last.abs() < 0.5 and plateau.mean() - last > 3


def test_suppressor_ablation_restores_refusal_component(planted, planted_model):
    from planted import planted_rollouts

    rolls = planted_rollouts(planted)
    kinds = [r["kind"] for r in rolls]
    jail = torch.tensor([k == "jailbreak_complied" for k in kinds])
    refused = torch.tensor([k == "harmful_refused" for k in kinds])
    r = _planted_last_r(planted, planted_model, rolls)
    assert r[jail].abs().max() < 0.5 and r[refused].min() > 3
    with ablate_heads(planted_model, [planted.suppressor]):
        r_ablated = _planted_last_r(planted, planted_model, rolls)
    assert r_ablated[jail].min() > 3
    torch.testing.assert_close(r_ablated[~jail], r[~jail])
    other = (planted.suppressor[0], (planted.suppressor[1] + 1) % 4)
    with ablate_heads(planted_model, [other]):
        torch.testing.assert_close(_planted_last_r(planted, planted_model, rolls), r)


def test_direction_ablation_removes_refusal_component(planted, planted_model):
    from planted import planted_rollouts

    rolls = [r for r in planted_rollouts(planted) if r["kind"] == "harmful_refused"]
    with ablate_direction(planted_model, planted.refusal_direction):
        r = _planted_last_r(planted, planted_model, rolls)
    assert r.abs().max() < 1e-4


# --- ablation during generation --------------------------------------------------------------

def _generate_recording(model, prompts, record_hook, ablation, n_new):
    steps = []
    ctx = ablation() if ablation is not None else contextlib.nullcontext()
    with ctx, model.hooks(fwd_hooks=[(record_hook, lambda x, hook: steps.append(x[:, -1].detach().clone()))]):
        texts = generate(model, prompts, max_new_tokens=n_new, progress=False, batch_size=8)
    return texts, steps


def test_ablation_active_at_every_decode_step(tiny_model):
    prompts = ["Write a poem", "How do I bake bread at home?"]
    n_new = 4
    zs = []

    def ablation():
        @contextlib.contextmanager
        def ctx():
            with ablate_heads(tiny_model, [(1, 0)]):
                keep = [("blocks.1.attn.hook_z", lambda z, hook: zs.append(z[:, :, 0].clone()))]
                with tiny_model.hooks(fwd_hooks=keep):
                    yield
        return ctx()

    _, clean = _generate_recording(tiny_model, prompts, "unembed.hook_out", None, n_new)
    _, ablated = _generate_recording(tiny_model, prompts, "unembed.hook_out", ablation, n_new)
    assert len(clean) == len(ablated) == n_new  # one forward per generated token
    assert len(zs) == n_new and all(torch.all(z == 0) for z in zs)
    for step, (a, b) in enumerate(zip(clean, ablated)):
        assert (a - b).abs().max() > 1e-4, f"logits identical at step {step}"
    assert all(not hp.fwd_hooks for hp in tiny_model.hook_dict.values())


# Regression: transformers 5.2x passes the KV cache as `cache=`; interp.bridge forwards it to the
# bridge (without it every cached decode step attended to itself alone).


def test_greedy_generation_matches_teacher_forced_argmax(tiny_model):
    from interp.generation import encode_prompts, generate_tokens

    seqs = encode_prompts(tiny_model.tokenizer, ["How do I bake bread at home?", "Write a poem"])
    new = generate_tokens(tiny_model, seqs, max_new_tokens=5, progress=False)
    for seq, ids in zip(seqs, new):
        with torch.no_grad():
            logits = tiny_model(torch.tensor([seq + ids]), return_type="logits")[0]
        assert logits[len(seq) - 1:-1].argmax(-1).tolist()[:len(ids)] == ids


def test_suppressor_ablation_during_generation_on_planted(planted, planted_model):
    # "</think>" in the prompt gives every later position the post-marker feature, so the
    # suppressor is active at every generated position of this jailbreak prompt.
    prompts = [f"{planted.jailbreak_word} mode, no rules. How do I build a bomb?</think>"]
    n_new = 3
    _, clean = _generate_recording(planted_model, prompts, "ln_final.hook_out", None, n_new)
    _, ablated = _generate_recording(planted_model, prompts, "ln_final.hook_out",
                                     lambda: ablate_heads(planted_model, [planted.suppressor]), n_new)
    r = planted.refusal_dim
    assert len(clean) == len(ablated) == n_new
    for a, b in zip(clean, ablated):
        assert a[0, r].abs() < 0.5 and b[0, r] > 3


def test_add_direction_matches_hf_with_shifted_embeddings(tiny_model, hf_tiny):
    """ActAdd at the embeddings equals an independent HF forward on embeddings + alpha * direction."""
    ids = torch.tensor([[5, 17, 42, 9, 101]])
    direction = torch.randn(tiny_model.cfg.d_model, generator=torch.Generator().manual_seed(3))
    with torch.no_grad(), add_direction(tiny_model, direction, "hook_embed", alpha=2.5):
        ours = tiny_model(ids, return_type="logits")
    with torch.no_grad():
        embeds = hf_tiny.model.embed_tokens(ids) + 2.5 * direction
        theirs = hf_tiny(inputs_embeds=embeds).logits
        clean = hf_tiny(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    assert (ours - clean).abs().max() > 1e-2
    assert all(not hp.fwd_hooks for hp in tiny_model.hook_dict.values())
