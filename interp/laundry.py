"""The Laundry List task (Talking Heads, Merullo et al. 2024): recall the one list item not repeated.

"I put the shirt, the socks and the towel in the laundry. I took out the socks and the shirt, and
then I took out the" → " towel". N items (2–10), the answer at any list position, the repeated
items in the same or shuffled order; four surface templates over three item vocabularies (objects,
food, names), the format the model organisms were trained on (`interp.organisms.corpus`).

Scoring at the last prompt token (END): accuracy among the N list items (argmax of the items'
logits is the answer), full-vocabulary top-1 accuracy, and the logit difference between the answer
and the strongest other item. An item is scored by the token that would follow END: the first token
of prompt + " item" tokenized as one string, split at the prompt's end by offsets
(`interp.tokens.encode_joint`; never " item" tokenized alone, which on SentencePiece/Metaspace
tokenizers such as Llama-2's starts with a bare `▁` piece shared by every item). The prompt itself
starts with the BOS the model's own tokenizer adds (the `bos` option, `interp.tokens`). When an item
is several tokens this is first-token scoring (`Encoded.multi_token`). Items whose first token is
shared with another item, is whitespace only, or merges with the prompt's last characters (so the
prompt's own tokenization would not precede it) are dropped from the pool, so the items of a prompt
stay distinguishable and each is a possible next token at END (`item_pools`).

Held out (`split_pools`): the selection and held-out prompts share no template and no item, so the
held-out numbers measure recall on unseen wording and unseen items.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from interp import distributed
from interp.batching import run_batches
from interp.bridge import sdpa_attention, stopped_at
from interp.controls import split, wilson
from interp.errors import UserError
from interp.organisms.corpus import LAUNDRY_TEMPLATES
from interp.tokens import encode as encode_text
from interp.tokens import encode_joint

TEMPLATE_NAMES = ("laundry", "bag", "market", "park")  # LAUNDRY_TEMPLATES, in order


@dataclass(frozen=True)
class LaundryPrompt:
    text: str  # ends right before the answer
    items: tuple[str, ...]  # the first list, in order
    position: int  # 0-based list position of the answer
    template: int
    spans: tuple[tuple[int, int], ...]  # character span of each item in the first list

    @property
    def answer(self) -> str:
        return self.items[self.position]

    @property
    def n_items(self) -> int:
        return len(self.items)


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def build_prompt(template: int, items: Sequence[str], position: int, shuffled_rest: Sequence[str] | None = None
                 ) -> LaundryPrompt:
    """One prompt of `template` (an index into `TEMPLATE_NAMES`) with the answer at `position`."""
    _, article, first, second = LAUNDRY_TEMPLATES[template]
    art = (lambda w: f"the {w}") if article else (lambda w: w)
    rest = list(shuffled_rest) if shuffled_rest is not None else [w for j, w in enumerate(items) if j != position]
    head, tail = first.split("{list}")
    spans, text = [], head
    for j, w in enumerate(items):
        if j:
            text += " and " if j == len(items) - 1 else ", "
        text += art(w)
        spans.append((len(text) - len(w), len(text)))
    text += tail + " " + second.format(rep=_join([art(w) for w in rest])) + (" the" if article else "")
    return LaundryPrompt(text, tuple(items), position, template, tuple(spans))


@dataclass(frozen=True)
class ItemToken:
    """How an item follows a prompt: `token` is the first token of prompt + " item" tokenized jointly (None when
    `problem` says why it cannot be scored at END), `single` whether the item is that one token."""

    token: int | None
    single: bool
    problem: str | None = None


def item_token(tokenizer, text: str, item: str, prompt_ids: Sequence[int] | None = None,
               bos: bool | None = None) -> ItemToken:
    """The token the model would predict at END for `item`: the first token of `text` + " " + `item` tokenized
    as one string, split at the end of `text` by offsets. Not scorable when the tokens before it are not the
    prompt's own (`prompt_ids`: it merges with the prompt's last characters) or it holds only whitespace."""
    prompt_ids = list(encode_text(tokenizer, text, bos=bos)) if prompt_ids is None else list(prompt_ids)
    joint = encode_joint(tokenizer, text, " " + item, bos=bos)
    cont = joint.continuation_ids
    if joint.prompt_ids != prompt_ids or not cont:
        return ItemToken(None, False, "merges with the prompt's last token")
    if not tokenizer.decode([cont[0]]).strip():
        return ItemToken(None, False, "starts with a whitespace-only token")
    return ItemToken(cont[0], len(cont) == 1)


def item_pools(tokenizer, templates: Sequence[int], bos: bool | None = None) -> tuple[dict[int, list[str]], bool]:
    """Each template's items that can be scored after its prompts (`item_token` at the end of a prompt of that
    template) with pairwise distinct first tokens, and whether any kept item is several tokens."""
    pools, multi = {}, False
    for t in templates:
        vocabulary = LAUNDRY_TEMPLATES[t][0]
        text = build_prompt(t, vocabulary[:2], 0).text  # every prompt of the template ends the same way
        prompt_ids = encode_text(tokenizer, text, bos=bos)
        seen, pool = set(), []
        for w in vocabulary:
            it = item_token(tokenizer, text, w, prompt_ids, bos)
            if it.token is not None and it.token not in seen:
                seen.add(it.token)
                pool.append(w)
                multi |= not it.single
        pools[t] = pool
    return pools, multi


def split_pools(pools: dict[int, list[str]], fraction: float, seed: int
                ) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """(selection pools, held-out pools): the templates split by `interp.controls.split`, and the items of a
    vocabulary whose templates fall on both sides split the same way, so the halves share no template and no
    item. With one template only the items are split (the caller warns)."""
    templates = sorted(pools)
    halves = split(len(templates), fraction, seed) if len(templates) > 1 else ([0], [0])
    sides = [[templates[i] for i in half] for half in halves]
    out: tuple[dict[int, list[str]], dict[int, list[str]]] = ({}, {})
    for vocabulary in dict.fromkeys(tuple(pools[t]) for t in templates):
        users = [[t for t in side if tuple(pools[t]) == vocabulary] for side in sides]
        every = list(range(len(vocabulary)))
        items = split(len(vocabulary), fraction, seed) if all(users) else (every, every)
        for side, members, idx in zip(out, users, items):
            side.update({t: [vocabulary[i] for i in idx] for t in members})
    return out


def make_prompts(pools: dict[int, list[str]], n_items: Sequence[int], per_cell: int, seed: int) -> list[LaundryPrompt]:
    """`per_cell` prompts for every (N, answer position) cell, templates in turn, repeated items
    shuffled half of the time, no prompt text twice (while the pools allow)."""
    rng = random.Random(f"laundry-{seed}")
    templates = sorted(pools)
    for n in n_items:
        small = [TEMPLATE_NAMES[t] for t in templates if len(pools[t]) < n]
        if small:
            raise UserError(f"fewer than {n} items with distinct first tokens in template(s) {', '.join(small)} "
                            "after the prompt for this tokenizer (a vocabulary shared by selection and held-out "
                            "templates is split between them); lower --n-items or choose other --templates")
    out, seen = [], set()
    for n in n_items:
        for pos in range(n):
            for j in range(per_cell):
                t = templates[j % len(templates)]
                for _ in range(1000):
                    items = rng.sample(pools[t], n)
                    rest = [w for k, w in enumerate(items) if k != pos]
                    if rng.random() < 0.5:
                        rest = rng.sample(rest, len(rest))
                    p = build_prompt(t, items, pos, rest)
                    if p.text not in seen:
                        break
                seen.add(p.text)
                out.append(p)
    return out


@dataclass
class Encoded:
    ids: list[list[int]]
    item_positions: list[list[int]]  # token index of each first-list item (its first token)
    candidates: list[list[int]]  # each item's first token after the prompt (joint tokenization)
    multi_token: bool  # some item is several tokens: scored by its first token


def encode(tokenizer, prompts: Sequence[LaundryPrompt], bos: bool | None = None) -> Encoded:
    """Each prompt's ids (the BOS the `bos` option gives, `interp.tokens`), the token index of each first-list
    item, and each item's candidate: its first token after the prompt, from the joint tokenization (`item_token`)."""
    ids, positions, cands, multi = [], [], [], False
    for p in prompts:
        plain = tokenizer(p.text, add_special_tokens=False, return_offsets_mapping=True)
        full = encode_text(tokenizer, p.text, bos=bos)
        shift = len(full) - len(plain["input_ids"])  # the BOS in front
        pos = []
        for start, _ in p.spans:
            hit = [i for i, (a, b) in enumerate(plain["offset_mapping"]) if a <= start < b]
            pos.append(hit[0] + shift)
        found = [item_token(tokenizer, p.text, w, full, bos) for w in p.items]
        bad = [(w, it.problem) for w, it in zip(p.items, found) if it.token is None]
        if bad or len({it.token for it in found}) < len(found):
            why = f"{bad[0][0]!r} {bad[0][1]}" if bad else "two items share their first token"
            raise UserError(f"Laundry List item after the prompt {p.text[-30:]!r}: {why} for this tokenizer")
        multi |= any(not it.single for it in found)
        ids.append(full)
        positions.append(pos)
        cands.append([it.token for it in found])
    return Encoded(ids, positions, cands, multi)


@torch.no_grad()
def last_logits(model, ids: Sequence[Sequence[int]], *, batch_size: int = 8, progress: bool = False,
                desc: str = "laundry list") -> Float[Tensor, "n vocab"]:
    """Next-token logits at the last token of each sequence (the unembedding runs on that position only). Under
    torchrun each rank runs its shard (whole batches); every rank gets all rows, in order."""
    if distributed.sharding():
        return torch.stack(distributed.map_items(
            lambda idx: list(last_logits(model, [ids[i] for i in idx], batch_size=batch_size, progress=progress,
                                         desc=desc)), len(ids), lengths=[len(s) for s in ids], batch_size=batch_size))
    n_layers = model.cfg.n_layers
    out = [None] * len(ids)

    def step(idx: list[int], tokens: Tensor, mask: Tensor) -> None:  # per-sequence results: safe to repeat
        saved = {}

        def keep(x, hook):
            saved["x"] = x[:, -1:]

        with stopped_at(model, n_layers) as stop_at, model.hooks(
                fwd_hooks=[(f"blocks.{n_layers - 1}.hook_resid_post", keep)]):
            model(tokens, attention_mask=mask, return_type=None, stop_at_layer=stop_at)
        logits = model.unembed(model.ln_final(saved["x"]))[:, 0].float().cpu()
        for row, i in enumerate(idx):
            out[i] = logits[row]

    with sdpa_attention(model):  # out of memory: the batch is halved (interp.batching.run_batches)
        run_batches(model, ids, batch_size, step, desc=desc, progress=progress)
    return torch.stack(out)


def score(logits: Float[Tensor, "n vocab"], enc: Encoded, prompts: Sequence[LaundryPrompt]) -> dict[str, Tensor]:
    """Per prompt: correct among the items, full-vocabulary top-1, logit(answer) − max logit(other items)."""
    correct, top1, diff = [], [], []
    for row, p, cand in zip(logits, prompts, enc.candidates):
        item_logits = row[cand]
        answer = item_logits[p.position]
        others = torch.cat([item_logits[:p.position], item_logits[p.position + 1:]])
        correct.append(bool(answer > others.max()))
        top1.append(int(row.argmax()) == cand[p.position])
        diff.append(float(answer - others.max()))
    return {"correct": torch.tensor(correct, dtype=torch.float), "top1": torch.tensor(top1, dtype=torch.float),
            "logit_diff": torch.tensor(diff)}


def evaluate(model, prompts: Sequence[LaundryPrompt], enc: Encoded, *, batch_size: int = 8,
             progress: bool = False, desc: str = "laundry list") -> dict[str, Tensor]:
    return score(last_logits(model, enc.ids, batch_size=batch_size, progress=progress, desc=desc), enc, prompts)


def table(prompts: Sequence[LaundryPrompt], scores: dict[str, Tensor]) -> list[dict]:
    """`laundry_list` rows: one per (N, answer position), then one per N over all positions (position None)."""
    n = torch.tensor([p.n_items for p in prompts])
    pos = torch.tensor([p.position for p in prompts])
    rows = []
    for k in sorted(set(n.tolist())):
        for where, position in [((n == k) & (pos == j), j) for j in range(k)] + [((n == k), None)]:
            if where.any():
                rows.append({"n_items": k, "position": position, **rates(scores, where),
                             "logit_diff": float(scores["logit_diff"][where].mean()), "n": int(where.sum())})
    return rows


def rates(scores: dict[str, Tensor], where: Tensor | None = None) -> dict[str, float | list[float]]:
    """`accuracy` and `top1_accuracy` of the prompts in `where` (default all), each with its Wilson `_ci`."""
    out: dict[str, float | list[float]] = {}
    for name, key in (("accuracy", "correct"), ("top1_accuracy", "top1")):
        hits = scores[key] if where is None else scores[key][where]
        out[name] = float(hits.mean())
        out[f"{name}_ci"] = list(wilson(int(hits.sum()), len(hits)))
    return out


@torch.no_grad()
def item_attention(model, enc: Encoded, prompts: Sequence[LaundryPrompt], layers: Sequence[int], *,
                   batch_size: int = 8, progress: bool = False) -> Float[Tensor, "n layer head"]:
    """Attention from END to the answer's first-list token minus the mean over the other items' tokens,
    per prompt and head (a mover head attends to the item it copies). Under torchrun: sharded like `last_logits`."""
    if distributed.sharding():
        def mine(idx: list[int]) -> list[Tensor]:
            part = Encoded([enc.ids[i] for i in idx], [enc.item_positions[i] for i in idx],
                           [enc.candidates[i] for i in idx], enc.multi_token)
            return list(item_attention(model, part, [prompts[i] for i in idx], layers, batch_size=batch_size,
                                       progress=progress))

        return torch.stack(distributed.map_items(mine, len(enc.ids), lengths=[len(s) for s in enc.ids],
                                                 batch_size=batch_size))
    out = torch.zeros(len(enc.ids), len(layers), model.cfg.n_heads)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in layers]
    stop = max(layers) + 1

    def step(idx: list[int], tokens: Tensor, mask: Tensor) -> None:  # per-prompt rows: safe to repeat
        width = tokens.shape[1]
        saved = {}

        def keep(x, hook):
            saved[hook.name] = x[:, :, -1].float().cpu()

        with sdpa_attention(model, names), stopped_at(model, stop) as stop_at:
            model.run_with_hooks(tokens, attention_mask=mask, return_type=None, stop_at_layer=stop_at,
                                 fwd_hooks=[(n, keep) for n in names])
        for row, i in enumerate(idx):
            shift = width - len(enc.ids[i])
            where = torch.tensor(enc.item_positions[i]) + shift
            ans = prompts[i].position
            for j, name in enumerate(names):
                a = saved[name][row][:, where]  # [head, item]
                others = torch.cat([a[:, :ans], a[:, ans + 1:]], dim=1).mean(1)
                out[i, j] = a[:, ans] - others

    run_batches(model, enc.ids, batch_size, step, desc="item attention", progress=progress)  # OOM: halved
    return out
