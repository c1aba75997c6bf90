"""The six analyses at small settings on the organisms, run through the CLI: `python -m torch.distributed.run
--nproc-per-node 2 tests/distributed_runs.py OUT_ROOT` (each rank runs them all; rank 0 writes OUT_ROOT/<analysis>),
and in one process by tests/test_distributed.py to compare."""

from __future__ import annotations

import sys

RUNS = {
    "refusal_cliff": ["--model", "organism", "--limit", "6", "--ablation-fractions", "0.0625", "--asr-limit", "2",
                      "--head-methods", "causal", "attribution", "--random-draws", "2", "--batch-size", "4"],
    "instability": ["--model", "organism", "--limit", "4", "--max-new-tokens", "24", "--n-boot", "100",
                    "--batch-size", "2"],
    "skill_unlearning": ["--model", "organism", "--n-probe", "8", "--n-eval", "4", "--random-draws", "2",
                         "--max-new-tokens", "8", "--batch-size", "4"],
    "talking_heads": ["--model", "organism", "--n-items", "2", "3", "--templates", "laundry", "bag",
                      "--prompts-per-cell", "4", "--alpha", "0", "1", "--candidates", "3", "--edit-components", "1",
                      "--random-draws", "2", "--baseline-draws", "2", "--view-prompts", "4", "--batch-size", "8"],
    "gated_attention": ["--model", "organism-sink-gated", "--seq-len", "16", "--n-chunks", "8", "--random-draws", "2",
                        "--alphas", "2", "--compare", "none", "--batch-size", "2"],
    "systematic_outliers": ["--model", "organism", "--seq-len", "16", "--n-chunks", "6", "--random-draws", "2",
                            "--batch-size", "2"],
}


def run_all(out_root: str, names=None) -> None:
    """Run each analysis (all by default) with `RUNS`' options into out_root/<analysis> (CPU, no progress bars)."""
    import torch

    from interp.run import main

    torch.set_num_threads(1)
    for name in names or RUNS:
        code = main([name, *RUNS[name], "--device", "cpu", "--no-progress", "--out", f"{out_root}/{name}"])
        if code:
            raise SystemExit(code)


if __name__ == "__main__":
    run_all(sys.argv[1], sys.argv[2:])
