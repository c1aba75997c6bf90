"""The text pass: one forward per batch over text chunks that reads, together, the sink statistics of every
softmax-attention layer (`interp.sinks`: the pattern reduced as it is made, one layer's at a time), the largest |h|
of each block's output (M-Act, `interp.outliers`) and the next-token loss (`interp.losses`: logits a chunk of
positions at a time, stopped before the final norm when there is no loss).

systematic_outliers' measurements and gated_attention's evaluation are this pass (with their interventions' hooks
alongside). Without an intervention it is `baseline`: a stage ("text_pass") of `interp.stages.shared()`, keyed by
the model, the chunks, the batches and the sink options, so an analysis that asks for the same chunks reads the
stored pass instead of running it again — within one run directory, and in `interp audit` across analyses (its
store is shared by one model's analyses: gated_attention reads systematic_outliers' held-out pass).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from interp import distributed, stages
from interp.batching import run_batches
from interp.bridge import hooks_active, sdpa_attention, stopped_at
from interp.losses import forward_nll
from interp.outliers import m_act
from interp.sinks import OUTLIER_KEY_FRAC, SINK_EPS, AttentionStats

STAGE = "text_pass"


@dataclass(frozen=True)
class SinkOptions:
    """How the sink statistics are read (`interp.sinks.AttentionStats`)."""

    layers: tuple[int, ...]  # the softmax-attention layers
    eps: float = SINK_EPS  # Gu et al.'s sink-rate threshold ε
    exclude_first_query: bool = True
    causal: bool = True
    outlier_frac: float = OUTLIER_KEY_FRAC  # An et al.'s attention-outlier key rule

    def stats(self, model) -> AttentionStats:
        return AttentionStats(model.cfg.n_layers, model.cfg.n_heads, self.layers, eps=self.eps,
                              exclude_first_query=self.exclude_first_query, causal=self.causal,
                              outlier_frac=self.outlier_frac)


@dataclass
class TextPass:
    """What one pass read: sink statistics, the largest |h| per block output over real tokens, summed NLL."""

    attention: AttentionStats
    layer_max: Float[Tensor, " layer"]  # float64
    nll: float = 0.0
    count: int = 0  # predicted tokens

    def loss(self) -> float | None:
        return self.nll / self.count if self.count else None

    def m_act(self) -> float:
        return m_act(self.layer_max)

    def m_act_layers(self) -> list[dict]:
        return [{"layer": layer, "max_abs": float(v)} for layer, v in enumerate(self.layer_max.tolist())]

    def summary(self) -> dict:
        """{loss (None without one), first_token (F-Attn), sink_rate (%), m_act}."""
        overall = self.attention.overall()
        return {"loss": self.loss(), "first_token": overall["first_token"], "sink_rate": overall["sink_rate"],
                "m_act": self.m_act()}

    def renumbered(self, idx: Sequence[int]) -> TextPass:
        self.attention.renumbered(idx)
        return self

    def merge(self, other: TextPass, order: Sequence[int]) -> TextPass:
        """Fold in the same pass over other batches (`order`: each sequence's batch place in the run)."""
        self.attention.merge(other.attention, order)
        self.layer_max = torch.maximum(self.layer_max, other.layer_max)
        self.nll, self.count = self.nll + other.nll, self.count + other.count
        return self

    def state(self) -> dict:
        """Plain data (what the stage stores; `from_state` rebuilds)."""
        attention = {**self.attention.__getstate__(), "sink_layers": dict(self.attention.sink_layers)}
        return {"attention": attention, "layer_max": self.layer_max, "nll": self.nll, "count": self.count}

    @classmethod
    def from_state(cls, state: dict) -> TextPass:
        attention = AttentionStats.__new__(AttentionStats)
        attention.__setstate__({**state["attention"], "sink_layers": Counter(state["attention"]["sink_layers"])})
        return cls(attention, state["layer_max"], state["nll"], state["count"])


def stream(model, seqs: Sequence[Sequence[int]], options: SinkOptions, *, batch_size: int, loss: bool = True,
           hooks: Sequence = (), before_batch: Callable[[Tensor], None] | None = None, state: Sequence = (),
           desc: str = "text pass", progress: bool = True) -> TextPass:
    """The pass over `seqs` in this process, with `hooks` (an intervention) alongside; `before_batch(mask)` runs
    before each batch's forward, and `state` (objects the hooks change) is restored with the statistics when an
    out-of-memory batch is halved (`interp.batching.run_batches`)."""
    found = TextPass(options.stats(model), torch.zeros(model.cfg.n_layers, dtype=torch.float64))
    current: dict[str, Tensor] = {}

    def track(x: Float[Tensor, "batch pos d"], hook) -> None:
        layer = int(hook.name.split(".")[1])
        real = x[current["mask"].bool().to(x.device)]
        found.layer_max[layer] = max(found.layer_max[layer], float(real.abs().max()))

    all_hooks = list(hooks) + [(f"blocks.{layer}.hook_resid_post", track) for layer in range(model.cfg.n_layers)] \
        + found.attention.hooks()

    def step(idx: list[int], tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"]) -> None:
        current["mask"] = mask
        found.attention.begin_batch(idx, tokens, mask)
        if before_batch is not None:
            before_batch(mask)
        if loss:  # stops before the final norm; the logits of LOGIT_CHUNK positions at a time
            nll, count = forward_nll(model, tokens, mask, all_hooks)
            found.nll, found.count = found.nll + nll, found.count + count  # after the forward succeeded
        else:
            with sdpa_attention(model, [n for n, _ in all_hooks]), stopped_at(model, model.cfg.n_layers) as stop:
                model.run_with_hooks(tokens, attention_mask=mask, return_type=None, stop_at_layer=stop,
                                     fwd_hooks=all_hooks)

    run_batches(model, seqs, batch_size, step, desc=desc, progress=progress,
                state=[found.attention, found.layer_max, *state])
    return found


@torch.no_grad()
def measure(model, seqs: Sequence[Sequence[int]], options: SinkOptions, *, batch_size: int, loss: bool = True,
            hooks: Sequence = (), desc: str = "text pass", progress: bool = True) -> TextPass:
    """`stream` over `seqs`; under torchrun each rank runs whole batches of its shard and the ranks' readings are
    merged (sums, counts and maxima; the outlier keys in one process's order)."""
    lengths = [len(s) for s in seqs]
    order = distributed.batch_order(lengths, batch_size)
    return distributed.map_stream(
        lambda idx: stream(model, [seqs[i] for i in idx], options, batch_size=batch_size, loss=loss, hooks=hooks,
                           desc=desc, progress=progress).renumbered(idx),
        len(seqs), lambda a, b: a.merge(b, order), lengths=lengths, batch_size=batch_size)


def baseline(model, seqs: Sequence[Sequence[int]], options: SinkOptions, *, batch_size: int, loss: bool = True,
             desc: str = "text pass", progress: bool = True) -> TextPass:
    """`measure` with no intervention, as the stage "text_pass" of the shared store (see the module docstring):
    shards of whole batches (`stages.shards`) stored and merged in the one-stream order, so a stored pass gives the
    same numbers as a fresh one."""
    if hooks_active(model):
        raise RuntimeError("passes.baseline measures the unmodified model; a hook is active (use measure)")
    lengths = [len(s) for s in seqs]
    parts = stages.shards(lengths, batch_size)

    def shard_passes(_, shard: list[list[int]]) -> list[dict]:
        return [measure(model, [seqs[i] for i in idx], options, batch_size=batch_size, loss=loss, desc=desc,
                        progress=progress).renumbered(idx).state() for idx in shard]

    key = {"version": 1, "model": stages.model_key(model), "sequences": stages.digest(seqs),
           "shards": stages.digest(parts), "options": dataclasses.asdict(options), "loss": loss}
    states = stages.shared().items(STAGE, key, parts, shard_passes, 1)
    order = distributed.batch_order(lengths, batch_size)
    found = TextPass.from_state(states[0])
    for state in states[1:]:
        found.merge(TextPass.from_state(state), order)
    return found
