"""The model families users load: a tiny random checkpoint of each (interp.tiny.FAMILIES), written once, loads
through `load_model`, tokenizes like its own tokenizer.json, matches the Hugging Face forward and can be hooked."""

from __future__ import annotations

import pytest
import torch

from interp.bridge import attention_layers, sdpa_attention
from interp.capture import capture
from interp.tiny import FAMILIES

TEXT = "How do I bake bread? Mix flour, water, salt and yeast, then knead. Sure, here is a poem about the sea."
HYBRID = {"qwen3.5", "qwen3-next"}


def _hf_model(family, path):
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    auto = AutoModelForMaskedLM if FAMILIES[family].tokenizer == "wordpiece" else AutoModelForCausalLM
    return auto.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loads_with_the_family_architecture(family, family_dirs, family_models):
    import json

    from interp.models import model_info

    info = model_info(family_models[family])
    assert info.random_weights and info.d_model == 64 and info.n_layers == (4 if family in HYBRID else 2)
    assert [info.architecture] == json.loads((family_dirs[family] / "config.json").read_text())["architectures"]
    tok = family_models[family].tokenizer
    assert tok.pad_token_id is not None and tok.pad_token_id < family_models[family].cfg.d_vocab


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tokenizer_round_trips_with_the_family_bos(family, family_dirs, family_models):
    from tokenizers import Tokenizer

    tok = family_models[family].tokenizer
    file = Tokenizer.from_file(str(family_dirs[family] / "tokenizer.json"))
    bare = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert bare == file.encode(TEXT, add_special_tokens=False).ids
    ids = tok(TEXT)["input_ids"]
    if FAMILIES[family].add_bos:
        assert ids == file.encode(TEXT).ids and ids[0] == tok.bos_token_id != bare[0]
    elif FAMILIES[family].tokenizer != "wordpiece":
        # TransformerLens loads every tokenizer that has a BOS token with add_bos_token=True (GPT-2, Pythia, OLMo-2)
        assert ids in (bare, [tok.bos_token_id] + bare)
    expected = TEXT.lower() if family == "bert" else TEXT
    assert tok.decode(bare).replace(" ", "") == expected.replace(" ", "")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi there"}], add_generation_prompt=True,
                                     tokenize=False)
    assert "Hi there" in prompt


@pytest.mark.parametrize("family", list(FAMILIES))
def test_bridge_logits_match_hugging_face(family, family_dirs, family_models):
    model = family_models[family]
    hf = _hf_model(family, family_dirs[family])
    tokens = torch.tensor([model.tokenizer(TEXT)["input_ids"]])
    assert tokens.shape[1] > 16  # longer than the sliding windows (Mistral, Gemma)
    with torch.no_grad():
        ref = hf(tokens).logits
        ours = model(tokens, return_type="logits")
        with sdpa_attention(model):
            fast = model(tokens, return_type="logits")
    assert ref.std() > 1e-3
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
    torch.testing.assert_close(fast, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_capture_hooks_the_softmax_attention_layers(family, family_models):
    model = family_models[family]
    softmax, others = attention_layers(model)
    assert softmax == ([1, 3] if family in HYBRID else [0, 1])
    assert others == ({0: "linear_attention", 2: "linear_attention"} if family in HYBRID else {})
    seqs = [model.tokenizer(TEXT)["input_ids"], model.tokenizer("Hi there")["input_ids"]]
    hooks = [f"blocks.{layer}.attn.hook_{kind}" for layer in softmax for kind in ("q", "k", "v", "z")]
    fast = capture(model, seqs, hooks, batch_size=2, progress=False)
    eager = capture(model, seqs, hooks, batch_size=1, fast_attention=False, progress=False)
    for name in hooks:
        torch.testing.assert_close(fast[name], eager[name], atol=1e-5, rtol=0)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in softmax]
    _, cache = model.run_with_cache(torch.tensor(seqs[:1]), names_filter=lambda n: n in names)
    for name in names:
        pattern = cache[name][0]
        torch.testing.assert_close(pattern.sum(-1), torch.ones(pattern.shape[:-1]))
        if family != "bert":
            assert pattern.triu(1).abs().max() == 0
