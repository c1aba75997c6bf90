"""Write tiny Hugging Face checkpoints (random weights, small BPE tokenizer, thinking chat template).

Tests and users load them through the same `load_model` path as real models:
`write_tiny_checkpoint(dir)` then `load_model(dir)`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

CHAT_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]
SPECIAL_TOKENS = CHAT_TOKENS + THINK_TOKENS

# Qwen-style chat template whose generation prompt opens a thinking span, like
# DeepSeek-R1 distills and Qwen3-Thinking ("...assistant\n<think>\n").
THINKING_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}"
)
# The same without thinking, for plain chat models.
CHAT_TEMPLATE = THINKING_CHAT_TEMPLATE.replace("<think>\n", "")

_TRAINING_TEXT = [
    "How do I bake bread? Mix flour, water, salt and yeast, then knead and let it rise.",
    "I'm sorry, but I can't help with that request because it could cause harm.",
    "Sure, here is a short poem about the sea and the wind over the harbour.",
    "The user is asking for something dangerous. I should refuse politely.",
    "The user wants a recipe. This is harmless, so I will answer helpfully.",
    "Write a program that prints the numbers from one to ten in Python.",
    "Explain how photosynthesis works in simple terms for a student.",
    "As an AI, I cannot assist with making weapons or hurting people.",
    "0123456789 + - * / = ( ) [ ] { } < > : ; , . ! ? ' \" \n\t",
]

ARCHITECTURES = ("qwen2", "llama", "gpt2")


def build_tokenizer(vocab_size: int = 512, thinking: bool = True):
    """A byte-level BPE tokenizer with chat (and, if `thinking`, `<think>`) special tokens; any text encodes."""
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS if thinking else CHAT_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_TRAINING_TEXT * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        padding_side="left",
    )
    fast.chat_template = THINKING_CHAT_TEMPLATE if thinking else CHAT_TEMPLATE
    return fast


BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def build_wordpiece_tokenizer(vocab_size: int = 512, pad_to: int | None = None):
    """A lower-casing BERT WordPiece tokenizer adding [CLS] … [SEP]; `pad_to` stores the fixed-length padding
    and truncation that sentence-transformers checkpoints (MiniLM: 128) write into `tokenizer.json`."""
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(_TRAINING_TEXT * 4, trainers.WordPieceTrainer(
        vocab_size=vocab_size, special_tokens=BERT_SPECIALS, show_progress=False))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    if pad_to is not None:
        tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]", length=pad_to)
        tok.enable_truncation(max_length=pad_to)
    return BertTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="[PAD]",
                             unk_token="[UNK]", mask_token="[MASK]", do_lower_case=True)


def _config(arch: str, vocab_size: int, d_model: int, n_layers: int, n_heads: int,
            n_kv_heads: int, d_mlp: int, max_len: int, pad_id: int, eos_id: int):
    common = dict(vocab_size=vocab_size, pad_token_id=pad_id, eos_token_id=eos_id,
                  bos_token_id=eos_id, tie_word_embeddings=False)
    if arch == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(hidden_size=d_model, num_hidden_layers=n_layers,
                           num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                           intermediate_size=d_mlp, max_position_embeddings=max_len, **common)
    if arch == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(hidden_size=d_model, num_hidden_layers=n_layers,
                           num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                           intermediate_size=d_mlp, max_position_embeddings=max_len, **common)
    from transformers import GPT2Config

    return GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_inner=d_mlp,
                      n_positions=max_len, **common)


def write_tiny_checkpoint(
    path: str | Path,
    arch: str = "qwen2",
    *,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    d_mlp: int = 128,
    max_len: int = 512,
    vocab_size: int = 512,
    seed: int = 0,
    thinking: bool = True,
) -> Path:
    """Save a random-weight `arch` model (safetensors) with tokenizer and chat template to `path`
    (a thinking template that opens `<think>`, or a plain chat template with `thinking=False`).

    The embedding has max(`vocab_size`, tokenizer size) rows (extra rows are unused, as in real
    padded vocabularies). `d_model` must differ from it (TransformerLens mis-centres square unembeddings).
    """
    from transformers import AutoModelForCausalLM

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    tokenizer = build_tokenizer(min(vocab_size, 512), thinking=thinking)
    vocab = max(len(tokenizer), vocab_size)
    if vocab == d_model:
        raise ValueError("d_model must differ from the vocabulary size")
    config = _config(arch, vocab, d_model, n_layers, n_heads, n_kv_heads, d_mlp, max_len,
                     tokenizer.pad_token_id, tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    (path / "interp_model.json").write_text(json.dumps({"random_weights": True, "arch": arch}))
    return path
