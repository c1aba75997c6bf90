"""Text sets for activation statistics: natural text chunked to a fixed length, with or without a BOS-like first token.

Public functions (signatures kept stable for other analyses):

- `natural_text(limit=None)` → list[str]: the bundled natural-text sample (`interp/data/natural_text.txt`, ~370
  sentences of varied prose written for this project, one paragraph per item; not the organism corpus).
- `organism_text(limit)` → list[str]: held-out plain passages from the organisms' corpus generator.
- `read_text_file(path)` → list[str]: a user `.txt` file, one item per blank-line-separated paragraph
  (UserError when missing or empty).
- `load_hub_texts(name, limit=None, n_docs=500, seed=0)` → list[str]: a seeded sample of `n_docs` documents (at most
  `limit`) of `wikitext-2` (Salesforce/wikitext, wikitext-2-raw-v1, test) or `redpajama-sample`
  (togethercomputer/RedPajama-Data-1T-Sample), streamed through `datasets` (`sample_documents`: shuffled shards and a
  buffer of `HUB_SHUFFLE_BUFFER` documents, never the whole set); one-line UserError saying what failed (offline:
  the hub could not be reached and nothing is cached). These, the bundled sample and `organism-plain` are registered
  in `interp.datasets` (kind "texts"; a .txt file goes through `read_text_file`).
- `load_texts(spec, n_docs=500, seed=0, limit=None)` → list[str]: the documents of any text set (a hub set sampled
  as above, the others through `interp.datasets.load_dataset`).
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

HUB_SAMPLE_DOCS = 500  # documents sampled from a hub text set (An et al. 2025 and Sun et al. 2024 sample 500)
HUB_SHUFFLE_BUFFER = 10_000  # streaming shuffle buffer (documents) the sample is drawn from, after shuffling shards
PARQUET_EXPORT = "refs/convert/parquet"  # the hub's parquet export of a repository (for script-based datasets)
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


def load_hub_texts(name: str, limit: int | None = None, *, n_docs: int = HUB_SAMPLE_DOCS, seed: int = 0) -> list[str]:
    """A seeded sample of `n_docs` non-empty documents (at most `limit`) of a hub text set (see `HUB_TEXTS`), streamed
    (`datasets` streaming=True): nothing but the sample and a shuffle buffer is downloaded or held. A repository that
    still ships a loading script (which `datasets` no longer runs) is read from its parquet export instead. One-line
    UserError saying what failed."""
    if n_docs < 1 or (limit is not None and limit < 1):
        raise UserError(f"the number of documents must be at least 1; got {min(n_docs, limit or n_docs)}")
    repo, config, split, column = HUB_TEXTS[name]
    n = n_docs if limit is None else min(n_docs, limit)
    hint = "pass a .txt file or --dataset natural-text"
    try:
        import datasets
    except ImportError:
        raise UserError(f"text set {name!r} ({repo}) needs the 'datasets' package (pip install 'interp[datasets]'); "
                        f"or {hint}") from None
    try:
        try:
            docs = sample_documents(datasets.load_dataset(repo, config, split=split, streaming=True), column, n, seed)
        except RuntimeError as e:
            if "scripts are no longer supported" not in str(e):
                raise
            stream = datasets.load_dataset(repo, config, split=split, streaming=True, revision=PARQUET_EXPORT)
            docs = sample_documents(stream, column, n, seed)
    except Exception as e:  # noqa: BLE001 - network, auth, cache and format failures all surface differently
        raise UserError(f"text set {name!r} ({repo}) could not be loaded: {_hub_failure(e)}; {hint}") from None
    if not docs:
        raise UserError(f"text set {name!r} ({repo}) has no non-empty {column!r} documents; {hint}")
    return docs


def sample_documents(stream, column: str, n: int, seed: int, buffer: int | None = None) -> list[str]:
    """The first `n` non-empty `column` values of an iterable dataset shuffled with `seed` (`IterableDataset.shuffle`:
    the shard order, then a buffer of `buffer` documents, default `HUB_SHUFFLE_BUFFER`; the whole set when it is
    smaller than the buffer). Reads at most about `buffer` + `n` documents of the stream."""
    shuffled = stream.shuffle(seed=seed, buffer_size=buffer or HUB_SHUFFLE_BUFFER)
    docs: list[str] = []
    for row in shuffled:
        text = row.get(column)
        if isinstance(text, str) and text.strip():
            docs.append(text)
            if len(docs) >= n:
                break
    return docs


def _hub_failure(e: BaseException) -> str:
    """What went wrong, in one line: no network (and no cached copy), or the error itself."""
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
    text = f"{type(e).__name__}: {first}"
    offline = isinstance(e, ConnectionError | TimeoutError) or type(e).__name__ in (
        "OfflineModeIsEnabled", "LocalEntryNotFoundError", "ConnectError", "ConnectTimeout", "ConnectionError",
        "ReadTimeout", "Timeout")
    if offline or "Couldn't reach" in first:
        return f"the Hugging Face hub could not be reached (offline?) and no cached copy was found [{text}]"
    return f"[{text}]"


def load_texts(spec: str, *, n_docs: int = HUB_SAMPLE_DOCS, seed: int = 0, limit: int | None = None) -> list[str]:
    """The documents of a text set: a hub set (`HUB_TEXTS`) as a seeded, streamed sample of `n_docs` (at most `limit`);
    a bundled set or a .txt file through `interp.datasets.load_dataset` (`limit`: the first N)."""
    if spec in HUB_TEXTS:
        return load_hub_texts(spec, limit, n_docs=n_docs, seed=seed)
    from interp.datasets import load_dataset

    return load_dataset(spec, "texts", limit=limit)


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
    shorter than a chunk is dropped. UserError when not even one chunk fits. With `n_chunks`, only as much of the
    text as those chunks need is tokenized (`_leading_ids`; the same ids as tokenizing the whole text).
    """
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2; got {seq_len}")
    body = seq_len - 1 if bos else seq_len
    ids = _leading_ids(tokenizer, "\n\n".join(texts), None if n_chunks is None else n_chunks * body)
    prefix = [_bos_like(tokenizer)] if bos else []
    chunks = [prefix + ids[i:i + body] for i in range(0, len(ids) - body + 1, body)]
    if n_chunks is not None:
        chunks = chunks[:n_chunks]
    if not chunks:
        raise UserError(f"text set {source!r} has {len(ids)} tokens, fewer than one chunk of {seq_len}; "
                        "lower --seq-len or pass more text")
    return _text_set(tokenizer, source, seq_len, bos, chunks)


def _leading_ids(tokenizer, text: str, need: int | None) -> list[int]:
    """Token ids of `text` (no special tokens); with `need`, only of a leading part of it that yields at least `need`
    ids: character prefixes of doubling length are tokenized until two consecutive ones agree on their first `need`
    ids (a cut only changes the tokens near it), so a long text set is not tokenized whole for a few chunks."""
    if need is None:
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    length = max(4096, 8 * need)
    ids = tokenizer(text[:length], add_special_tokens=False)["input_ids"]
    while length < len(text):
        length *= 2
        longer = tokenizer(text[:length], add_special_tokens=False)["input_ids"]
        if len(ids) >= need and longer[:need] == ids[:need]:
            return longer
        ids = longer
    return ids


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

