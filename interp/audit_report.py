"""The audit's index page: one card per analysis, the joins with their chance levels, two models side by side.

`build_index(index)` reads only the audit's `results.json` content (`interp.audit`); every string goes through
`interp.report.Report`, which escapes it.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from interp.joins import HEAD_SETS
from interp.report import Report, format_value


def _number(value: Any, ci: Any = None, sd: Any = None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    text = format_value(value)
    if ci and None not in ci:
        text += f" [{format_value(ci[0])}, {format_value(ci[1])}]"
    if sd is not None and isinstance(sd, float) and math.isfinite(sd):
        text += f" ± {format_value(sd)}"
    return text


def _card(rep: Report, name: str, status: dict, head: dict | None, model: str) -> None:
    """One analysis on one model: headline beside its control, the verdict, the link to its report."""
    if status["status"] in ("not_applicable", "failed"):
        rep.add_metrics({f"{model}: verdict": status["status"].replace("_", " ")})
        rep.add_paragraph(status["reason"])
        if "error" in status:
            rep.add_link(f"{name} on {model}: traceback", status["error"])
        return
    rep.add_metrics({f"{model}: {head['metric']}": _number(head["value"], head.get("ci")),
                     f"control: {head['control_label']}": _number(head["control"], sd=head.get("control_sd")),
                     f"{model}: verdict": head["verdict"]})
    if head.get("why"):
        rep.add_paragraph(head["why"])
    rep.add_link(f"{name} on {model}: full report ({status['status']})", status["report"])


def _joins(rep: Report, joins: dict, model: str) -> None:
    sets = joins.get("head_sets", {})
    rep.add_heading(f"Head sets — {model}", level=3)
    rep.add_table(pd.DataFrame([{"set": k, "what": HEAD_SETS[k], "heads": " ".join(f"({h[0]},{h[1]})" for h in v)
                                 or "none"} for k, v in sets.items()]))
    if joins.get("head_overlaps"):
        rep.add_table(pd.DataFrame(joins["head_overlaps"]),
                      caption=f"Overlap of every pair of head sets; chance = |A|·|B|/N with N = "
                              f"{joins.get('n_heads_total')} heads; p: permutation p-value against random head sets "
                              "of the same sizes (10,000 draws).")
    gate = joins.get("gate_vs_first_token")
    rep.add_heading(f"Gate sparsity against first-token attention — {model}", level=3)
    if gate:
        s = gate["summary"]
        rep.add_paragraph(f"Per head, {s['x']} against {s['y']} on the same text chunks: Spearman ρ = "
                          f"{_number(s['spearman'])} over {s['n_heads']} heads, permutation p = "
                          f"{_number(s['p_value'])} (chance: {s['chance']}).")
        rep.add_table(pd.DataFrame(gate["heads"]), max_rows=64)
    else:
        rep.add_paragraph("Not joined: the model has no attention output gate (or gated_attention did not run).")
    rep.add_heading(f"Skill neurons against massive-activation dims — {model}", level=3)
    skill = joins.get("skill_vs_massive")
    if skill:
        s = skill["summary"]
        rep.add_paragraph(f"{_number(s['share'])} of the {s['neurons']} skill neurons write most to one of the dims "
                          f"{s['dims']} ({s['dims_are']}); layer-matched random neurons: {_number(s['chance'])}, "
                          f"permutation p = {_number(s['p_value'])}.")
    else:
        rep.add_paragraph("Not joined: skill_unlearning or systematic_outliers did not run, or found nothing to join.")
    if joins.get("layer_strip"):
        rep.add_heading(f"Where the findings sit, layer by layer — {model}", level=3)
        strip = pd.DataFrame(joins["layer_strip"]).set_index("finding")
        fig = go.Figure(go.Heatmap(z=strip.to_numpy(float), x=[f"L{c}" for c in strip.columns], y=list(strip.index),
                                   colorscale="Reds", hovertemplate="%{y}, %{x}: %{z}<extra></extra>"))
        fig.update_layout(height=120 + 30 * len(strip), margin=dict(l=10, r=10, t=10, b=10))
        rep.add_figure(fig, caption="Number of findings of each kind per layer.")
        rep.add_table(strip.reset_index())


def _compare(rep: Report, cmp: dict, a: str, b: str) -> None:
    rep.add_heading(f"{a} against {b}")
    if not cmp["same_shape"]:
        rep.add_notice(cmp["not_compared"], level="info")
    changed = [{"analysis": name, "option": k, "used (both models)": v["used"], f"{b}'s card": v["own_card"]}
               for name, options in cmp.get("card_differences", {}).items() for k, v in options.items()]
    if changed:
        rep.add_table(pd.DataFrame(changed), caption=f"Both models ran with {a}'s settings (the same data, seeds and "
                      f"splits); {b}'s own card recommends these instead.")
    rep.add_table(pd.DataFrame(cmp["differences"]), caption=f"Headlines of both models (difference: {b} − {a}); "
                  "M-Act: the largest |activation| systematic_outliers / gated_attention measured.")
    if cmp["items"]:
        rows = [{**r, "ci": _number(r["ci"][0]) + " … " + _number(r["ci"][1])} for r in cmp["items"]]
        rep.add_table(pd.DataFrame(rows), caption="Per-item quantities: mean of each model, difference b − a with a "
                      "95 % bootstrap interval over items (paired where both models have the same items); moved: "
                      "the interval excludes 0.")
    if cmp["no_item_values"]:
        rep.add_paragraph("No per-item values (difference without an interval): " + ", ".join(cmp["no_item_values"]))
    if "findings" in cmp:
        if cmp["findings"]:
            rep.add_table(pd.DataFrame(cmp["findings"]), caption="Findings that appear (only in the second model), "
                          "vanish (only in the first) or move; heads matched by (layer, head), dims by index.")
        else:
            rep.add_paragraph("No finding appears, vanishes or moves.")


def build_index(index: dict) -> Report:
    """The index report of an audit (`results.json` content)."""
    a = index["model"]["name"]
    cmp = index.get("compare")
    b = cmp["model"]["name"] if cmp else None
    rep = Report(f"audit — {a}" + (f" vs {b}" if b else ""))
    if index["model"].get("random_weights") or (cmp and cmp["model"].get("random_weights")):
        rep.add_notice("A model here has random weights: the findings only show the pipeline working.")
    rep.add_heading("Analyses")
    heads = {h["analysis"]: h for h in index["headlines"]}
    heads_b = {h["analysis"]: h for h in cmp["headlines"]} if cmp else {}
    status_b = {r["analysis"]: r for r in cmp["status"]} if cmp else {}
    for row in index["status"]:
        name = row["analysis"]
        rep.add_heading(name, level=3)
        _card(rep, name, row, heads.get(name), a)
        if cmp:
            _card(rep, name, status_b[name], heads_b.get(name), b)
    rep.add_heading("Joins")
    _joins(rep, index["joins"], a)
    if cmp:
        _joins(rep, cmp["joins"], b)
        _compare(rep, cmp, a, b)
    rep.add_heading("Run")
    shared = index["shared"]
    if len(shared["text_chunks"]) == 2:
        rep.add_paragraph("systematic_outliers and gated_attention read the same text chunks: "
                          + ", ".join(f"{k} = {v}" for k, v in shared["text_options"].items()) + ".")
    passes = [{"model": m, "pass": "text pass (sinks, M-Act, loss)" if r["stage"] == "text_pass" else r["stage"],
               "key": r["key_hash"], "shards": r["shards"], "computed by": ", ".join(r["computed_by"]) or "earlier run",
               "read back by": ", ".join(r["read_by"])}
              for m, rows in ((a, shared.get("passes", [])), (b, cmp.get("passes", []) if cmp else []))
              for r in rows if r["read_by"]]
    if passes:
        rep.add_table(pd.DataFrame(passes), caption="Capture passes run once and read by several analyses (the same "
                      "chunks, batches and sink options; interp.passes): the readers did not run the forward again.")
    rows = [{"model": a, **r} for r in index["status"]] + ([{"model": b, **r} for r in cmp["status"]] if cmp else [])
    rep.add_table(pd.DataFrame(rows), caption="ran: run now; resumed: complete outputs for the same options read "
                                              "back; not_applicable: the analysis does not apply (reason); failed: "
                                              "it raised (reason; traceback in error.txt), the others ran.")
    rep.add_config({"model": index["model"], **({"compare": cmp["model"]} if cmp else {})})
    return rep
