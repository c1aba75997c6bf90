"""The MLP of each layer as the analyses read it: dense, mixture of experts (MoE), or none; the TransformerLens and
Hugging Face internals of MLPs in one module (the attention side is `interp.bridge.attention_layers`).

A stack may mix the two: DeepSeek-V2/V3 (`first_k_dense_replace`), Qwen2-MoE (`mlp_only_layers`) and Llama-4 put
dense MLPs in some layers and MoE blocks in others, so every question is asked per layer.

- `mlp_kinds(model)` → one of "dense" | "moe" | "none" per layer; `moe_layers(model)`, `is_moe(model)` (any layer).
- `dense_mlp(model, layer)` → `DenseMLP` (hook names, down-projection and gate modules, width) of a dense layer's
  MLP, None for an MoE or MLP-less layer. TransformerBridge wraps the dense layers of a mixed stack in the same
  `MoEBridge` as the sparse ones (`bound_dense`; `dense_gate` / `dense_in` / `dense_out`), with the dense hooks.
- `shared_expert(model, layer)` → `DenseMLP` of an MoE layer's shared expert (Qwen2-MoE / Qwen3-Next
  `shared_expert`, DeepSeek `shared_experts`): a dense gated MLP every token goes through. None without one.
- `neuron_mlps(model)` → ({layer: `DenseMLP`}, {layer: what is left out}): the MLP whose neurons see every token,
  per layer (a dense layer's MLP, an MoE layer's shared expert), for analyses that read gate / key neurons.
- `shared_experts_by_position(model)`: a context manager under which a shared expert's hooks see `[batch, pos, ·]`
  (Qwen2-MoE / Qwen3-Next call it on the flattened tokens).
- `routed_experts(model, layer)` → `RoutedExperts`: the routed experts of an MoE layer (transformers 5's fused
  `*Experts` module: `gate_up_proj` `[E, 2F, D]`, `down_proj` `[E, D, F]`, or transposed), their per-expert
  down-projection weights and `down_inputs(hidden, top_k_index)`, the input of each expert's down-projection
  (act(gate)·up) on the tokens routed to it. None where the experts have another layout (`unreadable_reason`).
- `routed_down_inputs(model, layers, callback)`: a context manager calling `callback(layer, token_index, expert,
  x)` with every routed expert's down-projection input during each forward (a forward pre-hook on the HF experts
  module: its inputs are the flattened MLP input and the routing, whatever experts implementation runs).
- `is_encoder(model)`: bidirectional attention (BERT-style), which cannot generate text; `require_generation(model,
  analysis)` raises `NotApplicable` for one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

ENCODER_REASON = "an encoder (masked LM) does not generate text"


def is_encoder(model) -> bool:
    """True for a bidirectional encoder (BERT-style): TransformerLens `cfg.attention_dir` "bidirectional"."""
    return getattr(model.cfg, "attention_dir", "causal") == "bidirectional"


def require_generation(model, analysis: str) -> None:
    """NotApplicable for an encoder: the analysis generates text (call before any heavy work)."""
    if model is not None and is_encoder(model):
        from interp.analysis import not_applicable

        raise not_applicable(analysis, model, ENCODER_REASON)


def _moe_bridge():
    from transformer_lens.model_bridge.generalized_components.moe import MoEBridge

    return MoEBridge


def _hf(module):
    """The Hugging Face module a bridge component wraps (the module itself when it is not a bridge)."""
    return getattr(module, "original_component", None) or module


def mlp_kind(model, layer: int) -> str:
    """"dense", "moe" or "none" (no MLP in the block)."""
    mlp = getattr(model.blocks[layer], "mlp", None)
    if mlp is None:
        return "none"
    if isinstance(mlp, _moe_bridge()):
        return "dense" if mlp.bound_dense else "moe"
    experts = any("expert" in name.split(".")[-1] for name, _ in _hf(mlp).named_modules())
    return "moe" if experts else "dense"


def mlp_kinds(model) -> list[str]:
    return [mlp_kind(model, layer) for layer in range(model.cfg.n_layers)]


def moe_layers(model) -> list[int]:
    return [layer for layer, kind in enumerate(mlp_kinds(model)) if kind == "moe"]


def is_moe(model) -> bool:
    """True when any layer's MLP is a mixture of experts."""
    return bool(moe_layers(model))


@dataclass(frozen=True)
class DenseMLP:
    """A dense MLP (a dense layer's, or an MoE layer's shared expert) as bridge paths and modules."""

    path: str  # bridge path: blocks.L.mlp or blocks.L.mlp.shared_expert(s)
    gate: object  # bridge linear whose output is `hook_pre` (the gate, or `in` for an ungated MLP)
    down: object  # bridge linear of the down-projection
    down_name: str  # its attribute under `path` (out, dense_out)
    width: int  # neurons (the down-projection's input width)
    kind: str  # "dense" or "shared_expert"

    @property
    def gate_hook(self) -> str:
        """Gate pre-activation (before the activation function), one value per neuron."""
        return f"{self.path}.hook_pre"

    @property
    def key_hook(self) -> str:
        """The down-projection's input, act(gate)·up."""
        return f"{self.path}.hook_post"

    @property
    def down_hook(self) -> str:
        return f"{self.path}.{self.down_name}.hook_in"

    def down_weight(self, d_model: int) -> Float[Tensor, "d_model width"]:
        """The down-projection weight as `[d_model, width]` (column j = neuron j), float32, CPU."""
        w = _hf(self.down).weight.detach().float().cpu()
        return w if w.shape[0] == d_model and w.shape[1] == self.width else w.T  # GPT-2's Conv1D stores [in, out]


def _width(linear, d_model: int, fallback: int) -> int:
    hf = _hf(linear)
    if isinstance(hf, torch.nn.Linear):
        return hf.in_features
    w = getattr(hf, "weight", None)
    if w is not None and w.ndim == 2:
        return int(w.shape[0] if w.shape[1] == d_model else w.shape[1])
    return fallback


def _dense(model, path: str, component, kind: str) -> DenseMLP | None:
    pairs = (("gate", "out"), ("in", "out"), ("dense_gate", "dense_out"), ("dense_in", "dense_out"))
    for gate_name, down_name in pairs:
        gate, down = getattr(component, gate_name, None), getattr(component, down_name, None)
        if gate is not None and down is not None:
            return DenseMLP(path, gate, down, down_name, _width(down, model.cfg.d_model, model.cfg.d_mlp), kind)
    return None


def dense_mlp(model, layer: int) -> DenseMLP | None:
    """The dense MLP of `layer`, None on an MoE layer (its `gate` is the router) or without a readable MLP."""
    if mlp_kind(model, layer) != "dense":
        return None
    return _dense(model, f"blocks.{layer}.mlp", model.blocks[layer].mlp, "dense")


def shared_expert(model, layer: int) -> DenseMLP | None:
    """The shared expert of an MoE layer (a dense gated MLP every token goes through), None without one."""
    if mlp_kind(model, layer) != "moe":
        return None
    mlp = model.blocks[layer].mlp
    for name in ("shared_expert", "shared_experts"):
        component = getattr(mlp, name, None)
        if component is not None and f"blocks.{layer}.mlp.{name}.hook_pre" in model.hook_dict:
            found = _dense(model, f"blocks.{layer}.mlp.{name}", component, "shared_expert")
            if found is not None:
                return found
    return None


ROUTED_REASON = "routed experts skipped (a routed expert's neurons fire only on the tokens routed to it)"


def neuron_mlps(model) -> tuple[dict[int, DenseMLP], dict[int, str]]:
    """The dense MLP whose gate / key neurons see every token, per layer: the layer's MLP on a dense layer, the
    shared expert on an MoE layer; and {layer: what is left out and why} (the routed experts of an MoE layer, the
    whole layer without a shared expert or without an MLP)."""
    found, skipped = {}, {}
    for layer in range(model.cfg.n_layers):
        kind = mlp_kind(model, layer)
        if kind == "dense":
            dense = dense_mlp(model, layer)
            if dense is not None and dense.gate_hook in model.hook_dict and dense.key_hook in model.hook_dict:
                found[layer] = dense
            else:
                skipped[layer] = "no MLP gate / key hooks (blocks.L.mlp.hook_pre / hook_post)"
        elif kind == "moe":
            shared = shared_expert(model, layer)
            if shared is not None:
                found[layer] = shared
                skipped[layer] = f"{ROUTED_REASON}; the shared expert's neurons are used"
            else:
                skipped[layer] = f"mixture of experts without a shared expert: {ROUTED_REASON}"
        else:
            skipped[layer] = "no MLP in this block"
    return found, skipped


@contextlib.contextmanager
def shared_experts_by_position(model) -> Iterator[None]:
    """While active, every MoE layer's shared expert sees its input as `[batch, pos, d_model]`, as a dense MLP does
    (Qwen2-MoE and Qwen3-Next flatten it to `[batch·pos, d_model]` before calling it), so the hooks inside it
    (`hook_pre`, `hook_post`) have the usual shape; its output is flattened back. The MLP acts on each token alone:
    no number changes."""
    handles = []

    def hooks_for(state: dict):
        def block_pre(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            if isinstance(x, Tensor):
                state["shape"] = tuple(x.shape[:-1])

        def pre(module, args, kwargs):
            x = args[0] if args else kwargs.get("hidden_states")
            shape = state.get("shape")
            state["flat"] = bool(isinstance(x, Tensor) and x.ndim == 2 and shape and math.prod(shape) == x.shape[0])
            if not state["flat"]:
                return None
            x = x.reshape(*shape, x.shape[-1])
            return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

        def post(module, args, kwargs, output):
            if state.get("flat") and isinstance(output, Tensor):
                return output.reshape(-1, output.shape[-1])
            return None
        return block_pre, pre, post

    try:
        for layer in moe_layers(model):
            shared = shared_expert(model, layer)
            if shared is None:
                continue
            block_pre, pre, post = hooks_for({})
            component = model.get_submodule(shared.path)
            handles += [model.blocks[layer].mlp.register_forward_pre_hook(block_pre, with_kwargs=True),
                        component.register_forward_pre_hook(pre, with_kwargs=True),
                        component.register_forward_hook(post, with_kwargs=True)]
        yield
    finally:
        for h in handles:
            h.remove()


# --------------------------------------------------------------------------- routed experts

@dataclass
class RoutedExperts:
    """The routed experts of one MoE layer (transformers 5's fused `*Experts` module)."""

    layer: int
    module: torch.nn.Module  # the HF experts module
    n_experts: int
    width: int  # neurons per expert (F)

    @property
    def _transposed(self) -> bool:
        return bool(getattr(self.module, "is_transposed", False))

    def down_weight(self, expert: int) -> Float[Tensor, "d_model width"]:
        """Expert `expert`'s down-projection as `[d_model, F]` (column j = its neuron j), float32, CPU."""
        w = self.module.down_proj[expert].detach()
        return (w.T if self._transposed else w).float().cpu()

    def down_weights(self) -> Float[Tensor, "experts d_model width"]:
        w = self.module.down_proj.detach()
        return (w.transpose(1, 2) if self._transposed else w).float().cpu()

    def gate_up_weight(self, expert: int) -> Float[Tensor, "two_width d_model"]:
        """Expert `expert`'s fused gate/up projection as `[2F, d_model]` (HF Linear layout), float32, CPU."""
        w = self.module.gate_up_proj[expert].detach()
        return (w.T if self._transposed else w).float().cpu()

    def _gated(self, y: Tensor) -> Tensor:
        m = self.module
        if getattr(m, "is_concatenated", True):
            apply = getattr(m, "_apply_gate", None)
            if apply is not None:
                return apply(y)
            gate, up = y.chunk(2, dim=-1)
        else:  # interleaved [gate0, up0, gate1, up1, ...]
            gate, up = y[..., 0::2], y[..., 1::2]
        return m.act_fn(gate) * up

    @torch.no_grad()
    def down_inputs(self, hidden: Float[Tensor, "n d_model"], top_k_index: Int[Tensor, "n k"]
                    ) -> Iterator[tuple[int, Int[Tensor, " m"], Float[Tensor, "m width"]]]:
        """(expert, token indices into `hidden`, input of the expert's down-projection on those tokens) for every
        expert some token is routed to. The same arithmetic as the module's eager forward."""
        m = self.module
        for expert in top_k_index.unique().tolist():
            if not 0 <= expert < self.n_experts:
                continue  # expert-parallel sentinels
            tokens = (top_k_index == expert).any(-1).nonzero()[:, 0]
            w = m.gate_up_proj[expert]
            y = hidden[tokens] @ w if self._transposed else torch.nn.functional.linear(hidden[tokens], w)
            bias = getattr(m, "gate_up_proj_bias", None)
            if bias is not None and getattr(m, "has_bias", False):
                y = y + bias[expert]
            yield expert, tokens, self._gated(y)


def _experts_module(model, layer: int):
    mlp = model.blocks[layer].mlp
    hf = _hf(mlp)
    experts = getattr(hf, "experts", None)
    return _hf(experts) if experts is not None else None


def unreadable_reason(model, layer: int) -> str | None:
    """Why `routed_experts` cannot read this MoE layer's experts (None when it can)."""
    module = _experts_module(model, layer)
    if module is None:
        return "mixture of experts without an `experts` module interp reads"
    if not (isinstance(getattr(module, "gate_up_proj", None), Tensor)
            and isinstance(getattr(module, "down_proj", None), Tensor) and module.down_proj.ndim == 3):
        return f"mixture of experts in a layout interp does not read ({type(module).__name__}: no fused " \
               "gate_up_proj / down_proj expert weights)"
    if not getattr(module, "has_gate", True) or getattr(module, "has_post_expert_norm", False):
        return f"mixture of experts in a layout interp does not read ({type(module).__name__}: ungated or " \
               "post-normed experts)"
    return None


def routed_experts(model, layer: int) -> RoutedExperts | None:
    """The routed experts of an MoE layer; None for other layers or an expert layout interp does not read."""
    if mlp_kind(model, layer) != "moe" or unreadable_reason(model, layer) is not None:
        return None
    module = _experts_module(model, layer)
    down = module.down_proj
    n_experts = int(down.shape[0])
    width = int(down.shape[1] if getattr(module, "is_transposed", False) else down.shape[2])
    return RoutedExperts(layer, module, n_experts, width)


@contextlib.contextmanager
def routed_down_inputs(model, layers: Sequence[int],
                       callback: Callable[[int, Tensor, int, Tensor], None]) -> Iterator[None]:
    """While active, `callback(layer, token_index, expert, x)` receives every routed expert's down-projection input
    `x` `[m, F]` on the tokens routed to it (`token_index` into the flattened batch × position MLP input)."""
    handles = []

    def pre_hook(experts: RoutedExperts):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            index = args[1] if len(args) > 1 else next(v for k, v in kwargs.items() if "index" in k or "indices" in k)
            for expert, tokens, x in experts.down_inputs(hidden, index):
                callback(experts.layer, tokens, expert, x)
        return hook

    try:
        for layer in layers:
            experts = routed_experts(model, layer)
            if experts is not None:
                handles.append(experts.module.register_forward_pre_hook(pre_hook(experts), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
