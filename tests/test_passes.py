"""The text pass (interp.passes): equal to an independent computation, to itself at any batch size, stored by shard
and read back instead of run again (the audit's shared capture pass)."""

from __future__ import annotations

import pytest
import torch

from interp import passes, stages
from interp.batching import padded_batches


def _seqs(n_tokens=(12, 9, 12, 7, 5, 12, 3, 8, 10, 11), seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 200, (n,), generator=g).tolist() for n in n_tokens]


def _numbers(rows: list[dict]) -> list[float]:
    return [v for r in rows for v in r.values() if isinstance(v, float)]


def _options(model) -> passes.SinkOptions:
    return passes.SinkOptions(tuple(range(model.cfg.n_layers)), eps=0.3)


def test_text_pass_equals_the_cached_forward_at_any_batch_size(tiny_model):
    """Loss and the largest |h| per layer against run_with_cache on one padded batch; the same at batch 1 and 4."""
    seqs = _seqs()
    found = passes.measure(tiny_model, seqs, _options(tiny_model), batch_size=4, progress=False)
    (_, tokens, mask), = list(padded_batches(tiny_model, seqs, len(seqs), progress=False))
    with torch.no_grad():
        logits, cache = tiny_model.run_with_cache(tokens, attention_mask=mask,
                                                  names_filter=lambda n: n.endswith("hook_resid_post"))
    pairs = (mask[:, :-1] * mask[:, 1:]).bool()
    logp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, tokens[:, 1:, None])[..., 0]
    assert found.count == int(pairs.sum()) == sum(len(s) - 1 for s in seqs)
    assert found.loss() == pytest.approx(float(-logp[pairs].mean()), rel=1e-4)
    real = mask.bool()
    expected = [float(cache[f"blocks.{layer}.hook_resid_post"][real].abs().max())
                for layer in range(tiny_model.cfg.n_layers)]
    assert found.layer_max.tolist() == pytest.approx(expected, rel=1e-5)
    assert found.m_act() == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    single = passes.measure(tiny_model, seqs, _options(tiny_model), batch_size=1, progress=False)
    assert single.summary() == pytest.approx(found.summary(), rel=1e-5)
    assert [r["first_token"] for r in single.attention.per_head()] == \
        pytest.approx([r["first_token"] for r in found.attention.per_head()], rel=1e-5)


def test_baseline_is_stored_by_shard_and_read_back_without_a_forward(tiny_model, tmp_path, monkeypatch):
    seqs = _seqs(seed=1)
    options = _options(tiny_model)
    one = passes.measure(tiny_model, seqs, options, batch_size=2, progress=False)
    assert len(stages.shards([len(s) for s in seqs], 2)) == 2  # 5 batches: shards of 4 and 1, merged in order
    with stages.sharing(tmp_path) as store:
        stored = passes.baseline(tiny_model, seqs, options, batch_size=2, progress=False)
    assert store.events == [{"stage": "text_pass", "key_hash": store.events[0]["key_hash"], "items": 2, "reused": 0}]
    assert stored.nll == pytest.approx(one.nll, rel=1e-12) and stored.count == one.count
    assert torch.equal(stored.layer_max, one.layer_max)
    assert _numbers(stored.attention.per_head()) == pytest.approx(_numbers(one.attention.per_head()), rel=1e-12)

    def no_forward(*args, **kwargs):
        raise AssertionError("the stored pass ran again")

    monkeypatch.setattr(passes, "measure", no_forward)
    with stages.using(tmp_path / "another analysis"), stages.sharing(tmp_path) as store:  # the audit's shared store
        again = passes.baseline(tiny_model, seqs, options, batch_size=2, progress=False)
    assert store.events[0]["reused"] == 2
    assert again.summary() == stored.summary() and again.attention.per_head() == stored.attention.per_head()
    with pytest.raises(AssertionError, match="ran again"):  # other sink options: another pass
        passes.baseline(tiny_model, seqs, passes.SinkOptions(options.layers, eps=0.5), batch_size=2, progress=False)


def test_baseline_refuses_a_model_under_an_intervention(tiny_model):
    with tiny_model.hooks(fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: 2 * x)]):
        with pytest.raises(RuntimeError, match="hook is active"):
            passes.baseline(tiny_model, _seqs(), _options(tiny_model), batch_size=4, progress=False)
