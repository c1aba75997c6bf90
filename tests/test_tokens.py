"""Tokenizing as the model was trained (interp.tokens): the BOS rule of the checkpoint's own tokenizer, and prompt +
continuation tokenized in one call, on a SentencePiece-style (Metaspace) tokenizer that adds a BOS (tiny Llama-2)
and on byte-level BPE tokenizers that add none (tiny GPT-2, whose BOS TransformerLens would add; tiny Qwen3)."""

from __future__ import annotations

import pytest

from interp import tokens
from interp.tiny import write_family_checkpoint

PROMPT = "Q: What is two plus two?\nA: 2+2="
CONTINUATION = "4. The answer is 4."


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from interp.models import load_model

    root = tmp_path_factory.mktemp("token_families")
    return {f: load_model(str(write_family_checkpoint(root / f, f)), device="cpu")
            for f in ("llama-2", "gpt2", "qwen3")}


def test_trained_bos_follows_the_checkpoint_not_transformerlens(models):
    llama, gpt2, qwen = (models[f].tokenizer for f in ("llama-2", "gpt2", "qwen3"))
    assert tokens.trained_bos(llama) == llama.bos_token_id == llama("Hi")["input_ids"][0]
    # TransformerLens loads GPT-2's tokenizer with add_bos_token=True; its own tokenizer.json adds nothing
    assert gpt2("Hi")["input_ids"][0] == gpt2.bos_token_id and tokens.trained_bos(gpt2) is None
    assert tokens.trained_bos(qwen) is None
    for tok in (llama, gpt2, qwen):
        bare = tok("Hi there", add_special_tokens=False)["input_ids"]
        assert tokens.encode(tok, "Hi there", bos=False) == bare
        first = tokens.bos_id(tok, True)
        assert tokens.encode(tok, "Hi there", bos=True) == [first] + bare
        assert tokens.encode(tok, "Hi there") == ([llama.bos_token_id] if tok is llama else []) + bare
    assert tokens.bos_id(gpt2, True) == gpt2.convert_tokens_to_ids("<|endoftext|>")
    assert tokens.bos_id(qwen, True) == qwen.convert_tokens_to_ids("<|endoftext|>")


def test_tokenization_record(models):
    llama, gpt2 = models["llama-2"].tokenizer, models["gpt2"].tokenizer
    rec = tokens.tokenization(llama)
    assert rec["bos"] and rec["bos_token"] == "<s>" and rec["model_adds_bos"] and rec["bos_option"] is None
    assert "checkpoint" in rec["rule_from"]
    assert not tokens.tokenization(llama, False)["bos"] and tokens.tokenization(llama, False)["model_adds_bos"]
    rec = tokens.tokenization(gpt2)
    assert not rec["bos"] and not rec["model_adds_bos"] and rec["bos_token"] is None
    assert tokens.tokenization(gpt2, True)["bos_token"] == "<|endoftext|>"


def test_joint_tokenization_on_a_metaspace_tokenizer_with_bos(models):
    tok = models["llama-2"].tokenizer
    joint = tokens.encode_joint(tok, PROMPT, CONTINUATION)
    # the joint tokenization is the tokenizer's own encoding of the whole text (its default call adds the BOS)
    assert joint.input_ids == tok(PROMPT + CONTINUATION)["input_ids"]
    assert joint.input_ids.count(tok.bos_token_id) == 1 and joint.input_ids[0] == tok.bos_token_id
    # the split: prompt tokens decode to the prompt, continuation tokens to the continuation
    assert tok.decode(joint.prompt_ids, skip_special_tokens=True) == PROMPT
    assert tok.decode(joint.continuation_ids) == CONTINUATION
    assert joint.prompt_ids + joint.continuation_ids == joint.input_ids
    assert joint.prompt_ids == tokens.encode(tok, PROMPT)  # no token straddles this joint
    # the old way (two calls, concatenated) puts a bare "▁" piece at the joint: the model never sees it there
    old = tok(PROMPT, add_special_tokens=False)["input_ids"] + tok(CONTINUATION, add_special_tokens=False)["input_ids"]
    at = len(tok(PROMPT, add_special_tokens=False)["input_ids"])
    assert tok.convert_ids_to_tokens(old[at]) == "▁" and old != joint.input_ids[1:]
    assert tok.convert_ids_to_tokens(joint.continuation_ids[0]) != "▁"
    # no BOS with --no-bos; a forced one is not doubled
    assert tokens.encode_joint(tok, PROMPT, CONTINUATION, bos=False).input_ids == joint.input_ids[1:]
    assert tokens.encode_joint(tok, PROMPT, CONTINUATION, bos=True).input_ids == joint.input_ids


def test_joint_split_gives_a_straddling_token_to_the_continuation(models):
    tok = models["qwen3"].tokenizer
    joint = tokens.encode_joint(tok, "The cat sat on the ma", "t. Then it slept.")
    assert joint.input_ids == tok("The cat sat on the mat. Then it slept.", add_special_tokens=False)["input_ids"]
    cont = tok.decode(joint.continuation_ids)
    straddle = len(cont) - len("t. Then it slept.")
    assert cont.endswith("t. Then it slept.") and straddle > 0 and "The cat sat on the ma".endswith(cont[:straddle])
    assert "".join(tok.decode([t]) for t in joint.input_ids) == "The cat sat on the mat. Then it slept."
    assert tok.decode(joint.prompt_ids) + tok.decode(joint.continuation_ids) == "The cat sat on the mat. Then it slept."


def test_chat_template_text_keeps_its_own_bos_once(models):
    from interp.chat import chat_prefix

    tok = models["llama-2"].tokenizer
    text = chat_prefix(tok, "Hi there")
    assert text.startswith("<s>")
    for bos in (None, True):
        ids = tokens.encode(tok, text, bos=bos, chat=True)
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
        assert tokens.encode(tok, text, bos=bos) == ids  # plain-text rule: not doubled either
    qwen = models["qwen3"].tokenizer
    assert tokens.encode(qwen, chat_prefix(qwen, "Hi"), chat=True) == qwen(chat_prefix(qwen, "Hi"),
                                                                            add_special_tokens=False)["input_ids"]


def test_run_header_and_cli_record_the_bos(models):
    from interp.analysis import config_for, run_header
    from interp.run import build_parser, explicit_options

    model = models["llama-2"]
    header = run_header("systematic_outliers", model, config_for("systematic_outliers", model))
    assert header["tokenization"]["bos"] and header["tokenization"]["bos_token"] == "<s>"
    header = run_header("systematic_outliers", model, config_for("systematic_outliers", model, bos=False))
    assert not header["tokenization"]["bos"] and header["tokenization"]["model_adds_bos"]
    assert not run_header("gated_attention", models["gpt2"], config_for("gated_attention"))["tokenization"]["bos"]
    from interp.analysis import load_analysis

    module = load_analysis("systematic_outliers")
    for argv, want in (([], None), (["--bos"], True), (["--no-bos"], False)):
        args = build_parser("systematic_outliers").parse_args(["systematic_outliers", *argv])
        assert module.Config(**explicit_options(args, module)).bos is want


def test_chunks_start_with_the_bos_as_trained(models):
    from interp.analyses import systematic_outliers as so
    from interp.analysis import config_for

    llama, gpt2 = models["llama-2"], models["gpt2"]
    chunks = so.load_text_set(llama, config_for("systematic_outliers", llama, seq_len=16, n_chunks=3))
    assert chunks.bos and [c[0] for c in chunks.chunks] == [llama.tokenizer.bos_token_id] * 3
    assert all(c.count(llama.tokenizer.bos_token_id) == 1 and len(c) == 16 for c in chunks.chunks)
    chunks = so.load_text_set(gpt2, config_for("systematic_outliers", gpt2, seq_len=16, n_chunks=3))
    assert not chunks.bos and gpt2.tokenizer.bos_token_id not in [c[0] for c in chunks.chunks]
    chunks = so.load_text_set(gpt2, config_for("systematic_outliers", gpt2, seq_len=16, n_chunks=3, bos=True))
    assert chunks.bos and chunks.first_tokens == ["<|endoftext|>"] * 3


def test_skill_unlearning_tokenizes_prompt_and_target_jointly(models):
    from interp.analyses import skill_unlearning as su
    from interp.skills import SkillItem

    tok = models["llama-2"].tokenizer
    items = [SkillItem(PROMPT, CONTINUATION, "4", "sums", "number"),
             SkillItem("Say it:\n", "Hello there.", "Hello", "sums", "prefix")]
    split = su.SkillSplit("sums", "forget", [], items)
    batch = su.Batch.of(tok, [split], "held_out")
    for item, prompt, context, target in zip(items, batch.prompts, batch.contexts, batch.targets):
        assert context + target == tok(item.text)["input_ids"]  # one call over the whole text, BOS once
        assert prompt == tokens.encode(tok, item.prompt) and prompt[0] == tok.bos_token_id
        assert tok.decode(target) == item.target and tok.convert_ids_to_tokens(target[0]) != "▁"
    no_bos = su.Batch.of(tok, [split], "held_out", bos=False)
    assert [c[0] for c in no_bos.contexts] != [tok.bos_token_id] * 2 and no_bos.targets == batch.targets
