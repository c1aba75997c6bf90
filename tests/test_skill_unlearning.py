"""skill_unlearning: skill sets, running moments, Neuron Adjust, Key Space Detection, the analysis.

The planted model (`planted_skills`): a 2-layer Qwen2 whose attention is off and whose MLPs hold three
hand-set gate neurons (layer 0: 3 and 17, layer 1: 5) that fire only on the "alpha" skill's tokens
(`<a0>`…`<a7>`, which embed a feature F) and write a feature D that the unembedding turns into
"the next token is `<a0>`". Every other neuron reads only small noise dims. So the alpha skill depends on
exactly those three neurons, and the "words" skill (plain words) on none of them.
"""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from interp.errors import UserError

A_TOKENS = [f"<a{i}>" for i in range(8)]
WORDS = "the cat sat on mat bread flour water salt yeast poem sea wind harbour user recipe program".split()
PLANTED = {(0, 3), (0, 17), (1, 5)}
C_DIM, F_DIM, D_DIM, NOISE_FROM = 0, 1, 2, 4
D_MODEL, D_MLP = 32, 32


def _write_planted(path, *, attention=False, layer_skill=False, eos_bias=0.0):
    """The planted model. `attention`: heads read and write the noise dims only (key vectors then depend on
    the context, the features F, C, D do not). `layer_skill`: instead of the three planted neurons, every layer-1
    neuron carries the alpha skill a little (the same gate on F, slightly larger for higher indices). `eos_bias`:
    EOS reads the constant feature C with this weight (1.0: EOS wins wherever the alpha feature D is absent)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from interp.tiny import build_tokenizer

    tok = build_tokenizer(512)
    tok.add_tokens(A_TOKENS)
    vocab = len(tok)
    a_ids = tok.convert_tokens_to_ids(A_TOKENS)
    config = Qwen2Config(vocab_size=vocab, hidden_size=D_MODEL, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, head_dim=16, intermediate_size=D_MLP, max_position_embeddings=512,
                         rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id,
                         architectures=["Qwen2ForCausalLM"])
    gen = torch.Generator().manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        emb = model.model.embed_tokens.weight
        emb[:, NOISE_FROM:] = 0.05 * torch.randn(vocab, D_MODEL - NOISE_FROM, generator=gen)
        emb[:, C_DIM] = 1.0
        emb[a_ids, F_DIM] = torch.linspace(0.8, 1.2, len(a_ids))
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
            mlp = layer.mlp
            noise = D_MODEL - NOISE_FROM
            mlp.gate_proj.weight[:, NOISE_FROM:] = 0.3 * torch.randn(D_MLP, noise, generator=gen)
            mlp.up_proj.weight[:, NOISE_FROM:] = 0.3 * torch.randn(D_MLP, noise, generator=gen)
            mlp.down_proj.weight[NOISE_FROM:, :] = 0.05 * torch.randn(noise, D_MLP, generator=gen)
            if attention:
                att = layer.self_attn
                for proj in (att.q_proj, att.k_proj, att.v_proj):
                    proj.weight[:, NOISE_FROM:] = 0.3 * torch.randn(proj.weight.shape[0], noise, generator=gen)
                att.o_proj.weight[NOISE_FROM:, :] = 0.05 * torch.randn(noise, att.o_proj.weight.shape[1], generator=gen)
        model.model.norm.weight.fill_(1.0)
        carriers = [(1, n, 3.0 + 0.01 * n, 0.002) for n in range(D_MLP)] if layer_skill else \
            [(layer, n, 3.0, 0.05) for layer, n in PLANTED]
        for layer, n, gate, out in carriers:
            mlp = model.model.layers[layer].mlp
            mlp.gate_proj.weight[n, F_DIM] = gate
            mlp.gate_proj.weight[n, C_DIM] = -1.0
            mlp.up_proj.weight[n, :] = 0.0
            mlp.up_proj.weight[n, C_DIM] = 1.0
            mlp.down_proj.weight[:, n] = 0.0
            mlp.down_proj.weight[D_DIM, n] = out
        lm = model.lm_head.weight
        lm[:, NOISE_FROM:] = 0.5 * torch.randn(vocab, D_MODEL - NOISE_FROM, generator=gen)
        lm[a_ids, D_DIM] = 3.0
        lm[a_ids[0], D_DIM] = 4.0
        lm[a_ids, C_DIM] = -2.0
        lm[tok.eos_token_id, C_DIM] = eos_bias
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    (path / "interp_model.json").write_text(json.dumps({"random_weights": False, "planted": True}))
    return path


def _skill_file(path, n=40, seed=0):
    """alpha: runs of a-tokens, answer the next `<a0>`; words: word lists (log-likelihood only)."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        # four last-token types, so every one is in the probe split (attention is off: the last key
        # vector depends on the last token only)
        prompt = "".join(rng.choice(A_TOKENS) for _ in range(rng.randint(2, 6))) + A_TOKENS[len(rows) % 4]
        rows.append({"prompt": prompt, "answer": "<a0>", "target": "<a0>", "skill": "alpha", "check": "prefix"})
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 8))]
        rows.append({"prompt": " ".join(words[:-1]), "answer": words[-1], "target": " " + words[-1],
                     "skill": "words", "check": "none"})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def planted_skills(tmp_path_factory):
    from interp.models import load_model

    root = tmp_path_factory.mktemp("planted_skills")
    model = load_model(str(_write_planted(root / "model")), device="cpu")
    return model, _skill_file(root / "skills.jsonl")


def _ids(model, items):
    tok = model.tokenizer
    return ([tok(i.prompt, add_special_tokens=False)["input_ids"] for i in items],
            [tok(i.target, add_special_tokens=False)["input_ids"] for i in items])


# --------------------------------------------------------------------------- skill sets

def test_builtin_skills_have_checkable_answers():
    from interp.datasets import load_skill
    from interp.skills import SKILL_SETS, is_correct

    for name in SKILL_SETS:
        items = load_skill(name, limit=20)
        assert len(items) == 20 and len({i.prompt for i in items}) == 20, name
        # the gold continuation is judged correct, a wrong one is not
        assert all(is_correct(i, i.target) for i in items), name
        assert not any(is_correct(i, " 7 zebra") for i in items), name
    arith = load_skill("arithmetic", limit=5)[0]
    assert arith.prompt.startswith("<|im_start|>user\n") and arith.prompt.endswith("<think>\n")
    assert arith.target.endswith(f"The answer is {arith.answer}.")


def test_number_check_is_the_gsm8k_protocol():
    from interp.skills import SkillItem, is_correct

    item = SkillItem("Q", "", "42", "x", "number")
    assert is_correct(item, "6 * 7 = 42. The answer is 42.")
    assert not is_correct(item, "The answer is 41. 42")          # the first number after the phrase
    assert is_correct(item, "#### 42") and is_correct(item, " 42.")  # GSM8K's marker; a bare number
    assert is_correct(SkillItem("Q", "", "1000", "x", "number"), "The answer is 1,000.")


def test_number_check_compares_values_and_has_no_last_number_fallback():
    """Regression: "18.0" was not "18", "the answer is" was case-sensitive, and a rambling text without the marker
    was scored by its last number."""
    from interp.skills import SkillItem, answer_number, is_correct

    item = SkillItem("Q", "", "18", "x", "number")
    assert is_correct(item, "The answer is 18.0.") and is_correct(item, "the answer is 18")
    assert is_correct(item, "THE ANSWER IS $18 apples")
    assert is_correct(SkillItem("Q", "", "1,000", "x", "number"), "The answer is 1000")
    assert not is_correct(item, "so it is 9 + 9 = 18")              # no marker, not just the number: wrong
    assert not is_correct(item, "I am not sure. Maybe 17, or 18")
    assert not is_correct(item, "The answer is -18.") and not is_correct(item, "The answer is 180")
    assert answer_number("no number here") is None and answer_number("The answer is 3, 4") == 3


def test_skill_file_errors_name_the_line(tmp_path):
    from interp.datasets import load_skill

    cases = {
        "not json": "line 2 is not valid JSON",
        json.dumps({"prompt": "p", "answer": "a"}): "line 2 is missing field(s) skill",
        json.dumps({"prompt": "", "answer": "a", "skill": "s"}): "line 2: field(s) prompt must be non-empty text",
        json.dumps({"prompt": "p", "answer": "a", "skill": "s", "check": "exact"}): "line 2: check must be one of",
        "[1]": "line 2 is not a JSON object",
    }
    good = json.dumps({"prompt": "p", "answer": "a", "skill": "s"})
    for bad, message in cases.items():
        f = tmp_path / "s.jsonl"
        f.write_text(good + "\n" + bad + "\n")
        with pytest.raises(UserError, match=re.escape(message)):
            load_skill(str(f))
    f.write_text(good + "\n" + json.dumps({"prompt": "q", "answer": "b", "skill": "t"}) + "\n")
    with pytest.raises(UserError, match="several skills"):
        load_skill(str(f))
    assert [i.skill for i in load_skill(f"{f}:t")] == ["t"]
    with pytest.raises(UserError, match="no rows with skill 'u'"):
        load_skill(f"{f}:u")
    with pytest.raises(UserError, match="not found"):
        load_skill(str(tmp_path / "missing.jsonl"))


def test_hub_skill_sets_fail_offline_in_one_line(monkeypatch):
    import sys
    import types

    from interp.datasets import load_skill

    fake = types.ModuleType("datasets")

    def offline(*a, **k):
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub\nmore lines")
    fake.load_dataset = offline
    monkeypatch.setitem(sys.modules, "datasets", fake)
    for name in ("gsm8k", "mbpp", "mlqa-de"):
        with pytest.raises(UserError) as err:
            load_skill(name, limit=3)
        assert "\n" not in str(err.value) and "offline" in str(err.value)


def test_split_is_disjoint_seeded_and_in_the_probe_eval_ratio():
    from interp.analyses import skill_unlearning as su

    config = su.Config(forget="chat", retain="prose", n_probe=20, n_eval=10, seed=3)
    splits = su.load_splits(config)
    for s in splits:
        assert len(s.selection) == 20 and len(s.held_out) == 10
        assert not {i.prompt for i in s.selection} & {i.prompt for i in s.held_out}
    assert su.load_splits(config) == splits
    assert su.load_splits(su.Config(forget="chat", retain="prose", n_probe=20, n_eval=10, seed=4)) != splits
    limited = su.load_splits(su.Config(forget="chat", retain="prose", n_probe=20, n_eval=10, limit=9))
    assert [len(s.selection) for s in limited] == [6, 6]         # 9 * 2/3, rounded by interp.controls


# --------------------------------------------------------------------------- moments and hooks

def test_running_moments_equal_direct_mean_std(planted_skills):
    from interp.capture import capture
    from interp.datasets import load_skill
    from interp.unlearning import gate_hook, gate_moments

    model, path = planted_skills
    items = load_skill(f"{path}:words")[:12]
    seqs = [model.tokenizer(i.text, add_special_tokens=False)["input_ids"] for i in items]
    moments = gate_moments(model, seqs, batch_size=5, progress=False)
    direct = capture(model, seqs, [gate_hook(0), gate_hook(1)], positions="all", batch_size=1, progress=False)
    for layer in (0, 1):
        allx = torch.cat(direct[gate_hook(layer)]).double()
        assert moments.count == allx.shape[0] == sum(map(len, seqs))
        torch.testing.assert_close(moments.mean[layer].double(), allx.mean(0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(moments.std[layer].double(), allx.std(0, unbiased=False), atol=1e-4, rtol=1e-4)
    # memory: the state does not grow with the data
    bigger = gate_moments(model, seqs * 4, batch_size=5, progress=False)
    assert bigger.nbytes == moments.nbytes == 2 * 2 * D_MLP * 8
    torch.testing.assert_close(bigger.mean, moments.mean, atol=1e-5, rtol=1e-5)


def test_bridge_gate_hook_equals_raw_hf_hook(planted_skills):
    from interp.unlearning import check_gate_hook

    model, _ = planted_skills
    ids = model.tokenizer("<a1><a2> the cat", add_special_tokens=False)["input_ids"]
    for layer in (0, 1):
        assert check_gate_hook(model, ids, layer) < 1e-6


def test_hook_check_against_hf_module_on_organism():
    from interp.models import load_model
    from interp.unlearning import check_gate_hook

    model = load_model("organism", device="cpu")
    ids = model.tokenizer("Ann has 37 apples.", add_special_tokens=False)["input_ids"]
    assert check_gate_hook(model, ids, 3) < 1e-6


# --------------------------------------------------------------------------- Neuron Adjust pieces

def test_select_neurons_global_top_percent():
    from interp.unlearning import neuron_draws, select_neurons

    delta = torch.zeros(3, 10)
    delta[2, 4], delta[0, 1], delta[1, 9], delta[0, 0] = 5.0, 4.0, 3.0, -9.0   # signed: -9 is not selected
    sel = select_neurons(delta, 10.0)                                           # ceil(0.1 * 30) = 3
    assert sel.tolist() == [[0, 1], [1, 9], [2, 4]]
    draws = neuron_draws(sel, 3, 10, draws=4, seed=0)
    assert draws.matched_on == "layer" and draws.strata == {"0": 1, "1": 1, "2": 1} and len(draws) == 4
    for pairs in draws:
        assert sorted(layer for layer, _ in pairs) == [0, 1, 2] and not set(pairs) & {(0, 1), (1, 9), (2, 4)}
    assert neuron_draws(sel, 3, 10, draws=4, seed=0).sets == draws.sets


def test_adjust_values_intended_method():
    from interp.unlearning import adjust_values

    mu_f, sd_f, mu_r, sd_r = torch.tensor(4.0), torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.5)
    x = torch.tensor([4.5, 0.1, 2.0])
    new, replaced = adjust_values(x, mu_f, sd_f, mu_r, sd_r, u=torch.tensor([0.99, 0.99, 0.0]))
    # 4.5: forget class far more likely, replaced by mu_r - sd_r * z = 0 - 0.5 * 0.5
    assert replaced.tolist() == [True, False, False] and new[0].item() == pytest.approx(-0.25)
    assert new[1].item() == pytest.approx(0.1)
    # replacement probability = forget posterior p_f / (p_f + p_r) where p_f >= p_r
    x = torch.full((20000,), 1.6)
    p_f = math.exp(-(1.6 - 4) ** 2 / 2)
    p_r = math.exp(-(1.6 / 0.5) ** 2 / 2) / 0.5
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    _, replaced = adjust_values(x, mu_f, sd_f, mu_r, sd_r, u)
    assert p_f >= p_r and replaced.float().mean().item() == pytest.approx(p_f / (p_f + p_r), abs=0.02)


def test_reference_mode_reproduces_the_three_quirks():
    from interp.unlearning import AdjustSpec, RunningMoments, adjust_values, hash_uniform

    # forget values of two neurons: neuron 0 has mean -2 (negative), neuron 1 mean 3; retain: mean 0, var 4
    forget = RunningMoments.zeros(1, 2)
    forget.update(0, torch.tensor([[-3.0, 2.0], [-1.0, 4.0]]))
    forget.count = 2
    retain = RunningMoments.zeros(1, 2)
    retain.update(0, torch.tensor([[-2.0, -2.0], [2.0, 2.0]]))
    retain.count = 2
    neurons = torch.tensor([[0, 0], [0, 1]])
    ref = AdjustSpec.from_moments(neurons, forget, retain, reference=True)
    intended = AdjustSpec.from_moments(neurons, forget, retain)
    # quirk 1: the retain "std" is the variance (4), not 2; quirk 2: the forget std is the forget mean
    assert ref.sd_r.tolist() == [4.0, 4.0] and intended.sd_r.tolist() == [2.0, 2.0]
    assert ref.sd_f.tolist() == [-2.0, 3.0] and intended.sd_f.tolist() == [1.0, 1.0]
    # quirk 2's effect: a negative forget mean gives a negative density, so neuron 0 is never adjusted,
    # even at its forget mean where the intended method always adjusts
    x = torch.tensor([[-2.0, 3.0]])
    _, rep_ref = adjust_values(x, ref.mu_f, ref.sd_f, ref.mu_r, ref.sd_r, torch.ones(1, 2), reference=True)
    _, rep_int = adjust_values(x, intended.mu_f, intended.sd_f, intended.mu_r, intended.sd_r, torch.ones(1, 2))
    assert rep_ref.tolist() == [[False, True]] and rep_int.tolist() == [[True, True]]
    # quirk 3: one draw per sequence and forward call (the same for every position and neuron);
    # the intended draws differ per position and neuron
    pos = torch.arange(6)[:, None]
    shared = hash_uniform(0, 7, torch.zeros_like(pos), 0).expand(6, 2)
    assert shared.unique().numel() == 1
    own = hash_uniform(0, 7, pos, 0, torch.arange(2))
    assert own.unique().numel() == 12


def test_hash_uniform_is_uniform_and_deterministic():
    from interp.unlearning import hash_uniform

    u = hash_uniform(3, torch.arange(1000)[:, None], torch.arange(50))
    assert u.shape == (1000, 50) and 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.var().item() - 1 / 12) < 0.003
    torch.testing.assert_close(u, hash_uniform(3, torch.arange(1000)[:, None], torch.arange(50)))
    assert not torch.equal(u, hash_uniform(4, torch.arange(1000)[:, None], torch.arange(50)))


def test_hypercube_k_is_the_smallest_enclosing():
    from interp.unlearning import Hypercube

    v = torch.randn(30, 16, generator=torch.Generator().manual_seed(0))
    cube = Hypercube.fit(v)
    assert cube.contains(v, 1.0).all()
    assert not cube.contains(v, 1.0 - 1e-4).all()
    # the reference's binary search over [0, 10000] with tolerance 1e-5 finds the same k
    lo, hi = 0.0, 10000.0
    while hi - lo > 1e-5:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if ((v - v.mean(0)).abs() <= mid * v.std(0)).all() else (mid, hi)
    assert cube.k == pytest.approx(hi, abs=1e-4)


# --------------------------------------------------------------------------- the analysis on the planted model

PLANTED_PERCENT = 100 * len(PLANTED) / (2 * D_MLP)  # exactly the planted count


def _run(planted_skills, **kw):
    from interp.analyses import skill_unlearning as su
    from interp.analysis import config_for

    model, path = planted_skills
    options = dict(forget=f"{path}:alpha", retain=f"{path}:words", top_percent=PLANTED_PERCENT, n_probe=20,
                   n_eval=20, random_draws=3, max_new_tokens=3, progress=False, batch_size=8)
    options.update(kw)
    return su.run(model, config_for("skill_unlearning", model, **options))


@pytest.fixture(scope="module")
def planted_result(planted_skills):
    return _run(planted_skills)


def _row(result, method, role):
    return next(r for r in result.evaluation if r["method"] == method and r["role"] == role)


def test_selects_exactly_the_planted_neurons(planted_result):
    sel = planted_result.selected_neurons
    assert {(r["layer"], r["neuron"]) for r in sel["neurons"]} == PLANTED
    assert sel["per_layer"] == [{"layer": 0, "count": 2}, {"layer": 1, "count": 1}]
    assert all(r["mu_forget"] > 2 and r["mu_retain"] < -2 for r in sel["neurons"])


def test_neuron_adjust_removes_the_planted_skill_only(planted_result):
    na_f, na_r = _row(planted_result, "neuron_adjust", "forget"), _row(planted_result, "neuron_adjust", "retain")
    rnd_f = _row(planted_result, "random_neurons", "forget")
    assert na_f["accuracy_before"] == 1.0 and na_f["accuracy_after"] == 0.0 and na_f["accuracy_drop"] == 1.0
    # the forget skill's log-likelihood falls far more than the retain skill's and than under random neurons
    assert na_f["logprob_change"] < -3
    assert abs(na_r["logprob_change"]) < 0.05
    assert rnd_f["logprob_change"] > na_f["logprob_change"] + 3 and rnd_f["accuracy_after"] == 1.0
    assert rnd_f["draws"] == 3 and rnd_f["logprob_after_sd"] >= 0
    assert math.isnan(na_r["accuracy_before"])  # the words skill has no checkable answer (check "none")
    # Wilson intervals of the held-out rates; in-sample (selection-half) log-probs beside the held-out ones
    from interp.controls import wilson

    assert na_f["accuracy_before_ci"] == list(wilson(20, 20)) and na_f["accuracy_after_ci"] == list(wilson(0, 20))
    assert na_f["n_selection"] == 20 and na_f["logprob_change_selection"] < -3
    assert rnd_f["matched_on"] == "layer" and rnd_f["strata"] == {"0": 2, "1": 1}
    assert planted_result.selected_neurons["replaced_share"] > 0


def test_key_space_catches_the_planted_skill_only(planted_result):
    ks = planted_result.key_space
    assert (ks["tpr"], ks["fpr"], ks["tpr_prefill"], ks["fpr_prefill"]) == (1.0, 0.0, 1.0, 0.0)
    assert ks["n_forget"] == ks["n_retain"] == 20 and ks["k"] > 0
    assert ks["tpr_ci"][1] == 1.0 and ks["fpr_ci"][0] == 0.0 and ks["tpr_ci"][0] == pytest.approx(0.8389, abs=1e-4)
    assert ks["h_rule"] == "selection" and ks["selection"]["tpr"] == 1.0 and ks["selection"]["fpr"] == 0.0
    assert _row(planted_result, "key_space", "forget")["accuracy_after"] == 0.0


def test_numbers_do_not_depend_on_batch_size(planted_skills, planted_result):
    one = _run(planted_skills, batch_size=1)
    for a, b in zip(planted_result.evaluation, one.evaluation):
        for key, value in a.items():
            if isinstance(value, float) and not math.isnan(value):
                assert value == pytest.approx(b[key], abs=1e-5), key
    _assert_close(one.key_space, planted_result.key_space)


def _assert_close(a, b):
    """Nested dicts and lists of numbers equal to 1e-6 (strings exactly)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_close(a[key], b[key])
    elif isinstance(a, list):
        assert a == pytest.approx(b, abs=1e-6)
    else:
        assert a == (pytest.approx(b, abs=1e-6) if isinstance(a, float) else b)


def test_intended_draws_match_an_independent_forward(planted_skills):
    """Neuron Adjust through the bridge hook equals adjusting HF gate_proj outputs by hand."""
    from interp.unlearning import AdjustSpec, Rows, adjust_values, hash_uniform, neuron_adjust, rows_of

    model, _ = planted_skills
    hf = model.original_model
    neurons = torch.tensor([[0, 3], [1, 5]])
    spec = AdjustSpec(neurons, mu_f=torch.tensor([8.0, 5.0]), sd_f=torch.tensor([1.0, 1.0]),
                      mu_r=torch.tensor([-4.0, -5.0]), sd_r=torch.tensor([0.5, 0.5]), seed=7)
    ids = model.tokenizer("<a1><a2><a3> the cat", add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([ids])
    mask = torch.ones_like(tokens)
    with torch.no_grad(), neuron_adjust(model, spec), rows_of(Rows.for_batch([42], mask, [len(ids)])):
        got = model(tokens, attention_mask=mask)[0, -1]

    def manual(layer, n, k):
        def hook(mod, inp, out):
            out = out.clone()
            u = hash_uniform(7, torch.tensor(42), torch.arange(out.shape[1]), layer, torch.tensor([n]))[..., 0]
            new, _ = adjust_values(out[0, :, n], spec.mu_f[k], spec.sd_f[k], spec.mu_r[k], spec.sd_r[k], u)
            out[0, :, n] = new
            return out
        return hook
    layers = hf.model.layers
    gates = [layers[layer].mlp.gate_proj for layer, _ in neurons.tolist()]
    handles = [getattr(g, "original_component", g).register_forward_hook(manual(layer, n, k))
               for k, (g, (layer, n)) in enumerate(zip(gates, neurons.tolist()))]
    try:
        with torch.no_grad():
            want = hf(tokens).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_cli_writes_the_public_keys(planted_skills, tmp_path, capsys):
    from interp.run import main

    model, path = planted_skills
    out = tmp_path / "run"
    argv = ["skill_unlearning", "--model", str(_model_dir(model)), "--forget", f"{path}:alpha", "--retain",
            f"{path}:words", "--top-percent", str(PLANTED_PERCENT), "--n-probe", "10", "--n-eval", "6",
            "--random-draws", "2", "--max-new-tokens", "2", "--device", "cpu", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert {"selected_neurons", "evaluation", "key_space"} <= set(results)
    assert set(results["key_space"]) >= {"k", "tpr", "fpr", "n_forget", "n_retain", "h", "tpr_ci", "fpr_ci",
                                         "selection"}
    assert results["warnings"] == []
    random_rows = [r for r in results["evaluation"] if r["method"] == "random_neurons"]
    assert all(r["matched_on"] == "layer" and r["strata"] == {"0": 2, "1": 1} for r in random_rows)
    assert results["statistics"]["selection_items"] == results["statistics"]["probe_items"]
    assert {(r["method"], r["role"]) for r in results["evaluation"]} == {
        (m, role) for m in ("neuron_adjust", "random_neurons", "key_space") for role in ("forget", "retain")}
    assert set(results["evaluation"][0]) >= {"method", "skill", "role", "accuracy_before", "accuracy_after",
                                             "logprob_before", "logprob_after", "n"}
    assert set(results["selected_neurons"]["neurons"][0]) >= {"layer", "neuron", "mu_forget", "mu_retain"}
    assert set(results["selected_neurons"]["per_layer"][0]) == {"layer", "count"}
    html = (out / "report.html").read_text()
    assert "Key Space Detection" in html and "Selected neurons" in html
    assert (out / "evaluation.csv").exists()


def _model_dir(model):
    from interp.models import model_info

    return model_info(model).source


@pytest.mark.parametrize("extra, message", [
    (["--top-percent", "0"], "top-percent must be in (0, 100]"),
    (["--h", "-1"], "h must be positive"),
    (["--forget", "nope.jsonl"], "skill file not found"),
    (["--retain", "arithmetic"], "also in --retain"),
    (["--forget", "no-such-skill", "--n-probe", "2"], "unknown dataset 'no-such-skill'"),
])
def test_cli_bad_input_is_one_line(extra, message, planted_skills, tmp_path, capsys):
    from interp.run import main

    model, _ = planted_skills
    argv = ["skill_unlearning", "--model", str(_model_dir(model)), "--forget", "arithmetic", "--retain", "chat",
            "--device", "cpu", "--out", str(tmp_path / "x"), "--no-progress"] + extra
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and "Traceback" not in err and err.count("\n") == 1


def test_too_few_items_is_a_user_error(tmp_path):
    from interp.analyses import skill_unlearning as su

    f = tmp_path / "two.jsonl"
    f.write_text("\n".join(json.dumps({"prompt": f"p{i}", "answer": "a", "skill": "s"}) for i in range(2)) + "\n")
    with pytest.raises(UserError, match="at least 2 probe items"):
        su.load_splits(su.Config(forget=str(f), retain="chat", n_probe=5, n_eval=5))
    f.write_text(json.dumps({"prompt": "p", "answer": "a", "skill": "s"}) + "\n")
    with pytest.raises(UserError, match="at least 2"):
        su.load_splits(su.Config(forget=str(f), retain="chat", n_probe=5, n_eval=5))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_runs_on_other_mlp_architectures(arch, tmp_path):
    """GPT-2 (hook_pre = x·W_in + b_in) and Llama: the hook check passes and every output is filled."""
    from interp.analyses import skill_unlearning as su
    from interp.analysis import config_for
    from interp.models import load_model
    from interp.tiny import write_tiny_checkpoint

    write_tiny_checkpoint(tmp_path, arch, seed=0)
    model = load_model(str(tmp_path), device="cpu")
    result = su.run(model, config_for("skill_unlearning", model, forget="strings", retain="comprehension", n_probe=8,
                                      n_eval=4, random_draws=2, max_new_tokens=3, progress=False))
    assert result.statistics["gate_hook_max_abs_diff_vs_hf"] < 1e-6
    assert len(result.evaluation) == 6 and result.key_space["n_forget"] == 4
    assert sum(r["count"] for r in result.selected_neurons["per_layer"]) == math.ceil(0.03 * 2 * model.cfg.d_mlp)


# ------------------------------------------------------------- matched control, KSD leak, h on the selection half

@pytest.mark.slow
def test_layer_matched_control_on_a_planted_layer_effect(tmp_path):
    """Every layer-1 neuron carries the alpha skill a little, no layer-0 neuron does: the selection (all in layer 1)
    is hardly better than any layer-1 neurons. The old control, drawn over both layers, made it look several
    times as specific; the layer-matched one does not."""
    import statistics

    from interp.analyses import skill_unlearning as su
    from interp.models import load_model
    from interp.unlearning import AdjustSpec, gate_moments, neuron_adjust, neuron_draws

    model = load_model(str(_write_planted(tmp_path / "model", layer_skill=True)), device="cpu")
    path = _skill_file(tmp_path / "skills.jsonl", n=30)
    result = _run((model, path), top_percent=12.5, n_probe=15, n_eval=15, random_draws=4, max_new_tokens=1)
    na, rnd = _row(result, "neuron_adjust", "forget"), _row(result, "random_neurons", "forget")
    assert result.selected_neurons["per_layer"] == [{"layer": 0, "count": 0}, {"layer": 1, "count": 8}]
    assert rnd["matched_on"] == "layer" and rnd["strata"] == {"1": 8} and rnd["n_draws"] == rnd["draws"] == 4
    assert na["logprob_change"] < -0.02
    assert rnd["logprob_change"] < 0.7 * na["logprob_change"]           # matched: most of the effect is the layer's

    # the unmatched control of the old code, on the same split and statistics
    config = result.header["config"]
    splits = su.load_splits(su.Config(**config))
    moments = [gate_moments(model, su._encode(model.tokenizer, [i.text for i in s.selection]), progress=False)
               for s in splits]
    held = su.Batch.of(model.tokenizer, splits[:1], "held_out")
    cfg = su.Config(**config)
    before = statistics.mean(su._logprobs(model, held, cfg))
    selected = torch.tensor([[r["layer"], r["neuron"]] for r in result.selected_neurons["neurons"]])
    unmatched = neuron_draws(selected, 2, D_MLP, draws=4, seed=0, matched_on="none")
    changes = []
    for pairs in unmatched:
        with neuron_adjust(model, AdjustSpec.from_moments(torch.tensor(pairs), *moments)):
            changes.append(statistics.mean(su._logprobs(model, held, cfg)) - before)
    assert statistics.mean(changes) > 0.5 * na["logprob_change"]     # unmatched: the selection looks > 2x specific


def _gold_file(path, n=24, seed=1):
    """gold: word prompts whose gold continuation is an a-token (the model itself continues with words)."""
    import random

    rng = random.Random(seed)
    rows = [{"prompt": " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 6))), "answer": "<a0>",
             "target": "<a0>", "skill": "gold", "check": "none"} for _ in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_key_space_counts_generated_steps_only(tmp_path):
    """Regression: the teacher-forced log-likelihood pass ran inside the KSD watch, so the gold continuation's last
    token (never generated) could make a query abstain. Attention on; for several retain queries the gold token's
    key vector is inside the cube while the prompt's and the generated tokens' are not: none may abstain."""
    from interp.analyses import skill_unlearning as su
    from interp.capture import capture
    from interp.models import load_model
    from interp.unlearning import Hypercube, key_hook

    model = load_model(str(_write_planted(tmp_path / "model", attention=True)), device="cpu")
    skills, gold = _skill_file(tmp_path / "skills.jsonl", n=24), _gold_file(tmp_path / "gold.jsonl")
    result = _run((model, skills), retain=str(gold), n_probe=12, n_eval=12, random_draws=2, max_new_tokens=3)
    ks = result.key_space
    # the premise: at the chosen h, several held-out gold continuations' last key vectors are inside the cube
    config = su.Config(**result.header["config"])
    splits = su.load_splits(config)
    hook = key_hook(1)
    cube = Hypercube.fit(capture(model, su._encode(model.tokenizer, [i.prompt for i in splits[0].selection]), [hook],
                                 progress=False)[hook])
    assert cube.k == pytest.approx(ks["k"])
    gold_keys = capture(model, su._encode(model.tokenizer, [i.text for i in splits[1].held_out]), [hook],
                        progress=False)[hook]
    assert cube.contains(gold_keys, ks["h"]).sum() >= 3
    generated = result.per_item[result.per_item.role == "retain"].generated_before
    assert not any("<a" in text for text in generated)
    # and still no retain query abstains (the old code: FPR 1.0); the forget queries all do
    assert (ks["fpr"], ks["fpr_prefill"], ks["tpr"]) == (0.0, 0.0, 1.0)
    assert _row(result, "key_space", "retain")["abstained"] == 0.0


def test_pick_h_separates_the_selection_scores():
    from interp.unlearning import pick_h

    k = 2.0
    forget, retain = torch.tensor([1.0, 1.5, 2.0]), torch.tensor([8.0, 9.0])
    assert pick_h(k, forget, retain) == pytest.approx(math.sqrt(2.0 * 8.0) / k)   # halfway (geometric) 2 → 8
    # overlap: the threshold with the largest TPR − FPR (at 6: 1 − 1/3; at 3: 3/4 − 1/3), halfway to the next score
    forget, retain = torch.tensor([1.0, 2.0, 3.0, 6.0]), torch.tensor([2.5, 7.0, 8.0])
    assert pick_h(k, forget, retain) == pytest.approx(math.sqrt(6.0 * 7.0) / k)
    # ties: the smallest threshold with the best separation (here 2, not 6)
    forget, retain = torch.tensor([1.0, 2.0]), torch.tensor([4.0, 5.0, 6.0, 9.0])
    assert pick_h(k, forget, retain) == pytest.approx(math.sqrt(2.0 * 4.0) / k)


@pytest.mark.slow
def test_h_is_picked_on_the_selection_half_only(planted_skills, tmp_path):
    """The held-out retain prompts made to look like the forget skill change the held-out FPR, not h."""
    from interp.analyses import skill_unlearning as su

    model, path = planted_skills
    options = dict(n_probe=10, n_eval=10, random_draws=2, max_new_tokens=1)
    first = _run(planted_skills, **options)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    words = [r for r in rows if r["skill"] == "words"]
    held = su.load_splits(su.Config(**first.header["config"]))[1].held_out
    for r in words:
        if any(r["prompt"] == i.prompt for i in held):
            r["prompt"] += " <a1>"                                       # ends on a forget-skill token
    changed = tmp_path / "changed.jsonl"
    changed.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    second = _run((model, changed), **options)
    assert second.key_space["h_rule"] == "selection"
    assert second.key_space["h"] == first.key_space["h"] and second.key_space["k"] == first.key_space["k"]
    assert second.key_space["selection"] == first.key_space["selection"]
    assert first.key_space["fpr_prefill"] == 0.0 and second.key_space["fpr_prefill"] == 1.0
    fixed = _run(planted_skills, h=1.0, **options)
    assert fixed.key_space["h"] == 1.0 and fixed.key_space["h_rule"] == "fixed"


def test_control_falls_back_to_all_layers_with_a_warning():
    from interp.analyses import skill_unlearning as su

    warnings: list[str] = []
    crowded = torch.tensor([[0, n] for n in range(20)])            # 20 of layer 0's 32: only 12 left to match
    draws = su._control_draws(crowded, 2, 32, su.Config(random_draws=3), warnings)
    assert draws.matched_on == "none" and draws.strata == {"all": 20} and len(draws) == 3
    assert len(warnings) == 1 and "not matched on layer" in warnings[0]
    with pytest.raises(UserError, match="too few unselected neurons"):
        su._control_draws(torch.tensor([[layer, n] for layer in range(2) for n in range(20)]), 2, 32,
                          su.Config(random_draws=3), [])


# --------------------------------------------------------------------------- KV-cached generation, truncation

@pytest.mark.parametrize("reference", [False, True])
def test_cached_generation_equals_recomputed_under_neuron_adjust_and_watch(tmp_path, reference):
    """Greedy generation with the KV cache, Neuron Adjust (draws keyed on item and absolute position) and the key
    space watch active, equals recomputing the whole sequence each step: the same logits at every step of every
    item, the same tokens, truncation flags and abstentions, on a ragged left-padded batch."""
    from interp.models import load_model
    from interp.unlearning import AdjustSpec, Hypercube, current_rows, greedy_generate, key_space_watch, neuron_adjust

    model = load_model(str(_write_planted(tmp_path / "model", attention=True)), device="cpu")
    tok = model.tokenizer
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in
               ["<a1><a2><a3><a1>", "the cat sat on the mat", "<a4><a0>", "bread flour water salt yeast poem sea"]]
    ids, limits = [11, 12, 13, 14], [5, 3, 6, 4]
    # chance-level replacement (mu_f = mu_r, equal sd): the outcome hangs on every draw
    neurons = torch.tensor([[0, 3], [0, 17], [1, 5], [1, 9]])
    spec = AdjustSpec(neurons, mu_f=torch.zeros(4), sd_f=torch.ones(4), mu_r=torch.zeros(4), sd_r=torch.ones(4) * 1.5,
                      reference=reference, seed=3)
    cube = Hypercube(torch.zeros(D_MLP), torch.ones(D_MLP), 1.0)
    h = float(torch.rand(1, generator=torch.Generator().manual_seed(0))) + 0.5

    def run(use_cache: bool, batch_size: int):
        seen: dict[int, list] = {}

        def record(x, hook):
            for item, vec in zip(current_rows(x).items.tolist(), x[:, -1]):
                seen.setdefault(item, []).append(vec.clone())
        with neuron_adjust(model, spec), key_space_watch(model, cube, h) as watch, \
                model.hooks(fwd_hooks=[("unembed.hook_out", record)]):
            new = greedy_generate(model, prompts, ids, limits, batch_size=batch_size, progress=False,
                                  use_cache=use_cache)
        return new, seen, watch

    new, seen, watch = run(True, 4)
    assert spec.replaced[0] > 0 and spec.replaced[0] < spec.replaced[1]  # the draws decide
    for use_cache, batch_size in [(False, 4), (True, 1), (False, 1)]:
        other, other_seen, other_watch = run(use_cache, batch_size)
        assert other == new and other.truncated == new.truncated
        assert other_watch.prefill == watch.prefill and other_watch.any_step == watch.any_step
        for item in ids:
            assert len(other_seen[item]) == len(seen[item]) == len(new[ids.index(item)]) + (
                0 if new.truncated[ids.index(item)] else 1)
            torch.testing.assert_close(torch.stack(other_seen[item]), torch.stack(seen[item]), atol=1e-4, rtol=1e-4)


def test_truncated_generations_are_counted_per_skill(tmp_path):
    """EOS wins wherever the alpha feature is absent: alpha items run to the limit before (truncated), end at once
    under Neuron Adjust (which removes the feature); words items end at once; random neurons change nothing."""
    from interp.analyses import skill_unlearning as su
    from interp.models import load_model

    model = load_model(str(_write_planted(tmp_path / "model", eos_bias=1.0)), device="cpu")
    skills = _skill_file(tmp_path / "skills.jsonl", n=24)
    result = _run((model, skills), n_probe=12, n_eval=12, random_draws=2, max_new_tokens=3)
    alpha, words = f"{skills}:alpha", f"{skills}:words"
    na, rnd = _row(result, "neuron_adjust", "forget"), _row(result, "random_neurons", "forget")
    assert (na["truncated_before"], na["truncated_after"], na["generated_after"]) == (12, 0, 12)
    assert rnd["truncated_after"] == 12 and rnd["truncated_after_draws"] == [12, 12]
    assert _row(result, "key_space", "forget")["truncated_after"] == 12
    retain = _row(result, "neuron_adjust", "retain")
    assert (retain["truncated_before"], retain["truncated_after"], retain["generated_after"]) == (0, 0, 0)
    cut = result.statistics["truncated"]
    assert cut["before"] == {alpha: 12, words: 0} and cut["neuron_adjust"] == {alpha: 0, words: 0}
    assert cut["random_neurons"] == {alpha: [12, 12], words: [0, 0]} and cut["max_new_tokens"] == 3
    items = result.per_item
    assert items[items.skill == alpha].truncated_before.all() and not items[items.skill == words].truncated_before.any()
    assert "Truncated generations (hit the 3-token limit" in su.build_report(result).render()


@pytest.mark.parametrize("chunk", [1, 2, None])
def test_target_logprobs_chunked_equal_the_full_forward(tiny_model, chunk):
    """The log-likelihood pass unembeds a few target positions at a time (issue 16): equal to log-softmax over the
    whole forward's logits on each unpadded sequence (the HF module), at any chunk and batch size."""
    from interp.unlearning import target_logprobs

    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (3, 8, 5)]
    targets = [torch.randint(5, 200, (n,), generator=g).tolist() for n in (5, 1, 7)]
    got = target_logprobs(tiny_model, prompts, targets, [0, 1, 2], batch_size=3, progress=False, chunk=chunk)
    for i, (p, t) in enumerate(zip(prompts, targets)):
        logits = tiny_model.original_model(input_ids=torch.tensor([p + t])).logits[0].float()
        lp = logits[len(p) - 1: len(p) + len(t) - 1].log_softmax(-1)
        assert float(got[i]) == pytest.approx(float(lp.gather(-1, torch.tensor(t)[:, None]).mean()), abs=1e-5)
