"""Text sets for activation statistics: natural text chunked to a fixed length, with or without a BOS-like first token.

Public functions (signatures kept stable for other analyses):

- `natural_text(limit=None)` → list[str]: the bundled natural-text sample (`interp/data/natural_text.txt`, ~370
  sentences of varied prose written for this project, one paragraph per item; not the organism corpus).
- `organism_text(limit)` → list[str]: held-out plain passages from the organisms' corpus generator.
- `read_text_file(path)` → list[str]: a user `.txt` file, one item per blank-line-separated paragraph
  (UserError when missing or empty).
- `load_hub_texts(name, limit)` → list[str]: `wikitext-2` (Salesforce/wikitext, wikitext-2-raw-v1, test)
  or `redpajama-sample` (togethercomputer/RedPajama-Data-1T-Sample) through `datasets`; one-line
  UserError offline. These, the bundled sample and `organism-plain` are registered in `interp.datasets`
  (kind "texts"; a .txt file goes through `read_text_file`).
- `bos_token(tokenizer)` → (id, string): `[CLS]` (encoders), else the tokenizer's BOS, else `<|endoftext|>`, else EOS.
- `chunk_texts(tokenizer, texts, seq_len, n_chunks=None, bos=False)` → `TextSet`: the papers' recipe
  (An et al. 2025; Sun et al. 2024): items joined by "\\n\\n", tokenized without special tokens, cut into
  non-overlapping chunks of exactly `seq_len` tokens (with `bos`, a BOS then `seq_len − 1` content tokens:
  the BOS the model's own tokenizer adds, else `bos_token`'s; analyses decide `bos` with `interp.tokens.bos_id`).
- `repeated_token_set(tokenizer, seq_len, n_chunks, bos=False, seed=0)` → `TextSet`: one token repeated
  `seq_len` times per chunk (a different random token per chunk): Gu et al.'s negative control for sinks.
- `split_indices(n, fraction, seed)` → (selection, held_out) index lists.

`TextSet` carries the chunks (`list[list[int]]`), `seq_len`, `bos` and the first token of every chunk
(`first_token_ids`, `first_tokens`, strings as decoded) so every result can say which token sat first.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from interp.errors import UserError

HUB_TEXTS = {
    "wikitext-2": ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text"),
    "redpajama-sample": ("togethercomputer/RedPajama-Data-1T-Sample", None, "train", "text"),
}


@dataclass
class TextSet:
    """Fixed-length token chunks and what sits at position 0 of each."""

    source: str
    seq_len: int
    bos: bool
    chunks: list[list[int]]
    first_token_ids: list[int] = field(default_factory=list)
    first_tokens: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.chunks)

    def subset(self, idx) -> TextSet:
        idx = list(idx)
        return TextSet(self.source, self.seq_len, self.bos, [self.chunks[i] for i in idx],
                       [self.first_token_ids[i] for i in idx], [self.first_tokens[i] for i in idx])

    def first_token_summary(self) -> dict:
        """{id, token, share}: the most common first token and the share of chunks that start with it."""
        if not self.chunks:
            return {"id": None, "token": None, "share": 0.0}
        best = max(set(self.first_token_ids), key=self.first_token_ids.count)
        return {"id": best, "token": self.first_tokens[self.first_token_ids.index(best)],
                "share": self.first_token_ids.count(best) / len(self.chunks)}


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def natural_text(limit: int | None = None) -> list[str]:
    """The bundled natural-text sample, one paragraph per item (the first `limit`)."""
    return _paragraphs((resources.files("interp") / "data" / "natural_text.txt").read_text(encoding="utf-8"))[:limit]


def organism_text(limit: int | None = None) -> list[str]:
    """Held-out plain passages from the organisms' corpus generator (what the organisms were trained on)."""
    from interp.organisms.corpus import plain_passages

    return plain_passages(limit or 200, seed=1)


def read_text_file(path: str | Path) -> list[str]:
    """A user .txt file, one item per blank-line-separated paragraph."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"text file not found: {path}")
    if path.suffix.lower() != ".txt":
        raise UserError(f"unsupported text file type {path.suffix or '(none)'!r}; pass a .txt file")
    items = _paragraphs(path.read_text(encoding="utf-8", errors="replace"))
    if not items:
        raise UserError(f"text file {path} is empty")
    return items


def load_hub_texts(name: str, limit: int | None = None) -> list[str]:
    """Documents of a hub text set (see `HUB_TEXTS`); one-line UserError when offline."""
    repo, config, split, column = HUB_TEXTS[name]
    hint = f"text set {name!r} ({repo}) could not be loaded (offline?); pass a .txt file or --dataset natural-text"
    try:
        import datasets
    except ImportError:
        raise UserError(f"{hint}, or install the 'datasets' package") from None
    try:
        ds = datasets.load_dataset(repo, config, split=split if limit is None else f"{split}[:{limit}]")
    except Exception as e:  # noqa: BLE001 - network, auth and cache failures all surface differently
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise UserError(f"{hint} [{type(e).__name__}: {first}]") from None
    return [t for t in ds[column] if t and t.strip()]


def bos_token(tokenizer) -> tuple[int, str]:
    """The BOS-like token: BERT-style `[CLS]`, else the tokenizer's BOS (when it is not also its EOS), else
    `<|endoftext|>` (Qwen's and GPT-2's document separator), else EOS."""
    if getattr(tokenizer, "cls_token_id", None) is not None:
        return tokenizer.cls_token_id, tokenizer.cls_token
    if tokenizer.bos_token_id is not None and tokenizer.bos_token_id != tokenizer.eos_token_id:
        return tokenizer.bos_token_id, tokenizer.bos_token
    tid = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    if isinstance(tid, int) and tokenizer.convert_ids_to_tokens(tid) == "<|endoftext|>":
        return tid, "<|endoftext|>"
    if tokenizer.eos_token_id is not None:
        return tokenizer.eos_token_id, tokenizer.eos_token
    raise UserError("the tokenizer has no BOS, <|endoftext|> or EOS token; run with --no-bos")


def _bos_like(tokenizer) -> int:
    """The BOS the model's own tokenizer adds (`interp.tokens`), else `bos_token`'s BOS-like token."""
    from interp.tokens import bos_id

    return bos_id(tokenizer, True)


def token_string(tokenizer, tid: int) -> str:
    """A token as text (decoded, so byte-level BPE shows spaces and newlines as themselves)."""
    return tokenizer.decode([tid])


def chunk_texts(tokenizer, texts: list[str], seq_len: int, n_chunks: int | None = None, *, bos: bool = False,
                source: str = "texts") -> TextSet:
    """Join `texts` by "\\n\\n", tokenize without special tokens, cut into non-overlapping `seq_len` chunks.

    With `bos`, each chunk is the BOS-like token followed by `seq_len − 1` content tokens. The tail
    shorter than a chunk is dropped. UserError when not even one chunk fits.
    """
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2; got {seq_len}")
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    body = seq_len - 1 if bos else seq_len
    prefix = [_bos_like(tokenizer)] if bos else []
    chunks = [prefix + ids[i:i + body] for i in range(0, len(ids) - body + 1, body)]
    if n_chunks is not None:
        chunks = chunks[:n_chunks]
    if not chunks:
        raise UserError(f"text set {source!r} has {len(ids)} tokens, fewer than one chunk of {seq_len}; "
                        "lower --seq-len or pass more text")
    return _text_set(tokenizer, source, seq_len, bos, chunks)


def repeated_token_set(tokenizer, seq_len: int, n_chunks: int, *, bos: bool = False, seed: int = 0) -> TextSet:
    """Chunks of one random (non-special) token repeated to `seq_len` (after the BOS-like token with `bos`)."""
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    rng = random.Random(seed)
    prefix = [_bos_like(tokenizer)] if bos else []
    chunks = [prefix + [rng.choice(vocab)] * (seq_len - len(prefix)) for _ in range(n_chunks)]
    return _text_set(tokenizer, "repeated-token", seq_len, bos, chunks)


def _text_set(tokenizer, source: str, seq_len: int, bos: bool, chunks: list[list[int]]) -> TextSet:
    firsts = [c[0] for c in chunks]
    names = {t: token_string(tokenizer, t) for t in set(firsts)}
    return TextSet(source, seq_len, bos, chunks, firsts, [names[t] for t in firsts])


def split_indices(n: int, fraction: float = 0.5, seed: int = 0) -> tuple[list[int], list[int]]:
    """A seeded random split of range(n): (selection, held_out), both sorted, both non-empty when n ≥ 2."""
    if n < 2:
        raise UserError(f"need at least 2 text chunks to select on one part and measure on another; got {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    k = min(max(1, round(n * fraction)), n - 1)
    return sorted(order[:k]), sorted(order[k:])

