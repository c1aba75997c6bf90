"""Skill unlearning (Li, Sun, Weng 2025, *Effective Skill Unlearning through Intervention and Abstention*).

Two training-free ways to remove one skill (the forget skill) while keeping others (the retain skills):

- Neuron Adjust (NA): per-neuron mean and std of every layer's MLP gate pre-activation over all tokens
  of each skill (streamed); the global top p % of μ_forget − μ_retain over all layers are selected; at
  inference each selected value is moved to the retain distribution (reflected z-score) with the forget
  class's posterior probability. Control: as many random, never-selected neurons per layer as the
  selection (matched on layer: the selection sits mostly in the last layer), several draws, mean ± sd.
- Key Space Detection (KSD): the last layer's key vectors (the input of `down_proj`) at the last prompt
  token of the forget skill's selection prompts span a hypercube μ ± k·σ (k the smallest enclosing them); a
  query abstains (is scored wrong) when the key vector at the last position of a generation forward (the
  prompt or a generated token, never the gold continuation) falls inside μ ± h·k·σ; h is given or picked on
  the selection split's prompts. True / false positive rates on held-out forget / retain queries.

Each skill's items are split (`interp.controls.split`) into a selection half (statistics, neuron selection,
the hypercube and h) and a held-out half; accuracy (greedy generation, checked answer, Wilson interval) and
the mean log-probability per token of the gold continuation (teacher-forced) are measured on the held-out
half before and after each method, and the log-probability on the selection half too (in-sample).
Method note, defaults and deviations: docs/skill_unlearning.md.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float

from interp import distributed, stages
from interp.analysis import CommonConfig, not_applicable, require, run_header, skip_layers, warn
from interp.capture import capture
from interp.controls import ControlUnavailable, Draws, control_row, split, wilson
from interp.cost import announce, sequence_cost
from interp.datasets import load_skill
from interp.errors import UserError
from interp.mlp import neuron_mlps, require_generation, shared_experts_by_position
from interp.report import analysis_report
from interp.skills import SkillItem, is_correct
from interp.tokens import Joint, bos_id, encode, encode_joint
from interp.unlearning import (
    AdjustSpec,
    Hypercube,
    RunningMoments,
    Watch,
    check_gate_hook,
    gate_hook,
    gate_moments,
    greedy_generate,
    key_space_watch,
    neuron_adjust,
    neuron_draws,
    pick_h,
    select_neurons,
    target_logprobs,
)

DATASET_FIELD = "forget"
METHODS = ("neuron_adjust", "random_neurons", "key_space")
ITEM_STRIDE = 1_000_000  # global item id = skill index * ITEM_STRIDE + item index (seeds NA's draws)
SELECTION_OFFSET = ITEM_STRIDE // 2  # selection items' ids follow the held-out ones within a skill


@dataclass
class Config(CommonConfig):
    """Defaults follow the paper and its reference code (Li et al. 2025) unless a comment says otherwise."""

    # skill to unlearn: a registered skill set (--list) or a JSONL file (FILE or FILE:SKILL) (paper: GSM8K, MBPP, MLQA
    # languages)
    forget: str = "gsm8k"
    # comma-separated skills to keep, pooled for the retain statistics (paper: MBPP when forgetting GSM8K)
    retain: str = "mbpp"
    # Neuron Adjust: percent of all gate neurons (pooled over layers) selected by mu_forget - mu_retain (paper: 3
    # math/code, 0.5 languages)
    top_percent: float = 3.0
    # Key Space Detection: hypercube half-width h*k*sigma (default: picked on the selection split's prompts; paper's
    # fixed values: 2 GSM8K, 1.4 MBPP, 0.06 MLQA)
    h: float | None = None
    n_probe: int = 200  # selection items per skill: statistics, neuron selection, the hypercube and h (paper N = 200)
    n_eval: int = 100  # held-out items per skill for the before/after evaluation
    # random-neuron control: draws of as many random neurons per layer as selected (mean and sd reported)
    random_draws: int = 5
    # reproduce the reference code's Neuron Adjust quirks (variance as std, sigma_forget = mu_forget, one draw per
    # forward)
    reference: bool = False
    # greedy generation length for accuracy (paper: 256 GSM8K/MBPP, 24 MLQA; items may cap it lower). Generation
    # runs with Neuron Adjust's hooks, so it stays on the local model (KV-cached), never on a server
    max_new_tokens: int = 256
    top_neurons_shown: int = 4  # selected neurons whose activation histograms the report shows
    # a BOS first in every input: unset, where the model's own tokenizer adds one (as trained; the reference code
    # tokenizes with the default call); --bos always (a BOS-like token where it adds none); --no-bos never
    bos: bool | None = None

    def validate(self, model=None) -> None:
        super().validate(model)
        require(0 < self.top_percent <= 100, f"top-percent must be in (0, 100]; got {self.top_percent}")
        require(self.h is None or self.h > 0, f"h must be positive; got {self.h}")
        require(self.n_probe >= 2, f"n-probe must be at least 2 (the hypercube needs a std); got {self.n_probe}")
        for name in ("n_eval", "max_new_tokens", "top_neurons_shown"):
            require(getattr(self, name) >= 1, f"{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        require(bool(self.forget.strip()), "forget must name a skill set or a JSONL file")
        retain = self.retain_skills
        require(bool(retain), "retain must name at least one skill (comma-separated)")
        require(self.forget not in retain,
                f"the forget skill {self.forget!r} is also in --retain; pick other retain skills")
        require(len(set(retain)) == len(retain), "retain names a skill twice")

    @property
    def retain_skills(self) -> list[str]:
        return [s.strip() for s in self.retain.split(",") if s.strip()]


@dataclass
class Result:
    header: dict
    selected_neurons: dict
    evaluation: list[dict]
    key_space: dict
    statistics: dict
    per_item: pd.DataFrame
    key_scores: pd.DataFrame
    top_values: dict  # "layer.neuron" -> skill -> list of held-out activation values
    warnings: list[str] = field(default_factory=list)
    skipped_layers: dict[int, str] = field(default_factory=dict)  # layer → what was not read there and why

    def to_dict(self) -> dict:
        return {**self.header, "warnings": self.warnings, "skipped_layers": self.skipped_layers,
                "selected_neurons": self.selected_neurons,
                "evaluation": self.evaluation, "key_space": self.key_space, "statistics": self.statistics}

    def tables(self) -> dict[str, pd.DataFrame]:
        return {"evaluation": pd.DataFrame(self.evaluation),
                "selected_neurons": pd.DataFrame(self.selected_neurons["neurons"]),
                "selected_per_layer": pd.DataFrame(self.selected_neurons["per_layer"]),
                "items": self.per_item, "key_scores": self.key_scores}


def preflight(config: Config) -> None:
    """Check options and user skill files before the model loads (registered sets load in `run`)."""
    config.validate()
    for spec in [config.forget, *config.retain_skills]:
        if spec.split(":")[0].lower().endswith(".jsonl"):
            load_skill(spec)


# --------------------------------------------------------------------------- data

@dataclass
class SkillSplit:
    name: str
    role: str  # "forget" | "retain"
    selection: list[SkillItem]
    held_out: list[SkillItem]


def load_splits(config: Config) -> list[SkillSplit]:
    """Each skill's items (at most n_probe + n_eval, or --limit), split by `interp.controls.split` in the
    ratio n_probe : n_eval (seeded)."""
    want = config.n_probe + config.n_eval
    total = min(want, config.limit) if config.limit else want
    out = []
    for role, name in [("forget", config.forget)] + [("retain", s) for s in config.retain_skills]:
        items = load_skill(name, limit=total)
        if len(items) < 2:
            raise UserError(f"skill {name!r} has {len(items)} item(s); it needs at least 2 (one to select on, "
                            "one held out)")
        halves = split(len(items), config.n_probe / want, config.seed)
        selection, held_out = [items[i] for i in halves.selection], [items[i] for i in halves.held_out]
        if role == "forget" and len(selection) < 2:
            raise UserError(f"the forget skill {name!r} needs at least 2 probe items for the hypercube's std; "
                            "give more items or raise --n-probe")
        out.append(SkillSplit(name, role, selection, held_out))
    return out


def _encode(tok, texts: list[str], bos: bool | None = None) -> list[list[int]]:
    """Each text's ids with the BOS the `bos` option gives (`interp.tokens.encode`)."""
    first = bos_id(tok, bos)
    ids = [encode(tok, t, bos=bos) for t in texts]
    if any(len(i) == (first is not None) for i in ids):
        raise UserError("a skill item's prompt or target is empty after tokenization")
    return ids


def _encode_joint(tok, items: list[SkillItem], bos: bool | None = None) -> list[Joint]:
    """Prompt + gold continuation of each item tokenized in one call and split at the boundary by character offsets
    (`interp.tokens.encode_joint`; two separate calls would put a bare `▁` at the joint on SentencePiece tokenizers)."""
    joints = [encode_joint(tok, i.prompt, i.target, bos=bos) for i in items]
    if any(not j.continuation_ids for j in joints):
        raise UserError("a skill item's target is empty after tokenization")
    return joints


@dataclass
class Batch:
    """Items of every skill, one list, with global ids (they seed Neuron Adjust's draws).

    `prompts`: each prompt as the model is asked it (tokenized alone; generation and the key vectors start there).
    `contexts` + `targets`: prompt + gold continuation tokenized in one call and split at the boundary (teacher
    forcing scores `targets` after `contexts`); `contexts` equals `prompts` unless a token straddles the joint."""

    items: list[SkillItem]
    skills: list[str]
    roles: list[str]
    ids: list[int]
    prompts: list[list[int]]
    contexts: list[list[int]]
    targets: list[list[int]]

    @classmethod
    def of(cls, tok, splits: list[SkillSplit], half: str, bos: bool | None = None) -> Batch:
        items, skills, roles, ids = [], [], [], []
        for si, s in enumerate(splits):
            for j, item in enumerate(getattr(s, half)):
                items.append(item)
                skills.append(s.name)
                roles.append(s.role)
                ids.append(si * ITEM_STRIDE + (SELECTION_OFFSET if half == "selection" else 0) + j)
        joints = _encode_joint(tok, items, bos)
        return cls(items, skills, roles, ids, _encode(tok, [i.prompt for i in items], bos),
                   [j.prompt_ids for j in joints], [j.continuation_ids for j in joints])

    def rows(self, skill: str) -> list[int]:
        return [j for j, name in enumerate(self.skills) if name == skill]


# --------------------------------------------------------------------------- evaluation

def _accuracy(items: list[SkillItem], generated: list[str], abstained: list[bool] | None = None) -> list[float]:
    """1/0 per item (NaN for check "none"); an abstained item counts as wrong."""
    out = []
    for j, (item, text) in enumerate(zip(items, generated)):
        ok = is_correct(item, text)
        out.append(float("nan") if ok is None else float(bool(ok) and not (abstained and abstained[j])))
    return out


def _logprobs(model, batch: Batch, config: Config) -> list[float]:
    """Mean log-probability per token of each item's gold continuation (teacher-forced)."""
    return target_logprobs(model, batch.contexts, batch.targets, batch.ids, batch_size=config.batch_size,
                           progress=config.progress).tolist()


def _generate(model, batch: Batch, config: Config, mask: list[bool], setting: dict, *, spec: AdjustSpec | None = None,
              watch: Watch | None = None) -> tuple[list[str | None], list[bool | None]]:
    """Greedy continuation of every item where `mask` (None elsewhere), and whether it hit its token limit
    without EOS (truncated; None where not generated). Stored per item (`interp.stages`, stage "generation") under
    `setting` (what the hooks active around it depend on): with `spec` (Neuron Adjust active) each chunk's count
    of replaced values, with `watch` (`key_space_watch` active) each item's flags, so a reused item counts as a
    generated one."""
    sel = [j for j, g in enumerate(mask) if g]
    texts: list[str | None] = [None] * len(batch.items)
    truncated: list[bool | None] = [None] * len(batch.items)
    if not sel:
        return texts, truncated
    limits = [min(config.max_new_tokens, batch.items[j].max_new_tokens or config.max_new_tokens) for j in sel]
    replaced = list(spec.replaced) if spec is not None else None

    def generate_chunk(idx: list[int], rows: list[int]) -> list[dict]:
        counted = list(spec.replaced) if spec is not None else None
        new = greedy_generate(model, [batch.prompts[j] for j in rows], [batch.ids[j] for j in rows],
                              [limits[i] for i in idx], batch_size=config.batch_size, progress=config.progress,
                              state=[s for s in (spec and spec.replaced, watch) if s is not None])
        out = [{"ids": list(t), "truncated": cut} for t, cut in zip(new, new.truncated)]
        if spec is not None:  # the chunk's count over every rank (torchrun: each counted its shard), on its first item
            delta = distributed.all_reduce_sum(torch.tensor([a - b for a, b in zip(spec.replaced, counted)]))
            for k, o in enumerate(out):
                o["replaced"] = delta.tolist() if k == 0 else [0, 0]
        if watch is not None:  # under torchrun a rank holds its shard's flags until the watch ends: gather them
            ids = [batch.ids[j] for j in rows]
            flags = distributed.merge_objects({i: (watch.prefill[i], watch.any_step[i]) for i in ids
                                               if i in watch.any_step}, lambda a, b: {**a, **b})
            for i, o in zip(ids, out):
                o["prefill"], o["any_step"] = flags[i]
        return out

    key = {"version": 1, "model": stages.model_key(model), "setting": setting, "limits": limits,
           "prompts": stages.digest([batch.prompts[j] for j in sel]), "item_ids": [batch.ids[j] for j in sel]}
    got = stages.current().items("generation", key, sel, generate_chunk, stages.CHUNK_BATCHES * config.batch_size)
    for j, g in zip(sel, got):
        texts[j], truncated[j] = model.tokenizer.decode(g["ids"], skip_special_tokens=True), g["truncated"]
        if watch is not None:
            watch.prefill[batch.ids[j]], watch.any_step[batch.ids[j]] = g["prefill"], g["any_step"]
    if spec is not None:  # the stored chunks' counts: the same total whether generated now or reused; under
        # torchrun rank 0 carries it (neuron_adjust adds the ranks' counts up when it ends)
        total = [sum(g["replaced"][k] for g in got) if distributed.is_main() else 0 for k in range(len(replaced))]
        spec.replaced[:] = [r + t for r, t in zip(replaced, total)]
    return texts, truncated


def _spec_key(spec: AdjustSpec) -> str:
    """A digest of what Neuron Adjust's hooks do (neurons, statistics, mode, seed, hooks; not its running count)."""
    return stages.digest({f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.name != "replaced"})


def _count(flags: list[bool | None], rows: list[int]) -> int:
    """Items of `rows` flagged True (truncated generations)."""
    return sum(bool(flags[j]) for j in rows)


def _generated(flags: list[bool | None], rows: list[int]) -> int:
    """Items of `rows` that were generated at all."""
    return sum(flags[j] is not None for j in rows)


def _nanmean(xs) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return float(np.mean(xs)) if xs else float("nan")


def _rate_ci(flags: list[float]) -> list[float]:
    """Wilson interval of the share of 1s among the defined (non-NaN) 1/0 values."""
    defined = [f for f in flags if not math.isnan(f)]
    return list(wilson(int(sum(defined)), len(defined)))


def _drop(before: float, after: float) -> float:
    """The paper's percentage of performance drop, 1 − after/before (NaN when before is 0)."""
    return 1 - after / before if before and not math.isnan(before) else float("nan")


def _control_draws(neurons: torch.Tensor, n_layers: int, d_mlp: int, config: Config, warnings: list[str],
                   widths: list[int] | None = None) -> Draws:
    """Layer-matched random neuron sets; drawn over all layers (with a warning) where a layer has too few."""
    try:
        return neuron_draws(neurons, n_layers, d_mlp, draws=config.random_draws, seed=config.seed, widths=widths)
    except ControlUnavailable as e:
        warn(warnings, f"random-neuron control not matched on layer ({e}); drawn over all layers instead")
    try:
        return neuron_draws(neurons, n_layers, d_mlp, draws=config.random_draws, seed=config.seed, matched_on="none",
                            widths=widths)
    except ControlUnavailable:
        raise UserError(f"top-percent {config.top_percent} leaves too few unselected neurons for a random control; "
                        "lower --top-percent") from None


def _rates(flags: list[bool], rows: list[int]) -> tuple[float, list[float]]:
    """Share of `rows` flagged, and its Wilson interval."""
    k = sum(bool(flags[j]) for j in rows)
    return (k / len(rows) if rows else float("nan")), list(wilson(k, len(rows)))


def _inside_rates(scores: Float[torch.Tensor, " n"], threshold: float) -> tuple[float, list[float]]:
    inside = (scores <= threshold).tolist()
    return _rates(inside, list(range(len(inside))))


def run(model, config: Config | None = None) -> Result:
    """Statistics, selection and h on the selection half; effects of NA / random neurons / KSD on the held-out half."""
    with shared_experts_by_position(model):  # MoE layers' shared-expert hooks shaped [batch, pos, ·]
        return _run(model, config)


def _run(model, config: Config | None = None) -> Result:
    config = config or Config()
    config.validate(model)
    require_generation(model, "skill_unlearning")
    warnings: list[str] = []
    skipped: dict[int, str] = {}
    tok = model.tokenizer
    n_layers, d_mlp = model.cfg.n_layers, model.cfg.d_mlp
    # the neurons read: a dense layer's MLP; an MoE layer's shared expert (its routed experts' neurons fire only on
    # the tokens routed to them), none in an MoE layer without one
    mlps, left_out = neuron_mlps(model)
    if not mlps:
        raise not_applicable("skill_unlearning", model, "mixture-of-experts MLPs without a shared expert: no MLP "
                                                        "neuron sees every token")
    skip_layers(skipped, warnings, left_out, "MLP neurons")
    key_layer = max(mlps)
    if key_layer != n_layers - 1:
        warn(warnings, f"Key Space Detection reads layer {key_layer}'s key vectors, the last layer with dense MLP "
                       f"neurons (the paper: the last layer, {n_layers - 1})")
    widths = [mlps[layer].width if layer in mlps else 0 for layer in range(n_layers)]
    gate_hooks = {layer: m.gate_hook for layer, m in mlps.items()}
    splits = load_splits(config)
    texts = {s.name: _encode(tok, [i.text for i in s.selection], config.bos) for s in splits}
    hook_diff = max(check_gate_hook(model, texts[splits[0].name][0], layer, mlps[layer])
                    for layer in sorted({min(mlps), key_layer}))
    if hook_diff > 1e-4:
        warn(warnings, f"the bridge's gate hook differs from a raw hook on the HF gate_proj output (max |diff| "
                       f"{hook_diff:.3g}): the statistics may be wrong")

    announce("gate statistics", *sequence_cost([t for ts in texts.values() for t in ts]),
             f"every layer's gate pre-activation streamed, batch {config.batch_size}", enabled=config.progress)
    def statistics(idx: list[int], names: list[str]) -> list[dict]:  # one split's moments (a streamed sum) per item
        return [dataclasses.asdict(gate_moments(model, texts[n], batch_size=config.batch_size, progress=config.progress,
                                                desc=f"statistics {n}", mlps=mlps)) for n in names]

    key = {"version": 1, "model": stages.model_key(model), "texts": stages.digest(texts),
           "gates": {layer: [m.gate_hook, m.width] for layer, m in mlps.items()}}
    names = [s.name for s in splits]
    moments = {n: RunningMoments(**m) for n, m in zip(names, stages.current().items("statistics", key, names,
                                                                                   statistics, 1))}
    forget = moments[config.forget]
    retain = moments[config.retain_skills[0]]
    for name in config.retain_skills[1:]:
        retain = retain.merge(moments[name])
    delta = forget.mean - retain.mean
    exists = torch.arange(delta.shape[1])[None, :] < torch.tensor(widths)[:, None]  # layers / neurons read
    delta = delta.masked_fill(~exists, float("-inf"))
    neurons = select_neurons(delta, config.top_percent)
    draws = _control_draws(neurons, n_layers, d_mlp, config, warnings, widths)

    # Key Space Detection: hypercube on the forget selection prompts' last-token key vectors; h on the selection half
    khook = mlps[key_layer].key_hook
    sel, held = Batch.of(tok, splits, "selection", config.bos), Batch.of(tok, splits, "held_out", config.bos)
    sel_keys = capture(model, sel.prompts, [khook], batch_size=config.batch_size, progress=config.progress)[khook]
    forget_sel, retain_sel = sel.rows(config.forget), [j for j, r in enumerate(sel.roles) if r == "retain"]
    cube = Hypercube.fit(sel_keys[forget_sel])
    sel_scores = cube.score(sel_keys)
    h = config.h if config.h is not None else pick_h(cube.k, sel_scores[forget_sel], sel_scores[retain_sel])
    held_keys = capture(model, held.prompts, [khook], batch_size=config.batch_size, progress=config.progress)[khook]
    key_scores = cube.score(held_keys)

    every = [True] * len(held.items)
    checkable = [i.check != "none" for i in held.items]
    settings = 2 + len(draws)  # before, Neuron Adjust, each random draw
    forwards, tokens, longest = sequence_cost([c + t for b in (held, sel) for c, t in zip(b.contexts, b.targets)],
                                              settings)
    announce("log-likelihood (teacher-forced)", forwards, tokens, longest,
             f"{settings} settings × held-out + selection items, logits of the gold continuation in chunks",
             enabled=config.progress)
    limits = [min(config.max_new_tokens, i.max_new_tokens or config.max_new_tokens) for i in held.items]
    announce("generation", settings * len(held.items), settings * sum(limits), None,
             f"{settings} settings × {len(held.items)} held-out items × up to {config.max_new_tokens} new tokens, "
             f"KV-cached, batch {config.batch_size}", enabled=config.progress)
    lp0, sel_lp0 = _logprobs(model, held, config), _logprobs(model, sel, config)
    with key_space_watch(model, cube, h, khook) as watch:  # only generation forwards count, never the gold continuation
        text0, cut0 = _generate(model, held, config, every, {"key_space_watch": stages.digest([cube, h, khook])},
                                watch=watch)
    abstain = [watch.any_step[i] for i in held.ids]
    prefill = [watch.prefill[i] for i in held.ids]
    acc0 = _accuracy(held.items, text0)
    acc_ksd = _accuracy(held.items, text0, abstain)

    spec = AdjustSpec.from_moments(neurons, forget, retain, reference=config.reference, seed=config.seed,
                                   hooks=gate_hooks)
    with neuron_adjust(model, spec):
        lp_na, sel_lp_na = _logprobs(model, held, config), _logprobs(model, sel, config)
        text_na, cut_na = _generate(model, held, config, checkable, {"neuron_adjust": _spec_key(spec)}, spec=spec)
    acc_na = _accuracy(held.items, [t or "" for t in text_na])

    rand_lp, rand_sel_lp, rand_acc, rand_cut = [], [], [], []
    for d, pairs in enumerate(draws):
        rspec = AdjustSpec.from_moments(torch.tensor(pairs), forget, retain, reference=config.reference,
                                        seed=config.seed + 1 + d, hooks=gate_hooks)
        with neuron_adjust(model, rspec):
            rand_lp.append(_logprobs(model, held, config))
            rand_sel_lp.append(_logprobs(model, sel, config))
            rand_text, cut = _generate(model, held, config, checkable, {"neuron_adjust": _spec_key(rspec)},
                                       spec=rspec)
            rand_acc.append(_accuracy(held.items, [t or "" for t in rand_text]))
            rand_cut.append(cut)

    top = neurons[delta[neurons[:, 0], neurons[:, 1]].argsort(descending=True)[:config.top_neurons_shown]]
    top_values = _top_values(model, splits, top, tok, config, gate_hooks)

    evaluation = []
    for s in splits:
        rows, srows = held.rows(s.name), sel.rows(s.name)

        def pick(xs: list, at: list[int] = rows) -> list:
            return [xs[j] for j in at]
        base = dict(skill=s.name, role=s.role, accuracy_before=_nanmean(pick(acc0)),
                    accuracy_before_ci=_rate_ci(pick(acc0)), logprob_before=_nanmean(pick(lp0)), n=len(rows),
                    logprob_before_selection=_nanmean(pick(sel_lp0, srows)), n_selection=len(srows),
                    truncated_before=_count(cut0, rows))
        evaluation.append(dict(method="neuron_adjust", **base, accuracy_after=_nanmean(pick(acc_na)),
                               accuracy_after_ci=_rate_ci(pick(acc_na)), logprob_after=_nanmean(pick(lp_na)),
                               logprob_after_selection=_nanmean(pick(sel_lp_na, srows)),
                               truncated_after=_count(cut_na, rows), generated_after=_generated(cut_na, rows)))
        control = control_row({"accuracy_after": [_nanmean(pick(a)) for a in rand_acc],
                               "logprob_after": [_nanmean(pick(lp)) for lp in rand_lp],
                               "logprob_after_selection": [_nanmean(pick(lp, srows)) for lp in rand_sel_lp]}, draws)
        evaluation.append(dict(method="random_neurons", **base, **control, draws=len(draws),
                               truncated_after=_nanmean([_count(c, rows) for c in rand_cut]),
                               truncated_after_draws=[_count(c, rows) for c in rand_cut],
                               generated_after=_generated(cut_na, rows)))
        evaluation.append(dict(method="key_space", **base, accuracy_after=_nanmean(pick(acc_ksd)),
                               accuracy_after_ci=_rate_ci(pick(acc_ksd)), logprob_after=float("nan"),
                               logprob_after_selection=float("nan"), abstained=float(np.mean(pick(abstain))),
                               abstained_prefill=float(np.mean(pick(prefill))),
                               truncated_after=_count(cut0, rows), generated_after=len(rows)))
    for row in evaluation:
        row["accuracy_drop"] = _drop(row["accuracy_before"], row["accuracy_after"])
        row["logprob_change"] = row["logprob_after"] - row["logprob_before"]
        row["logprob_change_selection"] = row["logprob_after_selection"] - row["logprob_before_selection"]

    forget_rows = [j for j, r in enumerate(held.roles) if r == "forget"]
    retain_rows = [j for j, r in enumerate(held.roles) if r == "retain"]
    (tpr, tpr_ci), (fpr, fpr_ci) = _rates(abstain, forget_rows), _rates(abstain, retain_rows)
    (tpr_p, tpr_p_ci), (fpr_p, fpr_p_ci) = _rates(prefill, forget_rows), _rates(prefill, retain_rows)
    (tpr_s, tpr_s_ci), (fpr_s, fpr_s_ci) = (_inside_rates(sel_scores[forget_sel], h * cube.k),
                                            _inside_rates(sel_scores[retain_sel], h * cube.k))
    key_space = {"k": cube.k, "tpr": tpr, "fpr": fpr, "n_forget": len(forget_rows), "n_retain": len(retain_rows),
                 "h": h, "tpr_prefill": tpr_p, "fpr_prefill": fpr_p,
                 "h_rule": "fixed" if config.h is not None else "selection",
                 "tpr_ci": tpr_ci, "fpr_ci": fpr_ci, "tpr_prefill_ci": tpr_p_ci, "fpr_prefill_ci": fpr_p_ci,
                 "selection": {"tpr": tpr_s, "fpr": fpr_s, "tpr_ci": tpr_s_ci, "fpr_ci": fpr_s_ci,
                               "n_forget": len(forget_sel), "n_retain": len(retain_sel)}}

    neuron_rows = [{"layer": int(layer), "neuron": int(n), "mu_forget": float(forget.mean[layer, n]),
                    "mu_retain": float(retain.mean[layer, n]), "delta": float(delta[layer, n]),
                    "sd_forget": float(forget.std[layer, n]), "sd_retain": float(retain.std[layer, n])}
                   for layer, n in neurons.tolist()]
    counts = torch.bincount(neurons[:, 0], minlength=n_layers).tolist()
    selected = {"per_layer": [{"layer": layer, "count": c} for layer, c in enumerate(counts)], "neurons": neuron_rows,
                "mlp_per_layer": [{"layer": layer, "mlp": mlps[layer].kind if layer in mlps else None,
                                   "neurons": widths[layer]} for layer in range(n_layers)],
                "top_percent": config.top_percent, "n_selected": len(neuron_rows), "n_total": sum(widths),
                "threshold": float(delta[neurons[:, 0], neurons[:, 1]].min()),
                "replaced_share": spec.replaced_share,
                "forget_mean_positive_share": float((forget.mean[neurons[:, 0], neurons[:, 1]] > 0).float().mean())}
    tokens = {name: m.count for name, m in moments.items()}
    statistics = {"tokens": tokens, "probe_items": {s.name: len(s.selection) for s in splits},
                  "eval_items": {s.name: len(s.held_out) for s in splits},
                  "selection_items": {s.name: len(s.selection) for s in splits},
                  "held_out_items": {s.name: len(s.held_out) for s in splits},
                  "state_bytes_per_skill": forget.nbytes,
                  "truncated": {"max_new_tokens": config.max_new_tokens,
                                "before": {s.name: _count(cut0, held.rows(s.name)) for s in splits},
                                "neuron_adjust": {s.name: _count(cut_na, held.rows(s.name)) for s in splits},
                                "random_neurons": {s.name: [_count(c, held.rows(s.name)) for c in rand_cut]
                                                   for s in splits},
                                "generated_before": {s.name: len(held.rows(s.name)) for s in splits},
                                "generated_after": {s.name: _generated(cut_na, held.rows(s.name)) for s in splits}},
                  "full_cache_bytes": {name: n * sum(widths) * 4 for name, n in tokens.items()},
                  "gate_hook_max_abs_diff_vs_hf": hook_diff}
    per_item = pd.DataFrame({"skill": held.skills, "role": held.roles, "prompt": [i.prompt for i in held.items],
                             "answer": [i.answer for i in held.items], "generated_before": text0,
                             "truncated_before": cut0, "truncated_neuron_adjust": cut_na,
                             "correct_before": acc0, "logprob_before": lp0, "generated_neuron_adjust": text_na,
                             "correct_neuron_adjust": acc_na, "logprob_neuron_adjust": lp_na,
                             "key_score": key_scores.tolist(), "abstained_prefill": prefill, "abstained": abstain})
    key_table = pd.DataFrame({"skill": held.skills + sel.skills, "role": held.roles + sel.roles,
                              "split": ["held_out"] * len(held.items) + ["selection"] * len(sel.items),
                              "score": key_scores.tolist() + sel_scores.tolist()})
    header = run_header("skill_unlearning", model, config)
    return Result(header, selected, evaluation, key_space, statistics, per_item, key_table, top_values, warnings,
                  skipped)


def _top_values(model, splits: list[SkillSplit], top: torch.Tensor, tok, config: Config,
                hooks: dict[int, str] | None = None, cap: int = 4000) -> dict:
    """Held-out gate values of the `top` neurons at every token, per skill (at most `cap` per skill); `hooks`: each
    layer's gate hook where it is not blocks.L.mlp.hook_pre (an MoE layer's shared expert)."""
    hooks = hooks or {}
    layers = sorted(set(top[:, 0].tolist()))
    out: dict[str, dict[str, list[float]]] = {f"{layer}.{n}": {} for layer, n in top.tolist()}
    for s in splits:
        cols = {hooks.get(layer, gate_hook(layer)): top[top[:, 0] == layer, 1] for layer in layers}
        got = capture(model, _encode(tok, [i.text for i in s.held_out], config.bos), list(cols), positions="all",
                      batch_size=config.batch_size, progress=False, reduce=lambda name, x: x[:, cols[name]])
        for layer in layers:
            name = hooks.get(layer, gate_hook(layer))
            vals = torch.cat(got[name])[:cap]
            for c, n in enumerate(cols[name].tolist()):
                out[f"{layer}.{n}"][s.name] = vals[:, c].tolist()
    return out


# --------------------------------------------------------------------------- report

def per_layer_figure(selected: dict):
    import plotly.graph_objects as go

    rows = selected["per_layer"]
    fig = go.Figure(go.Bar(x=[r["layer"] for r in rows], y=[r["count"] for r in rows], marker_color="#d62728"))
    fig.update_layout(title=f"Selected neurons per layer (top {selected['top_percent']}% of mu_forget - mu_retain)",
                      xaxis_title="layer", yaxis_title="neurons")
    return fig


def distribution_figure(top_values: dict, forget: str):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    names = list(top_values)
    fig = make_subplots(rows=1, cols=max(1, len(names)), subplot_titles=[f"layer.neuron {n}" for n in names])
    colours = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    for c, name in enumerate(names, start=1):
        for k, (skill, vals) in enumerate(top_values[name].items()):
            fig.add_trace(go.Histogram(x=vals, name=skill + (" (forget)" if skill == forget else ""), opacity=0.55,
                                       histnorm="probability density", marker_color=colours[k % len(colours)],
                                       legendgroup=skill, showlegend=c == 1), row=1, col=c)
    fig.update_layout(barmode="overlay",
                      title="Gate pre-activation of the top selected neurons, held-out tokens per skill")
    return fig


def key_figure(key_scores: pd.DataFrame, threshold: float):
    import plotly.graph_objects as go

    fig = go.Figure()
    for skill, df in key_scores[key_scores["split"] == "held_out"].groupby("skill", sort=False):
        s = np.sort(df["score"].to_numpy())
        fig.add_trace(go.Scatter(x=s, y=np.arange(1, len(s) + 1) / len(s), mode="lines", line_shape="hv",
                                 name=f"{skill} ({df['role'].iloc[0]})"))
    fig.add_vline(x=threshold, line_dash="dash", annotation_text="h·k")
    fig.update_layout(title="Held-out prompts inside the forget hypercube μ ± m·σ "
                            "(last-layer key vector, last prompt token)",
                      xaxis_title="multiplier m (max over dims of |x − μ| / σ)", yaxis_title="share of prompts inside",
                      xaxis_type="log")
    return fig


def _ci(interval: list[float]) -> str:
    return f"[{interval[0]:.2f}, {interval[1]:.2f}]"


def _matching(evaluation: list[dict]) -> str:
    """How the random control was drawn, in words (from its rows' matched_on and strata)."""
    row = next(r for r in evaluation if r["method"] == "random_neurons")
    if row["matched_on"] != "layer":
        return "over all layers (not matched on layer: see the warnings)"
    return "in each layer as the selection (" + ", ".join(f"layer {k}: {v}" for k, v in row["strata"].items()) + ")"


def build_report(result: Result, tokenizer=None):
    from interp.figures import intervention_bars

    cfg = result.header["config"]
    rep = analysis_report(result.header, result.warnings)
    ev = pd.DataFrame(result.evaluation)
    forget = ev[ev.role == "forget"].set_index("method")
    retain = ev[ev.role == "retain"].groupby("method")[["accuracy_after", "logprob_change", "accuracy_drop"]].mean()
    ks = result.key_space
    rep.add_metrics({
        "forget skill": cfg["forget"], "retain skills": cfg["retain"],
        "selected neurons": f"{result.selected_neurons['n_selected']} of {result.selected_neurons['n_total']}",
        "NA: forget log-prob change": forget.loc["neuron_adjust", "logprob_change"],
        "random: forget log-prob change": forget.loc["random_neurons", "logprob_change"],
        "NA: retain log-prob change (mean)": retain.loc["neuron_adjust", "logprob_change"],
        "KSD: TPR / FPR (held out)": f"{ks['tpr']:.2f} / {ks['fpr']:.2f}",
    })
    rep.add_heading("Before and after, held-out items")
    rep.add_paragraph("Accuracy: greedy generation, answer checked per skill (a KSD abstention counts as wrong). "
                      "Log-prob: mean log-probability per token of the gold continuation, teacher-forced; it moves "
                      "even where accuracy is near zero (the _selection columns: the same on the selection half, "
                      "in-sample). accuracy_drop is the paper's 1 − after/before; [lo, hi] are 95 % Wilson intervals. "
                      "The random control adjusts as many random, never-selected neurons "
                      f"{_matching(result.evaluation)}, {cfg['random_draws']} draws, mean ± sd.")
    cut = result.statistics.get("truncated")
    if cut:
        def per_skill(counts: dict, of: dict) -> str:
            return ", ".join(f"{k}: {counts[k]}/{of[k]}" for k in counts)
        rand = {k: f"{np.mean(v):.1f}" if v else "—" for k, v in cut["random_neurons"].items()}
        rep.add_paragraph(f"Truncated generations (hit the {cut['max_new_tokens']}-token limit, or an item's own, "
                          "without EOS; scored on the text they reached, counted in truncated_before / "
                          f"truncated_after): before {per_skill(cut['before'], cut['generated_before'])}; "
                          f"Neuron Adjust {per_skill(cut['neuron_adjust'], cut['generated_after'])}; random neurons "
                          f"(mean per draw) {per_skill(rand, cut['generated_after'])}. A change in accuracy that "
                          "comes with many more truncations may be a change in length, not in skill.")
    shown = ev.drop(columns=[c for c in ev if c in ("draws", "strata", "matched_on") or c.endswith("_draws")])
    for c in [c for c in shown if c.endswith("_ci")]:
        shown[c] = [_ci(v) if isinstance(v, list) and not math.isnan(v[0]) else None for v in shown[c]]
    shown = shown.astype(object).where(shown.notna(), "—")
    rep.add_table(shown, caption="evaluation (results.json 'evaluation'; — = not defined: no checkable answer, "
                                 "no model change under KSD, or not a random control)")
    rows = []
    for _, r in ev[ev.method != "key_space"].iterrows():
        rows.append({"label": f"{r.skill} ({r.role})",
                     "selection": "selected" if r.method == "neuron_adjust" else "random",
                     "logprob_change": r.logprob_change, "logprob_change_sd": r.get("logprob_after_sd"),
                     "accuracy_after": r.accuracy_after, "accuracy_after_sd": r.get("accuracy_after_sd")})
    rep.add_figure(intervention_bars(rows, ["logprob_change", "accuracy_after"],
                                     title="Neuron Adjust (selected) vs random neurons",
                                     titles=["log-prob change per token", "accuracy after"]))
    rep.add_heading("Selected neurons")
    rep.add_paragraph(f"Top {cfg['top_percent']}% of all gate neurons by μ_forget − μ_retain, pooled over layers "
                      f"(threshold Δ ≥ {result.selected_neurons['threshold']:.3g}); probe split only. Share of the "
                      f"selected neurons' held-out values that Neuron Adjust replaced: "
                      f"{result.selected_neurons['replaced_share']:.3f}.")
    rep.add_figure(per_layer_figure(result.selected_neurons))
    if result.top_values:
        rep.add_figure(distribution_figure(result.top_values, cfg["forget"]))
    rep.add_table(pd.DataFrame(result.selected_neurons["neurons"]).sort_values("delta", ascending=False),
                  caption="Selected neurons (largest Δ first)", max_rows=30)
    rep.add_heading("Key Space Detection")
    sel = ks["selection"]
    rule = "given" if ks["h_rule"] == "fixed" else "picked on the selection half's prompts"
    rep.add_paragraph(f"Hypercube from {result.statistics['selection_items'][cfg['forget']]} forget selection prompts: "
                      f"k = {ks['k']:.3g}, h = {ks['h']:.3g} ({rule}; there TPR {sel['tpr']:.2f}, FPR {sel['fpr']:.2f} "
                      "at the prompt). Abstention when the key vector at the last position of a generation forward "
                      f"(prompt or generated token) is inside: TPR {ks['tpr']:.3f} {_ci(ks['tpr_ci'])} on "
                      f"{ks['n_forget']} held-out forget queries, FPR {ks['fpr']:.3f} {_ci(ks['fpr_ci'])} on "
                      f"{ks['n_retain']} retain queries (prompt only: {ks['tpr_prefill']:.3f} / "
                      f"{ks['fpr_prefill']:.3f}).")
    rep.add_figure(key_figure(result.key_scores, ks["h"] * ks["k"]))
    st = result.statistics
    rep.add_heading("Statistics")
    rep.add_table(pd.DataFrame({"tokens": st["tokens"], "selection items": st["selection_items"],
                                "held-out items": st["held_out_items"],
                                "full cache bytes (not kept)": st["full_cache_bytes"]}).reset_index(names="skill"),
                  caption=f"Running moments keep {st['state_bytes_per_skill']} bytes per skill whatever the data size; "
                          "bridge gate hook vs raw HF gate_proj hook: max |diff| "
                          f"{st['gate_hook_max_abs_diff_vs_hf']:.2g}")
    rep.add_run_section(result.header)
    return rep
