"""Write tiny Hugging Face checkpoints (random weights, small BPE tokenizer, thinking chat template).

Tests and users load them through the same `load_model` path as real models:
`write_tiny_checkpoint(dir)` then `load_model(dir)`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
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


def build_wordpiece_tokenizer(vocab_size: int = 512, pad_to: int | None = None, text: list[str] | None = None):
    """A lower-casing BERT WordPiece tokenizer adding [CLS] … [SEP]; `pad_to` stores the fixed-length padding
    and truncation that sentence-transformers checkpoints (MiniLM: 128) write into `tokenizer.json`."""
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(text or _TRAINING_TEXT * 4, trainers.WordPieceTrainer(
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


# --- Tiny checkpoints of the model families users load ------------------------------------------------------

_INST_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}<<SYS>>\n{{ m['content'] }}\n<</SYS>>\n\n"
    "{% elif m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]{% else %} {{ m['content'] }}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)
_LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
_GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
    "{{ m['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
_DEEPSEEK_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<｜Assistant｜>{{ m['content'] }}{{ eos_token }}{% else %}{{ m['content'] }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}"
)
_ROLE_TEMPLATE = (  # Phi-3 and OLMo-2 (Tülu): <|user|>\n…
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ end }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_PLAIN_TEMPLATE = (  # base models ship none; a user who asks for a chat gets this
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:"
    "{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """A model family: its architecture's config and the kind of tokenizer its checkpoints ship."""

    config: Callable[[int], object]  # vocabulary size → transformers config (d_model 64)
    tokenizer: str  # "byte_bpe" (GPT-2-style byte-level BPE), "metaspace" (SentencePiece BPE, byte fallback),
    #                 "gemma" (SentencePiece BPE, no prefix space) or "wordpiece" (BERT)
    specials: dict  # bos/eos/pad/unk token strings (None: the family has none)
    extra_tokens: tuple[str, ...]  # chat-template tokens
    template: str
    tokenizer_class: str  # the class transformers rebuilds the tokenizer with, as the real tokenizer_config says
    add_bos: bool = False


def _sizes(**kw) -> dict:
    return dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=128, max_position_embeddings=512, tie_word_embeddings=False) | kw


def _hf(name: str, **kw) -> Callable[[int], object]:
    def make(vocab: int):
        import transformers

        return getattr(transformers, name)(vocab_size=vocab, **_sizes(**kw))
    return make


def _gpt2(vocab: int):
    from transformers import GPT2Config

    return GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_inner=128, n_positions=512)


def _pythia(vocab: int):
    from transformers import GPTNeoXConfig

    return GPTNeoXConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, max_position_embeddings=512, rotary_pct=0.25,
                         use_parallel_residual=True, tie_word_embeddings=False)


def _bert(vocab: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=128, max_position_embeddings=512, architectures=["BertForMaskedLM"])


_HYBRID = dict(num_hidden_layers=4, head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
               linear_key_head_dim=16, linear_value_head_dim=16,
               layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"])
_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
_MLA = dict(q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
_SP = dict(bos="<s>", eos="</s>", pad=None, unk="<unk>")
_CHATML = dict(bos=None, eos="<|im_end|>", pad="<|endoftext|>", unk=None)
_GPT = dict(bos="<|endoftext|>", eos="<|endoftext|>", pad=None, unk=None)  # a BOS token, not added by default
_QWEN = ("<|im_start|>",)
_INST, _THINK, _PLAIN = _INST_TEMPLATE, THINKING_CHAT_TEMPLATE, _PLAIN_TEMPLATE

FAMILIES: dict[str, Family] = {
    "llama-2": Family(_hf("LlamaConfig", num_key_value_heads=4), "metaspace", _SP, (), _INST, "LlamaTokenizer", True),
    "llama-3": Family(_hf("LlamaConfig", rope_theta=500000.0), "byte_bpe",
                      dict(bos="<|begin_of_text|>", eos="<|eot_id|>", pad=None, unk=None),
                      ("<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"), _LLAMA3_TEMPLATE,
                      "PreTrainedTokenizerFast", True),
    "qwen2.5": Family(_hf("Qwen2Config"), "byte_bpe", _CHATML, _QWEN, CHAT_TEMPLATE, "Qwen2Tokenizer"),
    "qwen3": Family(_hf("Qwen3Config", head_dim=16), "byte_bpe", _CHATML, _QWEN + tuple(THINK_TOKENS), _THINK,
                    "Qwen2Tokenizer"),
    "qwen3.5": Family(_hf("Qwen3_5TextConfig", **_HYBRID), "byte_bpe", _CHATML, _QWEN + tuple(THINK_TOKENS),
                      _THINK, "Qwen2Tokenizer"),
    "qwen3-next": Family(_hf("Qwen3NextConfig", **_HYBRID, **_MOE, shared_expert_intermediate_size=32), "byte_bpe",
                         _CHATML, _QWEN + tuple(THINK_TOKENS), _THINK, "Qwen2Tokenizer"),
    "mistral": Family(_hf("MistralConfig", sliding_window=16), "metaspace", _SP, (), _INST, "LlamaTokenizer", True),
    "mixtral": Family(_hf("MixtralConfig", num_local_experts=4, num_experts_per_tok=2), "metaspace", _SP, (), _INST,
                      "LlamaTokenizer", True),
    "qwen2-moe": Family(_hf("Qwen2MoeConfig", **_MOE, shared_expert_intermediate_size=32, mlp_only_layers=[0]),
                        "byte_bpe", _CHATML, _QWEN, CHAT_TEMPLATE, "Qwen2Tokenizer"),
    "deepseek-v3": Family(_hf("DeepseekV3Config", num_key_value_heads=4, **_MLA, first_k_dense_replace=1,
                              n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1, n_shared_experts=1,
                              moe_intermediate_size=32), "byte_bpe",
                          dict(bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", pad=None, unk=None),
                          ("<｜User｜>", "<｜Assistant｜>"), _DEEPSEEK_TEMPLATE, "LlamaTokenizer", True),
    "gemma-2": Family(_hf("Gemma2Config", head_dim=16, query_pre_attn_scalar=16, sliding_window=16), "gemma",
                      dict(bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>"), ("<start_of_turn>", "<end_of_turn>"),
                      _GEMMA_TEMPLATE, "GemmaTokenizer", True),
    "gemma-3": Family(_hf("Gemma3TextConfig", head_dim=16, query_pre_attn_scalar=16, sliding_window=16,
                          layer_types=["sliding_attention", "full_attention"]), "gemma",
                      dict(bos="<bos>", eos="<end_of_turn>", pad="<pad>", unk="<unk>"), ("<start_of_turn>", "<eos>"),
                      _GEMMA_TEMPLATE, "GemmaTokenizer", True),
    "gpt2": Family(_gpt2, "byte_bpe", _GPT, (), _PLAIN, "GPT2Tokenizer"),
    "pythia": Family(_pythia, "byte_bpe", dict(_GPT, pad="<|padding|>"), (), _PLAIN, "GPTNeoXTokenizer"),
    "phi-3": Family(_hf("Phi3Config", num_key_value_heads=4), "metaspace", dict(_SP, eos="<|end|>"),
                    ("<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"),
                    _ROLE_TEMPLATE.replace("{{ end }}", "<|end|>"), "LlamaTokenizer", True),
    "olmo-2": Family(_hf("Olmo2Config", num_key_value_heads=4), "byte_bpe", dict(_GPT, pad="<|pad|>"),
                     ("<|user|>", "<|assistant|>", "<|system|>"), _ROLE_TEMPLATE.replace("{{ end }}", ""),
                     "GPT2Tokenizer"),
    "bert": Family(_bert, "wordpiece", dict(bos=None, eos="[SEP]", pad="[PAD]", unk="[UNK]"), (), _PLAIN,
                   "BertTokenizer"),
}


def _byte_fallback(tok: Tokenizer) -> Tokenizer:
    """`tok` (a trained BPE) with the 256 `<0xNN>` pieces SentencePiece falls back to for unknown characters."""
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    return Tokenizer.from_str(json.dumps(spec))


def _family_training_text() -> list[str]:
    """Bundled prose and the Laundry-List words, so the analyses' words are whole tokens, as in real vocabularies."""
    from importlib import resources

    from interp.organisms.corpus import FOODS, NAMES, OBJECTS

    prose = (resources.files("interp") / "data" / "natural_text.txt").read_text().splitlines()
    words = " ".join(f"the {w}, {w} and {w}." for w in OBJECTS + FOODS + NAMES)
    return _TRAINING_TEXT * 4 + prose + [words] * 4


def family_tokenizer(family: str, vocab_size: int = 1000):
    """The tokenizer a `family` checkpoint ships (kind, special tokens, BOS, chat template), trained on bundled text."""
    from transformers import PreTrainedTokenizerFast

    fam = FAMILIES[family]
    if fam.tokenizer == "wordpiece":
        tok = build_wordpiece_tokenizer(vocab_size, text=_family_training_text())
        tok.chat_template = fam.template
        return tok
    specials = list(dict.fromkeys(t for t in (fam.specials["unk"], fam.specials["bos"], fam.specials["eos"],
                                              fam.specials["pad"], *fam.extra_tokens) if t))
    if fam.tokenizer == "byte_bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token=fam.specials["unk"]))
        prepend = "first" if fam.tokenizer == "metaspace" else "never"
        # trained split at spaces: SentencePiece's default (split_by_whitespace) learns no piece across a space, even
        # where the tokenizer file does not pre-split (Gemma: split=False, set after training)
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=prepend, split=True)
        tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(prepend_scheme=prepend)])
        alphabet = []
    tok.train_from_iterator(_family_training_text(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False))
    if fam.tokenizer == "gemma":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme=prepend, split=False)
    if fam.tokenizer != "byte_bpe":
        tok = _byte_fallback(tok)
    if fam.add_bos:
        bos = fam.specials["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    names = {f"{k}_token": v for k, v in fam.specials.items() if v}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, additional_special_tokens=list(fam.extra_tokens), **names)
    fast.chat_template = fam.template
    return fast


def write_family_checkpoint(path: str | Path, family: str, *, seed: int = 0) -> Path:
    """Save a random-weight tiny checkpoint of `family` (see `FAMILIES`: d_model 64, 2 layers, 4 for hybrids)
    with the tokenizer that family ships and a chat template, loadable with `load_model(path)`."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    if family not in FAMILIES:
        raise ValueError(f"family must be one of {tuple(FAMILIES)}, got {family!r}")
    fam = FAMILIES[family]
    tokenizer = family_tokenizer(family)
    config = fam.config(len(tokenizer))
    config.update({f"{k}_token_id": tokenizer.convert_tokens_to_ids(fam.specials[k]) if fam.specials[k] else None
                   for k in ("bos", "eos", "pad")})
    torch.manual_seed(seed)
    auto = AutoModelForMaskedLM if fam.tokenizer == "wordpiece" else AutoModelForCausalLM
    model = auto.from_config(config).eval()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    tok_config = path / "tokenizer_config.json"
    tok_config.write_text(json.dumps(json.loads(tok_config.read_text()) | {
        "tokenizer_class": fam.tokenizer_class, "add_bos_token": fam.add_bos}, indent=2))
    (path / "interp_model.json").write_text(json.dumps({"random_weights": True, "arch": family}))
    return path
