"""capture(): left padding, fast (SDPA) attention path, early stop, errors, and what it returns."""

from __future__ import annotations

import pytest
import torch

from interp.batching import pad_left
from interp.bridge import sdpa_attention, stop_layer_for
from interp.capture import capture
from interp.errors import UserError

HOOKS = ["ln_final.hook_out", "blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]


def _seqs(tokenizer):
    texts = [
        "How do I bake bread? Mix flour, water, salt and yeast, then knead and let it rise.",
        "Sure, here is a poem.",
        "Explain how photosynthesis works in simple terms for a student, please.",
        "Hi",
    ]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.fixture
def sdpa_calls(monkeypatch):
    """Count calls of transformers' SDPA attention function."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", counting)
    return calls


def test_pad_left():
    tokens, mask = pad_left([[1, 2, 3], [4]], pad_id=0)
    assert tokens.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@pytest.mark.parametrize("fast", [True, False])
def test_padding_invariance(tiny_model, fast):
    seqs = _seqs(tiny_model.tokenizer)
    target = seqs[0]
    longer = target + seqs[2]
    alone = capture(tiny_model, [target], HOOKS, fast_attention=fast, progress=False)
    batched = capture(tiny_model, [seqs[1], longer, target, seqs[3]], HOOKS, fast_attention=fast,
                      batch_size=8, progress=False)
    for name in HOOKS:
        assert batched[name].shape[0] == 4
        torch.testing.assert_close(batched[name][2], alone[name][0], atol=1e-5, rtol=0)
    # and the rows are not all the same (padding would be invisible otherwise)
    assert (batched["ln_final.hook_out"][1] - batched["ln_final.hook_out"][2]).abs().max() > 1e-3


def test_fast_and_eager_agree(tiny_model):
    seqs = _seqs(tiny_model.tokenizer)
    fast = capture(tiny_model, seqs, HOOKS, positions="all", fast_attention=True, progress=False)
    slow = capture(tiny_model, seqs, HOOKS, positions="all", fast_attention=False, progress=False)
    for name in HOOKS:
        for a, b in zip(fast[name], slow[name]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("fast", [True, False])
def test_all_positions_match_hf_hidden_states(tiny_model, tiny_dir, fast):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager", dtype=torch.float32).eval()
    seqs = _seqs(tiny_model.tokenizer)
    names = ["blocks.0.hook_resid_post", "ln_final.hook_out"]
    out = capture(tiny_model, seqs, names, positions="all", batch_size=3, fast_attention=fast, progress=False)
    assert set(out) == set(names)
    n_layers = tiny_model.cfg.n_layers
    for i, seq in enumerate(seqs):
        with torch.no_grad():
            hidden = hf(torch.tensor([seq]), output_hidden_states=True).hidden_states
        assert len(hidden) == n_layers + 1
        for name in names:
            assert out[name][i].shape == (len(seq), 64)
            assert out[name][i].dtype == torch.float32 and out[name][i].device.type == "cpu"
        torch.testing.assert_close(out["blocks.0.hook_resid_post"][i], hidden[1][0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out["ln_final.hook_out"][i], hidden[-1][0], atol=1e-5, rtol=0)


def test_callable_positions(tiny_model):
    seqs = _seqs(tiny_model.tokenizer)
    every = capture(tiny_model, seqs, ["blocks.0.hook_resid_post"], positions="all", progress=False)
    picked = capture(tiny_model, seqs, ["blocks.0.hook_resid_post"], positions=lambda n: [0, n - 1],
                     progress=False)
    for a, b in zip(every["blocks.0.hook_resid_post"], picked["blocks.0.hook_resid_post"]):
        assert b.shape == (2, 64)
        torch.testing.assert_close(b, a[[0, -1]])


def test_sdpa_fast_path_is_taken(tiny_model, sdpa_calls):
    seqs = _seqs(tiny_model.tokenizer)
    capture(tiny_model, seqs, ["ln_final.hook_out"], fast_attention=True, batch_size=8, progress=False)
    # one batch, one SDPA call per layer
    assert len(sdpa_calls) == tiny_model.cfg.n_layers
    # the model is back to eager afterwards
    assert tiny_model.original_model.config._attn_implementation == "eager"
    assert all("forward" not in vars(b.attn) for b in tiny_model.blocks)


def test_sdpa_contexts_nest(tiny_model, sdpa_calls):
    with sdpa_attention(tiny_model) as outer:
        with sdpa_attention(tiny_model) as inner:
            capture(tiny_model, _seqs(tiny_model.tokenizer), ["ln_final.hook_out"], progress=False)
        assert outer and inner and all("forward" in vars(b.attn) for b in tiny_model.blocks)
    assert all("forward" not in vars(b.attn) for b in tiny_model.blocks)
    assert tiny_model.original_model.config._attn_implementation == "eager"


def test_sdpa_not_used_when_disabled(tiny_model, sdpa_calls):
    capture(tiny_model, _seqs(tiny_model.tokenizer), ["ln_final.hook_out"], fast_attention=False, progress=False)
    assert sdpa_calls == []


def test_pattern_hook_falls_back_to_eager(tiny_model, sdpa_calls):
    seqs = _seqs(tiny_model.tokenizer)
    out = capture(tiny_model, seqs, ["blocks.0.attn.hook_pattern", "ln_final.hook_out"], positions="all",
                  fast_attention=True, progress=False)
    assert sdpa_calls == []
    pattern = out["blocks.0.attn.hook_pattern"]
    assert isinstance(pattern, list) and len(pattern) == len(seqs)
    with sdpa_attention(tiny_model, ["blocks.1.attn.hook_attn_scores"]) as on:
        assert on is False
    with sdpa_attention(tiny_model, ["blocks.1.attn.hook_z"]) as on:
        assert on is True
    assert tiny_model.original_model.config._attn_implementation == "eager"


def test_active_pattern_hook_also_forces_eager(tiny_model, sdpa_calls):
    seen = []
    with tiny_model.hooks(fwd_hooks=[("blocks.1.attn.hook_pattern", lambda x, hook: seen.append(x.shape))]):
        capture(tiny_model, _seqs(tiny_model.tokenizer)[:1], ["ln_final.hook_out"], progress=False)
    assert sdpa_calls == [] and len(seen) == 1


def test_stop_layer_for():
    # stop == n_layers: every block runs, the final norm and the unembedding do not
    assert stop_layer_for(["blocks.0.hook_resid_post"], 4) == 1
    assert stop_layer_for(["blocks.0.hook_resid_post", "blocks.2.attn.hook_z"], 4) == 3
    assert stop_layer_for(["blocks.3.hook_resid_post"], 4) == 4
    assert stop_layer_for(["ln_final.hook_out"], 4) is None
    assert stop_layer_for(["hook_unembed"], 4) is None
    assert stop_layer_for(["blocks.0.hook_resid_post", "ln_final.hook_out"], 4) is None
    assert stop_layer_for(["hook_embed"], 4) == 0
    assert stop_layer_for(["blocks.12.hook_resid_pre"], 28) == 13


def _counting_hooks(names):
    calls = {name: 0 for name in names}

    def counter(name):
        def count(x, hook):
            calls[name] += 1
        return count

    return calls, [(name, counter(name)) for name in names]


def test_capture_stops_early(tiny_model):
    calls, hooks = _counting_hooks(["blocks.0.hook_resid_mid", "blocks.1.hook_resid_mid", "unembed.hook_out"])
    seqs = _seqs(tiny_model.tokenizer)
    with tiny_model.hooks(fwd_hooks=hooks):
        out = capture(tiny_model, seqs, ["blocks.0.hook_resid_post"], batch_size=8, progress=False)
        assert calls == {"blocks.0.hook_resid_mid": 1, "blocks.1.hook_resid_mid": 0, "unembed.hook_out": 0}
        capture(tiny_model, seqs, ["hook_embed", "blocks.0.attn.hook_z"], batch_size=8, progress=False)
        assert calls == {"blocks.0.hook_resid_mid": 2, "blocks.1.hook_resid_mid": 0, "unembed.hook_out": 0}
        capture(tiny_model, seqs, ["blocks.1.attn.hook_z"], batch_size=8, progress=False)
        assert calls["blocks.1.hook_resid_mid"] == 1
    assert out["blocks.0.hook_resid_post"].shape == (len(seqs), 64)


def test_final_norm_read_equals_norm_of_last_residual(tiny_model):
    seqs = _seqs(tiny_model.tokenizer)
    out = capture(tiny_model, seqs, ["ln_final.hook_out", "blocks.1.hook_resid_post"], progress=False)
    resid = out["blocks.1.hook_resid_post"]
    rms = resid.pow(2).mean(-1, keepdim=True).add(tiny_model.original_model.config.rms_norm_eps).sqrt()
    weight = tiny_model.original_model.model.norm.weight.detach()
    torch.testing.assert_close(out["ln_final.hook_out"], resid / rms * weight, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["ln_final.hook_out", "blocks.1.hook_resid_post"])
def test_last_layer_reads_skip_the_unembedding(tiny_model, name):
    calls, hooks = _counting_hooks(["blocks.1.hook_resid_mid", "unembed.hook_out"])
    with tiny_model.hooks(fwd_hooks=hooks):
        capture(tiny_model, _seqs(tiny_model.tokenizer), [name], batch_size=8, progress=False)
    assert calls == {"blocks.1.hook_resid_mid": 1, "unembed.hook_out": 0}


def test_sequence_longer_than_context(tiny_model):
    n_ctx = tiny_model.cfg.n_ctx
    with pytest.raises(UserError, match="context"):
        capture(tiny_model, [[5] * (n_ctx + 1)], ["ln_final.hook_out"], progress=False)
    # exactly n_ctx is fine (checked cheaply: the check, not a forward)
    from interp.capture import check_context

    check_context(tiny_model, [[5] * n_ctx])


def test_empty_sequence(tiny_model):
    with pytest.raises(UserError, match="empty"):
        capture(tiny_model, [[5, 6], []], ["ln_final.hook_out"], progress=False)


def test_unknown_hook_name(tiny_model):
    with pytest.raises(UserError, match="unknown hook") as excinfo:
        capture(tiny_model, [[5, 6, 7]], ["blocks.0.hook_resid_postt"], progress=False)
    assert "\n" not in str(excinfo.value)


def test_last_returns_only_what_was_asked(tiny_model):
    seqs = _seqs(tiny_model.tokenizer)
    out = capture(tiny_model, seqs, ["blocks.1.hook_resid_post", "blocks.1.attn.hook_z"], progress=False)
    # only the requested names (no alias spellings such as blocks.1.hook_out)
    assert set(out) == {"blocks.1.hook_resid_post", "blocks.1.attn.hook_z"}
    resid, z = out["blocks.1.hook_resid_post"], out["blocks.1.attn.hook_z"]
    assert resid.shape == (len(seqs), 64) and z.shape == (len(seqs), 4, 16)
    for t in (resid, z):
        assert t.dtype == torch.float32 and not t.requires_grad
        # owns a storage of exactly its own size (no view into a [batch, pos, ...] cache)
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_all_positions_own_their_storage(tiny_model):
    seqs = _seqs(tiny_model.tokenizer)
    out = capture(tiny_model, seqs, ["blocks.0.hook_resid_post"], positions="all", batch_size=8, progress=False)
    for t in out["blocks.0.hook_resid_post"]:
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_per_sequence_position_lists_pick_from_the_unpadded_sequence(tiny_model):
    seqs = _seqs(tiny_model.tokenizer)[:3]
    wanted = [[0, 2], [len(seqs[1]) - 1], [1, 3, 4]]
    name = "blocks.0.hook_resid_post"
    picked = capture(tiny_model, seqs, [name], positions=wanted, batch_size=8, progress=False)[name]
    full = capture(tiny_model, seqs, [name], positions="all", batch_size=8, progress=False)[name]
    for got, all_pos, idx in zip(picked, full, wanted):
        torch.testing.assert_close(got, all_pos[idx])


@pytest.fixture(scope="module")
def hybrid_model(tmp_path_factory):
    """A tiny random Qwen3.5: Gated DeltaNet (linear attention) in layers 0 and 2, gated softmax in 1 and 3."""
    from interp.models import load_model
    from interp.tiny import write_family_checkpoint

    return load_model(str(write_family_checkpoint(tmp_path_factory.mktemp("qwen3.5"), "qwen3.5")), device="cpu")


def test_attention_layers_lists_softmax_and_other_layers(hybrid_model, tiny_model):
    from interp.bridge import attention_layers

    assert attention_layers(hybrid_model) == ([1, 3], {0: "linear_attention", 2: "linear_attention"})
    assert attention_layers(tiny_model) == ([0, 1], {})
    for layer in (1, 3):
        assert f"blocks.{layer}.attn.hook_pattern" in hybrid_model.hook_dict
    assert "blocks.0.attn.hook_pattern" not in hybrid_model.hook_dict


def test_hybrid_capture_takes_the_sdpa_path_and_agrees_with_eager(hybrid_model, sdpa_calls):
    """Regression: the fast path looked up `.attn` on every block and raised AttributeError on linear-attention ones."""
    seqs = _seqs(hybrid_model.tokenizer)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z", "blocks.3.attn.hook_q", "ln_final.hook_out"]
    fast = capture(hybrid_model, seqs, hooks, batch_size=2, progress=False)
    assert len(sdpa_calls) == 2 * 2  # two softmax layers, two batches; the linear-attention layers run as they are
    eager = capture(hybrid_model, seqs, hooks, batch_size=2, fast_attention=False, progress=False)
    assert len(sdpa_calls) == 4
    for name in hooks:
        torch.testing.assert_close(fast[name], eager[name], atol=1e-5, rtol=0)
    assert fast["ln_final.hook_out"].std() > 1e-3


def test_hybrid_patterns_on_softmax_layers_are_causal_distributions(hybrid_model):
    from interp.bridge import attention_layers

    tokens = torch.tensor([_seqs(hybrid_model.tokenizer)[0]])
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in attention_layers(hybrid_model)[0]]
    _, cache = hybrid_model.run_with_cache(tokens, names_filter=lambda n: n in names)
    for name in names:
        pattern = cache[name][0]  # [head, query, key]
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
        assert pattern.triu(1).abs().max() == 0
