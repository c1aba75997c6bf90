"""The Laundry List task (Talking Heads, Merullo et al. 2024): recall the one list item not repeated.

"I put the shirt, the socks and the towel in the laundry. I took out the socks and the shirt, and
then I took out the" → " towel". N items (2–10), the answer at any list position, the repeated
items in the same or shuffled order; four surface templates over three item vocabularies (objects,
food, names), the format the model organisms were trained on (`interp.organisms.corpus`).

Scoring at the last prompt token (END): accuracy among the N list items (argmax of the items'
logits is the answer), full-vocabulary top-1 accuracy, and the logit difference between the answer
and the strongest other item. An item is scored by the first token of " item"; when an item is
several tokens for the tokenizer this is first-token scoring (`Encoded.multi_token`), and items
sharing a first token are dropped from the pool so the items of a prompt stay distinguishable.

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

from interp.batching import padded_batches
from interp.bridge import sdpa_attention, stopped_at
from interp.controls import split, wilson
from interp.errors import UserError
from interp.organisms.corpus import LAUNDRY_TEMPLATES

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


def first_token(tokenizer, item: str) -> tuple[int, bool]:
    """(first token id of " item", whether " item" is a single token)."""
    ids = tokenizer(" " + item, add_special_tokens=False)["input_ids"]
    return ids[0], len(ids) == 1


def item_pools(tokenizer, templates: Sequence[int]) -> tuple[dict[int, list[str]], bool]:
    """Each template's items with pairwise distinct first tokens, and whether any item is multi-token."""
    pools, multi = {}, False
    for t in templates:
        seen, pool = set(), []
        for w in LAUNDRY_TEMPLATES[t][0]:
            tid, single = first_token(tokenizer, w)
            multi |= not single
            if tid not in seen:
                seen.add(tid)
                pool.append(w)
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
                            f"(a vocabulary shared by selection and held-out templates is split between them); "
                            f"lower --n-items or choose other --templates")
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
    candidates: list[list[int]]  # first token id of " item" for each item
    multi_token: bool  # some item is several tokens: scored by its first token


def encode(tokenizer, prompts: Sequence[LaundryPrompt]) -> Encoded:
    ids, positions, cands, multi = [], [], [], False
    cache: dict[str, tuple[int, bool]] = {}
    for p in prompts:
        enc = tokenizer(p.text, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        pos = []
        for start, _ in p.spans:
            hit = [i for i, (a, b) in enumerate(offsets) if a <= start < b]
            pos.append(hit[0])
        for w in p.items:
            if w not in cache:
                cache[w] = first_token(tokenizer, w)
        multi |= any(not cache[w][1] for w in p.items)
        ids.append(list(enc["input_ids"]))
        positions.append(pos)
        cands.append([cache[w][0] for w in p.items])
    return Encoded(ids, positions, cands, multi)


@torch.no_grad()
def last_logits(model, ids: Sequence[Sequence[int]], *, batch_size: int = 8, progress: bool = False,
                desc: str = "laundry list") -> Float[Tensor, "n vocab"]:
    """Next-token logits at the last token of each sequence (the unembedding runs on that position only)."""
    n_layers = model.cfg.n_layers
    out = [None] * len(ids)
    with sdpa_attention(model):
        for idx, tokens, mask in padded_batches(model, ids, batch_size, desc=desc, progress=progress):
            saved = {}

            def keep(x, hook):
                saved["x"] = x[:, -1:]

            with stopped_at(model, n_layers) as stop_at, model.hooks(
                    fwd_hooks=[(f"blocks.{n_layers - 1}.hook_resid_post", keep)]):
                model(tokens, attention_mask=mask, return_type=None, stop_at_layer=stop_at)
            logits = model.unembed(model.ln_final(saved["x"]))[:, 0].float().cpu()
            for row, i in enumerate(idx):
                out[i] = logits[row]
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
    per prompt and head (a mover head attends to the item it copies)."""
    out = torch.zeros(len(enc.ids), len(layers), model.cfg.n_heads)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in layers]
    stop = max(layers) + 1
    for idx, tokens, mask in padded_batches(model, enc.ids, batch_size, desc="item attention", progress=progress):
        width = tokens.shape[1]
        saved = {}

        def keep(x, hook):
            saved[hook.name] = x[:, :, -1].float().cpu()

        with stopped_at(model, stop) as stop_at:
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
    return out
