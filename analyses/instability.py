"""Dynamic instability in reasoning traces (Chen et al. 2026, "I May Not Have Articulated Myself
Clearly: Diagnosing Dynamic Instability in LLM Reasoning at Inference Time", arXiv 2602.02863).

From the top-k next-token distributions of each generated token: entropy H_t of the renormalised
top-k, shift D_t = JSD(p̃_t, p̃_{t−1}) on the union of the two supports, instability I_t = D_t + λ·H_t.
Per trace the peak S = max_t I_t and its relative position r = t*/T (early r ≤ 0.25, late r > 0.5);
across traces the ROC-AUC of S for predicting a wrong answer (95 % bootstrap interval resampling whole
questions), accuracy per S quantile bucket and early- vs late-peak accuracy within S strata (Wilson
intervals), an early-warning AUC from prefixes, and the same AUC for plain baselines (mean entropy,
final-step entropy, length). The peak of a longer trace is a maximum over more steps, so the AUC is also
reported within length strata (pairs of traces of similar length only); traces that hit the token limit
are recorded (`truncated`), and a generated trace's answer is scored after `</think>` (inside `\\boxed{}`
when there is one), never in its thinking.

Traces come from a local model (generated on a task set with checkable answers, greedy or seeded
sampling, then one teacher-forced batched forward over prompt + completion gives the full
next-token distributions and their top-k) or from a JSONL file of API logprobs (`--traces`, no
model; format in `interp.traces`). The paper released no code: λ, k, the support handling, step 1,
the windows and the bucket scheme are reconstructions, each an option (see docs/instability.md).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from interp import instability as ins
from interp.analysis import CommonConfig, require, run_header, warn
from interp.cost import announce
from interp.errors import UserError
from interp.files import read_jsonl
from interp.mlp import require_generation
from interp.report import Report, analysis_report
from interp.traces import load_traces, trace_record_ids

DATASET_FIELD = "tasks"
BASELINES = ("mean_entropy", "final_entropy", "length")


@dataclass
class Config(CommonConfig):
    # JSONL of external traces with API logprobs ({"id", "correct", "content"}, optional "question"); no model is loaded
    traces: str | None = None
    # (--dataset) task set with checkable answers: gsm8k (paper), word-problems, arithmetic (organisms) or a JSONL file
    # with prompt, answer
    tasks: str = "gsm8k"
    # wrap each task prompt in the model's chat template (the organisms' arithmetic prompts already are)
    chat_template: bool = False
    # a BOS first in every prompt: unset, where the model's own tokenizer adds one (as trained; a chat template writes
    # its own); --bos always (a BOS-like token where it adds none); --no-bos never
    bos: bool | None = None
    max_new_tokens: int = 256  # tokens generated per trace
    # traces sampled per task (needs --temperature > 0); the AUC intervals resample whole tasks
    samples_per_question: int = 1
    temperature: float = 0.0  # 0 = greedy (reconstructed protocol); > 0 samples, seeded by --seed
    top_p: float | None = None  # nucleus sampling when temperature > 0
    # an OpenAI-compatible completions server (e.g. http://localhost:8000/v1 from vllm serve) generates the traces
    # and returns their top-k logprobs (the paper's black-box setting); unset: the local model (KV cache, then one
    # teacher-forced forward)
    generator: str | None = None
    generator_model: str | None = None  # the model name the --generator server serves (default: --model)
    generator_concurrency: int = 16  # requests in flight at once to the --generator server
    top_k: int = 20  # k of the renormalised top-k distribution (reconstructed: the OpenAI top_logprobs maximum)
    lam: float = 1.0  # λ in I_t = D_t + λ·H_t (reconstructed; the paper's value was not recovered)
    # tokens outside a step's top-k: probability 0 (union of supports), or the tokens listed at both steps plus one
    # lumped 'rest' outcome (a lower bound of the full-vocabulary JSD)
    jsd_support: Literal["union_zero", "residual_bin"] = "union_zero"
    normalise_entropy: bool = False  # divide H_t by log k so both terms of I_t lie in [0, 1]
    smooth: int = 1  # trailing moving average of I_t over this many steps (1 = none, as in the paper)
    # signal from the top-k (paper, black-box) or the full vocabulary (local model only)
    distribution: Literal["topk", "full"] = "topk"
    # D_1 = 0 and step 1 counts for the peak, or the peak is taken over t >= 2
    first_step: Literal["zero", "exclude"] = "zero"
    n_buckets: int = 5  # quantile buckets of peak strength for the accuracy table (reconstructed: quintiles)
    n_strata: int = 3  # peak-strength strata for early vs late (compared within strata)
    # early-warning prefix lengths W in tokens: AUC of max_{t<=W} I_t (reconstructed)
    windows: tuple[int, ...] = (32, 64, 128)
    k_sweep: tuple[int, ...] = (5, 10, 20)  # also report the AUC at these k
    # quantile bins of trace length for the AUC within length strata (a longer trace's peak is a maximum over more
    # steps: this AUC compares only traces of similar length; not in the paper)
    n_length_strata: int = 10
    n_boot: int = 2000  # bootstrap resamples for the AUCs' 95 % intervals (whole questions, within label strata)
    # positions of one trace unembedded at once in the teacher-forced pass (memory: a few [chunk, vocab] float32
    # tensors; the numbers do not depend on it)
    logit_chunk: int = 128
    # also write steps.csv: one row per generated token of every trace (H, D, I, the token; millions of rows at
    # paper scale); by default only the per-trace summary tables are written
    step_rows: bool = False

    def validate(self, model=None) -> None:
        super().validate(model)
        require(self.max_new_tokens >= 1, f"max-new-tokens must be at least 1; got {self.max_new_tokens}")
        require(self.samples_per_question >= 1,
                f"samples-per-question must be at least 1; got {self.samples_per_question}")
        require(self.samples_per_question == 1 or self.temperature > 0,
                "--samples-per-question above 1 needs --temperature > 0 (greedy traces of one task are identical)")
        require(self.samples_per_question == 1 or not self.traces,
                "--samples-per-question is for generated traces; external traces name theirs in a 'question' field")
        require(self.temperature >= 0, f"temperature must be >= 0; got {self.temperature}")
        require(self.top_p is None or 0 < self.top_p <= 1, f"top-p must be in (0, 1]; got {self.top_p}")
        require(self.top_k >= 1, f"top-k must be at least 1; got {self.top_k}")
        require(self.lam >= 0 and math.isfinite(self.lam), f"lam must be a finite number >= 0; got {self.lam}")
        require(self.smooth >= 1, f"smooth must be at least 1 (1 = no smoothing); got {self.smooth}")
        require(self.n_buckets >= 2, f"n-buckets must be at least 2; got {self.n_buckets}")
        require(self.n_strata >= 1, f"n-strata must be at least 1; got {self.n_strata}")
        require(self.n_length_strata >= 1, f"n-length-strata must be at least 1; got {self.n_length_strata}")
        require(all(w >= 1 for w in self.windows), f"windows must be at least 1 token; got {self.windows}")
        require(all(k >= 1 for k in self.k_sweep), f"k-sweep values must be at least 1; got {self.k_sweep}")
        require(self.n_boot >= 100, f"n-boot must be at least 100; got {self.n_boot}")
        require(self.logit_chunk >= 1, f"logit-chunk must be at least 1; got {self.logit_chunk}")
        require(not (self.traces and self.distribution == "full"),
                "--distribution full needs a local model's full distributions; drop it or drop --traces")
        require(not (self.generator and (self.traces or self.distribution == "full")),
                "--generator generates traces with top-k logprobs; drop --traces and --distribution full")
        require(self.generator_concurrency >= 1,
                f"generator-concurrency must be at least 1; got {self.generator_concurrency}")


def needs_model(config: Config) -> bool:
    """External traces need no model."""
    return config.traces is None


def preflight(config: Config) -> None:
    """Read the traces or the task file before any model loads, so a bad file fails at once."""
    if config.traces:
        load_traces(config.traces)
    elif Path(config.tasks).suffix or Path(config.tasks).exists():
        load_tasks(config.tasks)
    else:
        from interp.datasets import DATASETS, dataset_names

        if config.tasks not in DATASETS or DATASETS[config.tasks].kind != "skills":
            raise UserError(f"unknown dataset {config.tasks!r}; choose one of {', '.join(dataset_names('skills'))} "
                            "or pass a JSONL file with prompt and answer")


# --------------------------------------------------------------------------- tasks

def load_task_file(path: Path):
    """Tasks from a JSONL file: `prompt` and `answer` per line (optional `check`: number | contains |
    prefix; default number when the answer is a number, else contains)."""
    from interp.skills import CHECKS, SkillItem

    if path.suffix.lower() != ".jsonl":
        raise UserError(f"task file {str(path)!r} must be .jsonl with prompt and answer on each line")
    if not path.is_file():
        raise UserError(f"task file not found: {path}")
    items = []
    for lineno, row in read_jsonl(path):
        where = f"{path}: line {lineno}"
        missing = [k for k in ("prompt", "answer") if k not in row]
        if missing:
            raise UserError(f"{where} is missing field(s) {', '.join(missing)}")
        answer = str(row["answer"]).strip() if isinstance(row["answer"], (int, float, str)) else ""
        if not isinstance(row["prompt"], str) or not row["prompt"].strip() or not answer:
            raise UserError(f"{where}: 'prompt' and 'answer' must be non-empty")
        check = row.get("check", "number" if re.fullmatch(r"-?[\d,]+(\.\d+)?", answer) else "contains")
        if check not in CHECKS or check == "none":
            raise UserError(f"{where}: check must be number, contains or prefix; got {check!r}")
        items.append(SkillItem(row["prompt"], "", answer, "user", check))
    if not items:
        raise UserError(f"task file {path} is empty")
    return items


def load_tasks(spec: str, limit: int | None = None):
    """Task items (`interp.skills.SkillItem`) of a registered set or a JSONL file."""
    from interp.datasets import load_dataset

    if Path(spec).suffix or Path(spec).exists():
        items = load_task_file(Path(spec).expanduser())
        return items[:limit] if limit else items
    items = load_dataset(spec, "skills", limit=limit)
    if any(i.check == "none" for i in items):
        raise UserError(f"dataset {spec!r} has no checkable answers; use gsm8k, word-problems, arithmetic or a file")
    return items


def server_dists(rows: list[dict], width: int) -> list[dict]:
    """`teacher_forced`'s fields from a server's top-k logprobs (`top_ids`, `top_logprobs`, `chosen` per step;
    no full-vocabulary entropy)."""
    import torch

    out = []
    for row in rows:
        ids = torch.full((len(row["top_ids"]), width), ins.PAD_ID, dtype=torch.long)
        lps = torch.full((len(row["top_ids"]), width), -math.inf, dtype=torch.float64)
        for t, (i, v) in enumerate(zip(row["top_ids"], row["top_logprobs"])):
            ids[t, :len(i[:width])] = torch.tensor(i[:width], dtype=torch.long)
            lps[t, :len(v[:width])] = torch.tensor(v[:width], dtype=torch.float64)
        out.append({"topk_ids": ids, "topk_logprobs": lps, "chosen": torch.tensor(row["chosen"], dtype=torch.float64),
                    "full_entropy": None, "full_jsd": None})
    return out


def generate_traces(model, config: Config, warnings: list[str]) -> tuple[list[ins.TraceDists], list[dict], dict]:
    """Generate on the task set (`samples_per_question` traces per task), score the answers, then one
    teacher-forced forward for the distributions (with `--generator`: the server's top-k logprobs instead).
    Returns the traces, one record per trace in the external JSONL format (for `traces.jsonl`) and the engine's
    `describe()` (`interp.engines`)."""
    from dataclasses import asdict

    from interp import stages
    from interp.chat import THINK_CLOSE, THINK_OPEN, chat_prefix
    from interp.engines import Sampling, default_stop_ids, make_engine
    from interp.generation import Generations
    from interp.skills import is_correct
    from interp.tokens import encode

    tok = model.tokenizer
    items = load_tasks(config.tasks, config.limit)
    # as the model was trained (interp.tokens): not TransformerLens' default call, which puts <|endoftext|> before
    # every GPT-2 / Pythia / OLMo-2 prompt
    encoded = [encode(tok, chat_prefix(tok, it.prompt) if config.chat_template else it.prompt, bos=config.bos,
                      chat=config.chat_template) for it in items]
    n = config.samples_per_question
    asked = [(q, j) for q in range(len(items)) for j in range(n)]
    prompts = [encoded[q] for q, _ in asked]
    longest = max(len(p) for p in prompts) + config.max_new_tokens
    announce("generation", len(prompts), len(prompts) * config.max_new_tokens, longest,
             f"up to {config.max_new_tokens} new tokens each, KV-cached, batch {config.batch_size}",
             enabled=config.progress)
    store, chunk = stages.current(), stages.CHUNK_BATCHES * config.batch_size
    engine = make_engine(model, config.generator, Sampling(config.max_new_tokens, config.temperature, config.top_p,
                                                           config.seed, default_stop_ids(tok)),
                         model_name=config.generator_model, concurrency=config.generator_concurrency,
                         batch_size=config.batch_size, progress=config.progress)
    model_key = stages.model_key(model)
    width = max([config.top_k, *config.k_sweep])
    server = {} if config.generator is None else {"engine": stages.engine_key(engine), "top_logprobs": width}

    def generate_chunk(idx: list[int], seqs: list[list[int]]) -> list[dict]:
        got = engine.generate(seqs, seed_ids=idx, top_logprobs=width if server else 0)
        rows = [{"ids": list(g), "truncated": t} for g, t in zip(got, got.truncated)]
        return [{**r, **asdict(lp)} for r, lp in zip(rows, got.logprobs)] if server else rows

    generated = store.items("generation", {"version": 1, "model": model_key, "prompts": stages.digest(prompts),
                                           "max_new_tokens": config.max_new_tokens, "temperature": config.temperature,
                                           "top_p": config.top_p, "seed": config.seed, **server}, prompts,
                            generate_chunk, max(chunk, 4 * config.generator_concurrency) if server else chunk)
    completions = Generations([g["ids"] for g in generated], [g["truncated"] for g in generated])
    keep = [i for i, c in enumerate(completions) if c]
    if not keep:
        raise UserError("the model ended every trace at once (no generated tokens); check the prompts' format")
    if len(keep) < len(completions):
        warn(warnings, f"{len(completions) - len(keep)} of {len(completions)} traces are empty (the model ended at "
                       "once) and are left out")
    def opens(ids: list[int]) -> bool:  # the prompt leaves a <think> span open (a chat template's or the task's own)
        text = tok.decode(ids, skip_special_tokens=False)
        return text.rfind(THINK_OPEN) > text.rfind(THINK_CLOSE)
    opened = [opens(p) for p in encoded]
    lengths = [len(prompts[i]) + len(completions[i]) for i in keep]
    def forward_chunk(idx: list[int], pairs: list[tuple[list[int], list[int]]]) -> list[dict]:
        return ins.teacher_forced(model, [p for p, _ in pairs], [c for _, c in pairs], top_k=width,
                                  batch_size=config.batch_size, progress=config.progress, chunk=config.logit_chunk)

    if server:  # the paper's black-box setting: the server's top-k logprobs, no local forward
        dists = server_dists([generated[i] for i in keep], width)
    else:
        announce("teacher-forced forward", len(keep), sum(lengths), max(lengths),
                 f"batch {config.batch_size}, logits of {config.logit_chunk} positions at a time "
                 f"({model.cfg.d_vocab:,}-token vocabulary)", enabled=config.progress)
        pairs = [(prompts[i], completions[i]) for i in keep]
        dists = store.items("traces", {"version": 1, "model": model_key, "sequences": stages.digest(pairs),
                                       "top_k": width}, pairs, forward_chunk, chunk)
    traces, records = [], []
    for i, d in zip(keep, dists):
        q, j = asked[i]
        item, text = items[q], tok.decode(completions[i], skip_special_tokens=True)
        tokens = tok.batch_decode([[t] for t in completions[i]])  # the generated tokens only, one call per trace
        answer = scored_answer(tok, completions[i], opened[q])
        trace = ins.TraceDists(f"{q}" if n == 1 else f"{q}-{j}", answer is not None and bool(is_correct(item, answer)),
                               tokens, d["topk_ids"], d["topk_logprobs"], d["full_entropy"], d["full_jsd"],
                               int(model.cfg.d_vocab), question=None if n == 1 else f"{q}",
                               truncated=completions.truncated[i])
        traces.append(trace)
        # the alternatives as token ids, never decoded (80M decode calls for 500 traces of 8k tokens at k = 20)
        rec = trace_record_ids(trace.id, trace.correct, list(completions[i]), tokens, d["topk_ids"].tolist(),
                               d["topk_logprobs"].tolist(), d["chosen"].tolist(), trace.question, trace.truncated)
        rec["prompt"], rec["answer"], rec["completion"], rec["scored_answer"] = item.prompt, item.answer, text, answer
        records.append(rec)
    return traces, records, engine.describe()


def boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (nested braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def scored_answer(tok, ids: list[int], opened: bool = False) -> str | None:
    """The part of a completion that is scored: the text after the first `</think>` (all of it when the model
    does not think), inside its last `\\boxed{}` when there is one; None when the thinking never closed (opened by
    the prompt, `opened`, or by the completion): no answer, scored wrong."""
    from interp.chat import THINK_CLOSE, THINK_OPEN

    raw = tok.decode(ids, skip_special_tokens=False)
    close = tok.convert_tokens_to_ids(THINK_CLOSE) if THINK_CLOSE in tok.get_vocab() else None
    if close is not None and close in ids:
        answer = tok.decode(ids[ids.index(close) + 1:], skip_special_tokens=True)
    elif THINK_CLOSE in raw:
        answer = raw.split(THINK_CLOSE, 1)[1]
    elif opened or THINK_OPEN in raw:
        return None
    else:
        answer = tok.decode(ids, skip_special_tokens=True)
    inner = boxed(answer)
    return answer if inner is None else inner


# --------------------------------------------------------------------------- the analysis

@dataclass
class Result:
    header: dict  # run_header: analysis, model, environment, config
    config: Config
    source: str  # "model" or the traces file
    trace_rows: list[dict]  # id, correct, peak, peak_position, length, + baselines and prefix peaks
    signals: dict[str, dict[str, np.ndarray]]  # trace id -> H, D, I per step (float64 arrays)
    tokens: dict[str, list[str]]
    auc: float
    auc_ci: list[float]
    baselines: dict[str, float]
    baselines_ci: dict[str, list[float]]
    variants: dict[str, float]
    buckets: list[dict]
    early_late: dict
    early_late_strata: list[dict]
    early_warning: list[dict]
    auc_by_k: list[dict]
    roc: dict[str, dict[str, list[float]]]
    shift_saturation: float  # share of steps t >= 2 with D_t > 0.99 log 2 (consecutive distributions disjoint)
    records: list[dict] = field(default_factory=list)  # generated traces in the JSONL format
    warnings: list[str] = field(default_factory=list)  # shown at the top of the report
    auc_length_strata: float = float("nan")  # peak → wrong, (wrong, right) pairs of one length stratum only
    auc_length_strata_ci: list[float] = field(default_factory=list)
    length_strata: list[dict] = field(default_factory=list)  # per stratum: low, high, n, n_wrong, auc
    truncation: dict = field(default_factory=dict)  # n_truncated, n_unknown, n_complete, auc_complete, ...

    def overall_accuracy(self) -> dict:
        """`accuracy` over all traces and its Wilson `accuracy_ci`."""
        return ins.rate(np.array([r["correct"] for r in self.trace_rows], bool))

    def to_dict(self) -> dict:
        """The `results.json` content."""
        keys = ("id", "correct", "peak", "peak_position", "length", "question", "truncated")
        return {
            **self.header, "warnings": self.warnings, "skipped_layers": {},  # reads the output distribution only
            "auc": self.auc, "auc_ci": self.auc_ci, "baselines": self.baselines, "baselines_ci": self.baselines_ci,
            "buckets": self.buckets, "early_late": self.early_late,
            "traces": [{k: r[k] for k in keys} for r in self.trace_rows],
            "n_traces": len(self.trace_rows), "n_questions": len({r["question"] for r in self.trace_rows}),
            **self.overall_accuracy(),
            "variants": self.variants, "early_warning": self.early_warning, "auc_by_k": self.auc_by_k,
            "early_late_strata": self.early_late_strata, "shift_saturation": self.shift_saturation,
            "source": self.source, "auc_length_strata": self.auc_length_strata,
            "auc_length_strata_ci": self.auc_length_strata_ci, "length_strata": self.length_strata,
            "truncation": self.truncation,
        }

    def tables(self) -> dict[str, pd.DataFrame]:
        """Per-trace summary tables; `steps` (one row per generated token) only with `--step-rows`."""
        out = {"traces": pd.DataFrame(self.trace_rows), "buckets": pd.DataFrame(self.buckets),
               "early_late_strata": pd.DataFrame(self.early_late_strata),
               "early_warning": pd.DataFrame(self.early_warning)}
        if self.config.step_rows:
            out["steps"] = self.steps_table()
        return out

    def steps_table(self) -> pd.DataFrame:
        """One row per generated token of every trace: id, step, token, H, D, I (built on demand)."""
        frames = [pd.DataFrame({"id": tid, "step": np.arange(1, len(sig["I"]) + 1), "token": self.tokens[tid],
                                **{k: np.asarray(v) for k, v in sig.items()}}) for tid, sig in self.signals.items()]
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["id", "step", "token"])

    def write_extras(self, out_dir: Path) -> None:
        """A local model's traces as `traces.jsonl`, readable back with `--traces`."""
        if self.records:
            with open(Path(out_dir) / "traces.jsonl", "w", encoding="utf-8") as f:
                for rec in self.records:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def analyse(traces: list[ins.TraceDists], config: Config, warnings: list[str] | None = None) -> dict:
    """Every number of the analysis from the traces' distributions (no model); `warnings` collects what to flag."""
    warnings = [] if warnings is None else warnings
    start = 1 if config.first_step == "exclude" else 0
    kept = [t for t in traces if t.length > start]
    if len(kept) < 2:
        raise UserError(f"need at least 2 traces with more than {start} token(s); got {len(kept)}")
    if len(kept) < len(traces):
        warn(warnings, f"{len(traces) - len(kept)} one-token traces are left out (--first-step exclude)")
    opts = dict(top_k=config.top_k, lam=config.lam, support=config.jsd_support,
                normalise_entropy=config.normalise_entropy, smooth=config.smooth)
    rows, signals, tokens = [], {}, {}
    extra: dict[str, list[float]] = {"peak_D": [], "peak_H": [], "peak_other": []}
    other = "topk" if config.distribution == "full" else "full"
    have_full = all(t.full_entropy is not None for t in kept)
    for t in kept:
        sig = ins.step_signals(t, distribution=config.distribution, **opts)
        p = ins.peak(sig["I"], start)
        h = sig["H"]
        row = {"id": t.id, "question": t.cluster, "correct": t.correct, "peak": p.strength,
               "peak_position": p.position, "length": t.length, "peak_step": p.step, "early": p.early, "late": p.late,
               "mean_entropy": float(h.mean()), "final_entropy": float(h[-1])}
        for w in config.windows:
            row[f"prefix_peak_{w}"] = ins.prefix_peak(sig["I"], w, start)
        row["truncated"] = t.truncated
        rows.append(row)
        signals[t.id] = {k: v.numpy() for k, v in sig.items()}
        tokens[t.id] = t.tokens
        extra["peak_D"].append(float(sig["D"][start:].max()))
        extra["peak_H"].append(float(sig["H"][start:].max()))
        if have_full:
            extra["peak_other"].append(ins.peak(ins.step_signals(t, distribution=other, **opts)["I"], start).strength)
    wrong = [not r["correct"] for r in rows]
    questions = [r["question"] for r in rows]
    _flag_labels(wrong, questions, warnings)

    def interval(scores: list[float]) -> list[float]:
        return list(ins.auc_interval(scores, wrong, questions, n_boot=config.n_boot, seed=config.seed))

    peaks = [r["peak"] for r in rows]
    stratum, edges = ins.length_strata([r["length"] for r in rows], config.n_length_strata)
    by_length = []
    for k in range(len(edges) - 1):
        sel = [i for i, b in enumerate(stratum) if b == k]
        if sel:
            by_length.append({"low": float(edges[k]), "high": float(edges[k + 1]), "n": len(sel),
                              "n_wrong": sum(wrong[i] for i in sel),
                              "auc": ins.roc_auc([peaks[i] for i in sel], [wrong[i] for i in sel])})
    flags = [r["truncated"] for r in rows]
    complete = [i for i, f in enumerate(flags) if f is False]
    truncation = {"n_truncated": sum(f is True for f in flags), "n_unknown": sum(f is None for f in flags),
                  "n_complete": len(complete),
                  "auc_complete": ins.roc_auc([peaks[i] for i in complete], [wrong[i] for i in complete]),
                  "wrong_truncated": sum(wrong[i] for i, f in enumerate(flags) if f is True)}
    if truncation["n_truncated"]:
        warn(warnings, f"{truncation['n_truncated']} of {len(rows)} traces hit the token limit "
                       f"({truncation['wrong_truncated']} of them wrong): longer traces have larger peaks, so read "
                       "the AUC within length strata and the AUC of complete traces beside the plain one")
    baselines = {b: ins.roc_auc([r[b] for r in rows], wrong) for b in BASELINES}
    baselines_ci = {b: interval([r[b] for r in rows]) for b in BASELINES}
    variants = {"peak_shift_only": ins.roc_auc(extra["peak_D"], wrong),
                "peak_entropy_only": ins.roc_auc(extra["peak_H"], wrong)}
    if have_full:
        variants["peak_full_vocab" if other == "full" else "peak_topk"] = ins.roc_auc(extra["peak_other"], wrong)
    summary, strata = ins.early_late(peaks, [r["peak_position"] for r in rows], [r["correct"] for r in rows],
                                     config.n_strata)
    if summary["early_accuracy"] is None:
        warn(warnings, "no peak-strength stratum holds both early- and late-peak traces: early vs late is undefined")
    warning = [{"window": w, "auc": ins.roc_auc([r[f"prefix_peak_{w}"] for r in rows], wrong),
                "traces_longer": sum(r["length"] > w for r in rows)} for w in config.windows]
    by_k = []
    if config.distribution == "topk":
        listed = max(int(t.topk_logprobs.isfinite().sum(-1).max()) for t in kept)
        if listed < config.top_k:
            warn(warnings, f"the traces list at most {listed} tokens per step, so k = {config.top_k} uses {listed}")
        for k in sorted(set(config.k_sweep)):
            s = [ins.peak(ins.step_signals(t, **{**opts, "top_k": k})["I"], start).strength for t in kept]
            by_k.append({"k": k, "auc": ins.roc_auc(s, wrong), "k_available": min(k, listed)})
    roc = {}
    for name, scores in [("peak", peaks)] + [(b, [r[b] for r in rows]) for b in BASELINES]:
        fpr, tpr = ins.roc_curve(scores, wrong)
        roc[name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    n_shifts = sum(len(sig["D"]) - 1 for sig in signals.values())
    saturated = sum(int((sig["D"][1:] > 0.99 * math.log(2)).sum()) for sig in signals.values())
    saturation = saturated / max(1, n_shifts)
    return dict(auc_length_strata=ins.stratified_auc(peaks, wrong, stratum),
                auc_length_strata_ci=list(ins.stratified_auc_interval(peaks, wrong, stratum, questions,
                                                                      n_boot=config.n_boot, seed=config.seed)),
                length_strata=by_length, truncation=truncation,
                shift_saturation=saturation, trace_rows=rows, signals=signals, tokens=tokens,
                auc=ins.roc_auc(peaks, wrong), auc_ci=interval(peaks), baselines=baselines, baselines_ci=baselines_ci,
                variants=variants, buckets=ins.accuracy_buckets(peaks, [r["correct"] for r in rows], config.n_buckets),
                early_late=summary, early_late_strata=strata, early_warning=warning, auc_by_k=by_k, roc=roc,
                warnings=warnings)


MIN_CLASS = 10  # fewer right (or wrong) traces than this: every interval is wide


def _flag_labels(wrong: list[bool], questions: list[str], warnings: list[str]) -> None:
    """Warn when the AUCs are undefined or rest on few traces of one class, or when traces share questions."""
    n_wrong, n = sum(wrong), len(wrong)
    if n_wrong in (0, n):
        warn(warnings, f"every trace is {'wrong' if n_wrong else 'right'}: the AUCs are undefined")
    elif min(n_wrong, n - n_wrong) < MIN_CLASS:
        fewer = "wrong" if n_wrong < n - n_wrong else "right"
        warn(warnings, f"only {min(n_wrong, n - n_wrong)} of {n} traces are {fewer}: every AUC interval is wide")
    if len(set(questions)) < n:
        warn(warnings, f"{n} traces answer {len(set(questions))} questions: the AUC intervals resample whole "
                       "questions, but the accuracies' Wilson intervals count traces as independent (too narrow)")


def run(model, config: Config) -> Result:
    """Traces (external or generated by `model`), their per-step signals and every summary."""
    config.validate(model)
    if not config.traces:
        require_generation(model, "instability")  # external traces need no model; generating needs a decoder
    warnings: list[str] = []
    if config.traces:
        traces, records, source = load_traces(config.traces), [], str(config.traces)
        if config.limit:
            traces = traces[:config.limit]
    else:
        if model is None:
            raise UserError("a model is needed to generate traces; pass --model or --traces FILE")
        traces, records, generator = generate_traces(model, config, warnings)
        source = "model" if config.generator is None else config.generator
    header = run_header("instability", None if config.traces else model, config)
    if not config.traces:
        header["generator"] = generator  # where and how the traces were generated (interp.engines)
    return Result(header=header, config=config, source=source, records=records, **analyse(traces, config, warnings))


# --------------------------------------------------------------------------- report

def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _ci(interval: list[float] | None) -> str:
    return "[n/a]" if interval is None else f"[{_fmt(interval[0])}, {_fmt(interval[1])}]"


RECONSTRUCTED = (
    "Reconstructed choices (the paper released no code; each is an option): k = {k} (--top-k; the OpenAI "
    "top_logprobs maximum), λ = {lam} weighting the entropy (--lam), natural log, tokens outside a step's top-k "
    "{support} (--jsd-support), D_1 = 0 {first} (--first-step), {norm} (--normalise-entropy), smoothing {smooth} "
    "(--smooth), peak position r = t*/T with t* the first maximum, early r ≤ 0.25 / late r > 0.5 (from a secondary "
    "summary), {nb} quantile buckets (--n-buckets), early vs late compared within {ns} peak-strength strata "
    "(--n-strata) weighted by each stratum's early + late count, prefix windows {win} tokens (--windows), AUC "
    "intervals: percentile bootstrap over questions (the samples of one question move together) within label "
    "strata, {nboot} resamples; accuracies with 95 % Wilson intervals. Higher scores predict a wrong answer for "
    "every AUC."
)


def _pick(rows: list[dict]) -> list[dict]:
    """Traces to show: the wrong one with the highest peak and the right one with the lowest (then the median)."""
    wrong = sorted((r for r in rows if not r["correct"]), key=lambda r: -r["peak"])
    right = sorted((r for r in rows if r["correct"]), key=lambda r: r["peak"])
    picked = wrong[:1] + right[:1]
    if wrong[1:]:
        picked.append(wrong[len(wrong) // 2])
    return picked


def signal_figure(result: Result, trace_id: str) -> go.Figure:
    """I_t, D_t and H_t of one trace over its generated tokens (hover: the token), peak marked."""
    r = next(x for x in result.trace_rows if x["id"] == trace_id)
    sig, toks = result.signals[trace_id], result.tokens[trace_id]
    fig = go.Figure()
    x = list(range(1, len(sig["I"]) + 1))
    lines = (("I", "I = D + λH", "#d62728"), ("D", "D (JSD)", "#1f77b4"), ("H", "H (entropy)", "#7f7f7f"))
    for key, name, colour in lines:
        fig.add_trace(go.Scatter(x=x, y=sig[key], name=name, mode="lines", line=dict(color=colour),
                                 text=toks, hovertemplate="step %{x}: %{text}<br>%{y:.3f}<extra></extra>"))
    fig.add_vline(x=r["peak_step"], line_dash="dot")
    fig.update_layout(title=f"trace {trace_id} ({'right' if r['correct'] else 'wrong'}), peak {r['peak']:.3f} at "
                      f"r = {r['peak_position']:.2f}", xaxis_title="generated token", yaxis_title="nats", height=320)
    return fig


def roc_figure(result: Result) -> go.Figure:
    """ROC curves of the peak strength and the baselines for predicting a wrong answer."""
    fig = go.Figure()
    names = {"peak": f"peak S (AUC {_fmt(result.auc)})",
             **{b: f"{b} (AUC {_fmt(result.baselines[b])})" for b in BASELINES}}
    for key, curve in result.roc.items():
        fig.add_trace(go.Scatter(x=curve["fpr"], y=curve["tpr"], name=names[key], mode="lines",
                                 line=dict(width=3 if key == "peak" else 1.5)))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], name="chance", mode="lines", line=dict(dash="dash", color="#aaa")))
    fig.update_layout(title="ROC: predicting a wrong answer", xaxis_title="false-positive rate (right traces flagged)",
                      yaxis_title="true-positive rate (wrong traces flagged)", height=420)
    return fig


def _error_bars(rates: list[float | None], intervals: list[list[float] | None]) -> dict:
    """Plotly asymmetric error bars from Wilson intervals (none where a rate is undefined)."""
    up = [0 if ci is None else ci[1] - r for r, ci in zip(rates, intervals)]
    down = [0 if ci is None else r - ci[0] for r, ci in zip(rates, intervals)]
    return dict(type="data", symmetric=False, array=up, arrayminus=down)


def bucket_figure(result: Result) -> go.Figure:
    """Accuracy per quantile bucket of the peak strength with its Wilson interval (n per bar)."""
    acc = [r["accuracy"] for r in result.buckets]
    fig = go.Figure(go.Bar(x=[f"{r['low']:.3f}–{r['high']:.3f}" for r in result.buckets], y=acc,
                           error_y=_error_bars(acc, [r["accuracy_ci"] for r in result.buckets]),
                           text=[f"n={r['n']}" for r in result.buckets], textposition="outside"))
    fig.update_layout(title="accuracy per quantile bucket of S", xaxis_title="peak strength S", yaxis_title="accuracy",
                      yaxis_range=[0, 1.1], height=360)
    return fig


def _truncated_text(truncation: dict, n: int) -> str:
    """"k of n traces hit the token limit (…)" with the unknown count and the complete traces' AUC."""
    if not truncation:
        return "truncation not recorded"
    text = f"{truncation['n_truncated']} of {n} traces hit the token limit"
    if truncation["n_unknown"]:
        text += f", {truncation['n_unknown']} unknown (external traces without a truncated field or finish_reason)"
    if truncation["n_truncated"]:
        text += f"; AUC of the {truncation['n_complete']} complete traces {_fmt(truncation['auc_complete'])}"
    return text


def build_report(result: Result, tokenizer=None) -> Report:
    c = result.config
    rep = analysis_report(result.header, result.warnings)
    rows = result.trace_rows
    acc, acc_ci = result.overall_accuracy().values()
    el = result.early_late
    rep.add_paragraph(
        "Chen et al. (2026): the peak of the instability signal I_t = D_t + λ·H_t (shift between consecutive "
        "next-token distributions plus their entropy) predicts whether a reasoning trace ends wrong; early peaks are "
        "corrective, late ones destructive. Paper: ROC-AUC 0.66–0.74; early-peak traces over 3× more accurate than "
        "late-peak ones at comparable strength.")
    rep.add_metrics({"traces": len(rows), "questions": len({r["question"] for r in rows}),
                     "accuracy": f"{_fmt(acc)} {_ci(acc_ci)}", "ROC-AUC (peak → wrong)": result.auc,
                     "95 % CI": _ci(result.auc_ci),
                     "ROC-AUC within length strata": f"{_fmt(result.auc_length_strata)} "
                                                     f"{_ci(result.auc_length_strata_ci or None)}",
                     "truncated traces": _truncated_text(result.truncation, len(rows)),
                     **{f"AUC {k}": v for k, v in result.baselines.items()},
                     "early-peak accuracy": f"{_fmt(el['early_accuracy'])} {_ci(el['early_accuracy_ci'])}",
                     "late-peak accuracy": f"{_fmt(el['late_accuracy'])} {_ci(el['late_accuracy_ci'])}"})
    rep.add_notice(RECONSTRUCTED.format(
        k=c.top_k, lam=c.lam, support="get probability 0 (union of supports)" if c.jsd_support == "union_zero"
        else "are lumped, with everything listed at one step only, into one 'rest' outcome (a lower bound of the "
        "full JSD)",
        first="and step 1 counts for the peak" if c.first_step == "zero" else "and the peak is taken over t ≥ 2",
        norm="H in nats" if not c.normalise_entropy else "H divided by log k",
        smooth=c.smooth if c.smooth > 1 else "none",
        nb=c.n_buckets, ns=c.n_strata, win=", ".join(map(str, c.windows)), nboot=c.n_boot), level="info")
    how = (", greedy" if c.temperature == 0 else f", sampled at temperature {c.temperature} (seed {c.seed})")
    if c.traces:
        src = f"external traces from {result.source}"
    elif c.generator:
        src = (f"traces generated on {c.tasks} by the server at {c.generator}{how}; distributions from its top-k "
               "logprobs (black-box)")
    else:
        src = (f"traces generated by the model on {c.tasks}{how}; distributions from one teacher-forced forward "
               "(temperature 1)")
    rep.add_paragraph(f"Source: {src}. Signal from the {'top-k' if c.distribution == 'topk' else 'full-vocabulary'} "
                      "distributions.")

    if result.shift_saturation > 0.5 and c.distribution == "topk":
        rep.add_notice(f"D_t is within 1 % of its maximum log 2 at {result.shift_saturation:.0%} of the steps: "
                       "consecutive top-k distributions barely overlap (near-deterministic text), so D is almost a "
                       "constant offset and the peak is decided by the entropy term.", level="info")
    rep.add_heading("Signal over the steps")
    for r in _pick(rows):
        sig, toks = result.signals[r["id"]], result.tokens[r["id"]]
        label = "right" if r["correct"] else "wrong"
        rep.add_figure(signal_figure(result, r["id"]))
        top = max(max(sig["I"]), 1e-9)
        rep.add_token_view(toks, sig["I"], caption=f"trace {r['id']} ({label}): tokens coloured by I_t", vmin=0,
                           vmax=top)

    rep.add_heading("Failure prediction")
    rep.add_figure(roc_figure(result))
    strat_ci = result.auc_length_strata_ci or [None, None]
    table = [{"score": "peak S", "auc": result.auc, "ci_low": result.auc_ci[0], "ci_high": result.auc_ci[1]},
             {"score": f"peak S within {len(result.length_strata)} length strata", "auc": result.auc_length_strata,
              "ci_low": strat_ci[0], "ci_high": strat_ci[1]}] + \
        ([{"score": "peak S, complete traces only", "auc": result.truncation["auc_complete"]}]
         if result.truncation.get("n_truncated") else []) + \
        [{"score": b, "auc": v, "ci_low": result.baselines_ci[b][0], "ci_high": result.baselines_ci[b][1]}
         for b, v in result.baselines.items()] + [{"score": k, "auc": v} for k, v in result.variants.items()]
    rep.add_table(pd.DataFrame(table), caption="ROC-AUC for predicting a wrong answer (higher score = wrong); the "
                  "baselines show whether the signal adds anything over entropy and length.")
    if result.length_strata:
        rep.add_paragraph(
            "Length: the peak is a maximum over the trace's steps, so a longer trace has a larger peak even when every "
            "step is drawn alike, and wrong traces are often longer (they ramble, or hit the token limit). The AUC "
            f"within length strata compares only wrong and right traces of the same length quantile bin "
            f"(--n-length-strata {c.n_length_strata}; pairs pooled over bins): "
            f"{_fmt(result.auc_length_strata)} {_ci(result.auc_length_strata_ci or None)} against "
            f"{_fmt(result.auc)} plain (length alone: {_fmt(result.baselines['length'])}). "
            + _truncated_text(result.truncation, len(rows)) + ".")
        rep.add_table(pd.DataFrame(result.length_strata), caption="Length strata: traces, wrong traces and the "
                      "peak's AUC in each (undefined where a bin holds one label only).")
    rep.add_table(pd.DataFrame(result.early_warning),
                  caption="Early warning: AUC of the peak within the first W tokens.")
    if result.auc_by_k:
        rep.add_table(pd.DataFrame(result.auc_by_k),
                      caption="AUC of the peak at other k (k_available: entries present).")

    rep.add_heading("Accuracy by peak strength")
    rep.add_figure(bucket_figure(result))
    rep.add_table(pd.DataFrame(result.buckets))

    rep.add_heading("Early vs late peaks")
    acc = [el["early_accuracy"] or 0, el["late_accuracy"] or 0]
    fig = go.Figure(go.Bar(x=["early (r ≤ 0.25)", "late (r > 0.5)"], y=acc,
                           error_y=_error_bars(acc, [el["early_accuracy_ci"], el["late_accuracy_ci"]]),
                           text=[f"n={el['n_early']}", f"n={el['n_late']}"], textposition="outside"))
    fig.update_layout(title="accuracy of early- vs late-peak traces, within peak-strength strata",
                      yaxis_title="accuracy", yaxis_range=[0, 1.1], height=340)
    rep.add_figure(fig)
    rep.add_table(pd.DataFrame(result.early_late_strata), caption="Per stratum of S, accuracies with Wilson "
                  "intervals (strata without both early and late "
                  "traces do not enter the comparison).")

    rep.add_heading("Traces")
    rep.add_table(pd.DataFrame(rows).sort_values("peak", ascending=False), max_rows=100)
    rep.add_run_section(result.header)
    return rep
