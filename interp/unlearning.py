"""Skill unlearning (Li et al. 2025, *Effective Skill Unlearning through Intervention and Abstention*).

- `gate_moments`: per-neuron running Σx, Σx², n of the MLP gate pre-activation (`blocks.L.mlp.hook_pre`,
  the output of HF `gate_proj`, before the activation function) over every real token of a skill, every
  layer, streamed batch by batch: memory is 3 · n_layers · d_mlp numbers whatever the dataset size. With
  `mlps` (`interp.mlp.neuron_mlps`: a dense layer's MLP, an MoE layer's shared expert) only those layers' neurons,
  each layer's row padded to the widest (the padding never selected: `select_neurons` skips non-finite Δ).
  `check_gate_hook` verifies the bridge hook equals a raw torch hook on the HF `gate_proj` module.
- Neuron Adjust: `select_neurons` takes the global top p % of Δ = μ_forget − μ_retain pooled over all
  layers (signed, one-sided); `neuron_adjust` (a context manager) replaces each selected neuron's value x
  by its reflection in the retain distribution, x' = μ_r − σ_r · (x − μ_f)/σ_f, when the forget class is
  the more likely one (p_f ≥ p_r under N(μ_f, σ_f), N(μ_r, σ_r)) and u ≥ p_r/(p_r + p_f), u ~ U(0, 1):
  with probability p_f/(p_r + p_f). Intended method: σ = sqrt(population variance), u independent per
  element. `reference=True` reproduces the released code's three quirks: (1) the "std" is the variance,
  (2) σ_f = μ_f (copy-paste bug: a negative μ_f gives a negative pdf and the neuron is never adjusted),
  (3) one u per sequence and forward call, shared by all neurons and positions of a layer.
- Key Space Detection: `Hypercube.fit` on last-layer key vectors (`blocks.{L-1}.mlp.hook_post`, the
  input of `down_proj`) at the last prompt position: μ_d, σ_d (sample std) and the smallest k with every
  probe inside |x_d − μ_d| ≤ k σ_d for all d (closed form of the reference's binary search);
  `key_space_watch` abstains a sequence when the key vector at the last position of any generation forward
  (prefill, then every generated token; never a teacher-forced pass) lies inside the cube of half-width h·k·σ.
  `pick_h` chooses h on the selection split's prompt scores.
- The random-neuron control (`neuron_draws`): as many random, never-selected neurons per layer as the
  selection (through `interp.controls.matched_draws`, matched on layer).

Uniform draws are a hash of (seed, item, position, layer, neuron), so the numbers do not depend on the
batch size, the padding or the order of the items. Generation is greedy with a KV cache
(`interp.generation.generate_tokens`): each forward's `Rows` describe only the positions it computes, at their
absolute positions, so the draws (and abstentions) equal those of recomputing the whole sequence each step.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from interp import distributed
from interp.batching import input_device, padded_batches, run_batches
from interp.bridge import sdpa_attention, stopped_at
from interp.controls import Draws, matched_draws
from interp.generation import Generations, Step, generate_tokens

EPS = 1e-6  # floor on σ (a neuron constant on a skill) [reconstructed: the paper has no guard]


def gate_hook(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_pre"


def key_hook(layer: int) -> str:
    return f"blocks.{layer}.mlp.hook_post"


# --------------------------------------------------------------------------- running moments

@dataclass
class RunningMoments:
    """Streaming per-(layer, neuron) sums Σx, Σx² (float64) and the token count."""

    total: Float[Tensor, "layer d_mlp"]
    total_sq: Float[Tensor, "layer d_mlp"]
    count: int = 0

    @classmethod
    def zeros(cls, n_layers: int, d_mlp: int) -> RunningMoments:
        return cls(torch.zeros(n_layers, d_mlp, dtype=torch.float64), torch.zeros(n_layers, d_mlp, dtype=torch.float64))

    def update(self, layer: int, x: Float[Tensor, "n width"]) -> None:
        """Add the values of one layer's neurons (a narrower layer fills the first `width` columns)."""
        x = x.detach().to(self.total.device, torch.float64)
        self.total[layer, :x.shape[-1]] += x.sum(0)
        self.total_sq[layer, :x.shape[-1]] += (x * x).sum(0)

    def merge(self, other: RunningMoments) -> RunningMoments:
        """Pooled moments of two token sets (the retain skills together)."""
        return RunningMoments(self.total + other.total, self.total_sq + other.total_sq, self.count + other.count)

    @property
    def mean(self) -> Tensor:
        return (self.total / max(self.count, 1)).float()

    @property
    def var(self) -> Tensor:
        """Population variance Σx²/n − mean² (what the reference code calls "std")."""
        m = self.total / max(self.count, 1)
        return (self.total_sq / max(self.count, 1) - m * m).clamp_min(0).float()

    @property
    def std(self) -> Tensor:
        return self.var.sqrt()

    @property
    def nbytes(self) -> int:
        return self.total.nbytes + self.total_sq.nbytes


@torch.no_grad()
def gate_moments(model, seqs: Sequence[Sequence[int]], *, batch_size: int = 8, progress: bool = True,
                 desc: str = "gate statistics", mlps: dict | None = None) -> RunningMoments:
    """Running moments of every layer's gate pre-activation over all real tokens of `seqs` (with `mlps`, {layer:
    `interp.mlp.DenseMLP`}: those layers' MLPs only; the others' rows stay 0). Under torchrun each rank reads its
    shard of `seqs` and the sums and counts are added up (`interp.distributed`)."""
    if distributed.sharding():
        return distributed.map_stream(lambda idx: gate_moments(model, [seqs[i] for i in idx], batch_size=batch_size,
                                                               progress=progress, desc=desc, mlps=mlps),
                                      len(seqs), RunningMoments.merge, lengths=[len(s) for s in seqs],
                                      batch_size=batch_size)
    n_layers = model.cfg.n_layers
    names = {layer: m.gate_hook for layer, m in mlps.items()} if mlps is not None else \
        {layer: gate_hook(layer) for layer in range(n_layers)}
    width = max((m.width for m in mlps.values()), default=0) if mlps is not None else model.cfg.d_mlp
    moments = RunningMoments.zeros(n_layers, width)
    keep: list[Tensor] = []

    def accumulate(x, hook):
        moments.update(int(hook.name.split(".")[1]), x[keep[0].to(x.device)])

    hooks = [(name, accumulate) for name in names.values()]

    def step(idx: list[int], tokens: Tensor, mask: Tensor) -> None:
        keep[:] = [mask.bool()]
        with stopped_at(model, n_layers) as stop:
            model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=hooks, return_type=None, stop_at_layer=stop)
        moments.count += int(mask.sum())

    with sdpa_attention(model, [h for h, _ in hooks]):  # out of memory: halved, `moments` restored (run_batches)
        run_batches(model, seqs, batch_size, step, desc=desc, progress=progress, state=[moments])
    return moments


@torch.no_grad()
def check_gate_hook(model, seq: Sequence[int], layer: int = 0, mlp=None, max_tokens: int = 64) -> float:
    """Max |bridge `hook_pre` − raw torch forward hook on the HF `gate_proj` output| on the first `max_tokens` of one
    sequence (`mlp`: the layer's `interp.mlp.DenseMLP`, e.g. an MoE layer's shared expert; default the layer's dense
    MLP); the forward stops after the layer."""
    if mlp is None:
        from interp.mlp import dense_mlp

        mlp = dense_mlp(model, layer)
    linear = mlp.gate
    raw_module = getattr(linear, "original_component", linear)
    raw: list[Tensor] = []
    handle = raw_module.register_forward_hook(lambda mod, inp, out: raw.append(out.detach().clone()))
    try:
        with stopped_at(model, layer + 1) as stop:
            _, cache = model.run_with_cache(torch.tensor([list(seq)[:max_tokens]], device=input_device(model)),
                                            names_filter=lambda n: n == mlp.gate_hook, return_type=None,
                                            stop_at_layer=stop)
    finally:
        handle.remove()
    return float((cache[mlp.gate_hook].float() - raw[0].float()).abs().max())


# --------------------------------------------------------------------------- Neuron Adjust

def select_neurons(delta: Float[Tensor, "layer d_mlp"], top_percent: float) -> Int[Tensor, "k 2"]:
    """(layer, neuron) of the global top `top_percent` % of Δ (ceil of the share), sorted by layer, neuron. Non-finite
    entries (-inf: no such neuron, a skipped layer or a narrower MLP's padding) are neither counted nor selected."""
    valid = torch.isfinite(delta)
    k = max(1, math.ceil(top_percent / 100 * int(valid.sum())))
    flat = delta.masked_fill(~valid, float("-inf")).flatten().topk(k).indices
    pairs = torch.stack([flat // delta.shape[1], flat % delta.shape[1]], dim=1)
    return pairs[torch.argsort(pairs[:, 0] * delta.shape[1] + pairs[:, 1])]


def neuron_draws(selected: Int[Tensor, "k 2"], n_layers: int, d_mlp: int, *, draws: int, seed: int,
                 matched_on: str = "layer", widths: Sequence[int] | None = None) -> Draws:
    """Random neuron sets of the control: none selected, as many per layer as the selection (`matched_on`
    "layer"; "none": drawn over all layers). Each set is a list of (layer, neuron) pairs. `widths`: neurons per
    layer where they differ (0: a layer without neurons read), else `d_mlp` in every layer."""
    widths = list(widths) if widths is not None else [d_mlp] * n_layers
    pool = [(layer, n) for layer in range(n_layers) for n in range(widths[layer])]
    stratum = (lambda pair: pair[0]) if matched_on == "layer" else None
    return matched_draws([tuple(p) for p in selected.tolist()], pool, stratum=stratum, draws=draws, seed=seed,
                         matched_on=matched_on, key="neurons")


def _pdf(x: Tensor, mu: Tensor, sd: Tensor) -> Tensor:
    """The reference's Gaussian density, written out (a negative σ gives a negative density)."""
    return torch.exp(-((x - mu) ** 2) / (2 * sd ** 2)) / (sd * math.sqrt(2 * math.pi))


def adjust_values(x: Float[Tensor, "... k"], mu_f: Tensor, sd_f: Tensor, mu_r: Tensor, sd_r: Tensor,
                  u: Tensor, reference: bool = False) -> tuple[Tensor, Bool[Tensor, "... k"]]:
    """Neuron Adjust on values `x` of k neurons: (new values, which were replaced).

    Replaced by μ_r − σ_r · (x − μ_f)/σ_f iff p_f ≥ p_r and u ≥ p_r/(p_r + p_f). The intended method
    works in log densities (no underflow); `reference` uses the code's densities as written.
    """
    x32 = x.float()
    if reference:
        p_r, p_f = _pdf(x32, mu_r, sd_r), _pdf(x32, mu_f, sd_f)
        replace = (p_f >= p_r) & (u >= p_r / (p_r + p_f))
    else:
        sd_f, sd_r = sd_f.clamp_min(EPS), sd_r.clamp_min(EPS)
        log_r = -((x32 - mu_r) / sd_r) ** 2 / 2 - sd_r.log()
        log_f = -((x32 - mu_f) / sd_f) ** 2 / 2 - sd_f.log()
        replace = (log_f >= log_r) & (u >= torch.sigmoid(log_r - log_f))
    shifted = mu_r - sd_r * (x32 - mu_f) / sd_f
    return torch.where(replace, shifted, x32).to(x.dtype), replace


_M32 = 0xFFFFFFFF


def _mix(h: Tensor) -> Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding 32-bit values."""
    h = h & _M32
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def hash_uniform(*keys: Tensor | int) -> Tensor:
    """Uniform [0, 1) floats, a deterministic hash of the broadcast integer keys."""
    h = torch.tensor(0x9E3779B9, dtype=torch.long)
    for key in keys:
        key = torch.as_tensor(key, dtype=torch.long)
        h = _mix(h ^ ((key & _M32) + 0x9E3779B9 + ((h << 6) & _M32) + (h >> 2)))
    return h.double().div(2 ** 32).float()


@dataclass
class Rows:
    """What the hooks need to know about the rows of the current forward (set by the caller per batch)."""

    items: Int[Tensor, " batch"]                 # global item ids (seed the uniform draws)
    positions: Int[Tensor, "batch pos"]         # absolute position of each column (padding: any)
    prompt_len: Int[Tensor, " batch"]            # tokens of the prompt (generated tokens come after)
    mask: Int[Tensor, "batch pos"]
    step: int | None = None                     # generation step (0 prefill, t the t-th token); None: teacher-forced

    @classmethod
    def for_batch(cls, items: Sequence[int], mask: Tensor, prompt_len: Sequence[int],
                  step: int | None = None) -> Rows:
        device = mask.device
        return cls(torch.as_tensor(list(items), device=device), (mask.cumsum(-1) - 1).clamp_min(0),
                   torch.as_tensor(list(prompt_len), device=device), mask, step)

    def last(self, n: int) -> Rows:
        """The same rows restricted to their last `n` columns (what a cached decode forward computes)."""
        return Rows(self.items, self.positions[:, -n:], self.prompt_len, self.mask[:, -n:], self.step)


@dataclass
class AdjustSpec:
    """Selected neurons and their forget / retain statistics, as Neuron Adjust uses them."""

    neurons: Int[Tensor, "k 2"]
    mu_f: Tensor
    sd_f: Tensor
    mu_r: Tensor
    sd_r: Tensor
    reference: bool = False
    seed: int = 0
    replaced: list[int] = field(default_factory=lambda: [0, 0])  # [replaced values, adjusted real-token values]
    hooks: dict[int, str] = field(default_factory=dict)  # layer → gate hook where not blocks.L.mlp.hook_pre

    @classmethod
    def from_moments(cls, neurons: Tensor, forget: RunningMoments, retain: RunningMoments, *,
                     reference: bool = False, seed: int = 0, hooks: dict[int, str] | None = None) -> AdjustSpec:
        """Intended: σ = sqrt(variance). Reference: σ_r = variance (quirk 1), σ_f = μ_f (quirk 2)."""
        layer, neuron = neurons[:, 0], neurons[:, 1]
        mu_f, mu_r = forget.mean[layer, neuron], retain.mean[layer, neuron]
        if reference:
            sd_f, sd_r = mu_f.clone(), retain.var[layer, neuron]
        else:
            sd_f, sd_r = forget.std[layer, neuron], retain.std[layer, neuron]
        return cls(neurons, mu_f, sd_f, mu_r, sd_r, reference, seed, hooks=dict(hooks or {}))

    @property
    def replaced_share(self) -> float:
        return self.replaced[0] / self.replaced[1] if self.replaced[1] else float("nan")


@contextlib.contextmanager
def neuron_adjust(model, spec: AdjustSpec) -> Iterator[AdjustSpec]:
    """Neuron Adjust at every position of every forward while active.

    The draws are keyed on the items and absolute positions that `rows_of` describes (the loops here set
    it); without it, on row index and position within the forward call (fine for one full forward, but
    cached decoding would then reuse the draws of position 0 at every step).
    """
    hooks = []
    for layer in spec.neurons[:, 0].unique().tolist():
        sel = (spec.neurons[:, 0] == layer).nonzero().squeeze(1)
        hooks.append((spec.hooks.get(layer, gate_hook(layer)), _adjust_hook(spec, layer, sel)))
    with model.hooks(fwd_hooks=hooks):
        yield spec
    if distributed.sharding():  # the forwards inside ran on shards: count every rank's values
        spec.replaced[:] = distributed.all_reduce_sum(torch.tensor(spec.replaced)).tolist()


def _adjust_hook(spec: AdjustSpec, layer: int, sel: Tensor):
    idx = spec.neurons[sel, 1]
    stats = [t[sel] for t in (spec.mu_f, spec.sd_f, spec.mu_r, spec.sd_r)]

    def hook(x, hook):
        r = current_rows(x)
        dev = x.device
        params = [t.to(dev) for t in stats]
        if spec.reference:  # quirk 3: one draw per sequence and forward call; with a KV cache a position
            # keeps the draw of the call that computed it: the prompt's at prefill, a new token's at its step
            step_of = (r.positions - r.prompt_len[:, None] + 1).clamp_min(0)
            u = hash_uniform(spec.seed, r.items[:, None, None], step_of[:, :, None], layer).to(dev)
        else:
            u = hash_uniform(spec.seed, r.items[:, None, None], r.positions[:, :, None], layer, idx.to(dev)).to(dev)
        new, replaced = adjust_values(x[..., idx.to(dev)], *params, u, spec.reference)
        real = r.mask.bool().to(dev)[:, :, None].expand_as(replaced)
        spec.replaced[0] += int(replaced[real].sum())
        spec.replaced[1] += int(real.sum())
        x = x.clone()
        x[..., idx.to(dev)] = new
        return x
    return hook


_ROWS: list[Rows] = []


def current_rows(x: Tensor) -> Rows:
    """The batch set by `rows_of`; without one, rows 0..b-1 with no padding and the whole input as prompt."""
    if _ROWS:
        return _ROWS[-1]
    b, pos = x.shape[:2]
    mask = torch.ones(b, pos, dtype=torch.long, device=x.device)
    return Rows.for_batch(range(b), mask, [pos] * b)


@contextlib.contextmanager
def rows_of(rows: Rows) -> Iterator[None]:
    """Make `rows` the batch description the hooks read during one forward."""
    _ROWS.append(rows)
    try:
        yield
    finally:
        _ROWS.pop()


# --------------------------------------------------------------------------- Key Space Detection

@dataclass
class Hypercube:
    """Axis-aligned cube μ ± k·σ (σ the sample std) around the probe key vectors, k the smallest enclosing all."""

    mu: Float[Tensor, " d"]
    sd: Float[Tensor, " d"]
    k: float

    @classmethod
    def fit(cls, vectors: Float[Tensor, "n d"]) -> Hypercube:
        v = vectors.double()
        mu, sd = v.mean(0), v.std(0, unbiased=True).clamp_min(EPS)
        k = float(((v - mu).abs() / sd).max())
        return cls(mu.float(), sd.float(), k)

    def score(self, x: Float[Tensor, "... d"]) -> Tensor:
        """max_d |x_d − μ_d| / σ_d: the smallest multiplier whose cube contains x."""
        return ((x.float() - self.mu.to(x.device)).abs() / self.sd.to(x.device)).amax(-1)

    def contains(self, x: Float[Tensor, "... d"], h: float) -> Tensor:
        return self.score(x) <= h * self.k


def pick_h(k: float, forget: Float[Tensor, " n"], retain: Float[Tensor, " m"]) -> float:
    """h from selection-split cube scores (max_d |x − μ|/σ) of forget and retain prompts: the smallest score
    threshold t with the largest TPR − FPR (inside = score ≤ t), moved halfway (geometric mean) to the next
    larger score; h = threshold / k."""
    scores = torch.cat([forget, retain]).double().unique()  # sorted
    best = int((_share_at_most(forget, scores) - _share_at_most(retain, scores)).argmax())
    t = scores[best]
    threshold = (t * scores[best + 1]).sqrt() if best + 1 < len(scores) else t
    return float(threshold) / k


def _share_at_most(values: Float[Tensor, " n"], thresholds: Float[Tensor, " t"]) -> Float[Tensor, " t"]:
    """Share of `values` ≤ each threshold."""
    return (values.double()[None, :] <= thresholds[:, None]).double().mean(1)


@dataclass
class Watch:
    """Per item: whether its key vector fell in the cube at prefill and at any step."""

    prefill: dict[int, bool] = field(default_factory=dict)
    any_step: dict[int, bool] = field(default_factory=dict)


@contextlib.contextmanager
def key_space_watch(model, cube: Hypercube, h: float, hook_name: str | None = None) -> Iterator[Watch]:
    """Test the last-layer key vector (`hook_name`, default `key_hook(n_layers - 1)`) at the last position of every
    generation forward against the cube (abstention). Only `greedy_generate`'s forwards count (prefill and generated
    tokens): a teacher-forced pass over a gold continuation shows the model tokens it never generated, and is
    ignored."""
    watch = Watch()

    def hook(x, hook):
        r = current_rows(x)
        if r.step is None:
            return x
        inside = cube.contains(x[:, -1], h).tolist()
        for item, flag in zip(r.items.tolist(), inside):
            if r.step == 0:
                watch.prefill[item] = flag
            watch.any_step[item] = watch.any_step.get(item, False) or flag
        return x

    with model.hooks(fwd_hooks=[(hook_name or key_hook(model.cfg.n_layers - 1), hook)]):
        yield watch
    if distributed.sharding():  # the generation inside ran on shards: every rank gets every item's flags
        merged = distributed.merge_objects(watch, lambda a, b: Watch({**a.prefill, **b.prefill},
                                                                     {**a.any_step, **b.any_step}))
        watch.prefill, watch.any_step = merged.prefill, merged.any_step


# --------------------------------------------------------------------------- evaluation loops

@torch.no_grad()
def target_logprobs(model, prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
                    item_ids: Sequence[int], *, batch_size: int = 8, progress: bool = True,
                    chunk: int | None = None) -> Tensor:
    """Mean log-probability per token of each target given its prompt (teacher-forced), `[n]`.

    The forward stops after the last block (`interp.logits.final_residual`); the final norm and the unembedding run
    on `chunk` target positions of one item at a time (default `interp.logits.LOGIT_CHUNK`), so no
    [batch, pos, vocab] tensor exists: memory is the batch's residual stream plus a chunk's logits. Under torchrun
    each rank scores its shard of the items (gathered in order)."""
    from interp.logits import LOGIT_CHUNK, final_residual, logits_at, position_chunks

    if distributed.sharding():
        return torch.tensor(distributed.map_items(
            lambda idx: target_logprobs(model, [prompts[i] for i in idx], [targets[i] for i in idx],
                                        [item_ids[i] for i in idx], batch_size=batch_size, progress=progress,
                                        chunk=chunk).tolist(), len(prompts),
            lengths=[len(p) + len(t) for p, t in zip(prompts, targets)], batch_size=batch_size))
    seqs = [list(p) + list(t) for p, t in zip(prompts, targets)]
    out = torch.empty(len(seqs))
    batches = padded_batches(model, seqs, batch_size, desc="log-likelihood", progress=progress)
    for idx, tokens, mask in batches:
        rows = Rows.for_batch([item_ids[i] for i in idx], mask, [len(prompts[i]) for i in idx])
        with rows_of(rows), sdpa_attention(model):
            resid = final_residual(model, tokens, mask)
        width = tokens.shape[1]
        for row, i in enumerate(idx):
            n_t = len(targets[i])
            states, gold = resid[row, width - n_t - 1: width - 1], tokens[row, width - n_t:]
            total = 0.0
            for a, b in position_chunks(n_t, chunk or LOGIT_CHUNK):
                pred = logits_at(model, states[a:b]).float().log_softmax(-1)
                total += float(pred.gather(-1, gold[a:b, None]).double().sum())
            out[i] = total / n_t
        del resid
    return out


def greedy_generate(model, prompts: Sequence[Sequence[int]], item_ids: Sequence[int], max_new_tokens: Sequence[int],
                    *, batch_size: int = 8, progress: bool = True, use_cache: bool = True,
                    state: Sequence = ()) -> Generations:
    """Greedy continuations (stopped at EOS or the item's limit) with a KV cache; `.truncated[i]`: item i hit its
    limit without EOS. Every forward (prefill, then one per generated token) sets `rows_of` for the positions it
    computes, so Neuron Adjust and `key_space_watch` see each item's id, absolute positions and step; a finished
    item leaves the batch. `use_cache=False` recomputes the whole sequence each step (same tokens and draws).
    `state`: what the active hooks accumulate, restored when a batch runs out of memory (`generate_tokens`)."""
    prompt_len = [len(p) for p in prompts]

    def rows(step: Step):
        r = Rows.for_batch([item_ids[i] for i in step.rows], step.mask, [prompt_len[i] for i in step.rows], step.step)
        return rows_of(r.last(step.new))

    return generate_tokens(model, prompts, max_new_tokens=list(max_new_tokens), batch_size=batch_size,
                           progress=progress, use_cache=use_cache, step_context=rows, state=state)
