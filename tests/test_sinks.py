"""Sink metrics against hand-computed values, padding invariance, and streaming = one-shot."""

from __future__ import annotations

import pytest
import torch

from interp import sinks


def _causal(rows):
    """A [1, 1, T, T] pattern from lower-triangular rows."""
    return torch.tensor(rows, dtype=torch.float32)[None, None]


P = _causal([[1.0, 0.0, 0.0, 0.0],
             [0.6, 0.4, 0.0, 0.0],
             [0.5, 0.2, 0.3, 0.0],
             [0.1, 0.1, 0.4, 0.4]])


def test_first_token_attention_hand_values():
    assert sinks.first_token_attention(P).item() == pytest.approx((0.6 + 0.5 + 0.1) / 3)
    assert sinks.first_token_attention(P, exclude_first_query=False).item() == pytest.approx((1 + 0.6 + 0.5 + 0.1) / 4)


def test_key_attention_is_gu_alpha():
    alpha = sinks.key_attention(P)[0, 0]
    expected = [(1 + 0.6 + 0.5 + 0.1) / 4, (0.4 + 0.2 + 0.1) / 3, (0.3 + 0.4) / 2, 0.4 / 1]
    assert alpha.tolist() == pytest.approx(expected)
    # bidirectional: every query counts for every key
    full = torch.full((1, 1, 3, 3), 1 / 3)
    assert sinks.key_attention(full, causal=False)[0, 0].tolist() == pytest.approx([1 / 3] * 3)


def test_outlier_keys_and_ratio():
    keys = sinks.attention_outlier_keys(P, frac=0.5)  # column sums 2.2, 0.7, 0.7, 0.4 ≥ 2.0?
    assert keys[0].tolist() == [True, False, False, False]
    assert sinks.sink_ratio(P, keys).item() == pytest.approx(2.2 / 4)
    keys = sinks.attention_outlier_keys(P, frac=0.1)  # ≥ 0.4: every key
    assert keys[0].all()


def test_left_padding_gives_the_same_metrics():
    padded = torch.zeros(1, 1, 6, 6)
    padded[0, 0, 2:, 2:] = P[0, 0]
    padded[0, 0, :2, :2] = 0.5  # garbage rows of padded queries must be ignored
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    assert torch.allclose(sinks.first_token_attention(padded, mask), sinks.first_token_attention(P))
    assert torch.allclose(sinks.key_attention(padded, mask)[..., :4], sinks.key_attention(P))
    assert sinks.key_attention(padded, mask)[..., 4:].abs().max() == 0
    k_pad, k = sinks.attention_outlier_keys(padded, mask, 0.5), sinks.attention_outlier_keys(P, frac=0.5)
    assert k_pad[0, :4].tolist() == k[0].tolist() and not k_pad[0, 4:].any()
    assert torch.allclose(sinks.sink_ratio(padded, k_pad, mask), sinks.sink_ratio(P, k))


def test_streaming_equals_one_shot():
    torch.manual_seed(0)
    b, h, t = 6, 3, 5
    pattern = torch.rand(b, h, t, t).tril()
    pattern = pattern / pattern.sum(-1, keepdim=True)
    tokens = torch.randint(0, 50, (b, t))

    def run(splits):
        stats = sinks.AttentionStats(1, h, eps=0.5, example=0)
        for idx in splits:
            stats.begin_batch(idx, tokens[idx], None)
            stats.update(0, pattern[idx])
        return stats

    one, streamed = run([list(range(b))]), run([[0, 1], [2], [3, 4, 5]])
    for a, b_ in zip(one.per_head(), streamed.per_head(), strict=True):
        assert a == pytest.approx(b_)
    assert sorted(one.outlier_keys) == sorted(streamed.outlier_keys)
    # per-layer values against a direct computation
    f = sinks.first_token_attention(pattern).mean()
    alpha0 = sinks.key_attention(pattern)[..., 0]
    row = one.per_layer()[0]
    assert 0 < row["sink_rate"] < 100
    assert row["first_token"] == pytest.approx(float(f))
    assert row["sink_rate"] == pytest.approx(100 * float((alpha0 > 0.5).float().mean()))
    assert torch.allclose(one.example[0], pattern[0].mean(0))


def test_gated_q_norms_use_the_query_half():
    """Qwen3.5 / Qwen3-Next: the q hook holds [q_h | g_h] per head as 2H rows; the norms read the query rows only."""
    from interp.models import load_model

    model = load_model("organism-gated", device="cpu")
    got = {}
    model.run_with_hooks(torch.tensor([[5, 6, 7, 8]]), return_type=None, fwd_hooks=[
        ("blocks.0.attn.hook_q", lambda x, hook: got.__setitem__("q", x.detach())),
        ("blocks.0.attn.q.hook_in", lambda x, hook: got.__setitem__("in", x.detach()))])
    raw = model.original_model.model.layers[0].self_attn.q_proj(got["in"]).view(1, 4, 4, 64)
    assert torch.allclose(got["q"][:, :, 0::2], raw[..., :32], atol=1e-6)
    stats = sinks.attention_metrics(model, [[5, 6, 7, 8]], layers=[0], qkv_norms=True, progress=False)
    assert stats.gated_q
    rows = {r["vector"]: r for r in stats.qkv_norm_rows()}
    expected = raw[..., :32].norm(dim=-1).mean().item()  # no padding: mean over positions and heads
    mixed = [rows["q"][k] for k in ("sink_norm", "other_norm") if rows["q"][k] is not None]
    n_sink = sum(1 for layer, *_ in stats.outlier_keys if layer == 0)
    overall = (mixed[0] * n_sink + mixed[-1] * (4 - n_sink)) / 4 if len(mixed) == 2 else mixed[0]
    assert overall == pytest.approx(expected, rel=1e-5)


def _pattern(sink_keys_by_query: list[int], t: int) -> torch.Tensor:
    """A [1, 1, T, T] pattern where query q puts all its attention on key `sink_keys_by_query[q]` (≤ q)."""
    p = torch.zeros(1, 1, t, t)
    for q, k in enumerate(sink_keys_by_query):
        p[0, 0, q, k] = 1.0
    return p


def test_rho_keeps_the_sink_set_of_the_emergence_layer():
    """Planted patterns: layer 0 sinks on key 0; in layer 1 queries 3.. move to key 3 (a delimiter). Re-detecting S in
    layer 1 follows the attention to key 3 (ρ = 5/8, the most-attended key by construction); An's S fixed where the
    sink emerges gives the share still on key 0 (3/8)."""
    t = 8
    first = _pattern([0] * t, t)
    moved = _pattern([0, 0, 0] + [3] * (t - 3), t)
    uniform = torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1)[:, None]
    layer_patterns = {0: torch.cat([first, uniform[None, None]]), 1: torch.cat([moved, moved])}
    stats = sinks.AttentionStats(2, 1, eps=0.3, outlier_frac=0.5)
    stats.begin_batch([0, 1], torch.zeros(2, t, dtype=torch.long), None)
    for layer in (0, 1):
        stats.update(layer, layer_patterns[layer])
    rho = {r["layer"]: r["sink_ratio"] for r in stats.per_layer()}
    redetected = sinks.sink_ratio(moved, sinks.attention_outlier_keys(moved, frac=0.5)).item()
    assert redetected == pytest.approx(5 / 8)  # the old per-layer rule: S = {3} in layer 1
    # sequence 0: S = {0} from layer 0, ρ = 3 / 8 in layer 1; sequence 1: no key in layer 0 (ρ 0), S = {3} from layer 1
    assert rho[0] == pytest.approx((1.0 + 0.0) / 2)
    assert rho[1] == pytest.approx((3 / 8 + 5 / 8) / 2)
    assert stats.sink_layers == {0: 1, 1: 1}
    # streamed one sequence per batch: the same
    one = sinks.AttentionStats(2, 1, eps=0.3, outlier_frac=0.5)
    for i in (0, 1):
        one.begin_batch([i], torch.zeros(1, t, dtype=torch.long), None)
        for layer in (0, 1):
            one.update(layer, layer_patterns[layer][i:i + 1])
    assert [r["sink_ratio"] for r in one.per_layer()] == pytest.approx([rho[0], rho[1]])


# ---------------------------------------------------------------- Gu's sink rate at T = 64


def test_first_key_alpha_reads_the_first_rows():
    assert sinks.first_key_alpha(P, t=2).item() == pytest.approx((1.0 + 0.6) / 2)
    assert sinks.first_key_alpha(P, t=64).item() == pytest.approx(sinks.key_attention(P)[0, 0, 0].item())
    padded = torch.zeros(1, 1, 6, 6)
    padded[0, 0, 2:, 2:] = P[0, 0]
    padded[0, 0, :2, :2] = 0.5
    assert sinks.first_key_alpha(padded, torch.tensor([[0, 0, 1, 1, 1, 1]]), t=3).item() == pytest.approx(2.1 / 3)


def _alpha0(model, seqs: list[list[int]]) -> torch.Tensor:
    """Gu's α[0] per sequence, layer and head from each sequence's own full pattern (one sequence per forward)."""
    out = []
    for s in seqs:
        _, cache = model.run_with_cache(torch.tensor([s]), names_filter=lambda n: n.endswith("hook_pattern"))
        out.append(torch.stack([sinks.key_attention(cache[f"blocks.{layer}.attn.hook_pattern"])[0, :, 0]
                                for layer in range(model.cfg.n_layers)]))
    return torch.stack(out)  # [seq, layer, head]


def test_sink_rate_t64_equals_a_separate_run_on_the_64_token_prefixes(tiny_model):
    """In a causal model the first 64 rows of a longer pattern are the 64-token prefix's pattern: the T = 64 sink rate
    read from 128-token chunks (and from left-padded chunks of mixed lengths) equals the sink rate of a separate run on
    the prefixes, per layer, per head and overall; at 64 tokens it equals the sink rate itself."""
    from interp.texts import chunk_texts, natural_text

    chunks = chunk_texts(tiny_model.tokenizer, natural_text(), 128, 6).chunks
    prefixes = [c[:64] for c in chunks]
    alpha = _alpha0(tiny_model, prefixes)
    # a threshold in the widest gap among the middle α[0] values: rates strictly between 0 and 100, far from any α
    vals = alpha.flatten().sort().values
    lo = len(vals) // 4
    k = lo + int((vals[lo + 1:3 * lo] - vals[lo:3 * lo - 1]).argmax())
    eps = float(vals[k] + vals[k + 1]) / 2
    long = sinks.attention_metrics(tiny_model, chunks, eps=eps, batch_size=4, progress=False)
    mixed = sinks.attention_metrics(tiny_model, [c[:64 + 12 * i] for i, c in enumerate(chunks)], eps=eps,
                                    batch_size=4, progress=False)  # left padding inside a batch
    short = sinks.attention_metrics(tiny_model, prefixes, eps=eps, batch_size=4, progress=False)
    expected = 100 * (alpha > eps).double().mean().item()
    assert 0 < expected < 100
    assert short.overall()["sink_rate"] == pytest.approx(expected)
    for stats in (long, mixed):
        assert stats.overall()["sink_rate_t64"] == pytest.approx(expected)
        for a, b in zip(stats.per_layer(), short.per_layer(), strict=True):
            assert a["sink_rate_t64"] == pytest.approx(b["sink_rate"])
        for a, b in zip(stats.per_head(), short.per_head(), strict=True):
            assert a["sink_rate_t64"] == pytest.approx(b["sink_rate"])
    assert long.overall()["sink_rate"] != pytest.approx(expected)  # T matters (Gu et al.): 128 tokens differ
    assert short.overall()["sink_rate_t64"] == short.overall()["sink_rate"]
    assert [r["sink_rate_t64"] for r in short.per_head()] == [r["sink_rate"] for r in short.per_head()]
    too_short = sinks.attention_metrics(tiny_model, [c[:32] for c in chunks], eps=eps, progress=False)
    assert too_short.overall()["sink_rate_t64"] is None and too_short.per_layer()[0]["sink_rate_t64"] is None


@pytest.mark.parametrize("analysis", ["systematic_outliers", "gated_attention"])
def test_analyses_report_the_sink_rate_at_t64(analysis, tiny_model):
    """Both analyses report `sink_rate_t64` beside the sink rate at --seq-len: equal at 64; at 128 the same as an
    independent run of the sink metrics on the 64-token prefixes of the chunks the analysis measured."""
    from interp.analyses import gated_attention as ga
    from interp.analyses import systematic_outliers as so
    from interp.analysis import config_for, run_analysis

    eps = 0.08
    small = dict(n_chunks=4, sink_epsilon=eps, progress=False)
    if analysis == "systematic_outliers":
        small |= dict(random_draws=2)
    for seq_len in (64, 128):
        res = run_analysis(analysis, tiny_model, seq_len=seq_len, **small)
        cfg = config_for(analysis, tiny_model, seq_len=seq_len, **small)
        if analysis == "systematic_outliers":
            got, at_len = res.attention_overall["sink_rate_t64"], res.attention_overall["sink_rate"]
            measured = so.load_text_set(tiny_model, cfg).chunks
            assert all("sink_rate_t64" in row for row in res.attention)
        else:
            got, at_len = res.primary.text["sink_rate_t64"], res.primary.text["sink_rate"]
            chunks = ga.text_set(tiny_model, cfg)
            held = ga.split(len(chunks), cfg.selection_fraction, cfg.seed).held_out
            measured = [chunks.chunks[i] for i in held]
            assert all("sink_rate_t64" in row for row in res.primary.attention)
        if seq_len == 64:
            assert got == at_len
        else:
            independent = sinks.attention_metrics(tiny_model, [c[:64] for c in measured], eps=eps,
                                                  progress=False).overall()["sink_rate"]
            assert got == pytest.approx(independent)


# ---------------------------------------------------------------- streamed reduction = full materialisation (issue 16)

def _ref_metrics(pattern, mask, causal=True, frac=0.1, eps=0.3, exclude_first=True, t=64):
    """The previous implementation, independent of interp.sinks: full float32 copies of the pattern."""
    b, h, width, _ = pattern.shape
    p = pattern.float()
    if mask is None:
        mask = torch.ones(b, width, dtype=torch.long)
    lengths = mask.sum(-1).long()
    starts = width - lengths
    pos = torch.arange(width)

    def align(x):
        out = torch.zeros_like(x)
        for r in range(b):
            out[r, ..., :lengths[r]] = x[r, ..., starts[r]:]
        return out

    real_q = (pos[None] >= starts[:, None]).float()
    q_first = (pos[None] >= starts[:, None] + int(exclude_first)).float()
    to_first = torch.stack([p[r, :, :, starts[r]] for r in range(b)])  # [b, h, q]
    first = (to_first * q_first[:, None]).sum(-1) / q_first.sum(-1).clamp_min(1)[:, None]
    received = p * real_q[:, None, :, None]
    if causal:
        received = received.tril()
        count = (width - torch.maximum(pos[None], starts[:, None])).float()
    else:
        count = real_q.sum(-1, keepdim=True).expand(b, width)
    alpha = align(received.sum(-2) / count.clamp_min(1)[:, None])
    rows = ((pos[None] >= starts[:, None]) & (pos[None] < starts[:, None] + t)).float()
    alpha64 = (to_first * rows[:, None]).sum(-1) / rows.sum(-1).clamp_min(1)[:, None]
    col = (p.mean(1) * real_q[:, :, None]).sum(1)
    keys = (align(col) >= frac * lengths[:, None].float()) & (pos[None] < lengths[:, None])
    colh = align((p * real_q[:, None, :, None]).sum(-2))
    ratio = (colh * keys[:, None].float()).sum(-1) / colh.sum(-1).clamp_min(1e-12)
    return {"first": first, "alpha": alpha, "sink": alpha[:, :, 0] > eps, "sink64": alpha64 > eps, "keys": keys,
            "ratio": ratio}


def _random_patterns(b=3, h=4, width=37, seed=0, causal=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, h, width, width, generator=g) * 2
    lengths = torch.tensor([width, width - 5, width - 11][:b])
    for row in range(b):
        scores[row, :, :, width - lengths[row]] += 3  # a sink on the first real key
    mask = (torch.arange(width)[None] >= (width - lengths)[:, None]).long()
    allowed = mask[:, None, None, :].bool().expand(b, h, width, width)
    if causal:
        allowed = allowed & torch.ones(width, width, dtype=torch.bool).tril()
    pattern = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return pattern.to(dtype), mask


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("block", [1, 5, None])
def test_streamed_metrics_equal_the_full_materialisation(causal, block, monkeypatch):
    pattern, mask = _random_patterns(causal=causal)
    if block is not None:  # rows per block: QUERY_BLOCK_BYTES / (batch · heads · pos · 4)
        monkeypatch.setattr(sinks, "QUERY_BLOCK_BYTES", block * 3 * 4 * 37 * 4)
    ref = _ref_metrics(pattern, mask, causal=causal)
    assert torch.allclose(sinks.first_token_attention(pattern, mask), ref["first"], atol=1e-6)
    assert torch.allclose(sinks.key_attention(pattern, mask, causal), ref["alpha"], atol=1e-6)
    keys = sinks.attention_outlier_keys(pattern, mask)
    assert torch.equal(keys, ref["keys"]) and keys[:, 0].all()
    assert torch.allclose(sinks.sink_ratio(pattern, keys, mask), ref["ratio"], atol=1e-6)
    stats = sinks.AttentionStats(1, 4, causal=causal, example=1)
    stats.begin_batch([0, 1, 2], torch.randint(0, 50, mask.shape), mask)
    stats.update(0, pattern)
    n = 3 * 4
    row = stats.per_layer()[0]
    assert row["first_token"] == pytest.approx(float(ref["first"].sum() / n), abs=1e-6)
    assert row["sink_rate"] == pytest.approx(100 * float(ref["sink"].sum()) / n)
    # S = this layer's keys (the first layer with any); ρ against the reference on the same S
    assert row["sink_ratio"] == pytest.approx(float(ref["ratio"].sum() / n), abs=1e-6)
    assert sorted((s, p) for _, s, p, _ in stats.outlier_keys) == sorted(map(tuple, ref["keys"].nonzero().tolist()))


def test_example_pattern_is_capped(monkeypatch):
    pattern, mask = _random_patterns(width=37)
    monkeypatch.setattr(sinks, "EXAMPLE_TOKENS", 16)
    stats = sinks.AttentionStats(1, 4, example=1, example_tokens=16)
    stats.begin_batch([0, 1, 2], torch.randint(0, 50, mask.shape), mask)
    stats.update(0, pattern)
    start = 5  # row 1 has 5 padded positions
    assert stats.example[0].shape == (16, 16)
    assert torch.allclose(stats.example[0], pattern[1, :, start:start + 16, start:start + 16].mean(0))
    short = sinks.AttentionStats(1, 4, example=2, example_tokens=256)  # 26 real tokens < 256: the whole chunk
    short.begin_batch([0, 1, 2], torch.randint(0, 50, mask.shape), mask)
    short.update(0, pattern)
    assert short.example[0].shape == (26, 26)


def test_update_makes_no_full_float32_copy_of_the_pattern(monkeypatch):
    """A bfloat16 pattern is reduced a block of query rows at a time: no allocation near the size of a float32 copy
    (torch's CPU memory profiler sees every allocation)."""
    from torch.profiler import ProfilerActivity, profile

    pattern, mask = _random_patterns(b=2, h=4, width=256, dtype=torch.bfloat16)
    full_copy = pattern.numel() * 4  # 2 MiB
    monkeypatch.setattr(sinks, "QUERY_BLOCK_BYTES", full_copy // 16)
    stats = sinks.AttentionStats(1, 4, qkv_norms=False)
    stats.begin_batch([0, 1], torch.randint(0, 50, mask.shape), mask)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        stats.update(0, pattern)
    largest = max(getattr(e, "cpu_memory_usage", 0) for e in prof.events())
    assert 0 < largest <= full_copy // 8, largest


def test_attention_metrics_on_a_model_equal_the_cached_patterns(tiny_model):
    """attention_metrics (hooks that reduce each layer's pattern and drop it) = the reference on run_with_cache's
    patterns, padded batch included."""
    from interp.texts import chunk_texts, natural_text

    seqs = chunk_texts(tiny_model.tokenizer, natural_text(), 24, 5).chunks
    seqs = [s[: 24 - 3 * i] for i, s in enumerate(seqs)]  # different lengths: left padding
    n_layers, n_heads = tiny_model.cfg.n_layers, tiny_model.cfg.n_heads
    stats = sinks.attention_metrics(tiny_model, seqs, batch_size=5, progress=False)
    from interp.batching import padded_batches

    (idx, tokens, mask), = list(padded_batches(tiny_model, seqs, 5, progress=False))
    with torch.no_grad():
        _, cache = tiny_model.run_with_cache(tokens, attention_mask=mask,
                                             names_filter=lambda name: name.endswith("hook_pattern"))
    rows = stats.per_layer()
    for layer in range(n_layers):
        ref = _ref_metrics(cache[f"blocks.{layer}.attn.hook_pattern"], mask)
        n = len(seqs) * n_heads
        assert rows[layer]["first_token"] == pytest.approx(float(ref["first"].sum() / n), abs=1e-6)
        assert rows[layer]["sink_rate"] == pytest.approx(100 * float(ref["sink"].sum()) / n)


def test_pattern_hooks_without_the_eager_scores(tiny_model, monkeypatch):
    """With a pattern hook, `sdpa_attention` runs the HF modules with `_pattern_attention`: the same patterns and
    logits as the bridge's eager attention (left padding included), and one pattern-sized allocation per layer (the
    pattern itself; the eager path also makes the scores and their masked copy), seen by torch's memory profiler."""
    from torch.profiler import ProfilerActivity, profile

    from interp import bridge
    from interp.batching import pad_left

    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(5, 400, (n,), generator=g).tolist() for n in (96, 80, 64)]
    tokens, mask = pad_left(seqs, tiny_model.tokenizer.pad_token_id)
    n_layers, n_heads = tiny_model.cfg.n_layers, tiny_model.cfg.n_heads
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(n_layers)]
    pattern_bytes = 3 * n_heads * 96 * 96 * 4
    monkeypatch.setattr(bridge, "PATTERN_BLOCK_BYTES", pattern_bytes // 8)

    def run(fast: bool):
        cache = {}

        def keep(x, hook):
            cache[hook.name] = x
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with bridge.sdpa_attention(tiny_model, names if fast else ["blocks.0.attn.hook_attn_scores"]) as on:
                logits = tiny_model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(n, keep) for n in names])
        big = sum(getattr(e, "self_cpu_memory_usage", 0) == pattern_bytes for e in prof.events())
        return on, logits, cache, big

    on, logits, cache, big = run(True)
    off, ref_logits, ref, ref_big = run(False)
    assert on and not off
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=1e-5)
    for name in names:
        torch.testing.assert_close(cache[name], ref[name], atol=1e-6, rtol=1e-5)
    assert big == n_layers and ref_big >= 2 * n_layers, (big, ref_big)
