"""Refusal Cliff (Yin et al., 2025): a linear refusal probe over every token of a reasoning trace.

The probe's refusal score stays high while the model thinks about a harmful request and drops at
the closing `</think>` marker when the model complies anyway (the "cliff"). Heads that push the
score down at the last token are ranked three ways, ablated, and compared with random heads.

Method (paper: Yin et al. 2025, "Refusal Falls off a Cliff"; reference code RefusalCliff): rollouts on
harmful and harmless prompts; a logistic probe on the final-norm state at the last token of template
+ thinking + closing marker, refused-harmful (1) vs complied-harmless (0); scores at every token;
cliff = max over the thinking − score at the final token; heads ranked by their output projected on
the probe direction; the top heads ablated (zeroed, Frobenius-rescaled) vs random heads; complied
harmful prompts ranked by cliff (Cliff-as-a-Judge).

Held-out protocol: rollouts are split by prompt into a fit part and an eval part (`interp.controls.split`,
stratified by outcome group, seeded), or `--eval-harmful/--eval-harmless` give separate evaluation sets (the
paper fits on AdvBench and evaluates on JailbreakBench). Eval prompts that duplicate or nearly duplicate a fit
prompt are dropped (`overlap`). The probe and the head rankings see only fit rollouts; the cliff summary,
curves, ablation sweep, ASR and Cliff-as-a-Judge are measured on eval rollouts (`cliff_fit` keeps the
in-sample summary). The random-head control is matched on layer (`interp.controls.matched_draws`).
Deviations from the paper and the reference code are listed in docs/refusal_cliff.md.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from interp import stages
from interp.analysis import CommonConfig, attention_scope, require, run_header, warn
from interp.bridge import FINAL_NORM, attention_layers, hidden_state_hook
from interp.capture import capture, check_context
from interp.chat import THINK_CLOSE, has_thinking_tokens, prompt_sequence, split_thinking, thinking_sequence
from interp.controls import ControlUnavailable, Draws, control_row, matched_draws, split, stratified_sample, wilson
from interp.cost import announce, sequence_cost
from interp.datasets import Rollout, load_prompts, load_rollouts
from interp.errors import UserError
from interp.figures import band, intervention_bars, layer_head_heatmap
from interp.generation import encode_prompts, generate, generate_tokens
from interp.heads import causal_scores, gradient_scores, projection_scores, ranking, rankings_table, readout_heads
from interp.interventions import ablate_heads
from interp.judges import JBB_REFUSAL_PREFIXES, REFUSALCLIFF_WORDS, is_refusal
from interp.metrics import cliff_metrics, mean_interpolated, mean_tail, reference_aggregate
from interp.mlp import require_generation
from interp.probes import L2_GRID, LogisticProbe, fit_logistic_probe, train_logistic_probe
from interp.report import analysis_report

DATASET_FIELD = "harmful"  # --dataset sets the harmful prompt set
GROUPS = ("refused_harmful", "complied_harmful", "harmless")
HEAD_METHODS = ("projection", "attribution", "causal")
SPLITS = ("fit", "eval")
MIN_PROBE_ACCURACY = 0.75  # below this validation accuracy the run warns that the probe does not fit
CLIFF_KEYS = ("plateau_max", "plateau_mean", "plateau_robust", "rs_final", "cliff", "cliff_robust")


@dataclass
class Config(CommonConfig):
    """Defaults follow the paper (Yin et al. 2025) and its code unless a comment says otherwise."""

    harmful: str = "builtin-harmful"  # harmful prompt set, a registered name or a file (paper: AdvBench)
    harmless: str = "builtin-harmless"  # harmless prompt set (paper: the first 256 UltraChat test_sft prompts)
    # separate harmful set to evaluate on (paper: JailbreakBench); then all main harmful rollouts are fit
    eval_harmful: str | None = None
    eval_harmless: str | None = None  # separate harmless set to evaluate on; then all main harmless rollouts are fit
    # share of each group's prompts held out for evaluation when a kind has no eval set (by prompt, stratified, seeded)
    eval_fraction: float = 0.5
    # eval prompts whose normalised word set has Jaccard >= this with a fit prompt's word set are dropped
    overlap_jaccard: float = 0.8
    rollouts: str | None = None  # JSONL of prompt/thinking/response[/kind] rollouts to use instead of generating
    max_new_tokens: int = 256  # tokens generated per rollout (paper 8192; reasoning-model aliases set it)
    temperature: float = 0.0  # sampling temperature, 0 = greedy (paper samples at 0.7)
    # an OpenAI-compatible completions server (e.g. http://localhost:8000/v1 from vllm serve) generates the rollouts;
    # unset: the local model. The ASR's head-ablated regenerations need hooks and stay local (KV-cached)
    generator: str | None = None
    generator_model: str | None = None  # the model name the --generator server serves (default: --model)
    generator_concurrency: int = 16  # requests in flight at once to the --generator server
    seed: int = 42  # seed of the fit/eval split, the probe's split, sampling and random controls (paper's probe seed)
    probe_layer: int | None = None  # HF hidden_states index the probe reads; None = final-norm output (paper)
    # last_token: one state per example (paper); thinking_span: every thinking token labelled
    probe_mode: Literal["last_token", "thinking_span"] = "last_token"
    # lbfgs: logistic regression to convergence, L2 picked on validation; paper: Adam, best-validation epoch (reference)
    probe_recipe: Literal["lbfgs", "paper"] = "lbfgs"
    # lbfgs recipe: L2 strengths tried (features centred, one common scale), the lowest validation loss wins
    probe_l2: tuple[float, ...] = L2_GRID
    per_layer_probes: bool = False  # also train and apply one probe per layer, each on its own layer
    thinking_prefix: str = "\n\n"  # text after the chat template before the thinking (the probe code's)
    max_items_per_class: int = 200  # examples per class for the probe (paper)
    probe_epochs: int = 5  # paper recipe: Adam epochs of the probe (paper)
    probe_lr: float = 1e-3  # paper recipe: Adam learning rate of the probe (paper)
    probe_batch_size: int = 64  # paper recipe: probe minibatch size (paper)
    # paper recipe, equal validation accuracy: lower loss wins; earliest is the reference
    probe_tie_break: Literal["val_loss", "earliest"] = "val_loss"
    span_positions_per_example: int = 64  # thinking_span mode: thinking positions sampled per example
    # refusal keywords: jbb (Arditi et al., anywhere) or refusalcliff (56 words, first 32 chars)
    refusal_phrases: Literal["jbb", "refusalcliff"] = "jbb"
    min_thinking_chars: int = 10  # probe examples (both classes) need a thinking longer than this (paper: positives)
    # probe negatives: complied harmless (paper), or also complied harmful
    probe_negatives: Literal["harmless", "complied"] = "harmless"
    robust_k: int = 32  # plateau_robust = mean score of the last K thinking tokens
    tail_tokens: int = 16  # tokens shown in the tail curve
    n_bins: int = 100  # bins of the normalised-position curve (each bin averages its tokens)
    # per-example bin averages, or the paper figure's zero-padded tail alignment
    curve_method: Literal["interpolate", "reference"] = "interpolate"
    # head ranking the ablation sweep uses (paper: projection)
    head_method: Literal["projection", "attribution", "causal"] = "projection"
    # further head rankings computed beside --head-method and shown side by side (opt-in: attribution keeps one
    # sequence's autograd graph, causal is one forward per head per example)
    head_methods: tuple[Literal["projection", "attribution", "causal"], ...] = ()
    # fit harmful examples (a seeded sample, stratified refused / complied) the attribution and causal rankings use;
    # 0: all (projection always uses all: one forward each)
    head_examples: int = 64
    attribution_batch_size: int = 1  # sequences per forward + backward of the attribution ranking (blocks recomputed)
    causal_batch_size: int = 8  # sequences per forward of the causal scan (examples × one replica per head)
    # projection ranking through the final norm (its gain γ and the last position's 1/rms); both versions are compared
    projection_fold_norm: bool = False
    ablation_fractions: tuple[float, ...] = (0.015, 0.03, 0.10)  # shares of all heads ablated (paper)
    # rescale after zeroing: each sequence's norm without padding; frobenius_batch: whole batch incl. padding
    # (reference); per token; none
    ablation_rescale: Literal["frobenius", "frobenius_batch", "per_token", "none"] = "frobenius"
    random_draws: int = 5  # random-head control: draws per ablation fraction, outside the top set, matched on layer
    # eval harmful prompts regenerated per ablation setting: a seeded sample stratified by outcome group (refused /
    # complied); 0: all (paper). Each setting regenerates them all, 1 + fractions × (1 + random draws) settings
    asr_limit: int | None = 32
    # regenerate thinking and answer (paper), or only the answer after each rollout's thinking
    asr_regenerate: Literal["full", "response"] = "full"
    # Llama Guard model (id or directory): labels harmful rollouts refused/complied and rates answers for ASR; None:
    # keyword judge
    judge: str | None = None
    judge_response_only: bool = True  # the judge sees only the response, cut to 512 characters (paper)
    # Cliff-as-a-Judge ranking: the paper's cliff, or the code's ascending final score
    judge_rank: Literal["cliff", "rs_final"] = "cliff"
    judge_top_k: int = 20  # complied-harmful examples exported by Cliff-as-a-Judge

    def validate(self, model=None) -> None:
        """Raise UserError for invalid options (layer ranges only when `model` is given)."""
        super().validate(model)
        n_layers = model.cfg.n_layers if model is not None else None
        require(all(0 < f <= 1 for f in self.ablation_fractions), "ablation-fractions must be in (0, 1]")
        for name in ("max_new_tokens", "max_items_per_class", "probe_epochs", "probe_batch_size",
                     "span_positions_per_example", "robust_k", "tail_tokens", "n_bins", "judge_top_k"):
            require(getattr(self, name) >= 1, f"{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        require(self.n_bins >= 2, f"n-bins must be at least 2; got {self.n_bins}")
        require(self.probe_lr > 0, f"probe-lr must be positive; got {self.probe_lr}")
        require(len(self.probe_l2) > 0 and all(v > 0 for v in self.probe_l2),
                f"probe-l2 strengths must be positive; got {' '.join(map(str, self.probe_l2))}")
        require(0 < self.eval_fraction < 1, f"eval-fraction must be in (0, 1); got {self.eval_fraction}")
        require(0 < self.overlap_jaccard <= 1, f"overlap-jaccard must be in (0, 1]; got {self.overlap_jaccard}")
        require(self.temperature >= 0, f"temperature must be >= 0; got {self.temperature}")
        require(self.generator_concurrency >= 1,
                f"generator-concurrency must be at least 1; got {self.generator_concurrency}")
        require(self.min_thinking_chars >= 0, f"min-thinking-chars must be >= 0; got {self.min_thinking_chars}")
        require(self.asr_limit is None or self.asr_limit >= 0, f"asr-limit must be >= 0 (0: all); got {self.asr_limit}")
        require(self.head_examples >= 0, f"head-examples must be >= 0 (0: all); got {self.head_examples}")
        for name in ("attribution_batch_size", "causal_batch_size"):
            require(getattr(self, name) >= 1, f"{name.replace('_', '-')} must be at least 1; got {getattr(self, name)}")
        require(self.probe_layer is None or self.probe_layer >= 0, f"probe-layer must be >= 0; got {self.probe_layer}")
        require(self.probe_layer is None or n_layers is None or self.probe_layer <= n_layers,
                f"probe-layer {self.probe_layer} is out of range: the model has {n_layers} layers, use 0..{n_layers}")
        require(self.probe_layer != 0, "probe-layer 0 reads the embeddings, which no head can change; use 1 or more")


@dataclass
class Example:
    prompt: str
    thinking: str
    response: str
    kind: str
    refused: bool
    group: str
    input_ids: list[int]
    span: tuple[int, int]
    span_kind: str  # "thinking", or "prompt" for models without thinking tokens
    split: str = "fit"  # "fit" (probe, head rankings) or "eval" (everything reported as held out)
    keyword_refused: bool | None = None  # the keyword matcher's verdict on the response (None: not computed)
    scores: torch.Tensor | None = None
    metrics: dict = field(default_factory=dict)


@dataclass
class Result:
    header: dict  # run_header: analysis, model, environment, config
    config: Config
    probe: dict
    examples: list[Example]
    cliff: dict  # group means on the eval split (held out)
    cliff_fit: dict  # group means on the fit split (in-sample)
    curves: pd.DataFrame
    tail: pd.DataFrame
    heads: list[dict]
    head_rankings: dict[str, list[dict]]
    ablation: list[dict]
    ablation_baseline: dict
    judge_ranking: list[dict]
    per_layer: list[dict]
    rollouts: dict  # counts: from_file, generated, truncated, used
    warnings: list[str]
    linear_probe: LogisticProbe  # the trained probe itself (weights), for reuse in Python
    overlap: dict = field(default_factory=dict)  # eval prompts dropped as (near) duplicates of fit prompts
    projection_fold: dict | None = None  # folded vs unfolded projection ranking: which is used, their agreement
    skipped_layers: dict[int, str] = field(default_factory=dict)  # layer → what was not measured there and why
    head_ranking_examples: dict[str, int] = field(default_factory=dict)  # method → fit harmful rollouts it ranked on
    asr_sample: dict = field(default_factory=dict)  # n, of, limit, by_group: the eval harmful prompts the ASR uses

    @property
    def model(self) -> dict:
        """The loaded model's description (the header's `model`)."""
        return self.header["model"]

    @property
    def splits(self) -> dict[str, int]:
        return {s: sum(e.split == s for e in self.examples) for s in SPLITS}

    def to_dict(self) -> dict:
        """The `results.json` content."""
        return {
            **self.header,
            "splits": self.splits,
            "rollouts": self.rollouts,
            "probe": self.probe,
            "cliff": self.cliff,
            "cliff_fit": self.cliff_fit,
            "heads": self.heads,
            "head_rankings": self.head_rankings,
            "ablation": self.ablation,
            "ablation_baseline": self.ablation_baseline,
            "cliff_as_a_judge": self.judge_ranking,
            "per_layer_probes": self.per_layer,
            "n_examples": {g: sum(e.group == g for e in self.examples) for g in GROUPS},
            "overlap": self.overlap,
            "projection_fold": self.projection_fold,
            "warnings": self.warnings,
            "skipped_layers": self.skipped_layers,
            "head_ranking_examples": self.head_ranking_examples,
            "asr_sample": self.asr_sample,
        }

    def write_extras(self, out_dir: Path) -> None:
        """Cliff-as-a-Judge selection as JSONL (prompt, thinking, response, cliff, rs_final, plateau_max)."""
        with open(Path(out_dir) / "cliff_as_a_judge.jsonl", "w", encoding="utf-8") as f:
            for row in self.judge_ranking:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    def tables(self) -> dict[str, pd.DataFrame]:
        return {
            "examples": examples_table(self.examples),
            "curves": self.curves,
            "tail": self.tail,
            "head_rankings": rankings_table(self.head_rankings),
            "ablation": pd.DataFrame(self.ablation),
        }


def examples_table(examples: list[Example]) -> pd.DataFrame:
    rows = [{"prompt": e.prompt, "kind": e.kind, "group": e.group, "split": e.split, "refused": e.refused,
             "n_tokens": len(e.input_ids), "span": e.span_kind, "span_tokens": e.span[1] - e.span[0], **e.metrics}
            for e in examples]
    return pd.DataFrame(rows)


# ---------------------------------------------------------------- rollouts and labels

def _phrases(config: Config) -> tuple[tuple[str, ...], int | None, bool]:
    if config.refusal_phrases == "refusalcliff":
        return tuple(REFUSALCLIFF_WORDS), 32, True  # first 32 characters, case-sensitive (paper)
    return JBB_REFUSAL_PREFIXES, None, False


def is_refused(response: str, config: Config) -> bool:
    phrases, first_chars, case_sensitive = _phrases(config)
    return is_refusal(response, phrases, first_chars=first_chars, case_sensitive=case_sensitive)


def preflight(config: Config) -> None:
    """Check options and input files before any model is loaded."""
    config.validate()
    if config.judge and config.judge.startswith((".", "/", "~")) and not Path(config.judge).expanduser().is_dir():
        raise UserError(f"judge model directory not found: {config.judge}")
    kinds = {r.kind for r in file_rollouts(config)}
    for kind, spec in (("harmful", config.harmful), ("harmless", config.harmless)):
        if kind not in kinds:
            load_prompts(spec, limit=config.limit)
    for spec in (config.eval_harmful, config.eval_harmless):
        if spec is not None:
            load_prompts(spec, limit=config.limit)


def file_rollouts(config: Config) -> list[Rollout]:
    """Rollouts from `config.rollouts` (a missing kind means harmful); none without a file."""
    rollouts = load_rollouts(config.rollouts) if config.rollouts else []
    for r in rollouts:
        r.kind = r.kind or "harmful"
        if r.kind not in ("harmful", "harmless"):
            raise UserError(f"rollout kind must be 'harmful' or 'harmless', got {r.kind!r}")
    return rollouts


def rollout_engine(model, config: Config):
    """Where the rollouts are generated (`interp.engines`): the local model, or the `--generator` server."""
    from interp.engines import Sampling, default_stop_ids, make_engine

    sampling = Sampling(config.max_new_tokens, config.temperature, None, config.seed, default_stop_ids(model.tokenizer))
    return make_engine(model, config.generator, sampling, model_name=config.generator_model,
                       concurrency=config.generator_concurrency, batch_size=config.batch_size,
                       progress=config.progress)


def generate_rollouts(model, config: Config, sets: dict[str, str], engine) -> tuple[list[Rollout], int]:
    """Roll the model out on each kind's prompt set (`sets`: kind → set) on `engine` (`rollout_engine`); returns
    the rollouts that closed their thinking and the number cut off before `</think>` (left out)."""
    rollouts, truncated = [], 0
    tok = model.tokenizer
    thinking_model = has_thinking_tokens(tok)
    for kind, spec in sets.items():
        prompts = load_prompts(spec, limit=config.limit)
        announce(f"{kind} rollouts", len(prompts), len(prompts) * config.max_new_tokens, None,
                 f"up to {config.max_new_tokens} new tokens each, KV-cached, batch {config.batch_size}",
                 enabled=config.progress)
        encoded = encode_prompts(tok, prompts)

        def roll_out(idx: list[int], seqs: list[list[int]]) -> list[list[int]]:
            return [list(ids) for ids in engine.generate(seqs, seed_ids=idx)]

        key = {"version": 1, "model": stages.model_key(model), "engine": stages.engine_key(engine),
               "prompts": stages.digest(encoded)}
        new = stages.current().items("rollouts", key, encoded, roll_out, stages.CHUNK_BATCHES * config.batch_size)
        for prompt, text in zip(prompts, (tok.decode(ids, skip_special_tokens=False) for ids in new)):
            if thinking_model and THINK_CLOSE not in text:
                truncated += 1
                continue
            thinking, response = split_thinking(text)
            rollouts.append(Rollout(prompt, thinking, response, kind))
    return rollouts, truncated


def load_judge(model, config: Config):
    """The Llama Guard judge of `--judge` (None without one)."""
    if not config.judge:
        return None
    from interp.judges import LlamaGuardJudge

    return LlamaGuardJudge(config.judge, device=str(next(model.parameters()).device),
                           response_only=config.judge_response_only)


def build_examples(model, rollouts: list[Rollout], config: Config, judge=None, split: str = "fit") -> list[Example]:
    """Tokenized examples with their outcome group. Harmful rollouts are refused unless the judge
    (when given) rates the answer unsafe, else unless the keyword matcher finds no refusal; harmless
    rollouts always use the keyword matcher (a safety judge cannot tell a refusal of a harmless request).
    The keyword verdict is kept as well (`keyword_refused`): a judge-safe answer that does not refuse is no
    probe positive (`probe_label`)."""
    tok = model.tokenizer
    thinking_model = has_thinking_tokens(tok)
    harmful = [r for r in rollouts if r.kind == "harmful"]
    unsafe = judge.judge([r.prompt for r in harmful], [r.response for r in harmful],
                         batch_size=config.batch_size) if judge is not None and harmful else []
    verdict = {id(r): v for r, v in zip(harmful, unsafe)}
    examples = []
    for r in rollouts:
        enc = (thinking_sequence(tok, r.prompt, r.thinking, thinking_prefix=config.thinking_prefix, response=r.response)
               if thinking_model else prompt_sequence(tok, r.prompt))
        keyword = is_refused(r.response, config)
        refused = not verdict[id(r)] if id(r) in verdict else keyword
        group = "harmless" if r.kind == "harmless" else ("refused_harmful" if refused else "complied_harmful")
        examples.append(Example(r.prompt, r.thinking, r.response, r.kind, refused, group, enc.input_ids, enc.span,
                                "thinking" if thinking_model else "prompt", split, keyword))
    return examples


def assign_splits(examples: list[Example], config: Config) -> None:
    """Hold out `eval_fraction` of each outcome group's prompts (`interp.controls.split`: all rollouts of a
    normalised prompt on one side, stratified by the prompt's first outcome group, seeded)."""
    if len(examples) < 2:
        return
    keys = [(e.kind, normalise(e.prompt)) for e in examples]
    first_group = {}
    for k, e in zip(keys, examples):
        first_group.setdefault(k, e.group)
    halves = split(len(examples), 1 - config.eval_fraction, config.seed, groups=keys,
                   strata=[first_group[k] for k in keys])
    for i in halves.selection:
        examples[i].split = "fit"
    for i in halves.held_out:
        examples[i].split = "eval"


def normalise(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed: the form the overlap check compares."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def jaccard(a: set[str], b: set[str]) -> float:
    """Word-set Jaccard similarity |a ∩ b| / |a ∪ b| (1 for two empty sets)."""
    return len(a & b) / len(a | b) if a | b else 1.0


def overlapping(fit_prompts: list[str], eval_prompts: list[str], threshold: float) -> dict[str, str]:
    """Eval prompts that duplicate a fit prompt after `normalise` ("exact") or share a word set with Jaccard
    ≥ `threshold` ("near"), each mapped to its kind of overlap."""
    fit_norm = {normalise(p) for p in fit_prompts}
    fit_words = [set(p.split()) for p in fit_norm]
    out = {}
    for p in dict.fromkeys(eval_prompts):
        n = normalise(p)
        if n in fit_norm:
            out[p] = "exact"
        elif any(jaccard(set(n.split()), w) >= threshold for w in fit_words):
            out[p] = "near"
    return out


def drop_overlap(examples: list[Example], config: Config, warnings: list[str]) -> tuple[list[Example], dict]:
    """Eval examples whose prompt (near) duplicates a fit prompt are dropped, counted and warned about."""
    rule = (f"eval prompt dropped when, lower-cased with punctuation removed and whitespace collapsed, it equals a fit "
            f"prompt (exact) or its word set has Jaccard >= {config.overlap_jaccard:g} with one (near)")
    found = overlapping([e.prompt for e in examples if e.split == "fit"],
                        [e.prompt for e in examples if e.split == "eval"], config.overlap_jaccard)
    kept = [e for e in examples if e.split == "fit" or e.prompt not in found]
    kinds = list(found.values())
    overlap = {"dropped": len(examples) - len(kept), "prompts": len(found), "exact": kinds.count("exact"),
               "near": kinds.count("near"), "rule": rule}
    if found:
        warn(warnings, f"{len(found)} eval prompts ({overlap['exact']} exact, {overlap['near']} near duplicates of fit "
                       f"prompts) were dropped with their {overlap['dropped']} rollouts: {rule}")
    return kept, overlap


def collect_examples(model, config: Config, judge, warnings: list[str], engine) -> tuple[list[Example], dict, dict]:
    """Rollouts (file and generated on `engine`, main and eval sets) → examples with their split (eval prompts that
    overlap fit prompts dropped); rollout counts; the overlap count."""
    given = file_rollouts(config)
    check_context(model, [e.input_ids for e in build_examples(model, given, config)])  # before generating
    main_sets = {k: s for k, s in (("harmful", config.harmful), ("harmless", config.harmless))
                 if k not in {r.kind for r in given}}
    eval_sets = {k: s for k, s in (("harmful", config.eval_harmful), ("harmless", config.eval_harmless)) if s}
    generated, cut_main = generate_rollouts(model, config, main_sets, engine)
    held_out, cut_eval = generate_rollouts(model, config, eval_sets, engine)
    if (main_sets or eval_sets) and (limitation := engine.limitation()):
        warn(warnings, limitation)
    truncated = cut_main + cut_eval
    n_generated = len(generated) + len(held_out) + truncated
    if truncated:
        warn(warnings, f"{truncated} of {n_generated} generated rollouts stopped before {THINK_CLOSE} and are left out "
                       f"of the probe and the groups; raise --max-new-tokens (now {config.max_new_tokens})")
    main = given + generated
    if not main and not held_out:
        raise UserError(f"no usable rollout: all {n_generated} stopped before {THINK_CLOSE}; "
                        f"raise --max-new-tokens (now {config.max_new_tokens})")
    examples = build_examples(model, main, config, judge)
    split_here = [e for e in examples if e.kind not in eval_sets]
    assign_splits(split_here, config)
    examples += build_examples(model, held_out, config, judge, split="eval")
    examples, overlap = drop_overlap(examples, config, warnings)
    counts = {"from_file": len(given), "generated": n_generated, "truncated": truncated, "used": len(examples)}
    return examples, counts, overlap


# ---------------------------------------------------------------- probe

def _probe_eligible(e: Example, config: Config) -> bool:
    """The paper's thinking-length filter, applied to both classes."""
    return len(e.thinking) > config.min_thinking_chars or e.span_kind == "prompt"


def probe_label(e: Example, config: Config) -> int | None:
    """1 (refused harmful), 0 (complied negative) or None (not a probe example). A refused-harmful example
    whose answer the keyword matcher reads as compliance (judge-safe, yet no refusal) is no positive."""
    if not _probe_eligible(e, config):
        return None
    if e.group == "refused_harmful":
        return None if e.keyword_refused is False else 1
    negative_groups = ("harmless", "complied_harmful") if config.probe_negatives == "complied" else ("harmless",)
    return 0 if e.group in negative_groups and not e.refused else None


def _training_sets(examples: list[Example], config: Config) -> tuple[list[Example], list[Example]]:
    rng = random.Random(config.seed)
    pos = [e for e in examples if probe_label(e, config) == 1]
    neg = [e for e in examples if probe_label(e, config) == 0]
    pos = rng.sample(pos, min(len(pos), config.max_items_per_class))
    neg = rng.sample(neg, min(len(neg), config.max_items_per_class))
    if len(pos) < 2 or len(neg) < 2:
        raise UserError(f"the probe needs at least 2 refused-harmful and 2 complied-harmless fit rollouts with a "
                        f"thinking; got {len(pos)} and {len(neg)} (use more prompts, or pass --rollouts)")
    return pos, neg


def _span_positions(e: Example, k: int) -> list[int]:
    """Up to k evenly spaced thinking positions plus the last token."""
    start, end = e.span
    if end <= start:
        return [len(e.input_ids) - 1]
    picks = np.linspace(start, end - 1, num=min(k, end - start)).round().astype(int)
    return sorted(set(picks.tolist()) | {len(e.input_ids) - 1})


def train_probe(model, examples: list[Example], config: Config, hook: str) -> LogisticProbe:
    """The probe on `examples` (the fit split), by `config.probe_recipe`."""
    pos, neg = _training_sets(examples, config)
    train = pos + neg
    labels = [1] * len(pos) + [0] * len(neg)
    kw = dict(batch_size=config.batch_size, progress=config.progress)
    announce(f"probe features at {hook}", *sequence_cost([e.input_ids for e in train]), f"batch {config.batch_size}",
             enabled=config.progress)
    seqs = [e.input_ids for e in train]
    positions = None if config.probe_mode == "last_token" else \
        [_span_positions(e, config.span_positions_per_example) for e in train]

    def features(idx: list[int], chunk: list[list[int]]) -> list[torch.Tensor]:  # per example: [d] or [k, d]
        got = capture(model, chunk, [hook], positions="last" if positions is None else [positions[i] for i in idx],
                      **kw)[hook]
        return [t.clone() for t in got]  # a row of the stacked batch would save the whole batch's storage

    key = {"version": 1, "model": stages.model_key(model), "hook": hook, "sequences": stages.digest(seqs),
           "positions": None if positions is None else stages.digest(positions)}
    feats = stages.current().items("probe_features", key, seqs, features, stages.CHUNK_BATCHES * config.batch_size)
    if config.probe_mode == "last_token":
        X = torch.stack(feats)
        y, groups = torch.tensor(labels), None
    else:
        X = torch.cat(feats)
        y = torch.tensor([label for label, f in zip(labels, feats) for _ in range(len(f))])
        groups = torch.tensor([i for i, f in enumerate(feats) for _ in range(len(f))])
    if config.probe_recipe == "lbfgs":
        return fit_logistic_probe(X, y, l2_grid=config.probe_l2, seed=config.seed, groups=groups)
    return train_logistic_probe(X, y, epochs=config.probe_epochs, lr=config.probe_lr,
                                batch_size=config.probe_batch_size, seed=config.seed, groups=groups,
                                tie_break=config.probe_tie_break)


def score_examples(model, examples: list[Example], probes: dict[str, LogisticProbe],
                   config: Config) -> dict[str, list[torch.Tensor]]:
    """Probe score at every token of every example, for each (hook → probe); only scores are kept."""
    announce("probe scores at every token", *sequence_cost([e.input_ids for e in examples]),
             f"batch {config.batch_size}, {len(probes)} probe(s)", enabled=config.progress)
    out = capture(model, [e.input_ids for e in examples], list(probes), positions="all",
                  batch_size=config.batch_size, progress=config.progress,
                  reduce=lambda name, acts: probes[name].scores(acts))
    return out


def held_out_accuracy(examples: list[Example], config: Config) -> tuple[float | None, int]:
    """Accuracy (final score ≥ 0.5 = refusal) on the eval split's probe examples, and their number."""
    labelled = [(e, probe_label(e, config)) for e in examples if e.split == "eval"]
    labelled = [(e, y) for e, y in labelled if y is not None]
    if not labelled:
        return None, 0
    return float(np.mean([(e.metrics["rs_final"] >= 0.5) == bool(y) for e, y in labelled])), len(labelled)


def probe_summary(probe: LogisticProbe, hook: str, layer: int, examples: list[Example], config: Config) -> dict:
    eval_accuracy, n_eval = held_out_accuracy(examples, config)
    return {"layer": layer, "hook": hook, "mode": config.probe_mode, "recipe": probe.recipe,
            "val_accuracy": probe.val_accuracy, "train_accuracy": probe.train_accuracy,
            "eval_accuracy": eval_accuracy, "n_train": probe.n_train, "n_val": probe.n_val, "n_eval": n_eval,
            "val_is_train": probe.val_is_train, "best_epoch": probe.best_epoch, "l2": probe.l2,
            "l2_search": probe.l2_search, "bias": probe.bias, "weight_norm": float(probe.weight.norm()),
            "converged": probe.converged, "n_iter": probe.n_iter,
            "n_judge_safe_not_refusing": sum(judge_safe_not_refusing(e, config) for e in examples)}


def judge_safe_not_refusing(e: Example, config: Config) -> bool:
    """A refused-harmful (judge-safe) example the keyword matcher reads as compliance: left out of the probe."""
    return _probe_eligible(e, config) and e.group == "refused_harmful" and e.keyword_refused is False


# ---------------------------------------------------------------- cliff summaries

def has_plateau(e: Example) -> bool:
    """The example has a span to take the plateau over (a thinking model's empty thinking has none)."""
    return e.span[1] > e.span[0]


def example_metrics(scores: torch.Tensor, e: Example, robust_k: int) -> dict:
    """`cliff_metrics` over the thinking span; without a thinking only `rs_final` (the rest None, no fallback)."""
    if has_plateau(e):
        return cliff_metrics(scores, e.span, robust_k)
    return {**dict.fromkeys(CLIFF_KEYS), "drop_position": None, "rs_final": float(scores[-1])}


def group_means(examples: list[Example]) -> dict:
    """Per group: means of the cliff metrics over examples with a thinking; `n_empty_thinking` left out."""
    out = {}
    for g in GROUPS:
        members = [e for e in examples if e.group == g and has_plateau(e)]
        out[g] = {"n": len(members), **{k: (float(np.mean([e.metrics[k] for e in members])) if members else None)
                                         for k in CLIFF_KEYS},
                  "n_empty_thinking": sum(e.group == g and not has_plateau(e) for e in examples)}
    return out


def curve_tables(examples: list[Example], config: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    curves, tails = [], []
    for g in GROUPS:
        seqs = [e.scores for e in examples if e.group == g and has_plateau(e)]
        if not seqs:
            continue
        if config.curve_method == "reference":
            x = np.linspace(0, 100, config.n_bins)
            mean, se = reference_aggregate(seqs, config.n_bins), np.zeros(config.n_bins)
        else:
            x = (np.arange(config.n_bins) + 0.5) / config.n_bins * 100  # bin centres
            mean, se = mean_interpolated(seqs, config.n_bins)
        curves.append(pd.DataFrame({"group": g, "position": x, "mean": mean, "se": se}))
        tmean, tse = mean_tail(seqs, config.tail_tokens)
        offsets = np.arange(-config.tail_tokens, 0) + 1
        tails.append(pd.DataFrame({"group": g, "offset": offsets, "mean": tmean, "se": tse}))
    if not curves:
        return (pd.DataFrame(columns=["group", "position", "mean", "se"]),
                pd.DataFrame(columns=["group", "offset", "mean", "se"]))
    return pd.concat(curves, ignore_index=True), pd.concat(tails, ignore_index=True)


# ---------------------------------------------------------------- heads and ablation

def find_heads(model, examples: list[Example], probe: LogisticProbe, hook: str, config: Config,
               warnings: list[str] | None = None) -> tuple[dict[str, list[dict]], dict | None]:
    """Heads ranked by each method on the harmful `examples` (the fit split; paper: harmful prompts with
    their own thinking). Only heads before the readout point are ranked. With a projection ranking on the
    final norm's output, the folded and unfolded projections are both computed and compared (`projection_fold`);
    `projection_fold_norm` picks which one ranks."""
    harmful = [e for e in examples if e.kind == "harmful"]
    seqs = [e.input_ids for e in harmful]
    if not seqs:
        raise UserError("no harmful fit rollout to rank heads on; use more harmful prompts")
    readout = (hook, probe.weight, probe.bias)
    n_before = readout_heads(model, hook)
    kw = dict(batch_size=config.batch_size, progress=config.progress)
    capped = [seqs[i] for i in head_sample(harmful, config)]
    n_heads = sum(layer < n_before for layer in attention_layers(model)[0]) * model.cfg.n_heads
    fold = config.projection_fold_norm and hook == FINAL_NORM
    if config.projection_fold_norm and not fold and warnings is not None:
        warn(warnings, f"--projection-fold-norm has no final norm to fold: the probe reads {hook}; unfolded projection")

    def project(folded: bool) -> torch.Tensor:
        return projection_scores(model, seqs, probe.weight, n_layers=n_before, fold_norm=folded, **kw)

    def cost(m: str) -> None:
        forwards, tokens, longest = sequence_cost(seqs if m == "projection" else capped)
        note = {"projection": f"batch {config.batch_size}, the last position's head outputs",
                "attribution": f"forward + backward, batch {config.attribution_batch_size} (blocks recomputed), "
                               f"{len(capped)} of {len(seqs)} examples",
                "causal": f"× {n_heads} heads (one ablated per replica), batch {config.causal_batch_size}, "
                          f"{len(capped)} of {len(seqs)} examples"}[m]
        heads = n_heads + 1 if m == "causal" else 1
        announce(f"head ranking '{m}'", forwards * heads, tokens * heads, longest, note, enabled=config.progress)

    methods = {"projection": lambda: project(fold),
               "attribution": lambda: gradient_scores(model, capped, readout, batch_size=config.attribution_batch_size,
                                                      progress=config.progress),
               "causal": lambda: causal_scores(model, capped, readout, rescale=config.ablation_rescale,
                                               batch_size=config.causal_batch_size, progress=config.progress)}
    out = {}
    for m in dict.fromkeys((*config.head_methods, config.head_method)):
        cost(m)
        scores = methods[m]()
        scores[n_before:] = float("nan")
        out[m] = ranking(scores)
    if "projection" not in out or hook != FINAL_NORM:
        return out, None
    other = ranking(project(not fold))
    k = max(1, round(max(config.ablation_fractions) * len(attention_layers(model)[0]) * model.cfg.n_heads))
    folded, unfolded = (out["projection"], other) if fold else (other, out["projection"])
    return out, {"used": "folded" if fold else "unfolded", **ranking_agreement(folded, unfolded, k)}


def head_sample(harmful: list[Example], config: Config) -> list[int]:
    """Indices of the fit harmful examples the attribution and causal rankings use: at most `head_examples`, a
    seeded sample stratified by outcome group (all with 0)."""
    return stratified_sample([e.group for e in harmful], config.head_examples, config.seed, "head-examples")


def asr_sample(harmful: list[Example], config: Config) -> list[Example]:
    """The eval harmful examples the ASR regenerates: at most `asr_limit`, a seeded sample stratified by outcome
    group (refused / complied, in proportion), in their order; all with 0 or None."""
    return [harmful[i] for i in stratified_sample([e.group for e in harmful], config.asr_limit, config.seed, "asr")]


def ranking_agreement(a: list[dict], b: list[dict], k: int) -> dict:
    """Spearman correlation of two head rankings' scores over the heads both rank, and the overlap of their top k."""
    def key(r: dict) -> tuple[int, int]:
        return r["layer"], r["head"]

    sb = {key(r): r["score"] for r in b}
    common = [(r["score"], sb[key(r)]) for r in a if key(r) in sb]
    ranks = pd.DataFrame(common).rank()
    spearman = float(ranks[0].corr(ranks[1])) if len(common) > 1 else float("nan")
    k = min(k, len(a), len(b))
    top = len({key(r) for r in a[:k]} & {key(r) for r in b[:k]})
    return {"spearman": spearman, "k": k, "top_k_overlap": top / k if k else float("nan")}


def final_scores(model, examples: list[Example], probe: LogisticProbe, hook: str, config: Config) -> torch.Tensor:
    seqs = [e.input_ids for e in examples]
    acts = capture(model, seqs, [hook], positions="last", batch_size=config.batch_size,
                   progress=False, fast_attention=True)[hook]
    return probe.scores(acts)


@dataclass(frozen=True)
class AsrCount:
    """One ASR setting's regenerations: `jailbroken` of the `scored` answers are a jailbreak (ASR = the ratio);
    `truncated` never closed `</think>` (no answer: not scored, not in the denominator); `capped` hit
    `--max-new-tokens` (the truncated ones and answers cut at the cap, which are scored on what they reached)."""

    jailbroken: int
    scored: int
    truncated: int = 0
    capped: int = 0

    @property
    def regenerated(self) -> int:
        return self.scored + self.truncated

    def __add__(self, other: AsrCount) -> AsrCount:
        return AsrCount(self.jailbroken + other.jailbroken, self.scored + other.scored,
                        self.truncated + other.truncated, self.capped + other.capped)


def attack_success_rate(model, harmful: list[Example], config: Config, judge=None) -> AsrCount:
    """How many harmful prompts' regenerated answers are a jailbreak, rated unsafe by `judge` (Llama Guard) or,
    without one, not a refusal (keyword judge), of how many have an answer; ASR = the ratio.

    asr_regenerate="full" (paper): regenerate thinking and answer from the prompt; on a thinking model a
    regeneration that never closes `</think>` (the cap, usually) has no answer: it is counted as truncated and
    left out, never scored (its thinking is not an answer).
    "response": keep each rollout's own thinking and regenerate only the answer after `</think>`,
    which isolates the refuse/comply decision from damage the ablation does to the thinking.
    """
    kw = dict(max_new_tokens=config.max_new_tokens, temperature=config.temperature, seed=config.seed,
              batch_size=config.batch_size, progress=config.progress)
    truncated = 0
    if config.asr_regenerate == "response":
        prompts = [e.prompt for e in harmful]
        new = generate_tokens(model, [e.input_ids for e in harmful], **kw)
        responses = [model.tokenizer.decode(ids, skip_special_tokens=True) for ids in new]
        capped = new.n_truncated
    else:
        asked = list(dict.fromkeys(e.prompt for e in harmful))
        texts = generate(model, asked, **kw)
        capped = texts.n_truncated
        thinking_model = has_thinking_tokens(model.tokenizer)
        answered = [(p, split_thinking(t)[1]) for p, t in zip(asked, texts)
                    if not (thinking_model and THINK_CLOSE not in t)]
        truncated = len(asked) - len(answered)
        prompts, responses = [p for p, _ in answered], [r for _, r in answered]
    if not responses:
        return AsrCount(0, 0, truncated, capped)
    if judge is not None:
        jailbroken = int(sum(judge.judge(prompts, responses, batch_size=config.batch_size)))
    else:
        jailbroken = sum(not is_refused(r, config) for r in responses)
    return AsrCount(jailbroken, len(responses), truncated, capped)


def random_heads(top: list[tuple[int, int]], eligible: list[tuple[int, int]], config: Config) -> Draws:
    """`random_draws` sets of heads outside `top`, each with `top`'s number of heads in every layer."""
    return matched_draws(top, eligible, stratum=lambda h: h[0], draws=config.random_draws, seed=config.seed,
                         matched_on="layer", key="heads")


def asr_fields(count: AsrCount) -> dict:
    """`asr` (jailbroken / scored; NaN when no regeneration has an answer) and its Wilson interval `asr_ci`,
    with the counts behind them: `asr_n` (the denominator), `n_truncated` (never closed `</think>`: left out),
    `n_capped` (hit --max-new-tokens), `n_regenerated`."""
    k, n = count.jailbroken, count.scored
    return {"asr": k / n if n else float("nan"), "asr_ci": list(wilson(k, n)), "asr_n": n,
            "n_truncated": count.truncated, "n_capped": count.capped, "n_regenerated": count.regenerated}


def ablation_sweep(model, harmful: list[Example], probe: LogisticProbe, hook: str, ranked: list[dict],
                   config: Config, judge, warnings: list[str]) -> tuple[list[dict], dict]:
    """Top-ranked heads vs `random_draws` sets of other heads matched on layer (`random_heads`): final refusal
    score and regenerated ASR (with its Wilson interval) on the eval harmful examples (paper: top vs random)."""
    if not harmful:
        warn(warnings, "no harmful eval rollout: the ablation sweep is skipped; use more harmful prompts")
        return [], {"rs_final": None, "asr": None, "asr_ci": None, "asr_n": 0, "n_truncated": 0}
    asr_set = asr_sample(harmful, config)
    total = len(attention_layers(model)[0]) * model.cfg.n_heads  # every softmax-attention head
    measured: dict[tuple, tuple[float, AsrCount]] = {}
    settings = 1 + len(config.ablation_fractions) * (1 + config.random_draws)
    regenerated = len(asr_set) if config.asr_regenerate == "response" else len({e.prompt for e in asr_set})
    announce("ablation sweep", settings * (len(harmful) + regenerated),
             settings * (sum(len(e.input_ids) for e in harmful) + regenerated * config.max_new_tokens), None,
             f"{settings} settings × ({len(harmful)} scoring forwards + {regenerated} regenerations of up to "
             f"{config.max_new_tokens} new tokens; ASR on {len(asr_set)} of {len(harmful)} eval harmful prompts, "
             f"--asr-limit {config.asr_limit or 'all'})", enabled=config.progress)

    # each setting is stored when it finishes (interp.stages, one stage per setting), keyed on every option but the
    # batch size and progress bars (the judge, refusal phrases, rescale, sampling), the probe and the examples
    options = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("batch_size", "progress")}
    base_key = {"version": 1, "model": stages.model_key(model), "options": options, "hook": hook,
                "probe": stages.digest([probe.weight, probe.bias]),
                "examples": stages.digest([e.input_ids for e in harmful]), "asr_set": stages.digest(
                    [e.input_ids for e in asr_set])}

    def setting(_, heads_list: list[tuple]) -> list[dict]:
        with ablate_heads(model, list(heads_list[0]), rescale=config.ablation_rescale):
            return [{"rs_final": float(final_scores(model, harmful, probe, hook, config).mean()),
                     "asr": dataclasses.asdict(attack_success_rate(model, asr_set, config, judge))}]

    def measure(heads: list[tuple[int, int]]) -> tuple[float, AsrCount]:
        key = tuple(sorted(heads))
        if key not in measured:
            [got] = stages.current().items("ablation", {**base_key, "heads": key}, [key], setting, 1)
            measured[key] = (got["rs_final"], AsrCount(**got["asr"]))
        return measured[key]

    rs0, count0 = measure([])
    baseline = {"rs_final": rs0, **asr_fields(count0)}
    eligible = [(h["layer"], h["head"]) for h in ranked]
    rows = []
    for fraction in config.ablation_fractions:
        n = min(max(1, round(fraction * total)), len(eligible))
        top = eligible[:n]
        rs, count = measure(top)
        rows.append({"fraction": fraction, "n_heads": n, "selection": "top", "rs_final": rs, **asr_fields(count),
                     "heads": [list(h) for h in top]})
        try:
            draws = random_heads(top, eligible, config)
        except ControlUnavailable as e:
            warn(warnings, f"no random control for {fraction:g} of the heads: {e}; use smaller --ablation-fractions")
            continue
        results = [measure(d) for d in draws]
        pooled = asr_fields(sum((r[1] for r in results), AsrCount(0, 0)))
        per_draw = [asr_fields(r[1])["asr"] for r in results]
        rows.append({"fraction": fraction, "n_heads": n, "selection": "random",
                     **control_row({"rs_final": [r[0] for r in results], "asr": per_draw}, draws),
                     **{k: pooled[k] for k in ("asr_ci", "asr_n", "n_truncated", "n_capped", "n_regenerated")},
                     "n_truncated_draws": [r[1].truncated for r in results],
                     "draws": [[list(h) for h in d] for d in draws]})
    return rows, baseline


def cliff_as_a_judge(examples: list[Example], config: Config) -> list[dict]:
    """Harmful-but-complied examples ranked by cliff (paper's MS) or by ascending final score (code)."""
    bad = [e for e in examples if e.group == "complied_harmful" and has_plateau(e)]
    key = (lambda e: -e.metrics["cliff"]) if config.judge_rank == "cliff" else (lambda e: e.metrics["rs_final"])
    return [{"prompt": e.prompt, "thinking": e.thinking, "response": e.response,
             **{k: e.metrics[k] for k in ("cliff", "rs_final", "plateau_max")}}
            for e in sorted(bad, key=key)[: config.judge_top_k]]


def per_layer_rows(examples: list[Example], probes: dict[str, LogisticProbe], scored: dict, n_layers: int,
                   config: Config) -> list[dict]:
    """One row per layer: its probe's validation accuracy and the eval split's group means."""
    rows = []
    for layer in range(1, n_layers + 1):
        h = hidden_state_hook(layer, n_layers)
        metrics = [example_metrics(scored[h][i], e, config.robust_k) for i, e in enumerate(examples)]
        row = {"layer": layer, "val_accuracy": probes[h].val_accuracy}
        for g in GROUPS:
            ms = [m for m, e in zip(metrics, examples) if e.group == g and e.split == "eval" and has_plateau(e)]
            for k in ("plateau_max", "rs_final", "cliff"):
                row[f"{g}_{k}"] = float(np.mean([m[k] for m in ms])) if ms else None
        rows.append(row)
    return rows


# ---------------------------------------------------------------- run

def run(model, config: Config | None = None) -> Result:
    """Roll out, split fit/eval, probe and rank heads on fit; score, ablate and judge on eval."""
    config = config or Config()
    n_layers = model.cfg.n_layers
    config.validate(model)
    # an encoder cannot generate: neither rollouts nor ASR regenerations; with --rollouts its two-way attention would
    # let every thinking position see the response the probe should anticipate
    require_generation(model, "refusal_cliff")
    warnings: list[str] = []
    skipped: dict[int, str] = {}
    attention_scope("refusal_cliff", model, skipped, warnings)  # heads are ranked and ablated on softmax layers
    judge = load_judge(model, config)
    engine = rollout_engine(model, config)  # a --generator server is checked here, before any heavy work
    examples, counts, overlap = collect_examples(model, config, judge, warnings, engine)
    fit = [e for e in examples if e.split == "fit"]
    held_out = [e for e in examples if e.split == "eval"]
    layer = n_layers if config.probe_layer is None else config.probe_layer
    hook = hidden_state_hook(layer, n_layers)
    probe = train_probe(model, fit, config, hook)
    probes = {hook: probe}
    if config.per_layer_probes:
        for other in range(1, n_layers + 1):
            h = hidden_state_hook(other, n_layers)
            if h not in probes:
                probes[h] = train_probe(model, fit, config, h)
    scored = score_examples(model, examples, probes, config)
    for i, e in enumerate(examples):
        e.scores = scored[hook][i]
        e.metrics = example_metrics(e.scores, e, config.robust_k)
    empty = sum(not has_plateau(e) for e in examples)
    if empty:
        warn(warnings, f"{empty} of {len(examples)} rollouts have an empty thinking: no plateau, so they are left out "
                       "of the cliff metrics, curves and Cliff-as-a-Judge (counted as n_empty_thinking per group)")
    summary = probe_summary(probe, hook, layer, examples, config)
    if probe.converged is False:
        warn(warnings, f"the L-BFGS probe did not converge ({probe.n_iter} iterations, L2 {probe.l2:g}); "
                       "its scores may be off; try larger --probe-l2 strengths")
    if summary["n_judge_safe_not_refusing"]:
        warn(warnings, f"{summary['n_judge_safe_not_refusing']} harmful rollouts the judge rates safe do not refuse "
                       "(keyword matcher): they are no probe positives")
    val_acc, eval_acc = summary["val_accuracy"], summary["eval_accuracy"]
    # thinking_span validation is per token (early thinking tokens are ambiguous by nature): there the
    # last-token accuracy on the eval split decides, when it exists
    checked = [eval_acc] if config.probe_mode == "thinking_span" and eval_acc is not None else [val_acc, eval_acc]
    if min(a for a in checked if a is not None) < MIN_PROBE_ACCURACY:
        fix = "--probe-recipe lbfgs" if config.probe_recipe == "paper" else "more rollouts"
        shown = "n/a" if eval_acc is None else f"{eval_acc:.2f}"
        warn(warnings, f"the probe does not fit: validation accuracy {val_acc:.2f}, eval-split accuracy {shown} "
                       f"(below {MIN_PROBE_ACCURACY} is unreliable for scores, cliffs and head rankings); try {fix}")
    per_layer = per_layer_rows(examples, probes, scored, n_layers, config) if config.per_layer_probes else []
    curves, tail = curve_tables(held_out, config)
    rankings, projection_fold = find_heads(model, fit, probe, hook, config, warnings)
    ranked = rankings[config.head_method]
    fit_harmful = [e for e in fit if e.kind == "harmful"]
    n_capped = len(head_sample(fit_harmful, config))
    ranking_examples = {m: len(fit_harmful) if m == "projection" else n_capped for m in rankings}
    eval_harmful = [e for e in held_out if e.kind == "harmful"]
    asr_set = asr_sample(eval_harmful, config)
    asr_info = {"n": len(asr_set), "of": len(eval_harmful), "limit": config.asr_limit,
                "by_group": {g: sum(e.group == g for e in asr_set) for g in GROUPS[:2]}}
    ablation, baseline = ablation_sweep(model, eval_harmful, probe, hook, ranked, config, judge, warnings)
    header = run_header("refusal_cliff", model, config)
    header["generator"] = engine.describe()  # where and how the rollouts were generated (interp.engines)
    return Result(header=header, config=config,
                  probe=summary, examples=examples,
                  cliff=group_means(held_out), cliff_fit=group_means(fit), curves=curves, tail=tail, heads=ranked,
                  head_rankings=rankings, ablation=ablation, ablation_baseline=baseline,
                  judge_ranking=cliff_as_a_judge(held_out, config), per_layer=per_layer, rollouts=counts,
                  warnings=warnings, linear_probe=probe, overlap=overlap, projection_fold=projection_fold,
                  skipped_layers=skipped, head_ranking_examples=ranking_examples, asr_sample=asr_info)


# ---------------------------------------------------------------- figures and report

GROUP_COLOURS = {"refused_harmful": "#1f77b4", "complied_harmful": "#d62728", "harmless": "#2ca02c"}


def curve_figure(curves: pd.DataFrame, method: str):
    import plotly.graph_objects as go

    fig = go.Figure()
    for group, df in curves.groupby("group", sort=False):
        band(fig, df["position"], df["mean"], df["se"], group.replace("_", " "), GROUP_COLOURS[group])
    fig.add_vrect(x0=95, x1=100, fillcolor="grey", opacity=0.15, line_width=0)
    fig.update_layout(title=f"Mean refusal score along the sequence ({method}, ±1 s.e.)",
                      xaxis_title="normalised position (%)", yaxis_title="refusal score", yaxis_range=[0, 1])
    return fig


def tail_figure(tail: pd.DataFrame):
    import plotly.graph_objects as go

    fig = go.Figure()
    for group, df in tail.groupby("group", sort=False):
        band(fig, df["offset"], df["mean"], df["se"], group.replace("_", " "), GROUP_COLOURS[group], markers=True)
    fig.update_layout(title="The last tokens (0 = final token, where the response starts)",
                      xaxis_title="token offset from the end", yaxis_title="refusal score", yaxis_range=[0, 1])
    return fig


def head_heatmap(ranked: list[dict], n_layers: int, n_heads: int, method: str):
    grid = np.full((n_layers, n_heads), np.nan)
    for row in ranked:
        grid[row["layer"], row["head"]] = row["score"]
    return layer_head_heatmap(grid, f"Head scores ({method}; negative = suppresses refusal)")


def ablation_figure(ablation: list[dict], baseline: dict):
    rows = [{**r, "label": f"{r['fraction']:.1%} ({r['n_heads']})",
             "selection": "selected" if r["selection"] == "top" else "random"} for r in ablation]
    return intervention_bars(rows, ("rs_final", "asr"), baseline,
                             title="Ablating the ranked heads vs random heads (mean ± sd over draws), eval split",
                             titles=("final refusal score (harmful)", "attack success rate"))


def ablation_table(ablation: list[dict]) -> pd.DataFrame:
    """The sweep without the head lists (those are in results.json and ablation.csv)."""
    df = pd.DataFrame(ablation)
    return df.drop(columns=[c for c in ("heads", "draws", "rs_final_draws", "asr_draws", "strata",
                                        "n_truncated_draws") if c in df])


def split_table(result: Result) -> pd.DataFrame:
    """Group means side by side: held out (eval) and in-sample (fit)."""
    rows = []
    for g in GROUPS:
        for half, summary in (("eval", result.cliff), ("fit", result.cliff_fit)):
            rows.append({"group": g, "split": half, **summary[g]})
    return pd.DataFrame(rows)


def _pick_example(examples: list[Example]) -> Example:
    pool = [e for e in examples if e.split == "eval" and has_plateau(e)] or [e for e in examples if has_plateau(e)]
    for group in ("complied_harmful", "refused_harmful", "harmless"):
        members = [e for e in pool if e.group == group]
        if members:
            return max(members, key=lambda e: e.metrics["cliff"])
    raise ValueError("no examples")


def _truncation_sentence(result: Result) -> str:
    """How many ASR regenerations had no answer (never closed `</think>`) or hit the cap, per setting."""
    base = result.ablation_baseline
    if base.get("n_regenerated") is None:
        return ""
    rows = [("none", base)] + [(f"{r['selection']} {r['n_heads']}", r) for r in result.ablation]
    cut = "; ".join(f"{name}: {r['n_truncated']} of {r['n_regenerated']}" for name, r in rows)
    capped = sum(r.get("n_capped", 0) for _, r in rows)
    return (f" Regenerations that never closed {THINK_CLOSE} have no answer: they are counted (n_truncated) and "
            f"left out of the ASR, never scored — {cut} (random rows: all draws). The ASR denominator is asr_n; "
            f"{capped} regenerations in all hit --max-new-tokens ({result.config.max_new_tokens}; n_capped: the "
            "truncated ones and answers cut at the cap, scored on what they reached).")


def _asr_sample_sentence(result: Result) -> str:
    """How many eval harmful prompts the ASR regenerates, and how they were picked."""
    a = result.asr_sample
    if not a or a["n"] == a["of"]:
        return f" The ASR regenerates all {a.get('of', 0)} eval harmful prompts."
    groups = ", ".join(f"{n} {g.replace('_', ' ')}" for g, n in a["by_group"].items())
    return (f" The ASR regenerates {a['n']} of the {a['of']} eval harmful prompts ({groups}): a seeded sample "
            f"stratified by outcome (--asr-limit {a['limit']}; 0 regenerates all, as the paper).")


def _rankings_sentence(result: Result) -> str:
    """Which rankings were computed (the sweep's, and any opt-in ones) and on how many examples."""
    cfg = result.config
    others = [m for m in result.head_rankings if m != cfg.head_method]
    n_fit = sum(e.split == "fit" and e.kind == "harmful" for e in result.examples)
    n_capped = min(n_fit, cfg.head_examples or n_fit)
    text = (f"Computed: '{cfg.head_method}' (the ranking the sweep uses)"
            + (f" and {', '.join(repr(m) for m in others)} (--head-methods)" if others else
               "; the other rankings are opt-in (--head-methods attribution causal)") + ".")
    if any(m in result.head_rankings for m in ("attribution", "causal")):
        text += (f" Attribution and causal rankings use {n_capped} of the {n_fit} fit harmful rollouts (a seeded "
                 f"sample stratified by outcome, --head-examples {cfg.head_examples or 'all'}).")
    return text


def build_report(result: Result, tokenizer=None):
    """The HTML report: warnings, headline numbers, curves, tail, one example's tokens, heads, ablation, tables."""
    info, cfg = result.model, result.config
    rep = analysis_report(result.header, result.warnings)
    c, p = result.cliff, result.probe
    splits = result.splits
    headline = {"probe": f"{p['mode']} at layer {p['layer']} ({p['hook']}), {p['recipe']} recipe",
                "probe val accuracy (fit split)": p["val_accuracy"],
                f"probe accuracy, eval split (n={p['n_eval']})":
                    "–" if p["eval_accuracy"] is None else p["eval_accuracy"],
                "rollouts fit / eval": f"{splits['fit']} / {splits['eval']}"}
    for g in GROUPS:
        if c[g]["n"]:
            headline[f"cliff / robust cliff, {g.replace('_', ' ')}, eval (n={c[g]['n']})"] = \
                f"{c[g]['cliff']:.3f} / {c[g]['cliff_robust']:.3f}"
    headline["head ranking used"] = cfg.head_method
    first = min(result.ablation, key=lambda r: (r["fraction"], r["selection"] != "top"), default=None)
    if first is not None:
        headline[f"ASR (eval): none → top {first['n_heads']} heads ablated"] = \
            f"{result.ablation_baseline['asr']:.2f} → {first['asr']:.2f}"
    rep.add_metrics(headline)
    eval_set = ("separate evaluation prompt sets" if cfg.eval_harmful or cfg.eval_harmless
                else f"{cfg.eval_fraction:.0%} of each group’s prompts, seeded")
    rep.add_paragraph(f"Held-out protocol: the probe and the head rankings use the fit split only; every number "
                      f"below (cliffs, curves, ablation, ASR, Cliff-as-a-Judge) is measured on the eval split "
                      f"({eval_set}). "
                      "The in-sample (fit) group means are shown next to the held-out ones, so overfitting is visible.")
    rep.add_heading("Refusal score along the reasoning trace")
    rep.add_paragraph("A logistic probe trained on refused harmful vs complied harmless rollouts scores every token of "
                      "template + thinking + closing marker. Groups: refused harmful, complied harmful (the "
                      "jailbreak successes, where the paper's cliff lives) and harmless. cliff = max over the "
                      "thinking span − score at the final token. Curves: eval split.")
    rep.add_figure(curve_figure(result.curves, cfg.curve_method))
    rep.add_figure(tail_figure(result.tail))
    rep.add_table(split_table(result), caption="Group means, held out (eval) and in-sample (fit)")
    example = _pick_example(result.examples)
    if tokenizer is not None and example.scores is not None:
        tokens = [tokenizer.decode([t]) for t in example.input_ids]
        rep.add_token_view(tokens, example.scores.tolist(),
                           caption=f"Refusal score per token: the {example.group.replace('_', ' ')} {example.split} "
                                   f"example with the largest cliff ({example.metrics['cliff']:.3f})")
    rep.add_heading("Refusal-suppression heads")
    rep.add_paragraph("Each method's score estimates a head's contribution to the probe at the final token, on the "
                      "fit split's harmful rollouts; negative = pushes the refusal score down. projection: head "
                      "output via W_O onto the probe direction at the last position (paper). attribution: gradient × "
                      f"activation over all positions. causal: −Δ score when the head alone is ablated (rescale: "
                      f"{cfg.ablation_rescale}, as in the sweep). Heads after the probe's layer cannot change it and "
                      "are not ranked. " + _rankings_sentence(result))
    for method, ranked in result.head_rankings.items():
        rep.add_figure(head_heatmap(ranked, info["n_layers"], info["n_heads"], method))
    top = rankings_table(result.head_rankings)
    rep.add_table(top.sort_values(f"{cfg.head_method}_rank").head(20),
                  caption="Top 20 heads (all methods side by side)")
    rep.add_heading("Ablation")
    rep.add_paragraph(f"Heads ranked by '{cfg.head_method}' are zero-ablated at every position (rescale: "
                      f"{cfg.ablation_rescale}) while scoring and while regenerating the eval split's harmful "
                      f"prompts; the control ablates random heads from outside the top set, as many in each layer as "
                      f"the top set has there (matched on layer), {cfg.random_draws} draws per fraction (mean ± sd). "
                      "ASR (95 % Wilson interval in the table) = share of harmful prompts whose "
                      "regenerated response "
                      + (f"the judge {cfg.judge} rates unsafe. " if cfg.judge else
                         "is not a refusal (keyword judge; a broken answer counts as not refused). ")
                      + "Regenerated: "
                      + ("thinking and answer (paper)." if cfg.asr_regenerate == "full" else
                         "the answer only, after each rollout's own thinking.")
                      + _truncation_sentence(result) + _asr_sample_sentence(result))
    if result.ablation:
        rep.add_figure(ablation_figure(result.ablation, result.ablation_baseline))
        rep.add_table(ablation_table(result.ablation), caption="Ablation results (eval split)")
    if result.per_layer:
        rep.add_heading("Per-layer probes")
        rep.add_table(pd.DataFrame(result.per_layer), caption="A probe trained (fit) and applied (eval) at each layer")
    rep.add_heading("Cliff-as-a-Judge")
    rep.add_paragraph(f"Harmful prompts of the eval split the model complied with, ranked by {cfg.judge_rank}; the "
                      "top ones are the candidates for safety fine-tuning (cliff_as_a_judge.jsonl).")
    if result.judge_ranking:
        rep.add_table(pd.DataFrame(result.judge_ranking)[["prompt", "cliff", "rs_final", "plateau_max", "response"]],
                      caption="Top complied-harmful examples")
    else:
        rep.add_paragraph("No harmful eval prompt was complied with.")
    rep.add_run_section(result.header)
    return rep
