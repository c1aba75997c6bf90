"""Dynamic instability in reasoning traces (Chen et al. 2026, "I May Not Have Articulated Myself
Clearly: Diagnosing Dynamic Instability in LLM Reasoning at Inference Time", arXiv 2602.02863).

From the top-k next-token distributions of each generated token: entropy H_t of the renormalised
top-k, shift D_t = JSD(p̃_t, p̃_{t−1}) on the union of the two supports, instability I_t = D_t + λ·H_t.
Per trace the peak S = max_t I_t and its relative position r = t*/T (early r ≤ 0.25, late r > 0.5);
across traces the ROC-AUC of S for predicting a wrong answer (bootstrap 95 % CI), accuracy per S
quantile bucket, early- vs late-peak accuracy within S strata, an early-warning AUC from prefixes,
and the same AUC for plain baselines (mean entropy, final-step entropy, length).

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

import pandas as pd
import plotly.graph_objects as go

from interp import instability as ins
from interp.analysis import CommonConfig, require, run_header
from interp.files import read_jsonl
from interp.errors import UserError
from interp.report import Report, analysis_report
from interp.traces import load_traces, trace_record

DATASET_FIELD = "tasks"
BASELINES = ("mean_entropy", "final_entropy", "length")


@dataclass
class Config(CommonConfig):
    traces: str | None = None  # JSONL of external traces with API logprobs ({"id", "correct", "content"}); no model is loaded
    tasks: str = "gsm8k"  # (--dataset) task set with checkable answers: gsm8k (paper), word-problems, arithmetic (organisms) or a JSONL file with prompt, answer
    chat_template: bool = False  # wrap each task prompt in the model's chat template (the organisms' arithmetic prompts already are)
    max_new_tokens: int = 256  # tokens generated per trace
    temperature: float = 0.0  # 0 = greedy (reconstructed protocol); > 0 samples, seeded by --seed
    top_p: float | None = None  # nucleus sampling when temperature > 0
    top_k: int = 20  # k of the renormalised top-k distribution (reconstructed: the OpenAI top_logprobs maximum)
    lam: float = 1.0  # λ in I_t = D_t + λ·H_t (reconstructed; the paper's value was not recovered)
    jsd_support: Literal["union_zero", "residual_bin"] = "union_zero"  # tokens outside a step's top-k: probability 0, or the un-renormalised tail lumped into one shared 'other' outcome
    normalise_entropy: bool = False  # divide H_t by log k so both terms of I_t lie in [0, 1]
    smooth: int = 1  # trailing moving average of I_t over this many steps (1 = none, as in the paper)
    distribution: Literal["topk", "full"] = "topk"  # signal from the top-k (paper, black-box) or the full vocabulary (local model only)
    first_step: Literal["zero", "exclude"] = "zero"  # D_1 = 0 and step 1 counts for the peak, or the peak is taken over t >= 2
    n_buckets: int = 5  # quantile buckets of peak strength for the accuracy table (reconstructed: quintiles)
    n_strata: int = 3  # peak-strength strata for early vs late (compared within strata)
    windows: tuple[int, ...] = (32, 64, 128)  # early-warning prefix lengths W in tokens: AUC of max_{t<=W} I_t (reconstructed)
    k_sweep: tuple[int, ...] = (5, 10, 20)  # also report the AUC at these k
    n_boot: int = 2000  # bootstrap resamples for the AUC's 95 % interval (stratified by label)

    def validate(self, model=None) -> None:
        super().validate(model)
        require(self.max_new_tokens >= 1, f"max-new-tokens must be at least 1; got {self.max_new_tokens}")
        require(self.temperature >= 0, f"temperature must be >= 0; got {self.temperature}")
        require(self.top_p is None or 0 < self.top_p <= 1, f"top-p must be in (0, 1]; got {self.top_p}")
        require(self.top_k >= 1, f"top-k must be at least 1; got {self.top_k}")
        require(self.lam >= 0 and math.isfinite(self.lam), f"lam must be a finite number >= 0; got {self.lam}")
        require(self.smooth >= 1, f"smooth must be at least 1 (1 = no smoothing); got {self.smooth}")
        require(self.n_buckets >= 2, f"n-buckets must be at least 2; got {self.n_buckets}")
        require(self.n_strata >= 1, f"n-strata must be at least 1; got {self.n_strata}")
        require(all(w >= 1 for w in self.windows), f"windows must be at least 1 token; got {self.windows}")
        require(all(k >= 1 for k in self.k_sweep), f"k-sweep values must be at least 1; got {self.k_sweep}")
        require(self.n_boot >= 100, f"n-boot must be at least 100; got {self.n_boot}")
        require(not (self.traces and self.distribution == "full"),
                "--distribution full needs a local model's full distributions; drop it or drop --traces")


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


def generate_traces(model, config: Config) -> tuple[list[ins.TraceDists], list[dict]]:
    """Generate on the task set, score the answers, then one teacher-forced forward for the distributions.
    Returns the traces and one record per trace in the external JSONL format (for `traces.jsonl`)."""
    from interp.chat import chat_prefix
    from interp.generation import generate_tokens
    from interp.skills import is_correct

    tok = model.tokenizer
    items = load_tasks(config.tasks, config.limit)
    if config.chat_template:
        prompts = [tok(chat_prefix(tok, it.prompt), add_special_tokens=False)["input_ids"] for it in items]
    else:
        prompts = [tok(it.prompt)["input_ids"] for it in items]
    completions = generate_tokens(model, prompts, max_new_tokens=config.max_new_tokens, temperature=config.temperature,
                                  top_p=config.top_p, seed=config.seed, batch_size=config.batch_size,
                                  progress=config.progress)
    keep = [i for i, c in enumerate(completions) if c]
    if not keep:
        raise UserError("the model ended every trace at once (no generated tokens); check the prompts' format")
    width = max([config.top_k, *config.k_sweep])
    dists = ins.teacher_forced(model, [prompts[i] for i in keep], [completions[i] for i in keep], top_k=width,
                               batch_size=config.batch_size, progress=config.progress)
    traces, records = [], []
    for i, d in zip(keep, dists):
        text = tok.decode(completions[i], skip_special_tokens=True)
        tokens = [tok.decode([t]) for t in completions[i]]
        trace = ins.TraceDists(f"{i}", bool(is_correct(items[i], text)), tokens, d["topk_ids"], d["topk_logprobs"],
                               d["full_entropy"], d["full_jsd"], int(model.cfg.d_vocab))
        traces.append(trace)
        alts = [[(tok.decode([int(v)]), float(lp)) for v, lp in zip(d["topk_ids"][t], d["topk_logprobs"][t])]
                for t in range(len(tokens))]
        rec = trace_record(trace.id, trace.correct, tokens, alts, d["chosen"].tolist())
        rec["prompt"], rec["answer"], rec["completion"] = items[i].prompt, items[i].answer, text
        records.append(rec)
    return traces, records


# --------------------------------------------------------------------------- the analysis

@dataclass
class Result:
    header: dict  # run_header: analysis, model, environment, config
    config: Config
    source: str  # "model" or the traces file
    trace_rows: list[dict]  # id, correct, peak, peak_position, length, + baselines and prefix peaks
    signals: dict[str, dict[str, list[float]]]  # trace id -> H, D, I per step
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

    def to_dict(self) -> dict:
        """The `results.json` content."""
        n = len(self.trace_rows)
        return {
            **self.header,
            "auc": self.auc, "auc_ci": self.auc_ci, "baselines": self.baselines, "baselines_ci": self.baselines_ci,
            "buckets": self.buckets, "early_late": self.early_late,
            "traces": [{k: r[k] for k in ("id", "correct", "peak", "peak_position", "length")} for r in self.trace_rows],
            "n_traces": n, "accuracy": sum(r["correct"] for r in self.trace_rows) / n,
            "variants": self.variants, "early_warning": self.early_warning, "auc_by_k": self.auc_by_k,
            "early_late_strata": self.early_late_strata, "shift_saturation": self.shift_saturation,
            "source": self.source,
        }

    def tables(self) -> dict[str, pd.DataFrame]:
        steps = [{"id": tid, "step": t + 1, "token": self.tokens[tid][t], **{k: v[t] for k, v in sig.items()}}
                 for tid, sig in self.signals.items() for t in range(len(sig["I"]))]
        return {"traces": pd.DataFrame(self.trace_rows), "buckets": pd.DataFrame(self.buckets),
                "early_late_strata": pd.DataFrame(self.early_late_strata),
                "early_warning": pd.DataFrame(self.early_warning), "steps": pd.DataFrame(steps)}

    def write_extras(self, out_dir: Path) -> None:
        """A local model's traces as `traces.jsonl`, readable back with `--traces`."""
        if self.records:
            with open(Path(out_dir) / "traces.jsonl", "w", encoding="utf-8") as f:
                for rec in self.records:
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")


def analyse(traces: list[ins.TraceDists], config: Config) -> dict:
    """Every number of the analysis from the traces' distributions (no model)."""
    start = 1 if config.first_step == "exclude" else 0
    kept = [t for t in traces if t.length > start]
    if len(kept) < 2:
        raise UserError(f"need at least 2 traces with more than {start} token(s); got {len(kept)}")
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
        row = {"id": t.id, "correct": t.correct, "peak": p.strength, "peak_position": p.position, "length": t.length,
               "peak_step": p.step, "early": p.early, "late": p.late, "mean_entropy": float(h.mean()),
               "final_entropy": float(h[-1])}
        for w in config.windows:
            row[f"prefix_peak_{w}"] = ins.prefix_peak(sig["I"], w, start)
        rows.append(row)
        signals[t.id] = {k: v.tolist() for k, v in sig.items()}
        tokens[t.id] = t.tokens
        extra["peak_D"].append(float(sig["D"][start:].max()))
        extra["peak_H"].append(float(sig["H"][start:].max()))
        if have_full:
            extra["peak_other"].append(ins.peak(ins.step_signals(t, distribution=other, **opts)["I"], start).strength)
    wrong = [not r["correct"] for r in rows]
    peaks = [r["peak"] for r in rows]
    auc = ins.roc_auc(peaks, wrong)
    lo, hi = ins.bootstrap_auc_ci(peaks, wrong, n_boot=config.n_boot, seed=config.seed)
    baselines = {b: ins.roc_auc([r[b] for r in rows], wrong) for b in BASELINES}
    baselines_ci = {b: list(ins.bootstrap_auc_ci([r[b] for r in rows], wrong, n_boot=config.n_boot, seed=config.seed))
                    for b in BASELINES}
    variants = {"peak_shift_only": ins.roc_auc(extra["peak_D"], wrong), "peak_entropy_only": ins.roc_auc(extra["peak_H"], wrong)}
    if have_full:
        variants["peak_full_vocab" if other == "full" else "peak_topk"] = ins.roc_auc(extra["peak_other"], wrong)
    summary, strata = ins.early_late(peaks, [r["peak_position"] for r in rows], [r["correct"] for r in rows],
                                     config.n_strata)
    warning = [{"window": w, "auc": ins.roc_auc([r[f"prefix_peak_{w}"] for r in rows], wrong),
                "traces_longer": sum(r["length"] > w for r in rows)} for w in config.windows]
    by_k = []
    if config.distribution == "topk":
        listed = max(int(t.topk_logprobs.isfinite().sum(-1).max()) for t in kept)
        for k in sorted(set(config.k_sweep)):
            s = [ins.peak(ins.step_signals(t, **{**opts, "top_k": k})["I"], start).strength for t in kept]
            by_k.append({"k": k, "auc": ins.roc_auc(s, wrong), "k_available": min(k, listed)})
    roc = {}
    for name, scores in [("peak", peaks)] + [(b, [r[b] for r in rows]) for b in BASELINES]:
        fpr, tpr = ins.roc_curve(scores, wrong)
        roc[name] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    shifts = [d for sig in signals.values() for d in sig["D"][1:]]
    saturation = sum(d > 0.99 * math.log(2) for d in shifts) / max(1, len(shifts))
    return dict(shift_saturation=saturation, trace_rows=rows, signals=signals, tokens=tokens, auc=auc, auc_ci=[lo, hi],
                baselines=baselines, baselines_ci=baselines_ci,
                variants=variants, buckets=ins.accuracy_buckets(peaks, [r["correct"] for r in rows], config.n_buckets),
                early_late=summary, early_late_strata=strata, early_warning=warning, auc_by_k=by_k, roc=roc)


def run(model, config: Config) -> Result:
    """Traces (external or generated by `model`), their per-step signals and every summary."""
    config.validate(model)
    if config.traces:
        traces, records, source = load_traces(config.traces), [], str(config.traces)
        if config.limit:
            traces = traces[:config.limit]
    else:
        if model is None:
            raise UserError("a model is needed to generate traces; pass --model or --traces FILE")
        traces, records = generate_traces(model, config)
        source = "model"
    header = run_header("instability", None if config.traces else model, config)
    return Result(header=header, config=config, source=source, records=records, **analyse(traces, config))


# --------------------------------------------------------------------------- report

def _fmt(x) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


RECONSTRUCTED = (
    "Reconstructed choices (the paper released no code; each is an option): k = {k} (--top-k; the OpenAI "
    "top_logprobs maximum), λ = {lam} weighting the entropy (--lam), natural log, tokens outside a step's top-k "
    "{support} (--jsd-support), D_1 = 0 {first} (--first-step), {norm} (--normalise-entropy), smoothing {smooth} "
    "(--smooth), peak position r = t*/T with t* the first maximum, early r ≤ 0.25 / late r > 0.5 (from a secondary "
    "summary), {nb} quantile buckets (--n-buckets), early vs late compared within {ns} peak-strength strata "
    "(--n-strata) weighted by each stratum's early + late count, prefix windows {win} tokens (--windows), AUC "
    "interval: stratified percentile bootstrap, {nboot} resamples. Higher scores predict a wrong answer for every AUC."
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
    for key, name, colour in (("I", "I = D + λH", "#d62728"), ("D", "D (JSD)", "#1f77b4"), ("H", "H (entropy)", "#7f7f7f")):
        fig.add_trace(go.Scatter(x=x, y=sig[key], name=name, mode="lines", line=dict(color=colour),
                                 text=toks, hovertemplate="step %{x}: %{text}<br>%{y:.3f}<extra></extra>"))
    fig.add_vline(x=r["peak_step"], line_dash="dot")
    fig.update_layout(title=f"trace {trace_id} ({'right' if r['correct'] else 'wrong'}), peak {r['peak']:.3f} at "
                      f"r = {r['peak_position']:.2f}", xaxis_title="generated token", yaxis_title="nats", height=320)
    return fig


def roc_figure(result: Result) -> go.Figure:
    """ROC curves of the peak strength and the baselines for predicting a wrong answer."""
    fig = go.Figure()
    names = {"peak": f"peak S (AUC {_fmt(result.auc)})", **{b: f"{b} (AUC {_fmt(result.baselines[b])})" for b in BASELINES}}
    for key, curve in result.roc.items():
        fig.add_trace(go.Scatter(x=curve["fpr"], y=curve["tpr"], name=names[key], mode="lines",
                                 line=dict(width=3 if key == "peak" else 1.5)))
    fig.add_trace(go.Scatter(x=[0, 1], y=[0, 1], name="chance", mode="lines", line=dict(dash="dash", color="#aaa")))
    fig.update_layout(title="ROC: predicting a wrong answer", xaxis_title="false-positive rate (right traces flagged)",
                      yaxis_title="true-positive rate (wrong traces flagged)", height=420)
    return fig


def bucket_figure(result: Result) -> go.Figure:
    """Accuracy per quantile bucket of the peak strength (n per bar)."""
    fig = go.Figure(go.Bar(x=[f"{r['low']:.3f}–{r['high']:.3f}" for r in result.buckets],
                           y=[r["accuracy"] for r in result.buckets],
                           text=[f"n={r['n']}" for r in result.buckets], textposition="outside"))
    fig.update_layout(title="accuracy per quantile bucket of S", xaxis_title="peak strength S", yaxis_title="accuracy",
                      yaxis_range=[0, 1.1], height=360)
    return fig


def build_report(result: Result, tokenizer=None) -> Report:
    c = result.config
    rep = analysis_report(result.header)
    rows = result.trace_rows
    acc = sum(r["correct"] for r in rows) / len(rows)
    rep.add_paragraph(
        "Chen et al. (2026): the peak of the instability signal I_t = D_t + λ·H_t (shift between consecutive "
        "next-token distributions plus their entropy) predicts whether a reasoning trace ends wrong; early peaks are "
        "corrective, late ones destructive. Paper: ROC-AUC 0.66–0.74; early-peak traces over 3× more accurate than "
        "late-peak ones at comparable strength.")
    rep.add_metrics({"traces": len(rows), "accuracy": acc, "ROC-AUC (peak → wrong)": result.auc,
                     "95 % CI": f"[{_fmt(result.auc_ci[0])}, {_fmt(result.auc_ci[1])}]",
                     **{f"AUC {k}": v for k, v in result.baselines.items()},
                     "early-peak accuracy": result.early_late["early_accuracy"],
                     "late-peak accuracy": result.early_late["late_accuracy"]})
    if not 0 < acc < 1:
        rep.add_notice("Every trace is " + ("right" if acc == 1 else "wrong") + ": the AUCs are undefined.")
    rep.add_notice(RECONSTRUCTED.format(
        k=c.top_k, lam=c.lam, support="get probability 0 (union of supports)" if c.jsd_support == "union_zero"
        else "are lumped into one shared 'other' outcome holding the un-renormalised tail mass",
        first="and step 1 counts for the peak" if c.first_step == "zero" else "and the peak is taken over t ≥ 2",
        norm="H in nats" if not c.normalise_entropy else "H divided by log k", smooth=c.smooth if c.smooth > 1 else "none",
        nb=c.n_buckets, ns=c.n_strata, win=", ".join(map(str, c.windows)), nboot=c.n_boot), level="info")
    src = ("traces generated by the model on " + c.tasks + (", greedy" if c.temperature == 0 else
           f", sampled at temperature {c.temperature} (seed {c.seed})") + "; distributions from one teacher-forced "
           "forward (temperature 1)") if result.source == "model" else f"external traces from {result.source}"
    rep.add_paragraph(f"Source: {src}. Signal from the {'top-k' if c.distribution == 'topk' else 'full-vocabulary'} "
                      "distributions.")

    if result.shift_saturation > 0.5 and c.distribution == "topk":
        rep.add_notice(f"D_t is within 1 % of its maximum log 2 at {result.shift_saturation:.0%} of the steps: consecutive "
                       "top-k distributions barely overlap (near-deterministic text), so D is almost a constant offset "
                       "and the peak is decided by the entropy term.", level="info")
    rep.add_heading("Signal over the steps")
    for r in _pick(rows):
        sig, toks = result.signals[r["id"]], result.tokens[r["id"]]
        label = "right" if r["correct"] else "wrong"
        rep.add_figure(signal_figure(result, r["id"]))
        top = max(max(sig["I"]), 1e-9)
        rep.add_token_view(toks, sig["I"], caption=f"trace {r['id']} ({label}): tokens coloured by I_t", vmin=0, vmax=top)

    rep.add_heading("Failure prediction")
    rep.add_figure(roc_figure(result))
    table = [{"score": "peak S", "auc": result.auc, "ci_low": result.auc_ci[0], "ci_high": result.auc_ci[1]}] + \
        [{"score": b, "auc": v, "ci_low": result.baselines_ci[b][0], "ci_high": result.baselines_ci[b][1]}
         for b, v in result.baselines.items()] + [{"score": k, "auc": v} for k, v in result.variants.items()]
    rep.add_table(pd.DataFrame(table), caption="ROC-AUC for predicting a wrong answer (higher score = wrong); the "
                  "baselines show whether the signal adds anything over entropy and length.")
    rep.add_table(pd.DataFrame(result.early_warning), caption="Early warning: AUC of the peak within the first W tokens.")
    if result.auc_by_k:
        rep.add_table(pd.DataFrame(result.auc_by_k), caption="AUC of the peak at other k (k_available: entries present).")

    rep.add_heading("Accuracy by peak strength")
    rep.add_figure(bucket_figure(result))
    rep.add_table(pd.DataFrame(result.buckets))

    rep.add_heading("Early vs late peaks")
    el = result.early_late
    fig = go.Figure(go.Bar(x=["early (r ≤ 0.25)", "late (r > 0.5)"],
                           y=[el["early_accuracy"] or 0, el["late_accuracy"] or 0],
                           text=[f"n={el['n_early']}", f"n={el['n_late']}"], textposition="outside"))
    fig.update_layout(title="accuracy of early- vs late-peak traces, within peak-strength strata",
                      yaxis_title="accuracy", yaxis_range=[0, 1.1], height=340)
    rep.add_figure(fig)
    rep.add_table(pd.DataFrame(result.early_late_strata), caption="Per stratum of S (strata without both early and late "
                  "traces do not enter the comparison).")

    rep.add_heading("Traces")
    rep.add_table(pd.DataFrame(rows).sort_values("peak", ascending=False), max_rows=100)
    rep.add_run_section(result.header)
    return rep
