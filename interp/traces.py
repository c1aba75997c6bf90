"""External reasoning traces with API logprobs (JSONL, one trace a line), for `instability --traces`.

Each line: `{"id": ..., "correct": true|false, "content": [...]}` where `content` is exactly the
OpenAI chat-completions `choices[0].logprobs.content` list — per generated token
`{"token": str, "logprob": float, "top_logprobs": [{"token": str, "logprob": float}, ...]}` — or
`"response": {...}` holding the whole chat-completions response object instead of `content`, and
optionally `"question": ...` naming the question the trace answers (several samples of one question
share it; the intervals resample whole questions), and optionally `"truncated": true|false|null` (the
trace hit its token limit without ending; null: not known). Without the field it is inferred where the
line says: `finish_reason` ("length" → true, any other → false; top level or in `response.choices[0]`),
else a last token that is an end-of-sequence marker (false), else `<think>` opened and never closed
(true: no answer); otherwise unknown (null).
Tokens are matched across steps by their text (`bytes`, when given, break ties between texts);
a token listed twice in one step is merged (probabilities added).

A line may instead carry token ids (the format `instability` writes for a local model's traces, `trace_record_ids`):
`{"id", "correct", "top_ids": [[int, ...] per step], "top_logprobs": [[float, ...] per step]}` with optional
`"tokens"` (each generated token's text, for the report), `"token_ids"`, `"logprobs"` (the generated tokens'), and
`question` / `truncated` as above. Tokens are then matched by id and no alternative is ever decoded.
"""

from __future__ import annotations

import math
import numbers
from pathlib import Path

import torch

from interp.chat import THINK_CLOSE, THINK_OPEN
from interp.errors import UserError
from interp.files import read_jsonl
from interp.instability import PAD_ID, TraceDists


def _is_logprob(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and not math.isnan(v) and v <= 1e-6


def _content(obj: dict, where: str) -> list:
    if "content" in obj:
        content = obj["content"]
    elif "response" in obj:
        try:
            content = obj["response"]["choices"][0]["logprobs"]["content"]
        except (KeyError, IndexError, TypeError):
            raise UserError(f"{where}: 'response' has no choices[0].logprobs.content "
                            "(request the completion with logprobs=true and top_logprobs=K)") from None
    else:
        raise UserError(f"{where}: missing field 'content' (or 'response')")
    if not isinstance(content, list) or not content:
        raise UserError(f"{where}: 'content' must be a non-empty list of token steps")
    return content


EOS_TEXTS = ("<|im_end|>", "<|endoftext|>", "</s>", "<|eot_id|>", "<|end|>", "<｜end▁of▁sentence｜>", "<eos>")


def _truncated(obj: dict, tokens: list[str], where: str) -> bool | None:
    """The trace's `truncated` flag: given, or inferred from finish_reason, a final EOS, an unclosed <think>."""
    if "truncated" in obj:
        if obj["truncated"] is not None and not isinstance(obj["truncated"], bool):
            raise UserError(f"{where}: 'truncated' must be true, false or null, not {obj['truncated']!r}")
        return obj["truncated"]
    reason = obj.get("finish_reason")
    if reason is None and isinstance(obj.get("response"), dict):
        choices = obj["response"].get("choices") or [{}]
        reason = choices[0].get("finish_reason") if isinstance(choices[0], dict) else None
    if isinstance(reason, str):
        return reason == "length"
    if tokens and tokens[-1].strip() in EOS_TEXTS:
        return False
    text = "".join(tokens)
    if THINK_OPEN in text and THINK_CLOSE not in text:
        return True
    return None


def _key(entry: dict) -> str:
    b = entry.get("bytes")
    return entry["token"] if not b else f"{entry['token']}\x00{bytes(b).hex()}"


def _parse_ids(obj: dict, where: str, question) -> TraceDists:
    """A line in the token-id format (`trace_record_ids`)."""
    top_ids, top_lps = obj["top_ids"], obj.get("top_logprobs")
    if not isinstance(top_ids, list) or not top_ids or not isinstance(top_lps, list) or len(top_lps) != len(top_ids):
        raise UserError(f"{where}: 'top_ids' and 'top_logprobs' must be non-empty lists with one entry per step")
    n = len(top_ids)
    k = 0
    for t, (ids, lps) in enumerate(zip(top_ids, top_lps), 1):
        if (not isinstance(ids, list) or not isinstance(lps, list) or not ids or len(ids) != len(lps)
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
                or not all(_is_logprob(v) for v in lps)):
            raise UserError(f"{where}, step {t}: 'top_ids' and 'top_logprobs' need the same non-empty number of "
                            "entries, token ids >= 0 and logprobs <= 0")
        k = max(k, len(ids))
    tokens = obj.get("tokens")
    if tokens is None:
        tokens = [str(i) for i in obj.get("token_ids", [row[0] for row in top_ids])]
    if not isinstance(tokens, list) or len(tokens) != n or not all(isinstance(x, str) for x in tokens):
        raise UserError(f"{where}: 'tokens' must be a list of {n} strings (one per step)")
    ids = torch.full((n, k), PAD_ID, dtype=torch.long)
    lps = torch.full((n, k), -math.inf, dtype=torch.float64)
    if all(len(row) == k for row in top_ids):
        ids[:], lps[:] = torch.tensor(top_ids), torch.tensor(top_lps, dtype=torch.float64)
    else:
        for t, (row, vals) in enumerate(zip(top_ids, top_lps)):
            ids[t, :len(row)] = torch.tensor(row)
            lps[t, :len(row)] = torch.tensor(vals, dtype=torch.float64)
    lps = torch.where(lps.isfinite(), lps.clamp_min(-1e4), lps)  # OpenAI's −9999 for "zero", as in the text format
    return TraceDists(id=str(obj["id"]), correct=obj["correct"], tokens=tokens, topk_ids=ids, topk_logprobs=lps,
                      question=None if question is None else str(question), truncated=_truncated(obj, tokens, where))


def parse_trace(obj: dict, where: str, vocab: dict[str, int]) -> TraceDists:
    """One JSONL object → TraceDists; `vocab` (token key → id) is shared across a file."""
    for field in ("id", "correct"):
        if field not in obj:
            raise UserError(f"{where}: missing field {field!r}")
    if not isinstance(obj["correct"], bool):
        raise UserError(f"{where}: 'correct' must be true or false, not {obj['correct']!r}")
    question = obj.get("question")
    if question is not None and (isinstance(question, bool) or not isinstance(question, (str, int))):
        raise UserError(f"{where}: 'question' must be a string or an integer, not {question!r}")
    if "top_ids" in obj:
        return _parse_ids(obj, where, question)
    content = _content(obj, where)
    tokens, rows = [], []
    for t, step in enumerate(content, 1):
        at = f"{where}, step {t}"
        if not isinstance(step, dict):
            raise UserError(f"{at}: a step must be an object with token, logprob, top_logprobs")
        for field in ("token", "logprob", "top_logprobs"):
            if field not in step:
                raise UserError(f"{at}: missing field {field!r}")
        top = step["top_logprobs"]
        if not isinstance(top, list) or not top:
            raise UserError(f"{at}: empty 'top_logprobs' (request the completion with top_logprobs=K, K >= 1)")
        merged: dict[int, float] = {}
        for e in top:
            if not isinstance(e, dict) or not isinstance(e.get("token"), str) or not _is_logprob(e.get("logprob")):
                raise UserError(f"{at}: each top_logprobs entry needs a text 'token' and a 'logprob' <= 0")
            i = vocab.setdefault(_key(e), len(vocab))
            lp = max(float(e["logprob"]), -1e4) if math.isfinite(e["logprob"]) else -math.inf
            merged[i] = float(torch.logaddexp(torch.tensor(merged[i]), torch.tensor(lp))) if i in merged else lp
        if all(v == -math.inf for v in merged.values()):
            raise UserError(f"{at}: every top_logprobs entry has probability 0 (logprob -inf)")
        tokens.append(str(step["token"]))
        rows.append(merged)
    k = max(len(r) for r in rows)
    ids = torch.full((len(rows), k), PAD_ID, dtype=torch.long)
    lps = torch.full((len(rows), k), -math.inf, dtype=torch.float64)
    for t, r in enumerate(rows):
        ids[t, :len(r)] = torch.tensor(list(r.keys()))
        lps[t, :len(r)] = torch.tensor(list(r.values()), dtype=torch.float64)
    return TraceDists(id=str(obj["id"]), correct=obj["correct"], tokens=tokens, topk_ids=ids, topk_logprobs=lps,
                      question=None if question is None else str(question), truncated=_truncated(obj, tokens, where))


def load_traces(path: str | Path) -> list[TraceDists]:
    """Read a traces JSONL file; any malformed line is a one-line UserError naming it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"traces file not found: {path}")
    vocab: dict[str, int] = {}
    traces, seen = [], {}
    for lineno, obj in read_jsonl(path):
        where = f"{path}: line {lineno}"
        trace = parse_trace(obj, where, vocab)
        if trace.id in seen:
            raise UserError(f"{where}: id {trace.id!r} already used on line {seen[trace.id]}")
        seen[trace.id] = lineno
        traces.append(trace)
    if not traces:
        raise UserError(f"traces file {path} is empty")
    return traces


def trace_record(trace_id: str, correct: bool, tokens: list[str], top: list[list[tuple[str, float]]],
                 chosen_logprobs: list[float], question: str | None = None, truncated: bool | None = None) -> dict:
    """One JSONL object in the format `load_traces` reads (for exporting a local model's traces)."""
    return {"id": trace_id, "correct": correct, **({} if question is None else {"question": question}),
            "truncated": truncated, "content": [
        {"token": tok, "logprob": lp, "top_logprobs": [{"token": t, "logprob": v} for t, v in alts]}
        for tok, lp, alts in zip(tokens, chosen_logprobs, top)]}


def trace_record_ids(trace_id: str, correct: bool, token_ids: list[int], tokens: list[str], top_ids: list[list[int]],
                     top_logprobs: list[list[float]], chosen_logprobs: list[float], question: str | None = None,
                     truncated: bool | None = None) -> dict:
    """One JSONL object in the token-id format `load_traces` reads: the alternatives as ids, never decoded (only the
    generated tokens' texts, one per step, for the report)."""
    return {"id": trace_id, "correct": correct, **({} if question is None else {"question": question}),
            "truncated": truncated, "token_ids": token_ids, "tokens": tokens, "logprobs": chosen_logprobs,
            "top_ids": top_ids, "top_logprobs": top_logprobs}
