"""Joins across analyses, and two models side by side: functions from analyses' outputs to tables.

An analysis's outputs are `Outputs(results, tables)`: its `results.json` content and its CSV tables as DataFrames
(read back from its run directory, so a resumed audit joins exactly what a fresh one does). Every join carries a
chance level: head-set overlaps a permutation p-value against random head sets of the same sizes, the per-head gate
/ first-token correlation a permutation p-value over shuffled heads, the skill-neuron / massive-dim join the share
of layer-matched random neurons. `docs/audit.md` states each definition.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from interp.controls import bootstrap_ci

Head = tuple[int, int]
HEAD_SETS = {  # name → what it is (the index's legend)
    "refusal_suppression": "refusal_cliff: the top-ranked heads of its largest ablation (pushing refusal down)",
    "sink": "heads whose mean attention to the first token is at least sink-epsilon (Gu et al.'s rule per head)",
    "talking_heads_writers": "talking_heads: writer heads of the q/k/v channels above the random baseline",
    "talking_heads_readers": "talking_heads: reader heads of those channels",
    "lowest_gate": "gated_attention: the heads with the lowest mean output gate (its head selection)",
}
N_PERMUTATIONS = 10_000


class Outputs(NamedTuple):
    """One analysis's outputs on one model."""

    results: dict
    tables: dict[str, pd.DataFrame]


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


# ---------------------------------------------------------------- findings per model

def head_sets(runs: Mapping[str, Outputs]) -> dict[str, list[Head]]:
    """The head sets the analyses found (only those whose analysis ran), in each analysis's order."""
    out: dict[str, list[Head]] = {}
    if "refusal_cliff" in runs:
        tops = [r for r in runs["refusal_cliff"].results.get("ablation", []) if r.get("selection") == "top"]
        largest = max(tops, key=lambda r: r["n_heads"], default=None)
        out["refusal_suppression"] = [tuple(h) for h in largest["heads"]] if largest else []
    sink_source = next((a for a in ("gated_attention", "systematic_outliers") if a in runs), None)
    if sink_source is not None:
        res = runs[sink_source]
        rows = res.results.get("attention_heads") or \
            res.tables.get("attention_heads", pd.DataFrame()).to_dict("records")
        eps = res.results["config"].get("sink_epsilon", 0.3)
        out["sink"] = [(int(r["layer"]), int(r["head"])) for r in rows
                       if r.get("first_token") is not None and r["first_token"] >= eps]
    if "talking_heads" in runs:
        channels = runs["talking_heads"].results.get("channels", [])
        out["talking_heads_writers"] = list(dict.fromkeys((r["writer_layer"], r["writer_head"]) for r in channels))
        out["talking_heads_readers"] = list(dict.fromkeys((r["reader_layer"], r["reader_head"]) for r in channels))
    if "gated_attention" in runs and runs["gated_attention"].results.get("gated"):
        out["lowest_gate"] = [tuple(h) for h in runs["gated_attention"].results.get("selected_heads", [])]
    return out


def massive_dims(runs: Mapping[str, Outputs]) -> list[tuple[int, int]]:
    """(layer, dim) of every massive activation systematic_outliers listed (Sun et al.'s rule), once each."""
    if "systematic_outliers" not in runs:
        return []
    rows = runs["systematic_outliers"].results.get("massive_activations", [])
    return sorted({(int(r["layer"]), int(r["dim"])) for r in rows})


def intervention_dims(runs: Mapping[str, Outputs]) -> list[int]:
    """The residual dims systematic_outliers intervened on (its massive dims, or its candidate dims without any)."""
    rows = runs["systematic_outliers"].results.get("interventions", []) if "systematic_outliers" in runs else []
    row = next((r for r in rows if r["what"] == "set_zero" and r.get("split") == "held_out"), None)
    return [int(d) for d in row["dims"]] if row else []


def skill_neurons(runs: Mapping[str, Outputs]) -> list[tuple[int, int]]:
    """(layer, neuron) of skill_unlearning's selected neurons."""
    if "skill_unlearning" not in runs:
        return []
    rows = runs["skill_unlearning"].results["selected_neurons"]["neurons"]
    return [(int(r["layer"]), int(r["neuron"])) for r in rows]


def shape(runs: Mapping[str, Outputs]) -> dict[str, int] | None:
    """n_layers, n_heads, d_model of the model the runs measured (from any run header)."""
    for out in runs.values():
        model = out.results.get("model")
        if model:
            return {k: int(model[k]) for k in ("n_layers", "n_heads", "d_model")}
    return None


# ---------------------------------------------------------------- joins with chance levels

def overlap_p_value(size_a: int, size_b: int, observed: int, n_total: int, n_draws: int = N_PERMUTATIONS,
                    seed: int = 0) -> float:
    """P(|A' ∩ B'| ≥ observed) for random sets A', B' of sizes `size_a`, `size_b` among `n_total` items, estimated
    by `n_draws` permutations ((1 + hits) / (1 + draws)). The overlap's law depends only on the sizes, so A' is fixed
    to the first `size_a` items and B' drawn."""
    if size_a == 0 or size_b == 0:
        return 1.0
    rng = np.random.default_rng(seed)
    draws = np.argpartition(rng.random((n_draws, n_total)), size_b - 1, axis=1)[:, :size_b]
    overlaps = (draws < size_a).sum(1)
    return float((1 + (overlaps >= observed).sum()) / (1 + n_draws))


def head_overlaps(sets: Mapping[str, Sequence[Head]], n_heads_total: int, seed: int = 0) -> pd.DataFrame:
    """Every pair of head sets: sizes, shared heads, the overlap expected by chance (|A|·|B|/N) and the permutation
    p-value against random head sets of the same sizes."""
    names = list(sets)
    rows = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            sa, sb = set(sets[a]), set(sets[b])
            shared = sorted(sa & sb)
            rows.append({"set_a": a, "set_b": b, "size_a": len(sa), "size_b": len(sb), "overlap": len(shared),
                         "chance": len(sa) * len(sb) / n_heads_total,
                         "p_value": overlap_p_value(len(sa), len(sb), len(shared), n_heads_total, seed=seed),
                         "shared": " ".join(f"({h[0]},{h[1]})" for h in shared)})
    return pd.DataFrame(rows, columns=["set_a", "set_b", "size_a", "size_b", "overlap", "chance", "p_value", "shared"])


def _rank(x: np.ndarray) -> np.ndarray:
    return pd.Series(x).rank().to_numpy()


def gate_vs_first_token(runs: Mapping[str, Outputs], seed: int = 0) -> tuple[pd.DataFrame, dict] | None:
    """Per head: mean gate and share of gate values below 0.1 (gate sparsity) against the head's mean attention to
    the first token, on the same text chunks; Spearman ρ with a two-sided permutation p-value (heads shuffled).
    None without a gated model."""
    if "gated_attention" not in runs or not runs["gated_attention"].results.get("gated"):
        return None
    res = runs["gated_attention"].results
    gates = pd.DataFrame(res["gates"])
    first = pd.DataFrame(res["attention_heads"])[["layer", "head", "first_token"]]
    table = gates[["layer", "head", "mean", "frac_below_0_1"]].rename(columns={"mean": "gate_mean"}).merge(
        first, on=["layer", "head"])
    rho, p = _spearman_permutation(table["frac_below_0_1"].to_numpy(float), table["first_token"].to_numpy(float), seed)
    return table, {"x": "gate sparsity (share of gate values < 0.1)", "y": "first-token attention", "spearman": rho,
                   "p_value": p, "n_heads": len(table), "chance": "ρ = 0 (heads shuffled)"}


def _spearman_permutation(x: np.ndarray, y: np.ndarray, seed: int) -> tuple[float, float]:
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return float("nan"), 1.0
    rx, ry = _rank(x), _rank(y)
    rho = float(np.corrcoef(rx, ry)[0, 1])
    rng = np.random.default_rng(seed)
    perms = np.argsort(rng.random((N_PERMUTATIONS, len(x))), axis=1)
    rxs = (rx - rx.mean()) / rx.std()
    rys = ry[perms]
    rys = (rys - rys.mean(1, keepdims=True)) / rys.std(1, keepdims=True)
    null = (rys * rxs).mean(1)
    return rho, float((1 + (np.abs(null) >= abs(rho) - 1e-12).sum()) / (1 + N_PERMUTATIONS))


def skill_vs_massive(neurons: Sequence[tuple[int, int]], dims: Sequence[int], top_dim: Mapping[int, np.ndarray],
                     seed: int = 0) -> tuple[pd.DataFrame, dict] | None:
    """Skill neurons against massive-activation dims: each selected neuron's top write dim (largest |column| of its
    down-projection, `top_dim[layer][neuron]`) and whether it is one of `dims`; chance: the same share over random
    neurons with the selection's count per layer (`N_PERMUTATIONS` draws; p = share of draws at least as high).
    None without neurons, dims or weights."""
    neurons = [(layer, n) for layer, n in neurons if layer in top_dim]
    if not neurons or not dims:
        return None
    wanted = set(dims)
    table = pd.DataFrame([{"layer": layer, "neuron": n, "top_write_dim": int(top_dim[layer][n]),
                           "writes_massive_dim": int(top_dim[layer][n]) in wanted} for layer, n in neurons])
    observed = float(table["writes_massive_dim"].mean())
    rng = np.random.default_rng(seed)
    hits = np.zeros(N_PERMUTATIONS)
    for layer, count in table.groupby("layer").size().items():
        in_set = np.isin(top_dim[layer], list(wanted))
        draws = np.argpartition(rng.random((N_PERMUTATIONS, len(in_set))), count - 1, axis=1)[:, :count]
        hits += in_set[draws].sum(1)
    null = hits / len(table)
    return table, {"neurons": len(table), "dims": sorted(wanted), "share": observed, "chance": float(null.mean()),
                   "p_value": float((1 + (null >= observed - 1e-12).sum()) / (1 + N_PERMUTATIONS))}


def layer_strip(sets: Mapping[str, Sequence[Head]], massive: Sequence[tuple[int, int]] | None,
                neurons: Sequence[tuple[int, int]] | None, n_layers: int) -> pd.DataFrame:
    """Findings per layer: one row per kind (head sets, massive activations as (layer, dim), skill neurons; None:
    the analysis did not run)."""
    kinds = {name: [h[0] for h in heads] for name, heads in sets.items()}
    if massive is not None:
        kinds["massive_dims"] = [layer for layer, _ in massive]
    if neurons is not None:
        kinds["skill_neurons"] = [layer for layer, _ in neurons]
    rows = [{"finding": kind, **{str(layer): layers.count(layer) for layer in range(n_layers)}}
            for kind, layers in kinds.items()]
    return pd.DataFrame(rows, columns=["finding", *map(str, range(n_layers))])


# ---------------------------------------------------------------- headlines

def headline(name: str, out: Outputs) -> dict:
    """The analysis's headline number (held out), its control and a verdict (found / null), from its outputs."""
    fn = _HEADLINES.get(name)
    row = fn(out.results) if fn else {"metric": "see its report", "value": None, "control": None,
                                      "control_label": "", "verdict": "null", "why": "no headline defined"}
    return {"analysis": name, **row}


def _refusal_cliff(res: dict) -> dict:
    rows = res.get("ablation", [])
    base = res.get("ablation_baseline") or {}
    tops = [r for r in rows if r.get("selection") == "top" and r.get("asr") is not None]
    if not tops:
        return {"metric": "held-out ASR with the top heads ablated", "value": None, "control": None,
                "control_label": "random heads", "verdict": "null", "why": "no ablation ran"}
    best = min(tops, key=lambda r: (r["asr"], r["n_heads"]))
    rand = next((r for r in rows if r.get("selection") == "random" and r["n_heads"] == best["n_heads"]), {})
    lo, hi = best.get("asr_ci") or (math.nan, math.nan)
    found = rand.get("asr") is not None and hi < rand["asr"] and best["asr"] < _num(base.get("asr"))
    return {"metric": f"held-out ASR, top {best['n_heads']} head(s) ablated", "value": best["asr"], "ci": [lo, hi],
            "control": rand.get("asr"), "control_sd": rand.get("asr_sd"),
            "control_label": f"random heads of the same layers (unablated {_num(base.get('asr')):.2f})",
            "verdict": "found" if found else "null",
            "why": "the top heads' ASR interval lies below the random heads' mean and the unablated ASR" if found else
                   "ablating the top heads does not cut the ASR below the random control"}


def _systematic_outliers(res: dict) -> dict:
    rows = [r for r in res.get("interventions", []) if r.get("split") == "held_out"]
    base = next((r for r in rows if r["what"] == "baseline"), None)
    zero = next((r for r in rows if r["what"] == "set_zero"), None)
    rand = next((r for r in rows if r["what"] == "set_zero_random" and r.get("draw") == "mean ± sd"), None)
    sink = _num((res.get("attention_overall") or {}).get("sink_rate"))
    found = res.get("n_massive", 0) > 0 or sink > 0
    delta = zero["loss"] - base["loss"] if zero and base else None
    return {"metric": "held-out Δloss zeroing the chosen dims", "value": delta,
            "control": rand["loss"] - base["loss"] if rand and base else None,
            "control_sd": rand.get("loss_sd") if rand else None, "control_label": "random dims matched on norm",
            "verdict": "found" if found else "null", "m_act": res.get("m_act"),
            "why": f"{res.get('n_massive', 0)} massive activation(s) (Sun's rule), sink rate {sink:.3g} %, "
                   f"M-Act {_num(res.get('m_act')):.3g}"}


def output_sparsity(res: dict) -> float | None:
    """gated_attention: mean over layers of the share of attention-output elements below θ (after the gate when the
    model has one)."""
    key = "gated" if res.get("gated") else "ungated"
    values = [r[key] for r in res.get("sparsity", []) if r.get(key) is not None]
    return float(np.mean(values)) if values else None


def _gated_attention(res: dict) -> dict:
    after = output_sparsity(res)
    if not res.get("gated"):
        return {"metric": "attention-output sparsity (share < θ)", "value": after, "control": None,
                "control_label": "no gate to compare with", "verdict": "null", "m_act": res.get("m_act"),
                "why": "the model has no attention output gate"}
    before = [r["ungated"] for r in res.get("sparsity", []) if r.get("ungated") is not None]
    control = float(np.mean(before)) if before else None
    found = after is not None and control is not None and after > control
    return {"metric": "gated attention-output sparsity (share < θ)", "value": after, "control": control,
            "control_label": "the same output before the gate", "verdict": "found" if found else "null",
            "m_act": res.get("m_act"), "why": f"mean gate {np.mean([g['mean'] for g in res['gates']]):.3g}; M-Act "
                                              f"{_num(res.get('m_act')):.3g}" if res.get("gates") else ""}


def _talking_heads(res: dict) -> dict:
    edits = [r for r in res.get("edits", []) if r.get("split") == "held_out"]
    alpha = min((r["alpha"] for r in edits), default=None)
    chan = next((r for r in edits if r["alpha"] == alpha and r["selection"] == "channel"), None)
    rand = next((r for r in edits if r["alpha"] == alpha and r["selection"] == "random"), None)
    if chan is None:
        return {"metric": "held-out Laundry List accuracy, channel edited", "value": None, "control": None,
                "control_label": "σ-matched random components", "verdict": "null", "why": "no channel edit ran"}
    lo, hi = chan.get("accuracy_ci") or (math.nan, math.nan)
    found = rand is not None and not lo <= rand["accuracy"] <= hi
    n = (res.get("channel_counts") or {}).get("found", len(res.get("channels", [])))
    return {"metric": f"held-out Laundry List accuracy, channel scaled by α = {alpha:g}", "value": chan["accuracy"],
            "ci": [lo, hi], "control": rand["accuracy"] if rand else None,
            "control_sd": rand.get("accuracy_sd") if rand else None, "control_label": "σ-matched random components",
            "verdict": "found" if found else "null",
            "why": f"{n} channel(s) above the random baseline; the edit "
                   + ("moves accuracy outside the random control" if found else "moves accuracy as random ones do")}


def _skill_unlearning(res: dict) -> dict:
    rows = [r for r in res.get("evaluation", []) if r.get("role") == "forget"]
    na = next((r for r in rows if r["method"] == "neuron_adjust"), None)
    rand = next((r for r in rows if r["method"] == "random_neurons"), None)
    if na is None or na.get("logprob_change") is None:
        return {"metric": "held-out forget log-prob change", "value": None, "control": None,
                "control_label": "layer-matched random neurons", "verdict": "null", "why": "no evaluation"}
    mean, sd = _num(rand.get("logprob_change")) if rand else math.nan, _num(rand.get("logprob_after_sd")) if rand else 0
    found = na["logprob_change"] < mean - 2 * (sd if math.isfinite(sd) else 0) and na["logprob_change"] < 0
    return {"metric": f"held-out log-prob change of {na['skill']} (Neuron Adjust)", "value": na["logprob_change"],
            "control": rand.get("logprob_change") if rand else None, "control_sd": sd,
            "control_label": "layer-matched random neurons", "verdict": "found" if found else "null",
            "why": "the forget skill's log-prob falls more than 2 sd below the random neurons'" if found else
                   "the forget skill's log-prob falls no more than the random neurons'"}


def _instability(res: dict) -> dict:
    auc, ci = res.get("auc"), res.get("auc_ci") or [None, None]
    found = auc is not None and ci[0] is not None and not ci[0] <= 0.5 <= ci[1]
    return {"metric": "AUC of the instability peak for wrong answers", "value": auc, "ci": ci, "control": 0.5,
            "control_label": "chance", "verdict": "found" if found else "null",
            "why": "undefined: " + "; ".join(res.get("warnings", [])[:1]) if auc is None else
                   ("the interval excludes 0.5" if found else "the interval includes 0.5")}


_HEADLINES = {"refusal_cliff": _refusal_cliff, "systematic_outliers": _systematic_outliers,
              "gated_attention": _gated_attention, "talking_heads": _talking_heads,
              "skill_unlearning": _skill_unlearning, "instability": _instability}


# ---------------------------------------------------------------- two models

class Items(NamedTuple):
    """Per-item values of one quantity (ids match items across models)."""

    quantity: str
    ids: list[str]
    values: np.ndarray


def items(name: str, out: Outputs) -> Items | None:
    """The per-item values an analysis keeps (None when it keeps none)."""
    if name == "refusal_cliff" and "examples" in out.tables:
        df = out.tables["examples"]
        df = df[(df["split"] == "eval") & (df["kind"] == "harmful")]
        return Items("final-token refusal score, held-out harmful prompts", df["prompt"].astype(str).tolist(),
                     df["rs_final"].to_numpy(float))
    if name == "skill_unlearning" and "items" in out.tables:
        df = out.tables["items"]
        df = df[df["role"] == "forget"]
        return Items("forget log-prob change per held-out item (Neuron Adjust)", df["prompt"].astype(str).tolist(),
                     (df["logprob_neuron_adjust"] - df["logprob_before"]).to_numpy(float))
    if name == "instability" and out.results.get("traces"):
        rows = out.results["traces"]
        return Items("correct final answer per trace", [str(r["id"]) for r in rows],
                     np.array([float(r["correct"]) for r in rows]))
    return None


def compare_items(a: Items, b: Items, seed: int = 0) -> dict:
    """Mean of each model's items, the difference b − a and its 95 % bootstrap interval over items: paired when
    both models have the same item ids (resampling pairs), otherwise each model's items resampled on their own."""
    ma, mb = float(np.nanmean(a.values)), float(np.nanmean(b.values))
    paired = sorted(a.ids) == sorted(b.ids) and len(set(a.ids)) == len(a.ids)
    if paired:
        order = {i: k for k, i in enumerate(b.ids)}
        d = b.values[[order[i] for i in a.ids]] - a.values
        ci = bootstrap_ci(lambda idx: float(np.nanmean(d[idx])), len(d), seed=seed)
    else:
        both = np.concatenate([a.values, b.values])
        n_a = len(a.values)
        which = np.array([0] * n_a + [1] * len(b.values))

        def diff(idx):
            return float(np.nanmean(both[idx][which[idx] == 1]) - np.nanmean(both[idx][which[idx] == 0]))

        ci = bootstrap_ci(diff, len(both), seed=seed, strata=which.tolist())
    moved = bool(ci[0] > 0 or ci[1] < 0)
    return {"quantity": a.quantity, "n_a": len(a.values), "n_b": len(b.values), "paired": paired, "mean_a": ma,
            "mean_b": mb, "difference": mb - ma, "ci": list(ci), "moved": moved}


def finding_changes(a: Mapping[str, Outputs], b: Mapping[str, Outputs]) -> pd.DataFrame:
    """Findings that appear (in b only), vanish (in a only) or move: heads matched by (layer, head), skill neurons
    by (layer, neuron), massive dims by index (a dim found in both whose layers differ moves)."""
    rows = []
    sa, sb = head_sets(a), head_sets(b)
    for kind in sorted(set(sa) & set(sb)):
        rows += _set_changes(kind, set(sa[kind]), set(sb[kind]))
    rows += _set_changes("skill_neurons", set(skill_neurons(a)), set(skill_neurons(b)))
    da, db = _layers_by_dim(massive_dims(a)), _layers_by_dim(massive_dims(b))
    for dim in sorted(set(da) | set(db)):
        if dim not in db:
            rows.append({"finding": "massive_dims", "change": "vanishes", "item": str(dim), "detail": _layers(da[dim])})
        elif dim not in da:
            rows.append({"finding": "massive_dims", "change": "appears", "item": str(dim), "detail": _layers(db[dim])})
        elif da[dim] != db[dim]:
            rows.append({"finding": "massive_dims", "change": "moves", "item": str(dim),
                         "detail": f"{_layers(da[dim])} → {_layers(db[dim])}"})
    return pd.DataFrame(rows, columns=["finding", "change", "item", "detail"])


def _set_changes(kind: str, a: set, b: set) -> list[dict]:
    return ([{"finding": kind, "change": "vanishes", "item": str(tuple(x)), "detail": ""} for x in sorted(a - b)]
            + [{"finding": kind, "change": "appears", "item": str(tuple(x)), "detail": ""} for x in sorted(b - a)])


def _layers_by_dim(pairs: Sequence[tuple[int, int]]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, dim in pairs:
        out.setdefault(dim, []).append(layer)
    return {d: sorted(v) for d, v in out.items()}


def _layers(layers: Sequence[int]) -> str:
    return "layers " + ", ".join(map(str, layers))
