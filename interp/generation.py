"""Batched generation with the chat template and a KV cache; hooks installed by the caller stay active.

`generate_tokens` runs its own decode loop on the bridge: one prefill forward over the left-padded prompts
(only the last position unembedded), then one forward per new token over that token alone, the keys and
values of earlier positions read from Hugging Face's cache. Every forward goes through the bridge, so any
hook active on the model (`ablate_heads` on `hook_z`, Neuron Adjust on `mlp.hook_pre`, a recorder on
`unembed.hook_out`) fires at every step, on the new position(s) of that step. Attention runs through SDPA
unless an active hook needs the eager path's internals (`hook_pattern`, `hook_attn_scores`, rotary).
A row leaves the batch (and the cache) when it ends, so hooks only ever see rows still generating.
Each result row says whether it ended (EOS) or hit its cap: `Generations.truncated`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor

from interp import distributed
from interp.batching import pad_left, run_batches
from interp.bridge import sdpa_attention
from interp.capture import check_context
from interp.chat import chat_prefix


def encode_prompts(tokenizer, prompts: Sequence[str], system: str | None = None) -> list[list[int]]:
    """Chat-templated token ids (generation prompt included; thinking models open `<think>`)."""
    return [tokenizer(chat_prefix(tokenizer, p, system), add_special_tokens=False)["input_ids"] for p in prompts]


class Generations(list):
    """One generated row per input (a plain list of token ids, or of strings from `generate`), plus
    `truncated[i]`: row i hit its `max_new_tokens` cap without producing EOS (False: it ended on EOS)."""

    def __init__(self, rows: Sequence = (), truncated: Sequence[bool] | None = None):
        super().__init__(rows)
        self.truncated: list[bool] = [False] * len(self) if truncated is None else [bool(t) for t in truncated]
        if len(self.truncated) != len(self):
            raise ValueError("one truncated flag per row")

    @property
    def n_truncated(self) -> int:
        return sum(self.truncated)


@dataclass(frozen=True)
class Step:
    """What one generation forward computes, for a `step_context`.

    step: 0 the prefill, t the forward that reads the t-th generated token. rows: the input indices (into
    `seqs`) of the batch rows, in order. mask: the `[rows, width]` 0/1 attention mask of the whole sequence
    so far (left padding, the prompt, the generated tokens; cached columns included). new: how many of the
    last columns this forward computes (the prompt width at prefill, 1 with the cache, all without)."""

    step: int
    rows: list[int]
    mask: Int[Tensor, "batch pos"]
    new: int


StepContext = Callable[[Step], contextlib.AbstractContextManager]


def _cache_supported(model) -> bool:
    """The bridge's own rule (no KV cache for recurrent/stateful decoders) plus a model that returns one."""
    adapter = getattr(model, "adapter", None)
    if not getattr(adapter, "supports_kv_cache", True) or getattr(model.cfg, "is_stateful", False):
        return False
    return getattr(getattr(model.original_model, "config", None), "use_cache", True) is not False


def _last_logits_kwargs(model) -> dict:
    """`logits_to_keep=1` where the wrapped model takes it: the prefill then unembeds only the last position."""
    try:
        params = inspect.signature(model.original_model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


def _sample(logits: Tensor, temperature: float, top_p: float | None, generators: Sequence[torch.Generator]) -> Tensor:
    """Next token per row: argmax at temperature 0, else a draw from softmax(logits / T) (nucleus `top_p`),
    each row from its own generator."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(-1, descending=True)
        probs = ordered.softmax(-1)
        ordered = ordered.masked_fill(probs.cumsum(-1) - probs > top_p, float("-inf"))  # keeps the top token
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
    probs = logits.softmax(-1)
    return torch.cat([torch.multinomial(probs[r], 1, generator=g) for r, g in enumerate(generators)])


def _select_rows(cache: Any, keep: list[int], device) -> bool:
    """Keep only rows `keep` of an HF cache in place; False where the cache cannot (the loop then recomputes)."""
    select = getattr(cache, "batch_select_indices", None)
    if select is None:
        return False
    try:
        select(torch.tensor(keep, device=device))
    except (NotImplementedError, AttributeError, TypeError):
        return False
    return True


@torch.no_grad()
def generate_tokens(
    model,
    seqs: Sequence[Sequence[int]],
    *,
    max_new_tokens: int | Sequence[int] = 256,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    use_cache: bool = True,
    step_context: StepContext | None = None,
    seed_ids: Sequence[int] | None = None,
    state: Sequence = (),
) -> Generations:
    """Continue each token sequence; returns the new token ids (stopped at EOS, which is dropped, or at the
    cap) with `.truncated` per row (True: the row hit its cap without EOS).

    max_new_tokens: one cap for all rows, or one per row. temperature 0 → greedy; otherwise sampling from
    a generator seeded per sequence (from `seed` and its index), so a sequence's continuation does not
    depend on the batch size or on which sequences share its batch. Any hooks active on `model` (e.g.
    `ablate_heads`) fire at every step. use_cache=False recomputes the whole sequence at every step (the
    reference the cached path is tested against; also the path for models without a KV cache).
    step_context(Step) is entered around every forward (hooks that need to know the rows and positions).
    seed_ids: each sequence's index for its generator's seed (default: its position in `seqs`). Under torchrun each
    rank generates its shard of `seqs` (same per-sequence seeds) and every rank gets all rows, in order.
    Out of memory: the batch is halved and its rows start again (`interp.batching.run_batches`); `state`, what the
    active hooks accumulate (e.g. Neuron Adjust's counts), is restored to before the failed batch.
    """
    if distributed.sharding():
        kw = dict(temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size, progress=progress,
                  use_cache=use_cache, state=state)
        caps = [max_new_tokens] * len(seqs) if isinstance(max_new_tokens, int) else list(max_new_tokens)

        def mine(idx: list[int]) -> list[tuple[list[int], bool]]:
            def context(step: Step):  # the step's rows as indices into `seqs`, as in one process
                return step_context(dataclasses.replace(step, rows=[idx[r] for r in step.rows]))

            got = generate_tokens(model, [seqs[i] for i in idx], max_new_tokens=[caps[i] for i in idx],
                                  seed_ids=[seed_ids[i] if seed_ids else i for i in idx],
                                  step_context=context if step_context else None, **kw)
            return list(zip(got, got.truncated))

        rows = distributed.map_items(mine, len(seqs), lengths=[len(s) for s in seqs], batch_size=batch_size)
        return Generations([r for r, _ in rows], [t for _, t in rows])
    limits = [max_new_tokens] * len(seqs) if isinstance(max_new_tokens, int) else [int(n) for n in max_new_tokens]
    if len(limits) != len(seqs):
        raise ValueError(f"{len(limits)} max_new_tokens for {len(seqs)} sequences")
    if any(n < 0 for n in limits):
        raise ValueError("max_new_tokens must be >= 0")
    check_context(model, seqs, new_tokens=max(limits, default=0))
    tok = model.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    cached = use_cache and _cache_supported(model)
    keep_last = _last_logits_kwargs(model)
    out: list[list[int]] = [[] for _ in seqs]
    truncated = [n == 0 for n in limits]
    step_context = step_context or (lambda step: contextlib.nullcontext())

    def generate_batch(idx: list[int], tokens: Tensor, mask: Tensor) -> None:  # its rows afresh: safe to repeat
        nonlocal cached
        for i in idx:
            out[i], truncated[i] = [], limits[i] == 0
        device = tokens.device
        generators = {i: torch.Generator(device=device).manual_seed(seed * 100_003 + (seed_ids[i] if seed_ids else i))
                      for i in idx}
        rows = [i for i in idx if limits[i] > 0]
        if not rows:
            return
        keep = [k for k, i in enumerate(idx) if limits[i] > 0]
        tokens, mask = tokens[keep], mask[keep]
        cache, step = None, 0
        with sdpa_attention(model):  # a no-op where an active hook needs the eager attention's internals
            while True:
                with step_context(Step(step, rows, mask, tokens.shape[1])):
                    if cached:
                        logits, cache = model(tokens, attention_mask=mask, past_key_values=cache, use_cache=True,
                                              return_type="logits_and_cache", **keep_last)
                    else:
                        logits = model(tokens, attention_mask=mask, return_type="logits")
                nxt = _sample(logits[:, -1], temperature, top_p, [generators[i] for i in rows]).tolist()
                still = []
                for k, (i, t) in enumerate(zip(rows, nxt)):
                    if t == eos:
                        continue
                    out[i].append(t)
                    if len(out[i]) >= limits[i]:
                        truncated[i] = True
                    else:
                        still.append(k)
                if not still:
                    break
                step += 1
                if len(still) < len(rows) and cached and not _select_rows(cache, still, device):
                    cached, cache = False, None  # this cache cannot drop rows: recompute from here on
                rows, mask = [rows[k] for k in still], mask[still]
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
                if cached:
                    tokens = torch.tensor([[out[i][-1]] for i in rows], device=device)
                else:
                    full, mask = pad_left([list(seqs[i]) + out[i] for i in rows], pad)
                    tokens, mask = full.to(device), mask.to(device)

    run_batches(model, seqs, batch_size, generate_batch, desc="generate", progress=progress, state=state)
    return Generations(out, truncated)


def generate(model, prompts: Sequence[str], *, system: str | None = None, **kw) -> Generations:
    """Chat-templated generation for each prompt; returns decoded continuations (special tokens kept
    except padding/EOS, so `</think>` survives for `split_thinking`) with `.truncated` per prompt."""
    tok = model.tokenizer
    new = generate_tokens(model, encode_prompts(tok, prompts, system), **kw)
    return Generations([tok.decode(ids, skip_special_tokens=False) for ids in new], new.truncated)
