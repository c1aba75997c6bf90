"""talking_heads: planted channel found by the per-component scan, numpy cross-checks, the whole-head
identity, hook edit = weight edit (GQA), Laundry List generator/scoring, the analysis end to end on a
tokenizer that splits the items, and CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from interp import composition as comp
from interp import laundry as ll
from interp.analysis import config_for
from interp.channels import scale_components
from interp.controls import ControlUnavailable, matched_draws, mean_sd, wilson
from interp.errors import UserError

D_MODEL, D_HEAD, N_HEADS, N_KV = 64, 16, 4, 2
WRITER, READER = (0, 1), (1, 2)  # the planted pair; writer uses KV head 0, reader KV head 1
SMALL_SIGMA = 0.1


def _orthonormal(g, d, k):
    return torch.linalg.qr(torch.randn(d, k, generator=g))[0]


@pytest.fixture(scope="module")
def planted_channel(tmp_path_factory):
    """A tiny GQA Qwen2 whose head (0,1) writes u in its smallest-σ OV component (σ = 0.1 against 1-2 for
    the other 15) and whose head (1,2) reads u on the query side (rank-1 W_Q along u)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from interp.tiny import build_tokenizer

    path = tmp_path_factory.mktemp("planted_channel")
    tok = build_tokenizer(512)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=D_MODEL, num_hidden_layers=2, num_attention_heads=N_HEADS,
                      num_key_value_heads=N_KV, head_dim=D_HEAD, intermediate_size=64, max_position_embeddings=512,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    u = torch.nn.functional.normalize(torch.randn(D_MODEL, generator=g), dim=0)
    with torch.no_grad():
        a0, a1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
        layer, head = WRITER
        kv = head // (N_HEADS // N_KV)
        P = _orthonormal(g, D_MODEL, D_HEAD)                     # read directions
        Q = _orthonormal(g, D_MODEL, D_HEAD - 1)
        Q = torch.cat([Q - torch.outer(u, u @ Q), u[:, None]], 1)  # write directions, the last one u
        Q = torch.linalg.qr(Q)[0] * torch.sign(torch.linalg.qr(Q)[1].diagonal())
        s = torch.cat([torch.linspace(2.0, 1.0, D_HEAD - 1), torch.tensor([SMALL_SIGMA])])  # distinct σ
        a0.v_proj.weight[kv * D_HEAD:(kv + 1) * D_HEAD] = P.T    # W_V[kv] = P
        a0.o_proj.weight[:, head * D_HEAD:(head + 1) * D_HEAD] = (torch.diag(s) @ Q.T).T  # W_O[h] = diag(s) Qᵀ
        rl, rh = READER
        q = torch.zeros(D_HEAD, D_MODEL)
        q[0] = 3 * u
        a1.q_proj.weight[rh * D_HEAD:(rh + 1) * D_HEAD] = q      # W_Q[h] = u e_0ᵀ
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    (path / "interp_model.json").write_text(json.dumps({"random_weights": False}))
    return path, u


@pytest.fixture(scope="module")
def channel_model(planted_channel):
    from interp.models import load_model

    return load_model(str(planted_channel[0]), device="cpu")


def _hf_weights(path):
    from safetensors.torch import load_file

    sd = load_file(str(path / "model.safetensors"))
    out = []
    for layer in range(2):
        p = f"model.layers.{layer}.self_attn."
        out.append({k: sd[p + f"{k}_proj.weight"].double().numpy() for k in "qkvo"})
    return out


# ---------------------------------------------------------------- composition

def test_planted_channel_ranked_first_while_whole_head_is_diluted(channel_model, planted_channel):
    w = comp.head_weights(channel_model)
    s = comp.scan(w, "q")
    z = s.z()
    rows = comp.channel_rows(s, z, min_z=3.0, min_score=2 * comp.gaussian_baseline(D_MODEL, D_HEAD, 5)["component_max"])
    top = rows[0]
    assert (top["writer_layer"], top["writer_head"], top["component"]) == (*WRITER, D_HEAD - 1)
    assert (top["reader_layer"], top["reader_head"]) == READER and top["mode"] == "q"
    assert top["score"] > 0.95 and top["singular_value"] == pytest.approx(SMALL_SIGMA, rel=1e-3)
    whole = s.whole_head()[WRITER[0], WRITER[1], READER[0], READER[1]]
    assert whole < 0.1  # diluted by the 15 components with σ in [1, 2]: ≈ 0.017
    pairs = {(r["writer_layer"], r["writer_head"], r["reader_layer"], r["reader_head"]): r
             for r in comp.whole_head_rows(s)}
    row = pairs[(*WRITER, *READER)]
    assert row["score"] == pytest.approx(float(whole)) and row["max_component_score"] > 0.95
    # into that reader, the whole-head score prefers other writers; the component scan does not
    into_reader = [r for r in pairs.values() if (r["reader_layer"], r["reader_head"]) == READER]
    assert max(into_reader, key=lambda r: r["score"]) is not row
    assert max(into_reader, key=lambda r: r["max_component_score"]) is row


def test_component_scores_match_numpy(channel_model, planted_channel):
    """Per-component scores of every mode against an independent numpy computation from the HF weights."""
    hf = _hf_weights(planted_channel[0])
    group = N_HEADS // N_KV
    w = comp.head_weights(channel_model, fold_norms=False)
    scans = {m: comp.scan(w, m) for m in comp.MODES}
    for h in range(N_HEADS):
        kv = h // group
        W_V = hf[0]["v"][kv * D_HEAD:(kv + 1) * D_HEAD].T         # [d, dh]
        W_O = hf[0]["o"][:, h * D_HEAD:(h + 1) * D_HEAD].T        # [dh, d]
        U, S, Vt = np.linalg.svd(W_V @ W_O)
        V = Vt[:D_HEAD].T                                         # write directions
        for r in range(N_HEADS):
            rk = r // group
            W_Q = hf[1]["q"][r * D_HEAD:(r + 1) * D_HEAD].T
            W_K = hf[1]["k"][rk * D_HEAD:(rk + 1) * D_HEAD].T
            OV_r = hf[1]["v"][rk * D_HEAD:(rk + 1) * D_HEAD].T @ hf[1]["o"][:, r * D_HEAD:(r + 1) * D_HEAD].T
            QK = W_Q @ W_K.T
            expected = {"q": np.linalg.norm(V.T @ QK, axis=1) / np.linalg.norm(QK),
                        "k": np.linalg.norm(V.T @ QK.T, axis=1) / np.linalg.norm(QK),
                        "v": np.linalg.norm(V.T @ OV_r, axis=1) / np.linalg.norm(OV_r)}
            for m, exp in expected.items():
                got = scans[m].scores[0, h, :, 1, r].double().numpy()
                np.testing.assert_allclose(got, exp, atol=2e-5)
            rot = scans["q"].rotary_invariant[0, h, :, 1, r].double().numpy()
            np.testing.assert_allclose(rot, np.linalg.norm(V.T @ W_Q, axis=1) / np.linalg.norm(W_Q), atol=2e-5)


def test_whole_head_identity_matches_transformerlens(channel_model):
    """CS² = Σ σ² CS_i² / Σ σ² reproduces TransformerLens' all_composition_scores in every mode."""
    w = comp.head_weights(channel_model, fold_norms=False)
    for m, name in (("q", "Q"), ("k", "K"), ("v", "V")):
        ours = comp.scan(w, m).whole_head()
        tl = torch.tensor(channel_model.all_composition_scores(name).detach().numpy())
        mask = ~torch.isnan(ours)
        assert mask.sum() == N_HEADS * N_HEADS
        torch.testing.assert_close(ours[mask], tl[mask], atol=1e-5, rtol=0)


def test_fold_norms_matches_transformerlens_processing(tmp_path):
    """Folded W_Q/W_K/W_V equal TransformerLens' process_weights (fold_ln) on an RMSNorm model with gains ≠ 1."""
    from transformer_lens.weight_processing import ProcessWeights

    from interp.models import load_model
    from interp.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path / "m", "qwen2", seed=3)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    for k in sd:
        if k.endswith("input_layernorm.weight"):
            sd[k] = 0.5 + torch.rand(sd[k].shape, generator=g)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    model = load_model(str(path), device="cpu")
    ours = comp.head_weights(model, fold_norms=True)
    processed = ProcessWeights.process_weights(dict(model.state_dict()), model.cfg, fold_ln=True,
                                               center_writing_weights=True, center_unembed=False,
                                               fold_value_biases=False, adapter=model.adapter)
    for name, mine in (("W_Q", ours.W_Q), ("W_K", ours.W_K), ("W_V", ours.W_V)):
        for layer in range(model.cfg.n_layers):
            key = ProcessWeights._get_param_key(f"blocks.{layer}.attn.{name}", model.adapter)
            theirs = ProcessWeights.convert_tensor_to_tl_format(key, processed, processed[key], model.cfg,
                                                                model.adapter, layer)
            torch.testing.assert_close(mine[layer], theirs.float(), atol=1e-5, rtol=1e-5)


def _randomise_norms(path, patterns, seed=0, offset=0.5):
    """Rewrite `path`'s safetensors with random norm parameters (weights in [offset, offset + 1), biases ~ 0.1 N)
    for every key containing one of `patterns`, so that folding them matters."""
    from safetensors.torch import load_file, save_file

    sd = load_file(str(path / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    for k in sd:
        if any(p in k for p in patterns):
            shape = sd[k].shape
            sd[k] = offset + torch.rand(shape, generator=g) if k.endswith("weight") else 0.1 * torch.randn(shape,
                                                                                                           generator=g)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def layernorm_gpt2(tmp_path_factory):
    """A GPT-2-shaped tiny model (LayerNorm, fused c_attn, Conv1D) with random LayerNorm gains and biases, and the
    same checkpoint on a bridge processed by TransformerLens itself (fold_ln + center_writing_weights)."""
    from interp.models import load_model
    from interp.tiny import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path_factory.mktemp("ln_gpt2") / "m", "gpt2", seed=3)
    _randomise_norms(path, (".ln_1.", ".ln_2.", "ln_f."))
    ours = load_model(str(path), device="cpu")
    tl = load_model(str(path), device="cpu")
    tl.enable_compatibility_mode(disable_warnings=True, fold_ln=True, center_writing_weights=True,
                                 center_unembed=False, fold_value_biases=False)
    return ours, tl


def test_layernorm_fold_centres_like_transformerlens(layernorm_gpt2):
    """GPT-2 (LayerNorm): folded W_Q/W_K/W_V (γ, then centred over d_model: LayerNorm removes the all-ones direction)
    and centred W_O equal TransformerLens' own processed weights, and so do the per-component scores of every mode
    (TransformerLens' composition_scores on each rank-1 writer component of its processed OV) and the whole-head
    scores (its all_composition_scores). Without the reader-side centring the component scores move by > 5 %."""
    from transformer_lens import FactoredMatrix
    from transformer_lens.utilities import composition_scores

    model, tl = layernorm_gpt2
    w = comp.head_weights(model, fold_norms=True)
    for name in ("W_Q", "W_K", "W_V", "W_O"):
        torch.testing.assert_close(getattr(w, name), getattr(tl, name).detach().float(), atol=1e-6, rtol=1e-5)
    assert w.processing["reader_norm"].startswith("LayerNorm") and "centred" in w.processing["writer_norm"]
    scans = {m: comp.scan(w, m) for m in comp.MODES}
    OV, QK = tl.OV, tl.QK
    U, S, V = OV.svd()
    heads = range(tl.cfg.n_heads)
    for h in heads:
        for i in range(tl.cfg.d_head):
            left = FactoredMatrix(U[0, h][:, i:i + 1] * S[0, h][i], V[0, h][:, i:i + 1].T)
            for r in heads:
                expected = {"q": composition_scores(left, QK[1, r]), "k": composition_scores(left, QK[1, r].T),
                            "v": composition_scores(left, OV[1, r])}
                for m, value in expected.items():
                    assert float(scans[m].scores[0, h, i, 1, r]) == pytest.approx(float(value), abs=2e-5)
    for m, name in (("q", "Q"), ("k", "K"), ("v", "V")):
        ours = scans[m].whole_head()
        theirs = torch.tensor(tl.all_composition_scores(name).detach().numpy())
        mask = ~torch.isnan(ours)
        torch.testing.assert_close(ours[mask], theirs[mask], atol=1e-5, rtol=0)
    # the same gains without the centring (the earlier fold) give other scores: the test can fail
    raw = comp.head_weights(model, fold_norms=False)
    gain = torch.stack([b.ln1.weight.detach().float() for b in model.blocks])[:, None, :, None]
    uncentred = comp.HeadWeights(raw.W_Q * gain, raw.W_K * gain, raw.W_V * gain, w.W_O)
    for m in comp.MODES:
        moved = (comp.scan(uncentred, m).scores - scans[m].scores).abs() / scans[m].scores
        assert float(moved.nan_to_num(0).max()) > 0.05


@torch.no_grad()
def test_layernorm_fold_is_what_the_query_reads_from_the_raw_residual(layernorm_gpt2):
    """Activation check, independent of TransformerLens' processing: GPT-2's query is LN(x) W_Q + b, and with the
    centred fold (x − mean) / sd · γ W_Q = x W_Q' / sd, so q − (β W_Q + b_Q) is x W_Q' up to the token's 1/sd."""
    model, _ = layernorm_gpt2
    w = comp.head_weights(model, fold_norms=True)
    tokens = torch.tensor([model.tokenizer("How do I bake bread? Mix flour and water.")["input_ids"]])
    _, cache = model.run_with_cache(tokens)
    for layer in range(model.cfg.n_layers):
        x = cache[f"blocks.{layer}.hook_resid_pre"][0].float()
        ln = model.blocks[layer].ln1
        const = torch.einsum("d,hde->he", ln.bias.detach().float(), model.W_Q[layer].detach().float()) + \
            model.b_Q[layer].detach().float()
        q = cache[f"blocks.{layer}.attn.hook_q"][0].float() - const  # [pos, head, d_head]
        eps = getattr(ln, "original_component", ln).eps
        sd = (x.var(-1, unbiased=False) + eps).sqrt()
        pred = torch.einsum("pd,hde->phe", x, w.W_Q[layer]) / sd[:, None, None]
        torch.testing.assert_close(pred, q, atol=2e-4, rtol=2e-4)


def _family_with_random_norms(tmp_path, family):
    from interp.models import load_model
    from interp.tiny import write_family_checkpoint

    path = _randomise_norms(write_family_checkpoint(tmp_path / family, family), ("norm",), seed=1, offset=0.3)
    return load_model(str(path), device="cpu")


def _cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(1), b.flatten(1), dim=-1)


@pytest.mark.parametrize("family", ["qwen3", "gemma-3", "olmo-2"])
@torch.no_grad()
def test_qk_norm_fold_is_the_pre_norm_query_and_key(tmp_path, family):
    """q/k-norm models (per head: Qwen3, Gemma-3; over all heads: OLMo-2, which has no pre-attention norm): the
    folded W_Q/W_K give the normalised query/key of every head up to a positive per-token scale (the norm's 1/rms,
    which the scores leave out: pre-norm); the raw W_Q/W_K (gains not folded) do not. Results say pre-norm."""
    model = _family_with_random_norms(tmp_path, family)
    w, raw = comp.head_weights(model, fold_norms=True), comp.head_weights(model, fold_norms=False)
    assert "pre-norm" in w.processing["qk_norm"] and any("q/k norm" in n for n in w.notes)
    assert ("no pre-attention norm" in w.processing["reader_norm"]) == (family == "olmo-2")
    assert "pre-norm" in comp.scan(w, "q").reads and comp.scan(w, "v").reads == "OV"
    tokens = torch.tensor([model.tokenizer("How do I bake bread? Mix flour and water.")["input_ids"]])
    _, cache = model.run_with_cache(tokens)
    for layer in range(model.cfg.n_layers):
        x = cache[f"blocks.{layer}.hook_resid_pre"][0].float()  # an RMSNorm input only scales it per token
        for side, W, W_raw in (("q", w.W_Q, raw.W_Q), ("k", w.W_K, raw.W_K)):
            normed = cache[f"blocks.{layer}.attn.hook_{side}_normed"][0].float()
            heads = W.shape[1]
            normed = normed.reshape(x.shape[0], heads, -1) if normed.dim() == 2 else normed.transpose(0, 1)
            for h in range(heads):
                assert float(_cosine(x @ W[layer, h], normed[:, h]).min()) > 1 - 1e-5
            assert min(float(_cosine(x @ W_raw[layer, h], normed[:, h]).min()) for h in range(heads)) < 0.999


@pytest.mark.parametrize("family", ["gemma-2", "gemma-3", "olmo-2"])
@torch.no_grad()
def test_post_attention_norm_gain_is_in_the_writers_ov(tmp_path, family):
    """Gemma-2/3 and OLMo-2 normalise the attention output before the residual add: Σ_h z_h W_O'[h] with the folded
    W_O' is what the post-attention norm writes, up to its per-token 1/rms (cosine 1); the raw W_O is not."""
    model = _family_with_random_norms(tmp_path, family)
    w, raw = comp.head_weights(model, fold_norms=True), comp.head_weights(model, fold_norms=False)
    assert "post-attention norm" in w.processing["writer_norm"] and any("post-attention" in n for n in w.notes)
    tokens = torch.tensor([model.tokenizer("How do I bake bread? Mix flour and water.")["input_ids"]])
    _, cache = model.run_with_cache(tokens)
    for layer in range(model.cfg.n_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"][0].float()
        written = cache[f"blocks.{layer}.ln1_post.hook_out"][0].float()
        assert float(_cosine(torch.einsum("phe,hed->pd", z, w.W_O[layer]), written).min()) > 1 - 1e-5
        assert float(_cosine(torch.einsum("phe,hed->pd", z, raw.W_O[layer]), written).min()) < 0.999


def test_channel_rank_and_gaussian_baseline():
    sigma = torch.tensor([2.0, 1.0, 0.5])[None, None]                      # one writer head
    scores = torch.full((1, 1, 3, 2, 1), float("nan"))
    scores[0, 0, :, 1, 0] = torch.tensor([0.1, 0.9, 0.1])
    s = comp.Scan("q", scores, sigma)
    # energies σ²·CS²: 0.04, 0.81, 0.0025 → the top one holds 95 %
    assert int(s.channel_rank(0.8)[0, 0, 1, 0]) == 1
    assert int(s.channel_rank(0.99)[0, 0, 1, 0]) == 2
    expected = ((sigma[0, 0] ** 2 * scores[0, 0, :, 1, 0] ** 2).sum() / (sigma ** 2).sum()).sqrt()
    assert float(s.whole_head()[0, 0, 1, 0]) == pytest.approx(float(expected))
    base = comp.gaussian_baseline(768, 64, n_draws=10)
    assert base["component_mean"] == pytest.approx(1 / np.sqrt(768), rel=0.1)   # method note: 0.0359 at d=768
    assert base["component_max"] > base["component_mean"]


# ---------------------------------------------------------------- edits

@torch.no_grad()
def test_hook_edit_equals_weight_edit_and_scales_the_component(channel_model):
    """Hook and W_O edits give the same logits (GQA model) and the weight edit scales exactly σ_i u_i v_iᵀ."""
    w = comp.head_weights(channel_model)
    S, V = comp.writer_svd(w)
    dirs = {(0, 1): V[0, 1][:, [0, D_HEAD - 1]], (0, 2): V[0, 2][:, [3]], (1, 3): V[1, 3][:, [2]]}
    tokens = torch.tensor([channel_model.tokenizer("How do I bake bread? Mix flour and water.")["input_ids"]])
    base = channel_model(tokens)
    before = channel_model.W_O.detach().clone()
    for alpha in (0.0, 2.5):
        with scale_components(channel_model, dirs, alpha, "hook"):
            hooked = channel_model(tokens)
        with scale_components(channel_model, dirs, alpha, "weight"):
            weighted = channel_model(tokens)
            OV = (w.expand(channel_model.W_V[0].detach()) @ channel_model.W_O[0].detach())[1]
        scale = max(1.0, float(hooked.detach().abs().max()))
        assert float((hooked - weighted).abs().max()) <= 1e-5 * scale
        assert float((hooked - base).abs().max()) > 1e-3
        OV0 = w.expand(w.W_V[0])[1] @ w.W_O[0, 1]
        U, s_, Vt = torch.linalg.svd(OV0.double())
        expected = OV0.double() + (alpha - 1) * sum(s_[i] * torch.outer(U[:, i], Vt[i]) for i in (0, D_HEAD - 1))
        torch.testing.assert_close(OV.double(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(channel_model.W_O, before)  # restored


# ---------------------------------------------------------------- Laundry List

def test_laundry_prompts_balanced_and_encoded(channel_model):
    tok = channel_model.tokenizer
    pools, multi = ll.item_pools(tok, range(3))
    assert multi  # this tiny tokenizer splits the items
    with pytest.raises(UserError, match="distinct first tokens"):  # its names share first tokens
        ll.make_prompts(ll.item_pools(tok, [3])[0], (2, 3), 1, seed=0)
    prompts = ll.make_prompts(pools, (2, 3, 5), 4, seed=0)
    assert len(prompts) == 4 * (2 + 3 + 5)
    for n in (2, 3, 5):
        assert sorted(p.position for p in prompts if p.n_items == n) == sorted(list(range(n)) * 4)
    assert len({p.text for p in prompts}) == len(prompts)
    enc = ll.encode(tok, prompts)
    for p, ids, positions in zip(prompts, enc.ids, enc.item_positions):
        second = p.text.split(". ", 1)[1]
        assert p.answer not in second.split() and all(w in second for w in p.items if w != p.answer)
        for w, (a, b), i in zip(p.items, p.spans, positions):
            assert p.text[a:b] == w
            assert tok.decode(ids[i]).strip() and w.startswith(tok.decode(ids[i]).strip())
        assert len(set(enc.candidates[prompts.index(p)])) == p.n_items


def test_laundry_scoring_matches_full_forward(channel_model):
    tok = channel_model.tokenizer
    pools, _ = ll.item_pools(tok, range(3))
    prompts = ll.make_prompts(pools, (3, 4), 2, seed=0)
    enc = ll.encode(tok, prompts)
    logits = ll.last_logits(channel_model, enc.ids, batch_size=3)
    scores = ll.score(logits, enc, prompts)
    for i, p in enumerate(prompts):
        full = channel_model(torch.tensor([enc.ids[i]]))[0, -1].detach()
        torch.testing.assert_close(logits[i], full, atol=1e-4, rtol=1e-4)
        items = full[enc.candidates[i]]
        answer = items[p.position]
        others = torch.cat([items[:p.position], items[p.position + 1:]])
        assert scores["correct"][i] == float(answer > others.max())
        assert scores["logit_diff"][i] == pytest.approx(float(answer - others.max()), abs=1e-4)
        assert scores["top1"][i] == float(int(full.argmax()) == enc.candidates[i][p.position])
    rows = ll.table(prompts, scores)
    assert {(r["n_items"], r["position"]) for r in rows} == {(3, 0), (3, 1), (3, 2), (3, None), (4, 0), (4, 1), (4, 2),
                                                             (4, 3), (4, None)}


# ---------------------------------------------------------------- the analysis

SMALL = dict(n_items=(2, 3), templates=("laundry", "bag", "market"), prompts_per_cell=4, alpha=(0.0, 1.0, 3.0),
             candidates=3, edit_components=1,
             random_draws=5, baseline_draws=4, view_prompts=8, progress=False)


@pytest.mark.slow  # ~10 CPU-seconds, 27-54 s wall on the shared 2-core box
def test_analysis_end_to_end_with_first_token_scoring(channel_model, tmp_path, monkeypatch):
    from interp.analyses import talking_heads as th

    result = th.run(channel_model, config_for("talking_heads", channel_model, batch_size=8, **SMALL))
    d = result.to_dict()
    for key in ("channels", "whole_head", "laundry_list", "edits", "edit_agreement"):
        assert key in d
    assert d["first_token_scoring"] is True
    c = d["channels"][0]
    assert set(c) >= {"writer_layer", "writer_head", "component", "reader_layer", "reader_head", "mode", "score", "z",
                      "singular_value"}
    found = (c["writer_layer"], c["writer_head"], c["component"], c["reader_layer"], c["reader_head"])
    assert found == (*WRITER, D_HEAD - 1, *READER)
    whole_keys = {"writer_layer", "writer_head", "reader_layer", "reader_head", "mode", "score"}
    assert all(set(r) >= whole_keys for r in d["whole_head"])
    laundry_keys = {"n_items", "position", "accuracy", "top1_accuracy", "logit_diff", "n"}
    assert all(set(r) >= laundry_keys for r in d["laundry_list"])
    rand = [r for r in d["edits"] if r["selection"] == "random"]
    chan = [r for r in d["edits"] if r["selection"] == "channel"]
    assert rand and chan and all(r["n_draws"] == 5 and "accuracy_sd" in r and "logit_diff_sd" in r for r in rand)
    assert all(set(r) >= {"alpha", "components", "accuracy", "logit_diff", "selection"} for r in d["edits"])
    assert d["edit_agreement"] < 1e-4
    edit_set = {tuple(x) for x in d["mover"]["edit_set"]}
    out = tmp_path / "r.html"
    th.build_report(result, channel_model.tokenizer).write(out)
    text = out.read_text()
    assert "first token" in text and "Editing the channel" in text
    monkeypatch.setattr(th, "MAX_HEATMAP_HEADS", 4)  # a big model's layer × layer heatmaps
    th.build_report(result, channel_model.tokenizer).write(tmp_path / "big.html")
    assert "max over heads of each layer pair" in (tmp_path / "big.html").read_text()
    # batch size does not change the numbers
    again = th.run(channel_model, config_for("talking_heads", channel_model, batch_size=1, **SMALL))
    for a, b in zip(d["edits"], again.to_dict()["edits"]):
        for k in ("accuracy", "logit_diff"):
            assert a[k] == pytest.approx(b[k], abs=1e-5)
    for a, b in zip(d["laundry_list"], again.to_dict()["laundry_list"]):
        assert a["logit_diff"] == pytest.approx(b["logit_diff"], abs=1e-5)
    assert {tuple(x) for x in again.to_dict()["mover"]["edit_set"]} == edit_set


@pytest.mark.parametrize("args", [["--n-items", "1"], ["--alpha", "-1"], ["--mode", "x"], ["--energy", "0"],
                                  ["--random-draws", "0"], ["--random-draws", "1"], ["--selection-fraction", "1"],
                                  ["--sigma-bins", "0"], ["--templates", "park", "--n-items", "3"]])
def test_cli_rejects_bad_options(planted_channel, tmp_path, capsys, args):
    from interp.run import main

    code = main(["talking_heads", "--model", str(planted_channel[0]), "--out", str(tmp_path / "o"), "--no-progress",
                 *args])
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and "Traceback" not in err


def test_spearman_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    from interp.analyses.talking_heads import spearman

    g = np.random.default_rng(0)
    x = g.normal(size=12)
    y = x + g.normal(size=12)
    assert spearman(list(x), list(y)) == pytest.approx(stats.spearmanr(x, y).statistic)


@torch.no_grad()
def test_hook_edit_equals_weight_edit_on_layernorm_gpt2(tmp_path):
    """GPT-2 (LayerNorm, Conv1D o-projection): directions from the centred W_O, both edits agree."""
    from interp.models import load_model
    from interp.tiny import write_tiny_checkpoint

    model = load_model(str(write_tiny_checkpoint(tmp_path / "g", "gpt2", seed=1)), device="cpu")
    w = comp.head_weights(model, fold_norms=True)
    torch.testing.assert_close(w.W_O.sum(-1), torch.zeros_like(w.W_O.sum(-1)), atol=1e-5, rtol=0)  # centred
    _, V = comp.writer_svd(w)
    dirs = {(0, 1): V[0, 1][:, [0, 2]], (1, 3): V[1, 3][:, [5]]}
    tokens = torch.tensor([model.tokenizer("How do I bake bread? Mix flour and water.")["input_ids"]])
    base = model(tokens)
    for alpha in (0.0, 3.0):
        with scale_components(model, dirs, alpha, "hook", W_O=w.W_O):
            hooked = model(tokens)
        with scale_components(model, dirs, alpha, "weight", W_O=w.W_O):
            weighted = model(tokens)
        assert float((hooked - weighted).abs().max()) <= 1e-5 * max(1.0, float(hooked.abs().max()))
        assert float((hooked - base).abs().max()) > 1e-3
    torch.testing.assert_close(model(tokens), base)


# ---------------------------------------------------------------- σ-matched control, held-out halves, END view

def _clustered_sigma(n_heads: int = 2) -> torch.Tensor:
    """[1, heads, 16] singular values in four clusters (8, 4, 2, 1), each spread by ±1.5 %."""
    one = torch.tensor([c * (1 + 0.01 * (j - 1.5)) for c in (8.0, 4.0, 2.0, 1.0) for j in range(4)])
    return one.repeat(1, n_heads, 1)


def test_sigma_matched_control_where_the_effect_follows_sigma():
    """Scaling a component by α moves its head's OV by exactly |α − 1| σ (tested above), so a random control
    drawn uniformly over the head's components has a smaller effect than a large-σ edit set whatever the
    components do: the unmatched control calls the edit set special, the σ-matched one does not."""
    from interp.analyses.talking_heads import random_control

    S = _clustered_sigma()

    def effect(components):
        return sum(float(S[lw, hw, i]) for lw, hw, i in components)  # |α − 1| = 1
    chosen = [(0, 0, 1), (0, 1, 5)]  # a σ ≈ 8 component of head 0.0, a σ ≈ 4 component of head 0.1
    pool = [(0, h, i) for h in range(2) for i in range(16)]
    unmatched = matched_draws(chosen, pool, draws=8, seed=0, matched_on="none")
    matched = random_control(chosen, S, n_bins=4, draws=8, seed=0)
    um, usd = mean_sd([effect(d) for d in unmatched])
    mm, msd = mean_sd([effect(d) for d in matched])
    assert effect(chosen) > 1.5 * um and um + usd < effect(chosen)  # unmatched: "the edit set does 2× more"
    assert abs(effect(chosen) / mm - 1) < 0.05 and msd < 0.05 * mm  # matched: the same push, ratio 1
    assert matched.matched_on == "sigma" and matched.strata == {"0.0:q4": 1, "0.1:q3": 1}
    for draw in matched:
        assert not set(draw) & set(chosen) and len(draw) == len(chosen)
        assert sorted((lw, hw) for lw, hw, _ in draw) == [(0, 0), (0, 1)]


def test_random_control_raises_when_a_sigma_bin_is_exhausted():
    from interp.analyses.talking_heads import random_control

    chosen = [(0, 0, i) for i in range(4)]  # the whole top bin of head 0.0
    with pytest.raises(ControlUnavailable, match="sigma"):
        random_control(chosen, _clustered_sigma(1), n_bins=4, draws=5, seed=0)


def test_split_pools_share_no_template_and_no_item():
    """Held out means unseen wording and unseen items: no template or item of one half is in the other."""
    pools = {t: list(ll.LAUNDRY_TEMPLATES[t][0]) for t in range(4)}  # laundry and bag share the clothes
    for seed in range(6):
        sel, held = ll.split_pools(pools, 0.5, seed)
        assert sel and held and not set(sel) & set(held)
        assert sorted([*sel, *held]) == [0, 1, 2, 3] and len(sel) == 2
        sel_items = {w for p in sel.values() for w in p}
        held_items = {w for p in held.values() for w in p}
        assert held_items and not sel_items & held_items
        prompts = ll.make_prompts(held, (2, 5), 3, seed)
        assert all(set(p.items) <= held_items and p.template in held for p in prompts)
    sel, held = ll.split_pools({0: pools[0]}, 0.5, 0)  # one template: only the items are split
    assert list(sel) == list(held) == [0] and not set(sel[0]) & set(held[0]) and len(sel[0]) == 10


def test_end_to_end_halves_intervals_warnings_and_matched_rows(channel_model, tmp_path):
    """The run's halves are disjoint, accuracies carry Wilson intervals, random rows say what they match."""
    from interp.analyses import talking_heads as th

    result = th.run(channel_model, config_for("talking_heads", channel_model, batch_size=8, max_channels=1,
                                              max_whole_head=2, **SMALL))
    d = json.loads(json.dumps(result.to_dict(), default=str))
    sp = d["split"]
    assert sp["held_out_templates"] and not set(sp["held_out_templates"]) & set(sp["selection_templates"])
    assert sp["held_out_items"] and not set(sp["held_out_items"]) & set(sp["selection_items"])
    for row in d["laundry_list"]:
        k = round(row["accuracy"] * row["n"])
        assert row["accuracy_ci"] == pytest.approx(list(wilson(k, row["n"])))
        assert row["accuracy_ci"][0] <= row["accuracy"] <= row["accuracy_ci"][1]
    chan = [r for r in d["edits"] if r["selection"] == "channel"]
    assert all(len(r["accuracy_ci"]) == 2 and len(r["top1_accuracy_ci"]) == 2 for r in chan)
    S, _ = comp.writer_svd(comp.head_weights(channel_model))
    edit_set = [tuple(c) for c in d["mover"]["edit_set"]]
    expected = th.sigma_strata(S, list(dict.fromkeys((a, b) for a, b, _ in edit_set)), 4)
    counts = {}
    for c in edit_set:
        counts[expected[c]] = counts.get(expected[c], 0) + 1
    for r in (r for r in d["edits"] if r["selection"] == "random"):
        assert r["matched_on"] == "sigma" and r["strata"] == counts and r["n_draws"] == 5
        assert len(r["accuracy_draws"]) == 5 and r["accuracy_sd"] is not None
    assert any("first token" in m for m in d["warnings"])
    cc, wc = d["channel_counts"], d["whole_head_counts"]
    assert cc["kept"] == len(d["channels"]) == 1 <= cc["found"] == sum(cc["per_mode"].values())
    assert wc["kept"] == len(d["whole_head"]) <= 3 * 2 * 2 < 3 * wc["pairs_per_mode"]      # 3 modes, ≤ 2 × 2 each
    out = th.build_report(result, channel_model.tokenizer).write(tmp_path / "r.html")
    assert "scored by its first token" in out.read_text()


def test_channel_and_whole_head_rows_capped_to_the_top(channel_model):
    """--max-channels / --max-whole-head: the rows kept are exactly the top of the full tables (chosen on the
    tensors); the defaults keep a 7B run's tables and Laundry List small."""
    from interp.analyses import talking_heads as th

    w = comp.head_weights(channel_model)
    s = comp.scan(w, "q")
    z = s.z()
    every = comp.channel_rows(s, z, min_z=-10.0, min_score=0.0)
    assert len(every) == int(comp.channel_mask(s, z, min_z=-10.0, min_score=0.0).sum()) > 5
    assert comp.channel_rows(s, z, min_z=-10.0, min_score=0.0, limit=5) == every[:5]
    pairs = comp.whole_head_rows(s)
    assert len(pairs) == int(comp.pair_mask(*s.scores.shape[:2]).sum())
    kept = comp.whole_head_rows(s, limit=3)
    key = lambda r: (r["writer_layer"], r["writer_head"], r["reader_layer"], r["reader_head"])  # noqa: E731
    want = {key(r) for r in sorted(pairs, key=lambda r: -r["score"])[:3]} | \
        {key(r) for r in sorted(pairs, key=lambda r: -r["max_component_score"])[:3]}
    assert {key(r) for r in kept} == want and kept == [r for r in pairs if key(r) in want]   # same rows, same order
    config = th.Config()
    assert (config.max_channels, config.max_whole_head, config.prompts_per_cell) == (1000, 1000, 20)


def test_activation_view_reads_the_end_position(channel_model):
    """The default view is the residual at END (the last prompt token), labelled by the answer's position;
    `view_tokens="items"` keeps the item-token view."""
    from interp.analyses import talking_heads as th

    pools, _ = ll.item_pools(channel_model.tokenizer, range(3))
    prompts = ll.make_prompts(pools, (2, 3), 3, seed=0)
    enc = ll.encode(channel_model.tokenizer, prompts)
    hook = "blocks.1.hook_resid_pre"
    config = th.Config(progress=False, batch_size=4)
    X, pos, n = th.view_activations(channel_model, enc, prompts, hook, config)
    assert X.shape[0] == len(prompts) and pos.tolist() == [p.position for p in prompts]
    for i in (0, 7, len(prompts) - 1):
        _, cache = channel_model.run_with_cache(torch.tensor([enc.ids[i]]), names_filter=hook)
        torch.testing.assert_close(X[i], cache[hook][0, -1].float(), atol=1e-4, rtol=1e-4)
    Xi, posi, _ = th.view_activations(channel_model, enc, prompts, hook, th.Config(progress=False, view_tokens="items"))
    assert Xi.shape[0] == sum(p.n_items for p in prompts) and posi.tolist()[:2] == [0, 1]
    view, points = th.activation_view(channel_model, enc, prompts, 1, torch.randn(D_MODEL, 3), config)
    assert view["tokens"] == "end" and view["n_tokens"] == len(prompts) and len(points) == len(prompts)


def test_position_eta2_within_n_ignores_what_n_explains():
    """A residual that only encodes N (as END does through the prompt's length) has no positional index."""
    from interp.analyses.talking_heads import position_eta2

    n = torch.tensor([2, 2, 3, 3, 3] * 40)
    pos = torch.tensor([0, 1, 0, 1, 2] * 40)
    g = torch.Generator().manual_seed(0)
    x = n[:, None].float() * torch.ones(1, 4) + 0.01 * torch.randn(200, 4, generator=g)
    assert position_eta2(x, pos) > 0.1              # pooled: position 3 exists only with N = 3
    assert position_eta2(x, n * 100 + pos, n) < 0.05  # within N: only noise left
    y = x + pos[:, None].float()
    assert position_eta2(y, n * 100 + pos, n) > 0.99


# ---------------------------------------------------------------- joint tokenization, real families

def _legacy_llama2_tokenizer(path):
    """The llama-2 family's tokenizer in Llama-2's own tokenizer.json layout: normalizer Prepend("▁") + Replace(" ",
    "▁"), no pre-tokenizer, <s> added: " item" tokenized alone starts with a bare "▁" piece."""
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    tok.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.backend_tokenizer.pre_tokenizer = None
    return tok


def _check_candidates_follow_the_prompt(tok, prompts, enc, bos_id):
    """Independent of `interp.tokens`: the default call on prompt + " item" (one string) is the prompt's ids, then
    the item's candidate; the prompt starts with the BOS; each item position holds the start of the item."""
    for p, ids, cands, positions in zip(prompts, enc.ids, enc.candidates, enc.item_positions):
        assert ids[0] == bos_id and ids.count(bos_id) == 1
        for w, cand in zip(p.items, cands):
            joint = tok(p.text + " " + w)["input_ids"]
            assert joint[:len(ids)] == ids and joint[len(ids)] == cand
            assert tok.decode([cand]).strip() and w.startswith(tok.decode([cand]).strip())
        for w, i in zip(p.items, positions):
            assert w.startswith(tok.decode([ids[i]]).strip()) and tok.decode([ids[i]]).strip()
        assert len(set(cands)) == p.n_items


def test_laundry_candidates_come_from_the_joint_tokenization_metaspace_bos(tmp_path):
    """Llama-2 layout (Metaspace with a prepended ▁, <s> added): " item" alone starts with the same bare ▁ piece for
    every item (the one-item pools of the isolated call); the joint tokenization gives each item its own in-context
    token, every pool keeps its 20 items and the prompts start with <s>."""
    from interp.organisms.corpus import LAUNDRY_TEMPLATES
    from interp.tiny import write_family_checkpoint

    tok = _legacy_llama2_tokenizer(write_family_checkpoint(tmp_path / "llama-2", "llama-2"))
    for vocabulary, *_ in LAUNDRY_TEMPLATES:
        alone = {tok(" " + w, add_special_tokens=False)["input_ids"][0] for w in vocabulary}
        assert len(alone) == 1 and not tok.decode(list(alone)).strip()  # the isolated call's bare ▁
    pools, multi = ll.item_pools(tok, range(4))
    assert all(len(pools[t]) == len(LAUNDRY_TEMPLATES[t][0]) for t in range(4)) and multi
    prompts = ll.make_prompts(pools, (2, 3, 5), 2, seed=0)
    enc = ll.encode(tok, prompts)
    _check_candidates_follow_the_prompt(tok, prompts, enc, tok.convert_tokens_to_ids("<s>"))
    no_bos = ll.encode(tok, prompts[:3], bos=False)
    assert [ids[1:] for ids in enc.ids[:3]] == no_bos.ids and no_bos.candidates == enc.candidates[:3]


def test_laundry_items_merging_with_the_prompt_are_not_scored():
    """A SentencePiece-style BPE trained across spaces (pieces like "▁the▁s"): the item's first token would swallow
    the prompt's last characters, so the item is no next token at END; it is dropped from the pool, and a pool too
    small stops with the one-line error."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from interp.organisms.corpus import LAUNDRY_TEMPLATES
    from interp.tiny import _family_training_text

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never", split=False)
    raw.decoder = decoders.Metaspace(prepend_scheme="never")
    raw.train_from_iterator(_family_training_text(), trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>"],
                                                                         show_progress=False))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>")
    text = ll.build_prompt(0, ["shirt", "socks"], 0).text
    found = [ll.item_token(tok, text, w) for w in LAUNDRY_TEMPLATES[0][0]]
    assert all(it.token is None and "merges" in it.problem for it in found)
    pools, _ = ll.item_pools(tok, [0])
    assert pools[0] == []
    with pytest.raises(UserError, match="distinct first tokens"):
        ll.make_prompts(pools, (2,), 1, seed=0)


FAMILY_SMALL = dict(n_items=(2, 3), templates=("laundry", "park"), prompts_per_cell=3, alpha=(0.0, 1.0),
                    candidates=3, edit_components=1, random_draws=2, baseline_draws=2, view_prompts=4, progress=False)


@pytest.mark.parametrize("family", ["gemma-2", "olmo-2", "qwen3"])
def test_analysis_runs_on_post_norm_and_qk_norm_families(tmp_path, family):
    """Gemma-2 (post-attention norm, <bos>, SentencePiece-style tokenizer), OLMo-2 (post-norms only, no pre-attention
    norm, q/k norm over all heads) and Qwen3 (q/k norm per head) run to the end with the names template: results say
    what was folded and where it is not exact (warnings), q/k-side channels are labelled pre-norm, the hook and
    weight edits agree on the norm-folded W_O, and every candidate is the token after the prompt."""
    from interp.analyses import talking_heads as th
    from interp.models import load_model
    from interp.tiny import write_family_checkpoint

    model = load_model(str(write_family_checkpoint(tmp_path / family, family)), device="cpu")
    result = th.run(model, config_for("talking_heads", model, batch_size=8, **FAMILY_SMALL))
    d = json.loads(json.dumps(result.to_dict(), default=str))
    wp = d["weight_processing"]
    post, qk = family in ("gemma-2", "olmo-2"), family in ("olmo-2", "qwen3")
    assert ("writer_norm" in wp) == post and ("qk_norm" in wp) == qk
    assert any("post-attention norm" in m for m in d["warnings"]) == post
    assert any("q/k norm" in m for m in d["warnings"]) == qk
    assert ("un-normalised residual" in wp["reader_norm"]) == (family == "olmo-2")
    assert ("pre-norm" in wp["reads"]["q"]) == qk and wp["reads"]["v"] == "OV"
    assert all(("pre-norm" in r["reads"]) == (qk and r["mode"] != "v") for r in d["channels"])
    assert d["edit_agreement"] < 1e-4
    assert {r["n_items"] for r in d["laundry_list"]} == {2, 3}
    bos = model.tokenizer.convert_tokens_to_ids("<bos>") if family == "gemma-2" else None
    tok, pools = model.tokenizer, ll.item_pools(model.tokenizer, [0, 3])[0]
    prompts = ll.make_prompts(pools, (3,), 2, seed=0)
    enc = ll.encode(tok, prompts)
    if bos is not None:
        _check_candidates_follow_the_prompt(tok, prompts, enc, bos)
    out = th.build_report(result, tok).write(tmp_path / "r.html").read_text()
    assert "Reader side per mode" in out
