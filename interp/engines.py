"""Where unhooked generation runs: the local bridge (KV-cached `generate_tokens`) or an OpenAI-compatible server.

One call for both engines: `engine.generate(seqs, top_logprobs=k)` takes token-id prompts (the chat template
applied locally, exactly the ids the bridge would use) and returns `Generations` (new token ids, EOS dropped, and
`truncated` per row), with per-step top-k log-probabilities (`Completions.logprobs`) when `top_logprobs > 0`.
`engine.describe()` is the run header's record of where and how the tokens were generated.

`OpenAICompletions(url, ...)` speaks `/v1/completions`. At start it reads `/v1/models` (the served model must be the
one asked for) and `/version`, then probes what the server can return with one 1-token request in vLLM's documented
schema (`prompt` as a list of token ids, `return_token_ids: true` → `token_ids` per choice, `logprobs: k` with
`return_tokens_as_token_ids: true` → top-k per step keyed `token_id:N`). A server that rejects it and takes only
string prompts (`transformers serve`) is used in text mode: the decoded prompt is sent (its re-encoding checked
against the ids), the returned text re-tokenized, and rows whose re-tokenized length differs from the server's token
count (special tokens such as `</think>` dropped from the text) are counted: `describe()["text_only"]` and a warning
say so; nothing is re-tokenized silently. Requests run on a bounded thread pool, one prompt each; connection errors
and 5xx answers are retried with exponential backoff; an unreachable server or another served model is a one-line
`UserError`.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from interp import distributed
from interp.errors import UserError
from interp.generation import Generations, generate_tokens

TOKEN_ID_PREFIX = "token_id:"  # vLLM's spelling of a token under return_tokens_as_token_ids
RETRIES, BACKOFF = 5, 0.5  # a failed request is tried again after 0.5, 1, 2, 4, 8 s


@dataclass(frozen=True)
class Sampling:
    """The sampling parameters of every request (recorded in the run header)."""

    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float | None = None  # nucleus sampling when temperature > 0 (None: off)
    seed: int = 0  # row i is seeded with seed * 100_003 + i (as `generate_tokens`)
    stop_ids: tuple[int, ...] = ()  # token ids that end a row (the tokenizer's EOS)


@dataclass(frozen=True)
class StepLogprobs:
    """One row's per-step distributions: the top-k ids and log-probs (descending) and the chosen token's log-prob."""

    top_ids: list[list[int]]
    top_logprobs: list[list[float]]
    chosen: list[float]


class Completions(Generations):
    """`Generations` plus `logprobs[i]` (a `StepLogprobs`, one entry per generated token of row i)."""

    def __init__(self, rows: Sequence, truncated: Sequence[bool], logprobs: Sequence[StepLogprobs]):
        super().__init__(rows, truncated)
        self.logprobs = list(logprobs)


def row_seed(seed: int, i: int) -> int:
    return seed * 100_003 + i


class LocalEngine:
    """Generation on the loaded bridge (`generate_tokens`, KV-cached); top-k log-probs from one teacher-forced pass
    (`interp.instability.teacher_forced`, temperature 1)."""

    def __init__(self, model, sampling: Sampling, *, batch_size: int = 8, progress: bool = True):
        self.model, self.sampling, self.batch_size, self.progress = model, sampling, batch_size, progress

    def generate(self, seqs: Sequence[Sequence[int]], *, top_logprobs: int = 0,
                 seed_ids: Sequence[int] | None = None) -> Generations:
        """New ids per row (`seed_ids[i]`: row i's index for its sampling seed, default i), top-k log-probs when
        `top_logprobs > 0` (a `Completions`)."""
        s = self.sampling
        seeding = {} if seed_ids is None else {"seed_ids": list(seed_ids)}
        gens = generate_tokens(self.model, seqs, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                               top_p=s.top_p, seed=s.seed, batch_size=self.batch_size, progress=self.progress,
                               **seeding)
        if top_logprobs <= 0:
            return gens
        from interp.instability import teacher_forced

        keep = [i for i, g in enumerate(gens) if g]
        dists = teacher_forced(self.model, [seqs[i] for i in keep], [gens[i] for i in keep], top_k=top_logprobs,
                               batch_size=self.batch_size, progress=self.progress)
        rows = [StepLogprobs([], [], []) for _ in gens]
        for i, d in zip(keep, dists):
            rows[i] = StepLogprobs(d["topk_ids"].tolist(), d["topk_logprobs"].tolist(), d["chosen"].tolist())
        return Completions(gens, gens.truncated, rows)

    def limitation(self) -> str | None:
        return None

    def describe(self) -> dict:
        return {"engine": "local", "kv_cache": True, "sampling": asdict(self.sampling)}


class ServerError(Exception):
    """A request that may succeed when tried again (connection refused or reset, timeout, 5xx)."""


@dataclass
class TextRoundTrip:
    """What the text-only mode could not carry: prompts whose re-encoding differs from their ids, rows whose
    re-tokenized text has another length than the server's count, and the special tokens its text drops."""

    prompts_changed: int = 0
    rows_changed: int = 0
    rows_unchecked: int = 0  # the server gave no token count for these rows
    dropped_specials: list[str] = field(default_factory=list)


class OpenAICompletions:
    """Generation on an OpenAI-compatible `/v1/completions` server (see the module docstring)."""

    def __init__(self, url: str, tokenizer, sampling: Sampling, *, model_name: str, concurrency: int = 16,
                 retries: int | None = None, backoff: float | None = None, timeout: float = 3600.0,
                 progress: bool = True):
        self.url = url.rstrip("/")
        self.tokenizer, self.sampling, self.model_name = tokenizer, sampling, model_name
        self.retries = RETRIES if retries is None else retries
        self.backoff = BACKOFF if backoff is None else backoff
        self.concurrency, self.timeout = concurrency, timeout
        self.progress = progress
        self.text = TextRoundTrip()
        models = self._request("GET", "/models")
        served = [m.get("id") for m in models.get("data", []) if isinstance(m, dict)]
        if model_name not in served:
            raise UserError(f"the server at {self.url} serves {', '.join(map(repr, served)) or 'no model'}, not "
                            f"{model_name!r}; pass --generator-model NAME (the served name) or serve {model_name}")
        self.owned_by = next(m.get("owned_by") for m in models["data"] if m.get("id") == model_name)
        self.server_version = self._version()
        self.ids, self.logprobs = self._probe()
        if not self.ids:
            specials = set(tokenizer.all_special_tokens) | {t.content for t in tokenizer.added_tokens_decoder.values()
                                                            if t.special}
            self.text.dropped_specials = sorted(t for t in specials if t and tokenizer.decode(
                tokenizer.convert_tokens_to_ids([t]), skip_special_tokens=True) == "")

    # ------------------------------------------------------------ HTTP

    def _request(self, method: str, path: str, body: dict | None = None, *, probe: bool = False) -> dict:
        """One JSON request, retried with exponential backoff on connection errors and 5xx answers; a 4xx answer is
        a `UserError` (`HTTPRejected` when `probe`)."""
        tries = self.retries + 1
        for attempt in range(tries):
            try:
                return self._once(method, path, body)
            except HTTPRejected as exc:
                if probe:
                    raise
                raise UserError(f"the server at {self.url} rejected {method} {path}: {exc}") from None
            except ServerError as exc:
                if attempt == tries - 1:
                    raise UserError(f"generator server {self.url} failed after {tries} tries: {exc}") from None
                time.sleep(self.backoff * 2 ** attempt)
        raise AssertionError("no try made")

    def _once(self, method: str, path: str, body: dict | None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read().decode())
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")[:300].replace("\n", " ")
            if exc.code >= 500:
                raise ServerError(f"HTTP {exc.code}: {detail}") from None
            raise HTTPRejected(exc.code, detail) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:  # refused, reset, timed out
            reason = getattr(exc, "reason", exc)
            raise ServerError(f"unreachable ({reason}); start the server (e.g. vllm serve MODEL) or drop "
                              "--generator") from None
        except json.JSONDecodeError:
            raise ServerError(f"{path} did not answer JSON") from None

    def _version(self) -> str | None:
        """The server's version where it says (vLLM: GET /version at the root)."""
        root = self.url[:-3] if self.url.endswith("/v1") else self.url
        try:
            with urllib.request.urlopen(root + "/version", timeout=10) as resp:
                return str(json.loads(resp.read().decode()).get("version"))
        except (urllib.error.URLError, OSError, ValueError, AttributeError):
            return None

    def _probe(self) -> tuple[bool, bool]:
        """(token ids in and out, top-k log-probs) from one 1-token request in vLLM's schema."""
        ids = self.tokenizer("Hello", add_special_tokens=False)["input_ids"]
        try:
            body = {**self._ids_body(ids, 1, 0), "logprobs": 1}
            choice = self._request("POST", "/completions", body, probe=True)["choices"][0]
        except HTTPRejected:
            choice = None
        if choice is not None and isinstance(choice.get("token_ids"), list):
            lp = choice.get("logprobs")
            return True, isinstance(lp, dict) and isinstance(lp.get("top_logprobs"), list)
        try:
            self._request("POST", "/completions", self._text_body(self.tokenizer.decode(ids), 1, 0), probe=True)
        except HTTPRejected as exc:
            raise UserError(f"the server at {self.url} rejects completions requests: {exc}") from None
        return False, False

    # ------------------------------------------------------------ requests

    def _sampling_fields(self, i: int, max_tokens: int) -> dict:
        s = self.sampling
        return {"model": self.model_name, "max_tokens": max_tokens, "temperature": s.temperature,
                "top_p": 1.0 if s.top_p is None else s.top_p, "seed": row_seed(s.seed, i)}

    def _ids_body(self, ids: Sequence[int], max_tokens: int, i: int) -> dict:
        """vLLM's schema: token-id prompt, ids back, explicit stop ids, none of the model's sampling defaults."""
        return {**self._sampling_fields(i, max_tokens), "prompt": list(ids), "return_token_ids": True,
                "stop_token_ids": list(self.sampling.stop_ids), "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0,
                "presence_penalty": 0.0, "frequency_penalty": 0.0, "return_tokens_as_token_ids": True}

    def _text_body(self, prompt: str, max_tokens: int, i: int) -> dict:
        return {**self._sampling_fields(i, max_tokens), "prompt": prompt}

    def _one(self, i: int, ids: Sequence[int], top_logprobs: int) -> tuple[list[int], bool, StepLogprobs | None, int]:
        """Row i (its seed's index): (new ids without the stop token, truncated, log-probs, 1 if its text round trip
        changed it, -1 if unchecked)."""
        n = self.sampling.max_new_tokens
        if self.ids:
            body = self._ids_body(ids, n, i)
            if top_logprobs:
                body["logprobs"] = top_logprobs
            choice = self._request("POST", "/completions", body)["choices"][0]
            new = [int(t) for t in choice["token_ids"]]
            steps = _parse_logprobs(choice.get("logprobs"), top_logprobs) if top_logprobs else None
            truncated = choice.get("finish_reason") == "length"
            if new and not truncated and new[-1] in self.sampling.stop_ids:  # vLLM returns the stop token
                new = new[:-1]
                steps = None if steps is None else StepLogprobs(*(v[:len(new)] for v in asdict(steps).values()))
            if steps is not None and len(steps.chosen) != len(new):
                raise UserError(f"the server returned {len(steps.chosen)} logprob steps for {len(new)} tokens")
            return new, truncated, steps, 0
        answer = self._request("POST", "/completions", self._text_body(self.tokenizer.decode(ids), n, i))
        choice = answer["choices"][0]
        new = self.tokenizer(choice.get("text", ""), add_special_tokens=False)["input_ids"]
        truncated = choice.get("finish_reason") == "length"
        count = (answer.get("usage") or {}).get("completion_tokens")
        if count is None:
            return new, truncated, None, -1
        return new, truncated, None, int(len(new) != count - (0 if truncated else 1))  # its count includes the EOS

    def generate(self, seqs: Sequence[Sequence[int]], *, top_logprobs: int = 0,
                 seed_ids: Sequence[int] | None = None) -> Generations:
        """As `LocalEngine.generate`, one request per row on a bounded thread pool. Under torchrun each rank sends its
        shard of the rows (its own pool) and every rank gets all rows, in order, and the text counts of all."""
        if top_logprobs and not self.logprobs:
            raise UserError(f"the server at {self.url} returns no token ids and logprobs (text only); serve the model "
                            "with vLLM (vllm serve) or drop --generator")
        if distributed.sharding():
            seeds = list(range(len(seqs)) if seed_ids is None else seed_ids)
            counts = [self.text.prompts_changed, self.text.rows_changed, self.text.rows_unchecked]

            def mine(idx: list[int]) -> list[tuple]:
                got = self.generate([seqs[i] for i in idx], top_logprobs=top_logprobs, seed_ids=[seeds[i] for i in idx])
                return list(zip(got, got.truncated, got.logprobs if top_logprobs else [None] * len(got)))

            rows = distributed.map_items(mine, len(seqs))
            now = [self.text.prompts_changed, self.text.rows_changed, self.text.rows_unchecked]
            added = distributed.all_reduce_sum(torch.tensor([b - a for a, b in zip(counts, now)])).tolist()
            self.text.prompts_changed, self.text.rows_changed, self.text.rows_unchecked = \
                [a + d for a, d in zip(counts, added)]
            if top_logprobs:
                return Completions([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
            return Generations([r[0] for r in rows], [r[1] for r in rows])
        if not self.ids:
            from interp.tokens import encode

            self.text.prompts_changed += sum(encode(self.tokenizer, self.tokenizer.decode(s)) != list(s) for s in seqs)
        pool = ThreadPoolExecutor(self.concurrency)
        try:
            seeds = range(len(seqs)) if seed_ids is None else seed_ids
            futures = [pool.submit(self._one, i, s, top_logprobs) for i, s in zip(seeds, seqs)]
            results = [f.result() for f in tqdm(futures, desc="generate (server)", disable=not self.progress,
                                                leave=False)]
        finally:
            pool.shutdown(cancel_futures=True)  # a failed row stops the rest
        self.text.rows_changed += sum(r[3] == 1 for r in results)
        self.text.rows_unchecked += sum(r[3] == -1 for r in results)
        rows, truncated = [r[0] for r in results], [r[1] for r in results]
        if top_logprobs:
            return Completions(rows, truncated, [r[2] for r in results])
        return Generations(rows, truncated)

    def limitation(self) -> str | None:
        """The text-only mode's one-line warning (None in token-id mode)."""
        if self.ids:
            return None
        t = self.text
        return (f"the generator server returns text only: prompts were sent decoded ({t.prompts_changed} re-encode "
                f"differently), completions re-tokenized ({t.rows_changed} rows changed length, {t.rows_unchecked} "
                f"unchecked); its text drops special tokens ({', '.join(t.dropped_specials) or 'none found'})")

    def describe(self) -> dict:
        return {"engine": "openai-completions", "url": self.url, "served_model": self.model_name,
                "owned_by": self.owned_by, "server_version": self.server_version,
                "capabilities": {"token_ids": self.ids, "logprobs": self.logprobs},
                "concurrency": self.concurrency, "sampling": asdict(self.sampling),
                "text_only": None if self.ids else asdict(self.text)}


class HTTPRejected(Exception):
    """A 4xx answer: the request itself is wrong for this server (not retried)."""

    def __init__(self, code: int, detail: str):
        super().__init__(f"HTTP {code}: {detail}")


def _parse_logprobs(lp, k: int) -> StepLogprobs:
    """vLLM's completions `logprobs` ({tokens, token_logprobs, top_logprobs: [{"token_id:N": logprob}]}) → ids."""
    if not isinstance(lp, dict) or not isinstance(lp.get("top_logprobs"), list):
        raise UserError("the server answered without logprobs; it needs vLLM's completions logprobs")
    top_ids, top_lps = [], []
    for step in lp["top_logprobs"]:
        ordered = sorted(((_token_id(t), float(v)) for t, v in (step or {}).items()), key=lambda e: -e[1])[:k]
        top_ids.append([t for t, _ in ordered])
        top_lps.append([v for _, v in ordered])
    chosen = [float(v) if v is not None else float("-inf") for v in lp.get("token_logprobs", [])]
    return StepLogprobs(top_ids, top_lps, chosen)


def _token_id(token: str) -> int:
    if not token.startswith(TOKEN_ID_PREFIX):
        raise UserError(f"the server names tokens by text ({token!r}), not {TOKEN_ID_PREFIX}N; it needs vLLM's "
                        "return_tokens_as_token_ids")
    return int(token[len(TOKEN_ID_PREFIX):])


def make_engine(model, url: str | None, sampling: Sampling, *, model_name: str | None = None, concurrency: int = 16,
                batch_size: int = 8, progress: bool = True) -> LocalEngine | OpenAICompletions:
    """The local engine (url None) or the server at `url` serving `model_name` (default: the model's own name)."""
    if url is None:
        return LocalEngine(model, sampling, batch_size=batch_size, progress=progress)
    from interp.models import model_info

    return OpenAICompletions(url, model.tokenizer, sampling, model_name=model_name or model_info(model).name,
                             concurrency=concurrency, progress=progress)


def default_stop_ids(tokenizer) -> tuple[int, ...]:
    """The ids `generate_tokens` stops at: the tokenizer's EOS."""
    return () if tokenizer.eos_token_id is None else (int(tokenizer.eos_token_id),)
