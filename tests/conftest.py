"""Shared session fixtures: tiny random Qwen2 and the planted refusal-cliff model, written once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # so tests can `import planted` and `import helpers`


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The test models are tiny: extra intra-op threads only spin (much slower on a loaded 2-core box)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random-weight 2-layer Qwen2 checkpoint (4 heads, 2 KV heads, d_model 64) with tokenizer."""
    from interp.tiny import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny_qwen2"), "qwen2", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from interp.models import load_model

    return load_model(str(tiny_dir), device="cpu")


@pytest.fixture(scope="session")
def planted(tmp_path_factory):
    """`PlantedSpec` of the hand-built refusal-suppression model (see tests/planted.py)."""
    from planted import write_planted_checkpoint

    return write_planted_checkpoint(tmp_path_factory.mktemp("planted"))


@pytest.fixture(scope="session")
def planted_model(planted):
    from interp.models import load_model

    return load_model(str(planted.path), device="cpu")


GUARD_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %} {% endfor %}<assistant>"
)


@pytest.fixture(scope="session")
def tiny_guard(tmp_path_factory):
    """A random-weight Llama with a guard-style chat template, saved to a directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny_guard")
    specials = ["<unk>", "<pad>", "<s>", "</s>", "<user>", "<assistant>"]
    words = "safe unsafe S1 S2 how do i make a bomb sure here is sorry i cannot help with that".split()
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(specials + words))}
    vocab.update({f"w{i}": len(vocab) for i in range(300 - len(vocab))})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tok.chat_template = GUARD_CHAT_TEMPLATE
    tok.save_pretrained(path)

    import torch

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
    )  # fmt: skip
    assert config.hidden_size != config.vocab_size
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory):
    """A tiny random checkpoint of every family users load (interp.tiny.FAMILIES), written once."""
    from interp.tiny import FAMILIES, write_family_checkpoint

    root = tmp_path_factory.mktemp("families")
    return {family: write_family_checkpoint(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="session")
def family_models(family_dirs):
    from interp.models import load_model

    return {family: load_model(str(path), device="cpu") for family, path in family_dirs.items()}
