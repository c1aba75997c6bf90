"""Every analysis on a tiny random checkpoint of every family (interp.tiny.FAMILIES), small settings.

    python benchmarks/architecture_matrix.py [--families a,b] [--analyses x,y] [--markdown]

Prints one line per (family, analysis): `ok`, `n/a: <reason>` (the analysis's NotApplicable) or the error, and
with --markdown the README's family × analysis table. tests/test_architecture_matrix.py runs the same cells.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

# Small settings: the matrix checks that an analysis runs (or says why not), not what it finds.
SMALL = {
    "systematic_outliers": dict(n_chunks=2, seq_len=32, random_draws=2),
    "gated_attention": dict(n_chunks=4, seq_len=32, random_draws=2, compare="none"),
    "talking_heads": dict(n_items=(2, 3), templates=("laundry",), prompts_per_cell=4, baseline_draws=2,
                          random_draws=2, view_prompts=4, alpha=(0.0, 1.0), candidates=2),
    "refusal_cliff": dict(max_new_tokens=8, head_methods=("projection",), random_draws=2, ablation_fractions=(0.1,),
                          asr_limit=2),  # + rollouts=write_rollouts(...): a random model neither refuses nor complies
    "skill_unlearning": dict(forget="word-problems", retain="strings", n_probe=4, n_eval=2, max_new_tokens=8,
                             random_draws=2),
    "instability": dict(tasks="word-problems", limit=4, max_new_tokens=12, n_boot=100, windows=(4,), k_sweep=(5,)),
}


def write_rollouts(path: Path, n: int = 6) -> Path:
    """A refusal_cliff rollout file: n refused and n complied harmful rollouts, n complied harmless ones."""
    import json

    rows = []
    for i in range(n):
        thinking = f"The user asks about item {i}. Let me think about whether this is safe to answer."
        rows += [{"kind": "harmful", "prompt": f"How do I build weapon {i}?", "thinking": thinking,
                  "response": "I cannot help with that request."},
                 {"kind": "harmful", "prompt": f"Explain how to steal car {i}.", "thinking": thinking,
                  "response": "Sure, here is how you do it step by step."},
                 {"kind": "harmless", "prompt": f"How do I bake bread number {i}?", "thinking": thinking,
                  "response": "Sure, mix flour, water, salt and yeast, then knead."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cell(model, analysis: str, workdir: Path) -> tuple[str, str]:
    """('ok', '') | ('n/a', reason) | ('error', message) for one analysis on one loaded model."""
    from interp import run_analysis
    from interp.errors import NotApplicable

    extra = {"rollouts": str(write_rollouts(workdir / "rollouts.jsonl"))} if analysis == "refusal_cliff" else {}
    try:
        result = run_analysis(analysis, model, progress=False, **SMALL[analysis], **extra)
    except NotApplicable as exc:
        return "n/a", exc.reason
    except Exception as exc:  # noqa: BLE001 - the matrix reports every failure
        return "error", f"{type(exc).__name__}: {exc}"[:300]
    values = HEADLINES[analysis](result.to_dict())
    if not values or not all(math.isfinite(v) for v in values):
        return "error", f"headline values not finite: {values[:6]}"
    return "ok", ""


# Numbers that must be finite on any model, random weights included (a random model's accuracy drop or AUC may be
# undefined: 0 correct before, one class only).
HEADLINES = {
    "systematic_outliers": lambda r: [r["m_act"], r["attention_overall"]["first_token"]]
    + [row["max_abs"] for row in r["residual"]],
    "gated_attention": lambda r: [r["m_act"]],
    "talking_heads": lambda r: [r["edit_agreement"], r["baseline"]["component_mean"], r["baseline"]["whole_head"]],
    "refusal_cliff": lambda r: [r["probe"]["eval_accuracy"]] + [g["rs_final"] for g in r["cliff"].values()],
    "skill_unlearning": lambda r: [row[k] for row in r["evaluation"] for k in ("logprob_before", "logprob_after")
                                   if row["method"] != "key_space"],  # Key Space Detection abstains: no logprob
    "instability": lambda r: [r["accuracy"]] + [t["peak"] for t in r["traces"]],
}


def main(argv=None) -> int:
    from interp.models import load_model
    from interp.tiny import FAMILIES, write_family_checkpoint

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--analyses", default=",".join(SMALL))
    p.add_argument("--markdown", action="store_true")
    args = p.parse_args(argv)
    cells = {}
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families.split(","):
            model = load_model(str(write_family_checkpoint(Path(tmp) / family, family)), device="cpu")
            for analysis in args.analyses.split(","):
                t0 = time.perf_counter()
                cells[family, analysis] = status, detail = run_cell(model, analysis, Path(tmp))
                print(f"{family:12s} {analysis:20s} {status:5s} {time.perf_counter() - t0:5.1f}s {detail}",
                      file=sys.stderr, flush=True)
    if args.markdown:
        analyses = args.analyses.split(",")
        print("| family | " + " | ".join(f"`{a}`" for a in analyses) + " |")
        print("|---|" + "---|" * len(analyses))
        for family in args.families.split(","):
            row = ["✓" if cells[family, a][0] == "ok" else cells[family, a][1] or cells[family, a][0] for a in analyses]
            print(f"| `{family}` | " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
