"""Out-of-memory backoff (interp.batching.run_batches) with an injected OOM: same numbers as an unforced run."""

from __future__ import annotations

import contextlib

import pytest
import torch

from interp.batching import fitted_sizes, run_batches
from interp.capture import capture
from interp.errors import UserError
from interp.generation import generate_tokens
from interp.outliers import residual_stats


def _seqs(tokenizer):
    texts = ["How do I bake bread? Mix flour, water, salt and yeast, then knead and let it rise.",
             "Sure, here is a poem.", "Explain photosynthesis in simple terms for a student, please.", "Hi",
             "The quick brown fox jumps over the lazy dog.", "One two three four five six seven eight nine ten.",
             "Why is the sky blue?", "Tell me a story about a robot who learns to paint."]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@contextlib.contextmanager
def oom_above(model, k: int, layer: int = -1):
    """Raise CUDA's out-of-memory error when decoder layer `layer` sees a batch larger than `k` (the earlier layers'
    hooks have fired by then: a failed batch has updated accumulators halfway). Counts the raises."""
    raised = []

    def pre(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        if x.shape[0] > k:
            raised.append(x.shape[0])
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected at batch {x.shape[0]})")

    handle = model.original_model.model.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield raised
    finally:
        handle.remove()
        fitted_sizes(model, "capture").clear(), fitted_sizes(model, "residual").clear()
        fitted_sizes(model, "generate").clear()


def test_capture_backs_off_to_the_same_activations(tiny_model, capsys):
    seqs = _seqs(tiny_model.tokenizer)
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    plain = capture(tiny_model, seqs, hooks, positions="all", batch_size=8, progress=False)
    capsys.readouterr()
    with oom_above(tiny_model, 2) as raised:
        forced = capture(tiny_model, seqs, hooks, positions="all", batch_size=8, progress=False)
        assert fitted_sizes(tiny_model, "capture") == {max(map(len, seqs)): 2}
    assert raised  # the injection fired
    err = capsys.readouterr().err
    assert err.count("note: out of memory in capture at batch size 8") == 1 and "retrying with 4" in err
    for name in hooks:
        for a, b in zip(plain[name], forced[name]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_later_batches_start_at_the_size_that_fit(tiny_model):
    """Each length's batch of 2 fails once; the next run of the stage starts at the sizes that fit (no OOM)."""
    seqs = _seqs(tiny_model.tokenizer)
    with oom_above(tiny_model, 1) as raised:
        first = capture(tiny_model, seqs, ["blocks.0.hook_resid_post"], batch_size=2, progress=False)
        assert raised == [2, 2, 2, 2]
        lengths = sorted(map(len, seqs), reverse=True)
        assert fitted_sizes(tiny_model, "capture") == {n: 1 for n in lengths[::2]}
        again = capture(tiny_model, seqs, ["blocks.0.hook_resid_post"], batch_size=2, progress=False)
        assert raised == [2, 2, 2, 2]
    torch.testing.assert_close(first["blocks.0.hook_resid_post"], again["blocks.0.hook_resid_post"])


def test_residual_statistics_back_off_without_partial_updates(tiny_model):
    """The OOM fires in the last layer, after the first layer's hooks updated the statistics: restored."""
    seqs = _seqs(tiny_model.tokenizer)
    plain = residual_stats(tiny_model, seqs, batch_size=8, progress=False, abs_thr=0.0, ratio=3.0)
    with oom_above(tiny_model, 3) as raised:
        forced = residual_stats(tiny_model, seqs, batch_size=8, progress=False, abs_thr=0.0, ratio=3.0)
    assert raised == [8, 4, 4]
    assert forced.n_seqs.tolist() == plain.n_seqs.tolist() == [len(seqs)] * tiny_model.cfg.n_layers
    for mine, ref in [(forced.profile(), plain.profile()), (forced.down_profile(), plain.down_profile())]:
        for a, b in zip(mine, ref):
            assert a["top_dims"] == b["top_dims"]
            for key in ("max_abs", "top1", "top2", "top3", "median_abs", "mean_abs"):
                assert a[key] == pytest.approx(b[key], rel=1e-5)
    assert forced.n_hits == plain.n_hits > 0
    assert sorted((h["layer"], h["sequence"], h["position"], h["dim"]) for h in forced.hits) == \
        sorted((h["layer"], h["sequence"], h["position"], h["dim"]) for h in plain.hits)
    assert forced.hit_counts == plain.hit_counts


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_generation_backs_off_to_the_same_tokens(tiny_model, temperature):
    seqs = _seqs(tiny_model.tokenizer)[:6]
    kw = dict(max_new_tokens=6, temperature=temperature, seed=3, batch_size=6, progress=False)
    plain = generate_tokens(tiny_model, seqs, **kw)
    with oom_above(tiny_model, 2) as raised:
        forced = generate_tokens(tiny_model, seqs, **kw)
    assert raised
    assert list(forced) == list(plain) and forced.truncated == plain.truncated


def test_out_of_memory_at_batch_one_is_a_user_error(tiny_model):
    seqs = _seqs(tiny_model.tokenizer)[:2]
    with oom_above(tiny_model, 0), pytest.raises(UserError) as err:
        capture(tiny_model, seqs, ["blocks.0.hook_resid_post"], batch_size=2, progress=False)
    message = str(err.value)
    assert "\n" not in message and "batch size 1" in message
    assert all(option in message for option in ("--batch-size", "--seq-len", "--device-map", "--dtype"))


def test_other_errors_and_plain_runtime_errors_pass_through(tiny_model):
    seqs = _seqs(tiny_model.tokenizer)[:4]

    def step(idx, tokens, mask):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        run_batches(tiny_model, seqs, 4, step, progress=False)
    tried = []

    def oom_message(idx, tokens, mask):  # the message form (older torch, other allocators) is caught too
        tried.append(len(idx))
        if len(idx) > 1:
            raise RuntimeError("HIP out of memory. Tried to allocate 2.00 GiB")

    run_batches(tiny_model, seqs, 4, oom_message, desc="message form", progress=False)
    assert tried == [4, 2, 1, 1, 2, 1, 1]
