"""One line before each heavy stage saying what it costs: forwards (or generated tokens) × tokens.

`announce(stage, forwards, tokens, ...)` prints, on stderr, e.g.

    cost: teacher-forced forward: 500 forwards, 4,100,000 tokens (longest 8,210), logits in chunks of 128 positions

so a run at paper scale says up front how much work each stage is; the tqdm bar of the stage then estimates the
time left after its first batch. `sequence_cost(seqs)` gives (forwards, tokens, longest) of one pass over token
sequences; `describe(stage, work)` prints a line for work that is not forwards (a weight scan). Printed only when
`enabled` (the analyses pass their `progress` flag, like the bars).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def sequence_cost(seqs: Sequence[Sequence[int]], repeats: int = 1) -> tuple[int, int, int]:
    """(forwards, tokens, longest) of `repeats` passes over `seqs` (one forward per sequence per pass)."""
    lengths = [len(s) for s in seqs]
    return repeats * len(lengths), repeats * sum(lengths), max(lengths, default=0)


def cost_line(stage: str, forwards: int, tokens: int, longest: int | None = None, note: str = "") -> str:
    """`cost: <stage>: N forwards, M tokens (longest L)[, note]`."""
    text = f"cost: {stage}: {forwards:,} forward{'s' if forwards != 1 else ''}, {tokens:,} tokens"
    if longest:
        text += f" (longest {longest:,})"
    return text + (f", {note}" if note else "")


def describe(stage: str, work: str, *, enabled: bool = True) -> str:
    """`cost: <stage>: <work>` on stderr when `enabled`, for work that is not forwards (a weight scan); the line."""
    line = f"cost: {stage}: {work}"
    if enabled:
        print(line, file=sys.stderr, flush=True)
    return line


def announce(stage: str, forwards: int, tokens: int, longest: int | None = None, note: str = "", *,
             enabled: bool = True) -> str:
    """Print `cost_line(...)` on stderr when `enabled`; returns the line."""
    line = cost_line(stage, forwards, tokens, longest, note)
    if enabled:
        print(line, file=sys.stderr, flush=True)
    return line
