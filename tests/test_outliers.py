"""systematic_outliers: planted massive activation and sink, metric functions, text sets, bad inputs.

The planted model (`planted_outliers`) is a 2-layer Qwen2 with hand-set weights:
* the BOS-like token `<|endoftext|>` embeds e_F and nothing else; other tokens carry N(0, 1) noise on dims ≥ 8;
* layer 0 head 0 attends to the BOS feature by construction (query bias QB on head dim 7, key = e_F feature):
  A[q, 0] = e^s / (e^s + q) with s = QB · x̂_F / √d_head, the other heads are uniform; no value/output;
* layer 0 MLP neuron J fires only on the BOS token and its down-projection column writes DG · act into dim D_STAR:
  a massive activation (≈ 6400) at the first token from block 0 on;
* layer 1 head 0 attends to keys with a large D_STAR (the sink) and copies content dims of the other tokens:
  with the massive value in place most of its attention parks on the BOS token, without it the head spreads
  attention and changes the logits (so set-zero changes the loss, set-mean does not);
* layer 1 MLP neuron K reads D_STAR and writes −DG · act back into it: it cancels the massive activation
  (block 1's output is back to normal), An et al.'s disappearance step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from interp import outliers, sinks, texts
from interp.controls import matched_draws, split
from interp.errors import UserError

F_DIM, D_STAR, NOISE_FROM = 0, 5, 8
D_MODEL, D_HEAD, D_MLP = 64, 16, 32
J, K = 3, 7
QB, KG, GG, UG, DG = 2.0, 1.0, 1.0, 1.0, 100.0
EPS = 1e-6


def write_planted_outliers(path: Path) -> Path:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from interp.tiny import build_tokenizer

    tok = build_tokenizer(512)
    vocab = len(tok)
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen2Config(vocab_size=vocab, hidden_size=D_MODEL, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=D_HEAD, intermediate_size=D_MLP, max_position_embeddings=128,
                         rope_theta=1e6, rms_norm_eps=EPS, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                         architectures=["Qwen2ForCausalLM"])
    if getattr(config, "rope_parameters", None) is not None:
        config.rope_parameters["rope_theta"] = 1e6
    gen = torch.Generator().manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        emb = model.model.embed_tokens.weight
        emb[:, NOISE_FROM:] = torch.randn(vocab, D_MODEL - NOISE_FROM, generator=gen)
        emb[bos] = 0.0
        emb[bos, F_DIM] = 1.0
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        a0, a1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
        a0.q_proj.bias[7] = QB                      # head 0, head dim 7 (slowest rotary pair)
        a0.k_proj.weight[7, F_DIM] = KG             # kv head 0 reads the BOS feature
        m0 = model.model.layers[0].mlp
        m0.gate_proj.weight[J, F_DIM] = GG
        m0.up_proj.weight[J, F_DIM] = UG
        m0.down_proj.weight[D_STAR, J] = DG
        m1 = model.model.layers[1].mlp               # neuron K cancels the massive value after layer 1's attention
        m1.gate_proj.weight[K, D_STAR] = GG
        m1.up_proj.weight[K, D_STAR] = UG
        m1.down_proj.weight[D_STAR, K] = -DG
        a1.q_proj.bias[7] = QB
        a1.k_proj.weight[7, D_STAR] = KG            # the sink key is the massive dim
        for i in range(D_HEAD):                     # head 0 copies 16 content dims of the keys it attends to
            a1.v_proj.weight[i, NOISE_FROM + i] = 1.0
            a1.o_proj.weight[NOISE_FROM + 16 + i, i] = 3.0
        model.lm_head.weight.copy_(torch.randn(vocab, D_MODEL, generator=gen))
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    (path / "interp_model.json").write_text(json.dumps({"random_weights": False, "planted": True}))
    return path


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory):
    return write_planted_outliers(tmp_path_factory.mktemp("planted_outliers"))


@pytest.fixture(scope="module")
def pmodel(planted_dir):
    from interp.models import load_model

    return load_model(str(planted_dir), device="cpu")


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("texts") / "prose.txt"
    path.write_text("\n\n".join(texts.natural_text()[:20]), encoding="utf-8")
    return path


def _chunks(model, n=12, seq_len=16, bos=True):
    return texts.chunk_texts(model.tokenizer, texts.natural_text()[:20], seq_len, n, bos=bos)


def _same(a: dict, b: dict, rel: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], float) and b[k] is not None:
            assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-6), k
        else:
            assert a[k] == b[k], k


def _bos_score() -> float:
    xhat = 1.0 / math.sqrt(1.0 / D_MODEL + EPS)   # RMSNorm of e_F
    return QB * KG * xhat / math.sqrt(D_HEAD)


# ---------------------------------------------------------------- planted sink

def test_planted_head_first_token_attention_and_sink_rate(pmodel):
    ts = _chunks(pmodel, n=6, seq_len=16)
    assert ts.first_tokens[0] == "<|endoftext|>" and ts.first_token_summary()["share"] == 1.0
    stats = sinks.attention_metrics(pmodel, ts.chunks, batch_size=4, layers=[0], progress=False)
    e, T = math.exp(_bos_score()), 16
    planted_f = np.mean([e / (e + q) for q in range(1, T)])
    planted_alpha = np.mean([e / (e + q) for q in range(T)])
    uniform_f = np.mean([1 / (q + 1) for q in range(1, T)])
    uniform_alpha = np.mean([1 / (q + 1) for q in range(T)])
    heads = {r["head"]: r for r in stats.per_head()}
    assert heads[0]["first_token"] == pytest.approx(planted_f, abs=1e-4)
    assert heads[1]["first_token"] == pytest.approx(uniform_f, abs=1e-5)
    assert planted_alpha > 0.3 > uniform_alpha
    assert heads[0]["sink_rate"] == 100.0 and heads[1]["sink_rate"] == 0.0
    assert stats.per_layer()[0]["sink_rate"] == pytest.approx(25.0)
    assert stats.per_layer()[0]["first_token"] == pytest.approx((planted_f + 3 * uniform_f) / 4, abs=1e-4)

    # repeated-token control without the BOS-like token: nothing carries the sink feature, every head is uniform
    rep = texts.repeated_token_set(pmodel.tokenizer, T, 4, bos=False, seed=0)
    assert len(set(rep.chunks[0])) == 1
    ctrl = sinks.attention_metrics(pmodel, rep.chunks, batch_size=4, layers=[0], progress=False)
    assert ctrl.overall()["sink_rate"] == 0.0
    assert ctrl.overall()["first_token"] == pytest.approx(uniform_f, abs=1e-5)


def test_attention_and_residual_stats_do_not_depend_on_batching(pmodel):
    ts = _chunks(pmodel, n=10, seq_len=16)
    seqs = [c[: 6 + i] for i, c in enumerate(ts.chunks)]  # different lengths: left padding in a batch
    a1 = sinks.attention_metrics(pmodel, seqs, batch_size=1, qkv_norms=True, progress=False)
    a8 = sinks.attention_metrics(pmodel, seqs, batch_size=8, qkv_norms=True, progress=False)
    for x, y in zip(a1.per_head(), a8.per_head(), strict=True):
        _same(x, y)
    assert sorted(a1.outlier_keys) == sorted(a8.outlier_keys)
    for x, y in zip(a1.qkv_norm_rows(), a8.qkv_norm_rows(), strict=True):
        _same(x, y)
    r1 = outliers.residual_stats(pmodel, seqs, batch_size=1, progress=False)
    r8 = outliers.residual_stats(pmodel, seqs, batch_size=8, progress=False)
    for x, y in zip(r1.profile() + r1.down_profile(), r8.profile() + r8.down_profile(), strict=True):
        _same(x, y)
    assert len(r1.hits) == len(r8.hits)


# ---------------------------------------------------------------- planted massive activation

def test_residual_stats_find_the_planted_massive_activation(pmodel, planted_dir):
    ts = _chunks(pmodel, n=8, seq_len=16)
    # tau 100: in a 16 × 64 chunk one 6400 lifts the mean |h| to ≈ 7, so An's 1000 × mean cannot fire
    stats = outliers.residual_stats(pmodel, ts.chunks, batch_size=4, tau=100, progress=False)
    assert stats.n_hits == len(ts)  # one per chunk in block 0; block 1 cancels it
    assert {(h["layer"], h["position"], h["dim"]) for h in stats.hits} == {(0, 0, D_STAR)}
    assert [r["dim"] for r in stats.outlier_dims()] == [D_STAR]
    expected = DG * UG * 8 * (GG * 8) * torch.sigmoid(torch.tensor(GG * 8.0)).item()  # silu(8)·8·DG
    assert stats.hits[0]["value"] == pytest.approx(expected, rel=1e-3)
    assert stats.profile()[0]["top_dims"][0] == D_STAR
    assert stats.down_profile()[0]["top_dims"][0] == J
    assert {(h["layer"], h["position"]) for h in stats.token_hits} == {(0, 0)}  # An's token rule too
    assert stats.profile()[1]["max_abs"] < 20
    # independent computation: a plain HF forward's hidden states
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(planted_dir).eval()
    outs = {}
    def keep(i):
        return lambda mod, args, output: outs.__setitem__(i, output[0] if isinstance(output, tuple) else output)

    # decoder-layer outputs (HF's last hidden state is after the final norm)
    for i, layer in enumerate(hf.model.layers):
        layer.register_forward_hook(keep(i))
    with torch.no_grad():
        hf(torch.tensor(ts.chunks))
    for layer in (0, 1):
        a = outs[layer].abs()
        top1 = a.flatten(1).max(1).values.mean().item()
        median = a.flatten(1).median(1).values.mean().item()
        assert stats.profile()[layer]["top1"] == pytest.approx(top1, rel=1e-4)
        assert stats.profile()[layer]["median_abs"] == pytest.approx(median, rel=1e-4)
    expected_m_act = np.mean([outs[i].abs().max().item() for i in (0, 1)])
    assert outliers.m_act(stats.layer_max()) == pytest.approx(expected_m_act, rel=1e-4)


def test_analysis_reports_layer_dim_neuron_and_interventions(pmodel, text_file, tmp_path):
    from interp.analyses import systematic_outliers as so
    from interp.analysis import config_for

    cfg = config_for("systematic_outliers", pmodel, text_set=str(text_file), seq_len=16, n_chunks=16, bos=True,
                     random_draws=3, progress=False)
    res = so.run(pmodel, cfg)
    d = res.to_dict()
    for key in ("residual", "massive_activations", "outlier_dims", "attention", "weight_outliers", "connections",
                "interventions"):
        assert key in d
    assert set(d["residual"][0]) >= {"layer", "max_abs", "median_abs", "mean_abs", "top_dims"}
    assert set(d["attention"][0]) >= {"layer", "first_token", "sink_rate"}
    assert d["outlier_dims"][0]["dim"] == D_STAR
    neuron = d["connections"]["neurons"][0]
    assert neuron["neuron"] == J and neuron["writes_to"][0] == D_STAR and neuron["weights"][0] == pytest.approx(DG)
    assert neuron["writes_to_outlier_dims"] == [D_STAR] and neuron["max_input"] == pytest.approx(64 * 0.99966, rel=1e-3)
    life = d["connections"]["lifecycle"][0]
    assert (life["dim"], life["emerges_at"], life["creator_neuron"], life["creator_same_sign"]) == (D_STAR, 0, J, True)
    assert (life["cancelled_at"], life["canceller_neuron"], life["canceller_opposite_sign"]) == (1, K, True)
    down0 = next(r for r in d["weight_outliers"] if r["layer"] == 0 and r["module"] == "down")
    assert down0["top_columns"][0] == J
    assert d["attention"][1]["sink_rate"] == pytest.approx(25.0)  # layer 1 head 0 parks on the massive token
    rows = {(r["what"], r["draw"]): r for r in d["interventions"] if r["split"] == "held_out"}
    in_sample = {r["what"]: r for r in d["interventions"] if r["split"] == "selection"}
    assert set(in_sample) == {"baseline", "set_zero", "set_mean"}
    assert abs(in_sample["set_zero"]["loss"] - in_sample["baseline"]["loss"]) > 1e-2
    base, zero, mean = rows[("baseline", None)], rows[("set_zero", None)], rows[("set_mean", None)]
    assert zero["dims"] == [D_STAR] and zero["layer"] == 0 and zero["massive"] is True
    assert zero["n_positions"] == base["n_measured"]  # one carrier (the first token) per measured chunk
    assert abs(zero["loss"] - base["loss"]) > 1e-2
    assert abs(mean["loss"] - base["loss"]) < 1e-5
    assert zero["first_token"] < base["first_token"] - 0.05 and zero["m_act"] < base["m_act"] / 10
    ctrl = rows[("set_zero_random", "mean ± sd")]
    # no ordinary dim is near 6400: the control moves the same change (same norm) onto random dims
    assert (ctrl["matched_on"], ctrl["strata"], ctrl["norm_match"]) == ("norm", {"1e3": 1}, "moved_change")
    assert ctrl["n_draws"] == 3 and ctrl["loss_sd"] > 0 and len(ctrl["loss_draws"]) == 3
    assert any("moves the same change" in w for w in d["warnings"])
    draws = [r for r in d["interventions"] if r["what"] == "set_zero_random" and r["draw"] != "mean ± sd"]
    assert len(draws) == 3 and all(D_STAR not in r["dims"] and r["strata"] == {"1e3": 1} for r in draws)
    # planted case: zeroing ordinary dims (the unmatched control) leaves the loss as it is, so set-zero would look
    # special; a change of the same norm on other dims moves the loss as much (this planted head reads no dim
    # in particular), and the matched control says so
    ts = so.load_text_set(pmodel, cfg)
    held = [ts.chunks[i] for i in split(len(ts), cfg.selection_fraction, cfg.seed).held_out]
    unmatched = so.SetScalars(0, [D_STAR], [D_STAR + 1], torch.zeros(2, 1), True, 100.0, 1000.0)
    assert abs(so.measure(pmodel, held, cfg, unmatched)["loss"] - base["loss"]) < 1e-3
    matched_shift = [abs(r["loss"] - base["loss"]) for r in draws]
    assert min(matched_shift) <= abs(zero["loss"] - base["loss"]) <= max(matched_shift)
    mctrl = rows[("set_mean_random", "mean ± sd")]
    assert (mctrl["matched_on"], mctrl["norm_match"], mctrl["strata"]) == ("norm", "stratum", {"0": 1})
    assert res.attention_overall["sink_set_layers"] == {0: 16, 1: 0}
    assert base["n_selection"] + base["n_measured"] == 16
    assert ("repeated_token", None) in rows
    rep = so.build_report(res, pmodel.tokenizer)
    html = rep.render()
    assert "Interventions" in html and "&lt;|endoftext|&gt;" in html
    assert set(res.tables()) >= {"residual", "attention_heads", "interventions"}


# ---------------------------------------------------------------- metric functions

def test_massive_rule_token_rule_and_token_types():
    h = torch.full((4, 8), 0.1)
    h[0, 3] = -500.0
    h[2, 1] = 150.0   # > 100 but 150 / 0.1 = 1500 ≥ 1000: massive too
    h[3, 2] = 90.0    # below the absolute threshold
    assert outliers.massive_hits(h).tolist() == [[0, 3], [2, 1]]
    assert outliers.massive_hits(h, ratio=2000).tolist() == [[0, 3]]
    mean = h.abs().mean().item()
    assert outliers.outlier_tokens(h, tau=500 / mean - 1).tolist() == [0]
    vals, dims = outliers.top_k_abs(h, 3)
    assert vals.tolist() == pytest.approx([500, 150, 90]) and dims.tolist() == [3, 1, 2]
    assert outliers.token_type(0, "Summer") == "initial"
    assert outliers.token_type(3, ".") == "strong_delimiter"
    assert outliers.token_type(5, "\n") == "strong_delimiter"
    assert outliers.token_type(4, " the") == "weak_semantic"
    assert outliers.token_type(4, " warm") == "other"
    assert outliers.m_act([10.0, 20.0, 60.0]) == pytest.approx(30.0)


def test_column_ratios_against_numpy():
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    a = np.abs(w.numpy())
    assert outliers.column_ratios(w).numpy() == pytest.approx(a.max(0) / (a.mean(0) + 1e-8), rel=1e-5)


def test_streamed_stats_hold_no_per_sequence_tensors(pmodel):
    """Memory is bounded by the batch: the accumulators' tensors do not grow with the number of chunks."""
    ts = _chunks(pmodel, n=40, seq_len=16)

    def tensor_bytes(obj):
        total = 0
        for name, v in vars(obj).items():
            if name.startswith("_"):  # one batch's state (its sink sets), replaced at each batch
                continue
            items = v.values() if isinstance(v, dict) else [v]
            total += sum(t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor))
        return total

    small = [sinks.attention_metrics(pmodel, ts.chunks[:4], progress=False),
             outliers.residual_stats(pmodel, ts.chunks[:4], progress=False)]
    big = [sinks.attention_metrics(pmodel, ts.chunks, progress=False),
           outliers.residual_stats(pmodel, ts.chunks, progress=False)]
    for s, b in zip(small, big):
        assert tensor_bytes(s) == tensor_bytes(b)


# ---------------------------------------------------------------- text sets

def test_chunking_with_and_without_bos(pmodel):
    tok = pmodel.tokenizer
    docs = texts.natural_text()
    assert len(docs) > 50 and sum(d.count(".") for d in docs) > 300
    ids = tok("\n\n".join(docs[:5]), add_special_tokens=False)["input_ids"]
    plain = texts.chunk_texts(tok, docs[:5], 10, bos=False)
    assert plain.chunks[0] == ids[:10] and plain.chunks[1] == ids[10:20]
    assert all(len(c) == 10 for c in plain.chunks) and len(plain) == len(ids) // 10
    assert plain.first_token_ids[1] == ids[10] and plain.first_tokens[1] == tok.decode([ids[10]])
    with_bos = texts.chunk_texts(tok, docs[:5], 10, 3, bos=True)
    bos_id, bos_str = texts.bos_token(tok)
    assert bos_str == "<|endoftext|>" and [c[0] for c in with_bos.chunks] == [bos_id] * 3
    assert with_bos.chunks[0][1:] == ids[:9] and with_bos.chunks[1][1:] == ids[9:18]
    with pytest.raises(UserError, match="fewer than one chunk"):
        texts.chunk_texts(tok, ["short"], 64)
    sel, held = texts.split_indices(10, 0.5, seed=0)
    assert sorted(sel + held) == list(range(10)) and len(sel) == 5


def test_text_file_and_registry(tmp_path):
    from interp.datasets import load_dataset

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    with pytest.raises(UserError, match="empty"):
        load_dataset(str(empty), "texts")
    f = tmp_path / "t.txt"
    f.write_text("One paragraph.\n\nAnother one.\n")
    assert load_dataset(str(f), "texts") == ["One paragraph.", "Another one."]
    assert load_dataset("natural-text", "texts")[0].startswith("The river rose")
    assert len(load_dataset("organism-plain", "texts", limit=3)) == 3


def test_model_without_down_projection_is_refused():
    fake = SimpleNamespace(cfg=SimpleNamespace(n_layers=1, d_model=4), hook_dict={},
                           blocks=[SimpleNamespace(mlp=None)])
    with pytest.raises(UserError, match="down-projection"):
        outliers.check_down_projection(fake)
    with pytest.raises(UserError, match="down-projection"):
        outliers.down_projection(fake, 0)


# ---------------------------------------------------------------- CLI errors

@pytest.mark.parametrize("extra, message", [
    (["--seq-len", "4096"], "exceeds the model's context"),
    (["--sink-epsilon", "0"], "sink-epsilon"),
    (["--n-chunks", "1"], "n-chunks"),
    (["--random-draws", "1"], "random"),
    (["--dataset", "no-such-set"], "unknown text set"),
    (["--dataset", "missing.txt"], "text file not found"),
    (["--example", "100"], "example must be in 0..99"),
])
def test_cli_bad_options(planted_dir, tmp_path, capsys, extra, message):
    from interp.run import main

    assert main(["systematic_outliers", "--model", str(planted_dir), "--out", str(tmp_path / "o"), "--no-progress",
                 *extra]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and message in err and "Traceback" not in err


def test_cli_empty_text_file(planted_dir, tmp_path, capsys):
    from interp.run import main

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["systematic_outliers", "--model", str(planted_dir), "--dataset", str(empty),
                 "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "empty" in err and "Traceback" not in err


def test_bidirectional_encoder_runs_without_loss(tmp_path):
    """A tiny BERT through TransformerBridge: bidirectional metrics, `[CLS]` first, loss skipped with a note."""
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    from interp.analyses import systematic_outliers as so
    from interp.analysis import config_for
    from interp.models import load_model

    words = "[PAD] [UNK] [CLS] [SEP] [MASK] the a river rose slowly through night and by morning . , is".split()
    (tmp_path / "vocab.txt").write_text("\n".join(words + [f"w{i}" for i in range(100)]))
    BertTokenizerFast(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    torch.manual_seed(0)
    BertForMaskedLM(BertConfig(vocab_size=len(words) + 100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64,
                               architectures=["BertForMaskedLM"])).save_pretrained(tmp_path)
    model = load_model(str(tmp_path), device="cpu")
    assert not so.is_causal(model)
    res = so.run(model, config_for("systematic_outliers", model, seq_len=16, n_chunks=6, bos=True, random_draws=2,
                                   progress=False))
    assert res.text_set["first_token"] == "[CLS]"
    assert any("Bidirectional encoder" in n for n in res.notes)
    assert all(r["loss"] is None for r in res.interventions)
    assert len(res.attention) == 2 and 0 < res.attention_overall["first_token"] < 1
    assert res.weight_outliers[0]["module"] == "down"
    so.build_report(res, model.tokenizer).render()


def test_gpt2_down_projection_is_read_as_out_by_in(tmp_path):
    from interp.models import load_model
    from interp.tiny import write_tiny_checkpoint

    model = load_model(str(write_tiny_checkpoint(tmp_path / "gpt2", "gpt2", d_model=32, d_mlp=96, max_len=64)),
                       device="cpu")
    w = outliers.down_projection(model, 0)
    conv = model.original_model.transformer.h[0].mlp.c_proj.weight  # Conv1D: [in = d_mlp, out = d_model]
    assert w.shape == (32, 96) and torch.equal(w, conv.detach().float().T)
    assert outliers.weight_outliers(model)[0]["module"] == "down"


def test_mixtral_runs_with_per_expert_down_projections(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    from interp.analyses import systematic_outliers as so
    from interp.analysis import config_for
    from interp.models import load_model
    from interp.tiny import build_tokenizer

    tok = build_tokenizer(512)
    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, architectures=["MixtralForCausalLM"],
    )).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), device="cpu")
    assert outliers.is_moe(model)
    cfg = config_for("systematic_outliers", model, seq_len=16, n_chunks=4, random_draws=2, progress=False)
    res = so.run(model, cfg)
    assert any(n.startswith("Mixture-of-experts") for n in res.notes) and res.skipped_layers == {}
    # read per expert (tests/test_moe.py plants a massive activation in one expert)
    assert [r["mlp"] for r in res.down_input] == ["moe", "moe"] and len(res.connections["neurons"]) == 2
    modules = {(r["module"], r["expert"]) for r in res.weight_outliers if r["layer"] == 0}
    assert modules >= {("down", e) for e in range(4)}
    assert len(res.residual) == 2 and res.interventions[0]["loss"] is not None


def test_hub_text_sets_fail_offline_with_one_line(monkeypatch):
    datasets = pytest.importorskip("datasets")
    from interp.datasets import load_dataset

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    for name in ("wikitext-2", "redpajama-sample"):
        with pytest.raises(UserError) as err:
            load_dataset(name, "texts")
        assert "offline?" in str(err.value) and "\n" not in str(err.value)


# ---------------------------------------------------------------- matched control, token types

def test_norm_matched_dims_where_the_unmatched_control_misleads():
    """Planted: a model whose loss rises with the squared size of any change (no dim is special). The chosen dims
    change by 500 and 300; ten ordinary dims change by 200–900, the rest by 0.1. Unmatched random dims change
    almost nothing (the chosen dims look 10⁷ × more important); norm-matched ones show the same order of effect."""
    from interp.analyses.systematic_outliers import norm_matched_dims

    change = [0.1] * 64
    change[0], change[1] = 500.0, 300.0
    for i, d in enumerate(range(10, 20)):
        change[d] = 200.0 + 70 * i

    def effect(dims):
        return sum(change[d] ** 2 for d in dims)

    chosen = effect([0, 1])
    unmatched = matched_draws([0, 1], range(64), draws=5, seed=0)
    draws, moved = norm_matched_dims([0, 1], change, draws=5, seed=0, key="zero")
    assert not moved and draws.matched_on == "norm" and draws.strata == {"1e2": 2}
    assert np.mean([effect(s) for s in unmatched]) < chosen / 1e4 < chosen / 100 < np.mean([effect(s) for s in draws])
    assert all(set(s) <= set(range(10, 20)) for s in draws)
    # a massive change no ordinary dim reaches: plain random dims, flagged to receive the moved change
    change[0] = 5000.0
    draws, moved = norm_matched_dims([0], change, draws=3, seed=0, key="zero")
    assert moved and draws.strata == {"1e3": 1} and len(draws) == 3 and all(0 not in s for s in draws)


def test_token_types_count_every_position_per_layer(pmodel):
    """Every massive position counts once (however many dims), per layer and over all layers, with no cap; the
    list of hits is capped and says how many it dropped. Checked against an independent count."""
    from interp.analyses.systematic_outliers import token_type_counts

    tok = pmodel.tokenizer
    dot, word = tok.convert_tokens_to_ids("."), tok("warm", add_special_tokens=False)["input_ids"][0]
    tokens = torch.tensor([[word, word, dot, word, word, dot]])
    h0, h1 = torch.full((6, 8), 0.1), torch.full((6, 8), 0.1)
    h0[0, 1], h0[0, 2], h0[2, 1], h0[5, 3] = 900.0, -700.0, 800.0, 600.0   # layer 0: positions 0 (two dims), 2, 5
    h1[2, 1], h1[4, 4] = 500.0, 400.0                                       # layer 1: positions 2, 4
    stats = outliers.ResidualStats(2, down=False, max_hits=3)
    stats.begin_batch([0], tokens, None)
    stats.update(0, h0[None])
    stats.update(1, h1[None])
    assert stats.n_hits == 6 and len(stats.hits) == 3 and stats.n_hits_dropped == 3
    rows = token_type_counts("massive_activation", stats.hit_positions, tok)
    got = {(r["layer"], r["type"]): r["count"] for r in rows}
    expected: dict = {}
    for layer, h in ((0, h0), (1, h1)):
        for p in sorted({int(p) for p, _ in outliers.massive_hits(h).tolist()}):
            t = outliers.token_type(p, tok.decode([int(tokens[0, p])]))
            for key in ((layer, t), ("all", t)):
                expected[key] = expected.get(key, 0) + 1
    assert got == expected == {(0, "initial"): 1, (0, "strong_delimiter"): 2, (1, "strong_delimiter"): 1,
                               (1, "other"): 1, ("all", "initial"): 1, ("all", "strong_delimiter"): 3,
                               ("all", "other"): 1}
    assert sum(r["share"] for r in rows if r["layer"] == 0) == pytest.approx(1.0)


def test_old_option_names_still_work_and_warn():
    from interp.analysis import config_for

    with pytest.warns(FutureWarning, match="'select_fraction' is now 'selection_fraction'"):
        assert config_for("systematic_outliers", select_fraction=0.25).selection_fraction == 0.25
    with pytest.warns(FutureWarning, match="'n_texts' is now 'n_chunks'"):
        assert config_for("systematic_outliers", n_texts=7).n_chunks == 7
    assert config_for("systematic_outliers").random_draws == 5


# ---------------------------------------------------------------- memory model (issue 16)

def test_measure_loss_equals_the_full_logits_reference(pmodel, text_file):
    """measure()'s chunked cross-entropy (no [batch, pos, vocab]) = the full-logits log_softmax, with and without an
    intervention, on a padded batch."""
    from interp.analyses import systematic_outliers as so
    from interp.analysis import config_for
    from interp.batching import padded_batches

    cfg = config_for("systematic_outliers", pmodel, text_set=str(text_file), seq_len=16, n_chunks=6, bos=True,
                     batch_size=4, progress=False)
    seqs = [c[: 16 - i] for i, c in enumerate(so.load_text_set(pmodel, cfg).chunks)]  # left padding in each batch
    for make in (lambda: None, lambda: so.SetScalars(0, [D_STAR], [D_STAR], torch.zeros(2, 1), True, 100.0, 1000.0)):
        got = so.measure(pmodel, seqs, cfg, make())
        nll, count, iv = 0.0, 0, make()
        for _, tokens, mask in padded_batches(pmodel, seqs, 4, progress=False):
            if iv is not None:
                iv.mask = mask
            with torch.no_grad():
                logits = pmodel.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=iv.hooks() if iv else [])
            logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tokens[:, 1:, None])[..., 0]
            keep = (mask[:, :-1] * mask[:, 1:]).bool()
            nll, count = nll - float(logp[keep].double().sum()), count + int(keep.sum())
        assert got["loss"] == pytest.approx(nll / count, rel=1e-5)


def test_example_pattern_is_capped_in_the_result_and_report(pmodel, text_file, monkeypatch):
    from interp.analyses import systematic_outliers as so
    from interp.analysis import config_for

    monkeypatch.setattr(sinks, "EXAMPLE_TOKENS", 8)
    cfg = config_for("systematic_outliers", pmodel, text_set=str(text_file), seq_len=16, n_chunks=4, bos=True,
                     random_draws=2, example=1, progress=False)
    res = so.run(pmodel, cfg)
    assert set(res.example_pattern) == {0, 1}
    assert all(np.asarray(p).shape == (8, 8) for p in res.example_pattern.values())
    assert len(res.example_tokens) == 8
    assert "its first 8 of 16 tokens" in so.build_report(res, pmodel.tokenizer).render()
