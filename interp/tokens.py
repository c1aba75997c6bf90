"""Tokenize as the model was trained: the BOS its own tokenizer adds, and prompt + continuation in one call.

The BOS rule. A model's inputs start with the BOS its own tokenizer puts first in the default call
`tokenizer(text)` (the papers' reference code tokenizes that way): `<s>` for Llama-2, Mistral and Phi-3,
`<|begin_of_text|>` for Llama-3, `<bos>` for Gemma, `[CLS]` for BERT, nothing for Qwen. "Its own tokenizer" is the
checkpoint's tokenizer files (`tokenizer.json`, `tokenizer_config.json`'s `add_bos_token`) as Hugging Face's
`AutoTokenizer` loads them, not the tokenizer TransformerLens installs: TransformerLens loads every tokenizer that
has a BOS token with `add_bos_token=True`, so on GPT-2, Pythia and OLMo-2 its default call starts with
`<|endoftext|>`, which their own tokenizer (and so their Hugging Face default call) never adds. `load_model` records
the checkpoint's rule on the tokenizer (`record_trained_bos`); a tokenizer loaded elsewhere is taken at its word
(its own default call).

The `bos` option (`interp.analysis.OPTION_VOCABULARY`; `bool | None`) means the same in every analysis:
None (default) = a BOS where the model's tokenizer adds one; True (`--bos`) = a BOS-like token first always
(`interp.texts.bos_token` where the tokenizer adds none: `<|endoftext|>` for Qwen); False (`--no-bos`) = none
(An et al.'s and Sun et al.'s code: `add_special_tokens=False`). A BOS is never doubled: text that already starts
with it (a chat template that writes `{{ bos_token }}`) keeps its own. Chat-template text (`chat=True`) gets no
added BOS by default: the template writes it where the model was trained with one (Hugging Face's
`apply_chat_template` tokenizes without special tokens).

Joint tokenization. A prompt and its continuation (a target, a thinking trace, a response) are tokenized as one
string and split at the boundary by character offsets (`encode_joint`), never concatenated from two calls:
SentencePiece-style (Metaspace) tokenizers give a string's first word a `▁` prefix, so a separately tokenized
continuation starts with a `▁` piece (often a bare `▁` token) that the model never sees at that joint, and
byte-level BPE merges across the joint differ too. A token that straddles the boundary belongs to the
continuation (it holds continuation characters).

Public functions: `record_trained_bos(tokenizer, path)`, `trained_bos(tokenizer)` → id | None,
`bos_id(tokenizer, bos, chat=False)` → the id to put first (None: none), `encode(tokenizer, text, bos=None,
chat=False)` → ids, `encode_joint(tokenizer, prompt, continuation, bos=None, chat=False)` → `Joint`,
`tokenization(tokenizer, bos)` → the run header's record.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

_ATTR = "_interp_trained_bos"  # (bos id | None, source) recorded by load_model
_PROBE = "Hello world, 42 times."


def default_prefix(tokenizer) -> list[int]:
    """The ids `tokenizer`'s default call puts before the text (`[]`: none)."""
    full = tokenizer(_PROBE)["input_ids"]
    bare = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    for k in range(len(full) - len(bare) + 1):
        if full[k:k + len(bare)] == bare:
            return list(full[:k])
    return []


def record_trained_bos(tokenizer, path: str | Path, *, trust_remote_code: bool = False) -> int | None:
    """Record on `tokenizer` the BOS the checkpoint's own tokenizer (at `path`, loaded by `AutoTokenizer` without
    TransformerLens' `add_bos_token=True`) puts first in its default call; returns its id (None: none)."""
    from transformers import AutoTokenizer

    try:
        own = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        prefix, source = default_prefix(own), "checkpoint tokenizer (Hugging Face default call)"
    except Exception:  # noqa: BLE001 - any failure to rebuild it: take the loaded tokenizer at its word
        prefix, source = default_prefix(tokenizer), "loaded tokenizer (default call)"
    bos = prefix[0] if prefix else None
    setattr(tokenizer, _ATTR, (bos, source))
    return bos


def _trained(tokenizer) -> tuple[int | None, str]:
    recorded = getattr(tokenizer, _ATTR, None)
    if recorded is not None:
        return recorded
    prefix = default_prefix(tokenizer)
    return (prefix[0] if prefix else None), "loaded tokenizer (default call)"


def trained_bos(tokenizer) -> int | None:
    """The BOS id the model's own tokenizer puts first in its default call (None where it adds none)."""
    return _trained(tokenizer)[0]


def bos_id(tokenizer, bos: bool | None = None, *, chat: bool = False) -> int | None:
    """The id an input starts with under the `bos` option (None: no BOS is added); see the module docstring."""
    if bos is False:
        return None
    if bos is True:
        from interp.texts import bos_token

        trained = trained_bos(tokenizer)
        return trained if trained is not None else bos_token(tokenizer)[0]
    return None if chat else trained_bos(tokenizer)


def _with_bos(ids: list[int], first: int | None) -> list[int]:
    return ([first] if first is not None and ids[:1] != [first] else []) + list(ids)


def encode(tokenizer, text: str, *, bos: bool | None = None, chat: bool = False) -> list[int]:
    """`text`'s ids (no other special tokens added) with the BOS the `bos` option gives, once."""
    return _with_bos(tokenizer(text, add_special_tokens=False)["input_ids"], bos_id(tokenizer, bos, chat=chat))


@dataclass(frozen=True)
class Joint:
    """Ids of prompt + continuation tokenized as one string; `boundary` is the first continuation token."""

    input_ids: list[int]
    boundary: int

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[:self.boundary]

    @property
    def continuation_ids(self) -> list[int]:
        return self.input_ids[self.boundary:]


def _offsets_cut(tokenizer, text: str, at: int) -> tuple[list[int], int]:
    """(ids of `text`, index of the first token that reaches past character `at`)."""
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):  # slow tokenizers have no offsets
        enc = None
    if enc is not None and "offset_mapping" in enc:
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        return ids, next((i for i, (_, end) in enumerate(offsets) if end > at), len(ids))
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    prompt = text[:at]  # no offsets: the longest token prefix that decodes to a prefix of the prompt
    cut = 0
    while cut < len(ids) and prompt.startswith(tokenizer.decode(ids[:cut + 1])):
        cut += 1
    return ids, cut


def encode_joint(tokenizer, prompt: str, continuation: str, *, bos: bool | None = None,
                 chat: bool = False) -> Joint:
    """prompt + continuation tokenized in one call (the BOS the `bos` option gives, once, first), split where the
    first token reaching into the continuation starts."""
    ids, cut = _offsets_cut(tokenizer, prompt + continuation, len(prompt))
    full = _with_bos(ids, bos_id(tokenizer, bos, chat=chat))
    return Joint(full, cut + len(full) - len(ids))


def tokenization(tokenizer, bos: bool | None = None) -> dict:
    """The run header's record: whether plain-text inputs start with a BOS under the `bos` option, which, the model's
    own rule (`model_adds_bos`) and where that rule was read."""
    trained, source = _trained(tokenizer)
    first = bos_id(tokenizer, bos)
    return {"bos": first is not None,
            "bos_token": tokenizer.convert_ids_to_tokens(first) if first is not None else None, "bos_option": bos,
            "model_adds_bos": trained is not None,
            "model_bos_token": tokenizer.convert_ids_to_tokens(trained) if trained is not None else None,
            "rule_from": source}
