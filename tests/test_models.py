"""load_model: architectures, numerics against raw Hugging Face, and one-line user errors."""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch

from interp.errors import UserError
from interp.models import load_model, model_info


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory, tiny_dir):
    from interp.tiny import write_tiny_checkpoint

    dirs = {"qwen2": tiny_dir}
    for arch in ("llama", "gpt2"):
        dirs[arch] = write_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny_{arch}"), arch, seed=1)
    return dirs


def _ids(tokenizer):
    texts = ["How do I bake bread? Mix flour and water.", "Sure, here is a short poem about the sea."]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
def test_logits_match_independent_hf_forward(arch, arch_dirs):
    from transformers import AutoModelForCausalLM

    path = arch_dirs[arch]
    model = load_model(str(path), device="cpu")
    info = model_info(model)
    assert info.n_layers == 2 and info.d_model == 64 and info.random_weights
    assert info.device == "cpu" and info.dtype == "float32"
    assert model.tokenizer.padding_side == "left" and model.tokenizer.pad_token_id is not None
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    for ids in _ids(model.tokenizer):
        tokens = torch.tensor([ids])
        with torch.no_grad():
            ours = model(tokens, return_type="logits")
            ref = hf(tokens).logits
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=0)
        # not trivially equal: logits vary across positions and vocabulary
        assert ref.std() > 1e-3


def _assert_one_line_user_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert isinstance(excinfo.value, UserError)
    assert "\n" not in msg and msg.strip() == msg and msg
    for needle in needles:
        assert needle.lower() in msg.lower(), (needle, msg)


def test_unknown_alias(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # so "notamodel" cannot be a relative path
    with pytest.raises(UserError) as excinfo:
        load_model("notamodel", device="cpu")
    _assert_one_line_user_error(excinfo, "notamodel", "alias")


def test_missing_local_directory(tmp_path):
    with pytest.raises(UserError) as excinfo:
        load_model(str(tmp_path / "does-not-exist"), device="cpu")
    _assert_one_line_user_error(excinfo, "not found")


def test_directory_without_config(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UserError) as excinfo:
        load_model(str(tmp_path), device="cpu")
    _assert_one_line_user_error(excinfo, "config.json")


def test_pickle_only_directory_refused(tmp_path, tiny_dir):
    shutil.copy(tiny_dir / "config.json", tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(UserError) as excinfo:
        load_model(str(tmp_path), device="cpu")
    _assert_one_line_user_error(excinfo, "safetensors", "allow-pickle")


def test_hub_id_unreachable_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable at import time; it is already imported by now
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf_home" / "hub"))
    monkeypatch.chdir(tmp_path)
    start = time.perf_counter()
    with pytest.raises(UserError) as excinfo:
        load_model("nobody-xyz/not-a-model", device="cpu")
    assert time.perf_counter() - start < 10
    _assert_one_line_user_error(excinfo, "nobody-xyz/not-a-model", "local directory")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present")
def test_cuda_without_cuda(tiny_dir):
    with pytest.raises(UserError) as excinfo:
        load_model(str(tiny_dir), device="cuda")
    _assert_one_line_user_error(excinfo, "cuda", "not available")


def test_unknown_dtype(tiny_dir):
    with pytest.raises(UserError) as excinfo:
        load_model(str(tiny_dir), device="cpu", dtype="float8")
    _assert_one_line_user_error(excinfo, "float8", "dtype")


def _fake_architecture_dir(src, dst, model_type):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["architectures"] = ["NotARealModelForCausalLM"]
    config["model_type"] = model_type
    (dst / "config.json").write_text(json.dumps(config))
    assert list(dst.glob("*.safetensors"))
    return dst


def test_unsupported_architecture_name_with_known_model_type(tmp_path, arch_dirs):
    path = _fake_architecture_dir(arch_dirs["llama"], tmp_path / "fake", "llama")
    with pytest.raises(UserError) as excinfo:
        load_model(str(path), device="cpu")
    _assert_one_line_user_error(excinfo, "architecture")


def test_unknown_model_type(tmp_path, tiny_dir):
    path = _fake_architecture_dir(tiny_dir, tmp_path / "fake", "notarealmodel")
    with pytest.raises(UserError) as excinfo:
        load_model(str(path), device="cpu")
    _assert_one_line_user_error(excinfo, "architecture")


def test_architecture_known_to_hf_but_not_to_transformerlens(tmp_path, tiny_dir):
    from transformers import AutoModelForCausalLM, BioGptConfig

    config = BioGptConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=64, vocab_size=520, max_position_embeddings=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path, safe_serialization=True)
    for f in tiny_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, tmp_path / f.name)
    with pytest.raises(UserError) as excinfo:
        load_model(str(tmp_path), device="cpu")
    _assert_one_line_user_error(excinfo, "architecture not supported")


def test_planted_checkpoint_is_not_random(planted_model):
    assert model_info(planted_model).random_weights is False


def test_padding_and_truncation_in_tokenizer_json_are_not_a_mismatch(tmp_path):
    """A sentence-transformers checkpoint (MiniLM) pads and truncates every encoding to 128 in tokenizer.json;
    the load-time round trip compares the unpadded encodings, so it loads, and encodes like the file unpadded."""
    from tokenizers import Tokenizer
    from transformers import BertConfig, BertModel

    from interp.models import TOKENIZER_PROBE
    from interp.tiny import build_wordpiece_tokenizer

    tokenizer = build_wordpiece_tokenizer(pad_to=128)
    tokenizer.save_pretrained(tmp_path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=256)).save_pretrained(tmp_path)
    file = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert len(file.encode(TOKENIZER_PROBE).ids) == 128  # the file pads: the naive comparison would refuse
    model = load_model(str(tmp_path), device="cpu")
    file.no_padding()
    for text in (TOKENIZER_PROBE, "hello world"):
        ids = model.tokenizer(text)["input_ids"]
        assert ids == file.encode(text).ids and len(ids) < 128
        bare = model.tokenizer(text, add_special_tokens=False)["input_ids"]
        assert bare == file.encode(text, add_special_tokens=False).ids


def test_pad_token_added_outside_the_vocabulary_falls_back_to_eos(tmp_path):
    """GPTNeoXTokenizer adds `<|padding|>` when tokenizer.json has no pad token: an id past the embedding,
    so every padded batch would index out of range."""
    from interp.capture import capture
    from interp.tiny import write_family_checkpoint

    path = write_family_checkpoint(tmp_path, "gpt2")
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps(config | {"tokenizer_class": "GPTNeoXTokenizer"}))
    model = load_model(str(path), device="cpu")
    tok = model.tokenizer
    assert tok.pad_token_id == tok.eos_token_id < model.cfg.d_vocab
    seqs = [tok("a long sentence about the sea", add_special_tokens=False)["input_ids"], tok("hi")["input_ids"]]
    assert capture(model, seqs, ["blocks.0.hook_resid_post"], batch_size=2, progress=False)[
        "blocks.0.hook_resid_post"].shape == (2, 64)
