"""`interp audit`: every analysis that applies, on one model or two side by side, and one index that joins them.

`audit(model, compare=None, analyses=None, out=None, options=None)` (also `python -m interp.run audit`) loads each
model once and runs each analysis with the model card's settings (`interp.analysis.config_for`) plus `options[name]`;
with `compare` the second model runs every analysis with the first model's configs (the same data, seeds and splits;
the settings its own card would change are listed).
`systematic_outliers` and `gated_attention` read the same text chunks and split (gated_attention takes
systematic_outliers' text options; it runs without its own twin comparison), and the same capture pass: the
held-out text pass (sinks, M-Act, loss: `interp.passes`) is a stage of a store the model's analyses share
(`OUT/<model>/shared/`), run by the first and read back by the other (the index lists who computed and who read
each). Each analysis's report, `results.json` and CSVs go to `OUT/<model>/<analysis>/`; `OUT/index.html` and
`OUT/results.json` join them (`interp.joins`). An analysis that does not apply (`NotApplicable`, or card settings
its options check rejects for this model) is listed with its reason; one that fails is listed as failed (traceback
in its directory's `error.txt`) and the others run. Rerunning into the same `OUT` resumes: an analysis whose outputs
are complete for the same options and model is read back, not rerun; an unfinished one reuses its stored stages
(`interp.stages`: rollouts, traces, statistics, the shared text pass); outputs for other options are refused unless
`force`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from interp import joins, stages
from interp.analysis import available, config_for, load_analysis
from interp.errors import NotApplicable, UserError
from interp.outputs import atomic_write_text, sanitize_name, to_jsonable, write_run

ORDER = ("systematic_outliers", "gated_attention", "refusal_cliff", "talking_heads", "skill_unlearning", "instability")
# systematic_outliers' options gated_attention takes in an audit: the same chunks, split, batches and sink threshold,
# so its held-out text pass is systematic_outliers' (`interp.passes`); plus n_chunks (systematic_outliers' limit caps
# its chunks, gated_attention's caps its documents: the audit passes the chunk count and no limit)
SHARED_TEXT = ("text_set", "seq_len", "n_docs", "bos", "seed", "selection_fraction", "sink_epsilon", "batch_size")


def analysis_names(analyses: str | list[str] | None) -> list[str]:
    """The analyses to run (all by default, in `ORDER`); UserError naming an unknown one."""
    known = available()
    if analyses is None:
        return [a for a in ORDER if a in known] + [a for a in known if a not in ORDER]
    names = [a.strip() for a in analyses.split(",")] if isinstance(analyses, str) else list(analyses)
    names = [a for a in names if a]
    bad = [a for a in names if a not in known]
    if bad or not names:
        raise UserError(f"unknown analysis {bad[0]!r} in --analyses; available: {', '.join(known)}" if bad else
                        "--analyses names no analysis; give a comma-separated list such as refusal_cliff,instability")
    return list(dict.fromkeys(names))


def configs(names: list[str], model, options: dict[str, dict], progress: bool) -> dict[str, Any]:
    """Each analysis's Config for `model`: card defaults, then `options[name]`; gated_attention reads
    systematic_outliers' text options (`SHARED_TEXT`: the same chunks and split) unless they are given for it, and
    compares nothing itself."""
    out = {}
    for name in names:
        given = dict(options.get(name, {}))
        if name == "gated_attention":
            given.setdefault("compare", "none")
            if "systematic_outliers" in names:
                text = config_for("systematic_outliers", model, **options.get("systematic_outliers", {}))
                for key in SHARED_TEXT:
                    given.setdefault(key, getattr(text, key))
                if "n_chunks" not in given and "limit" not in given:
                    given["n_chunks"] = min(text.n_chunks, text.limit) if text.limit else text.n_chunks
        out[name] = config_for(name, model, **{"progress": progress, **given})
    return out


def _load(model, device: str, dtype: str, **load_kw):
    """A model name or path loaded (`interp.load_model`); an already loaded bridge as it is."""
    from interp.models import load_model

    return load_model(str(model), device=device, dtype=dtype, **load_kw) if isinstance(model, (str, Path)) else model


def _same_config(stored: dict, config) -> bool:
    want = to_jsonable(dataclasses.asdict(config))
    return {k: v for k, v in stored.items() if k != "progress"} == {k: v for k, v in want.items() if k != "progress"}


def _complete(path: Path, config, info) -> bool | None:
    """True: outputs there for this config and model; False: outputs for something else; None: nothing there."""
    results = path / "results.json"
    if not results.is_file() or not (path / "report.html").is_file():
        return None
    stored = json.loads(results.read_text(encoding="utf-8"))
    model = stored.get("model") or {}
    same_model = model.get("name") == info.name and model.get("source") == info.source
    return same_model and _same_config(stored.get("config", {}), config)


def read_outputs(path: Path) -> joins.Outputs:
    """An analysis's outputs read back from its run directory."""
    results = json.loads((path / "results.json").read_text(encoding="utf-8"))
    tables = {}
    for csv in sorted(path.glob("*.csv")):
        try:
            tables[csv.stem] = pd.read_csv(csv)
        except pd.errors.EmptyDataError:
            tables[csv.stem] = pd.DataFrame()
    return joins.Outputs(results, tables)


def run_one(name: str, model, config, path: Path, force: bool) -> dict:
    """Run (or resume) one analysis into `path`; its status row. An analysis that raises is recorded as failed
    (its traceback in `path/error.txt`) and the audit goes on; Ctrl-C still stops it."""
    from interp.models import model_info

    state = _complete(path, config, model_info(model))
    if state:
        return {"analysis": name, "status": "resumed", "dir": path}
    if state is False and not force:
        raise UserError(f"{path} holds {name} outputs for other options or another model; pass --force to replace "
                        "them or choose another --out")
    module = load_analysis(name)
    start = time.perf_counter()
    try:
        with stages.using(path):  # a killed audit resumes inside the analysis too (rollouts, traces, statistics)
            result = module.run(model, config)
    except NotApplicable as exc:
        return {"analysis": name, "status": "not_applicable", "reason": exc.reason}
    except Exception as exc:  # noqa: BLE001 - the other analyses' results are worth keeping; the error is reported
        path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path / "error.txt", traceback.format_exc())
        reason = (str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}").strip()
        return {"analysis": name, "status": "failed", "reason": reason.splitlines()[0], "error": path / "error.txt"}
    write_run(path, result, module.build_report(result, model.tokenizer))
    (path / "error.txt").unlink(missing_ok=True)
    return {"analysis": name, "status": "ran", "dir": path, "seconds": round(time.perf_counter() - start, 1)}


def fitting(name: str, config, model, given: bool) -> str | None:
    """None when `config` suits `model`; else why not (the options check's message) when the settings are the
    card's (the analysis does not apply with them); options the user gave that do not fit raise UserError."""
    try:
        config.validate(model)
    except UserError as exc:
        if given:
            raise
        return (f"the card's settings do not fit this model: {exc} (in the audit: --options FILE.json with "
                f'{{"{name}": {{...}}}})')
    return None


def shared_passes(events: dict[str, list[dict]]) -> list[dict]:
    """Per shared stage (`interp.passes`' text pass on one chunk set): the analysis that computed it and those that
    read it back. `events`: analysis → its shared-store events (`interp.stages.Stages.events`)."""
    rows: dict[tuple, dict] = {}
    for name, evs in events.items():
        for e in evs:
            row = rows.setdefault((e["stage"], e["key_hash"]), {"stage": e["stage"], "key_hash": e["key_hash"],
                                                                  "shards": e["items"], "computed_by": [],
                                                                  "read_by": []})
            who = row["read_by"] if e["reused"] == e["items"] else row["computed_by"]
            if name not in who:
                who.append(name)
    return list(rows.values())


def _top_write_dims(model, layers) -> dict[int, np.ndarray]:
    """Per layer: the residual dim each MLP neuron writes to most (largest |column| of the down-projection)."""
    from interp.mlp import neuron_mlps

    found, _ = neuron_mlps(model)
    return {layer: found[layer].down_weight(model.cfg.d_model).abs().argmax(0).numpy()
            for layer in layers if layer in found}


def model_joins(runs: dict[str, joins.Outputs], model, seed: int) -> dict:
    """Every join on one model's outputs, as JSON-ready tables with their chance levels."""
    out: dict[str, Any] = {}
    shape = joins.shape(runs)
    sets = joins.head_sets(runs)
    out["head_sets"] = {k: [list(h) for h in v] for k, v in sets.items()}
    if shape:
        total = shape["n_layers"] * shape["n_heads"]
        out["head_overlaps"] = joins.head_overlaps(sets, total, seed=seed).to_dict("records")
        out["n_heads_total"] = total
    gate = joins.gate_vs_first_token(runs, seed=seed)
    if gate is not None:
        out["gate_vs_first_token"] = {"summary": gate[1], "heads": gate[0].to_dict("records")}
    neurons = joins.skill_neurons(runs)
    massive = joins.massive_dims(runs)
    dims = sorted({d for _, d in massive}) or joins.intervention_dims(runs)
    if neurons and dims:
        found = joins.skill_vs_massive(neurons, dims, _top_write_dims(model, {layer for layer, _ in neurons}),
                                       seed=seed)
        if found is not None:
            out["skill_vs_massive"] = {"summary": {**found[1], "dims_are": "massive" if massive else
                                                   "systematic_outliers' candidate dims (no massive activation)"},
                                       "neurons": found[0].to_dict("records")}
    if shape:
        strip = joins.layer_strip(sets, massive if "systematic_outliers" in runs else None,
                                  neurons if "skill_unlearning" in runs else None, shape["n_layers"])
        out["layer_strip"] = strip.to_dict("records")
    return out


def compare_models(names: list[str], a: dict[str, joins.Outputs], b: dict[str, joins.Outputs],
                   status_a: dict, status_b: dict, seed: int) -> dict:
    """Headlines of both models, per-item differences with bootstrap intervals, and findings that appear, vanish or
    move (only when both models have the same shape)."""
    shape_a, shape_b = joins.shape(a), joins.shape(b)
    same = shape_a is not None and shape_a == shape_b
    headlines, item_rows, no_items = [], [], []
    for name in names:
        if name not in a or name not in b:
            headlines.append({"analysis": name, "a": status_a[name]["status"], "b": status_b[name]["status"]})
            continue
        ha, hb = joins.headline(name, a[name]), joins.headline(name, b[name])
        diff = hb["value"] - ha["value"] if ha["value"] is not None and hb["value"] is not None else None
        headlines.append({"analysis": name, "metric": ha["metric"], "value_a": ha["value"], "value_b": hb["value"],
                          "difference": diff, "verdict_a": ha["verdict"], "verdict_b": hb["verdict"],
                          "m_act_a": ha.get("m_act"), "m_act_b": hb.get("m_act")})
        ia, ib = joins.items(name, a[name]), joins.items(name, b[name])
        if ia is None or ib is None or not len(ia.values) or not len(ib.values):
            no_items.append(name)
        else:
            item_rows.append({"analysis": name, **joins.compare_items(ia, ib, seed=seed)})
    out = {"same_shape": same, "shape_a": shape_a, "shape_b": shape_b, "differences": headlines, "items": item_rows,
           "no_item_values": no_items}
    if same:
        out["findings"] = joins.finding_changes(a, b).to_dict("records")
    else:
        out["not_compared"] = ("the models differ in shape: head sets, neurons and dims are not matched (findings "
                               "that appear, vanish or move are not listed); headlines and per-item values are")
    return out


def card_differences(used: dict[str, Any], own: dict[str, Any]) -> dict[str, dict]:
    """Per analysis, the settings the second model's own card would change: {option: {used, own_card}} (the audit
    runs both models with the first model's configs, so both read the same data with the same seeds and splits)."""
    out = {}
    for name, config in used.items():
        a, b = dataclasses.asdict(config), dataclasses.asdict(own[name])
        changed = {k: {"used": a[k], "own_card": b[k]} for k in a if a[k] != b[k] and k != "progress"}
        if changed:
            out[name] = changed
    return out


def default_out(labels: list[str]) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"audit-{'-vs-'.join(sanitize_name(x) for x in labels)}-{stamp}"


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a directory; choose another --out")
    if out.is_dir() and any(out.iterdir()) and not force:
        index = out / "results.json"
        if not index.is_file() or json.loads(index.read_text(encoding="utf-8")).get("analysis") != "audit":
            raise UserError(f"output directory {out} is not empty and holds no audit; pass --force to write into it "
                            "or choose another --out")


def audit(model, compare=None, analyses: str | list[str] | None = None, out: str | Path | None = None,
          options: dict[str, dict] | None = None, *, force: bool = False, device: str = "auto", dtype: str = "auto",
          progress: bool = True, seed: int = 0, **load_kw) -> Path:
    """Run the audit (see the module docstring); returns the output directory (index.html, results.json)."""
    from interp.models import model_info

    names = analysis_names(analyses)
    options = dict(options or {})
    unknown = sorted(set(options) - set(available()))
    if unknown:
        raise UserError(f"options for unknown analysis {unknown[0]!r}")
    for name, given in options.items():  # an unknown option name fails before any model loads
        config_for(name, None, **given)
    if out is not None:  # a directory that is not an audit's fails before any model loads
        _check_out(Path(out), force)
    model_a = _load(model, device, dtype, **load_kw)
    model_b = _load(compare, device, dtype, **load_kw) if compare is not None else None
    models = {"a": model_a} if model_b is None else {"a": model_a, "b": model_b}
    labels = {k: model_info(m).name for k, m in models.items()}
    dirs = {k: sanitize_name(v) for k, v in labels.items()}
    if model_b is not None and dirs["a"] == dirs["b"]:
        dirs = {"a": f"{dirs['a']}-a", "b": f"{dirs['b']}-b"}
    out = Path(out) if out is not None else default_out(list(labels.values()))
    cfgs = configs(names, model_a, options, progress)
    unfit = {slot: {} for slot in models}
    for slot, m in models.items():  # a bad option for either model fails before anything runs
        for name, cfg in cfgs.items():
            reason = fitting(name, cfg, m, bool(options.get(name)))
            if reason is not None:
                unfit[slot][name] = reason
    for name, cfg in cfgs.items():  # data sets are checked before the long runs (a typo fails in seconds)
        preflight = getattr(load_analysis(name), "preflight", None)
        if preflight is not None:
            preflight(cfg)
    status: dict[str, dict[str, dict]] = {}
    runs: dict[str, dict[str, joins.Outputs]] = {}
    pass_rows: dict[str, list[dict]] = {}
    for slot, m in models.items():
        status[slot], runs[slot], events = {}, {}, {}
        # stages several analyses compute alike (the text pass): computed by the first, read by the others
        with stages.sharing(out / dirs[slot] / "shared") as store:
            for name in names:
                if name in unfit[slot]:
                    status[slot][name] = {"analysis": name, "status": "not_applicable", "reason": unfit[slot][name]}
                    continue
                seen = len(store.events)
                row = run_one(name, m, cfgs[name], out / dirs[slot] / name, force)
                events[name] = store.events[seen:]
                status[slot][name] = row
                if "dir" in row:
                    runs[slot][name] = read_outputs(row["dir"])
        pass_rows[slot] = shared_passes(events)
    index = {"analysis": "audit", "model": model_info(model_a).to_dict(), "analyses": names,
             "shared": {"text_chunks": [a for a in ("systematic_outliers", "gated_attention") if a in names],
                        "text_options": {k: getattr(cfgs["systematic_outliers"], k) for k in SHARED_TEXT}
                        if "systematic_outliers" in cfgs else None, "passes": pass_rows["a"]},
             "status": _status_rows(status["a"], out),
             "headlines": [joins.headline(n, runs["a"][n]) for n in names if n in runs["a"]],
             **{n: o.results for n, o in runs["a"].items()},
             "joins": model_joins(runs["a"], model_a, seed)}
    if model_b is not None:
        index["compare"] = {"model": model_info(model_b).to_dict(), "status": _status_rows(status["b"], out),
                            "passes": pass_rows["b"],
                            "card_differences": card_differences(cfgs, configs(names, model_b, options, progress)),
                            "headlines": [joins.headline(n, runs["b"][n]) for n in names if n in runs["b"]],
                            "analyses": {n: o.results for n, o in runs["b"].items()},
                            "joins": model_joins(runs["b"], model_b, seed),
                            **compare_models(names, runs["a"], runs["b"], status["a"], status["b"], seed)}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "results.json", json.dumps(to_jsonable(index), indent=2, allow_nan=False) + "\n")
    from interp.audit_report import build_index

    build_index(index).write(out / "index.html")
    return out


def _status_rows(rows: dict[str, dict], out: Path) -> list[dict]:
    return [{**{k: v for k, v in r.items() if k not in ("dir", "error")},
             **({"report": str(Path(r["dir"]).relative_to(out) / "report.html")} if "dir" in r else {}),
             **({"error": str(Path(r["error"]).relative_to(out))} if "error" in r else {})}
            for r in rows.values()]


def failures(index: dict) -> list[dict]:
    """The status rows of the analyses that failed, both models."""
    rows = index["status"] + (index["compare"]["status"] if "compare" in index else [])
    return [r for r in rows if r["status"] == "failed"]
