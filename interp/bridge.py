"""Every TransformerLens internal interp relies on, in one module: a TransformerLens upgrade touches this file.

- `attention_layers`: which layers are softmax attention (hybrids mix in linear attention);
- `sdpa_attention`: attention through PyTorch SDPA (the wrapped HF module) when no hook needs its internals;
- `stop_layer_for` / `stopped_at`: end a forward after the last block a hook needs (also before the final norm);
- `readout_point`, `FINAL_NORM`, `hidden_state_hook`: where a readout reads, mapped to bridge hook names;
- `per_row_sampling`: sampled generation seeded per sequence, independent of the batch;
- `replace_tokenizer`: install another tokenizer on a loaded bridge;
- `forward_attention_mask`: the 2-D attention mask of the forward in progress, for hooks that must skip padding;
- `_patch_kv_cache_keyword`: the compat patch for transformers 5.2x's KV-cache keyword, applied on import;
- `_patch_block_signature_cache`, `_patch_norm_fast_path`, `_patch_offload_check`: per-forward overhead of the
  bridge removed (the same results; a decode step is mostly this overhead), applied on import;
- `mla_layers`, `head_W_O`, `_patch_mla_head_hooks`: multi-head latent attention (DeepSeek-V2/V3): per-head W_O from
  the output projection, and `hook_z` / `hook_q/k/v` in TransformerLens layout (patched on import).
"""

from __future__ import annotations

import contextlib
import inspect
import re
import types
import warnings
from collections.abc import Callable, Iterator, Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge

# Hooks that exist only in the bridge's eager re-implementation of attention.
_EAGER_ONLY = re.compile(r"attn\.(hook_attn_scores|hook_pattern|hook_rot_q|hook_rot_k|hook_cos|hook_sin|hook_q_gate)$")
_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def hidden_state_hook(layer: int | None, n_layers: int) -> str:
    """HF `hidden_states[layer]` as a bridge hook: L (or None) → final-norm output, l → resid_pre of block l."""
    if layer is None or layer == n_layers:
        return FINAL_NORM
    return "hook_embed" if layer == 0 else f"blocks.{layer - 1}.hook_resid_post"


FINAL_NORM = "ln_final.hook_out"


def stop_layer_for(hook_names: Sequence[str], n_layers: int) -> int | None:
    """The first block no requested hook needs (None when a hook after the blocks is needed).

    `stop == n_layers` runs every block but skips the final norm and the unembedding.
    """
    layers = []
    for name in hook_names:
        m = _BLOCK.match(name)
        if m is None:
            if name.startswith(("hook_embed", "embed.", "hook_pos_embed")):
                layers.append(-1)
                continue
            return None
        layers.append(int(m.group(1)))
    return max(layers, default=n_layers - 1) + 1


def _raise_stop(x, hook):
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    raise StopAtLayerException(x)


@contextlib.contextmanager
def stopped_at(model, stop: int | None) -> Iterator[int | None]:
    """Context for a forward that should end before block `stop`; yields the `stop_at_layer` to pass.

    TransformerLens ignores `stop_at_layer == n_layers` (it still runs the final norm and the
    unembedding), so that case stops with a hook at the final norm's input instead."""
    if stop is not None and stop >= model.cfg.n_layers and "ln_final.hook_in" in model.hook_dict:
        with model.hooks(fwd_hooks=[("ln_final.hook_in", _raise_stop)]):
            yield None
    else:
        yield stop


def readout_point(model, hook_name: str) -> tuple[str, int | None, Callable[[Tensor], Tensor]]:
    """(hook to read, stop layer, transform) that yield `hook_name`'s activations without running
    anything later: the final-norm output is read as ln_final(last resid_post), skipping the unembed."""
    n_layers = model.cfg.n_layers
    if hook_name == FINAL_NORM:
        return f"blocks.{n_layers - 1}.hook_resid_post", n_layers, model.ln_final
    return hook_name, stop_layer_for([hook_name], n_layers), lambda x: x


@contextlib.contextmanager
def forward_attention_mask(model) -> Iterator[dict]:
    """Keep the `[batch, pos]` 0/1 attention mask of each forward in `state["mask"]` while active.

    The bridge hands the mask to the wrapped HF model on every forward (run_with_hooks, run_with_cache,
    each generate step, where it also covers the cached positions); None means no padding. A hook
    whose activations have `p` positions finds their mask in the last `p` columns."""
    state: dict = {"mask": None}

    def keep(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        state["mask"] = mask if mask is None or mask.ndim == 2 else None

    handle = model.original_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        yield state
    finally:
        handle.remove()


def _sdpa_forward(self, *args, **kwargs):
    """Attention through the wrapped HF module (SDPA kernel); hook_in/q/k/v/z/hook_out still fire."""
    hidden = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
    out, weights = self.original_component(self.hook_in(hidden), **kwargs)
    return self.hook_out(out), weights


_BLOCK_PARTS = {"hook_in", "hook_out", "hook_mlp_in", "_original_component", "mlp",
                "ln1", "ln2", "ln1_post", "ln2_post"}  # a block's modules other than its token mixer


def attention_layers(model) -> tuple[list[int], dict[int, str]]:
    """(the softmax-attention layers, {every other layer: its kind}) of a bridged model.

    Only softmax layers have `attn.hook_pattern`/`hook_attn_scores`/`hook_q/k/v`; hybrids (Qwen3.5, Qwen3-Next)
    put linear attention (Gated DeltaNet, kind "linear_attention") or state-space layers between them. The
    kind is the checkpoint's `layer_types` entry where it has one, else the block's token-mixer module name.
    """
    layer_types = getattr(getattr(model.original_model, "config", None), "layer_types", None) or []
    softmax, others = [], {}
    for i, block in enumerate(model.blocks):
        if isinstance(getattr(block, "attn", None), AttentionBridge):
            softmax.append(i)
        elif i < len(layer_types):
            others[i] = str(layer_types[i])
        else:
            others[i] = next((n for n in block._modules if n not in _BLOCK_PARTS), "unknown")
    return softmax, others


def mla_layers(model) -> list[int]:
    """The layers with multi-head latent attention (DeepSeek-V2/V3): queries, keys and values are read from
    compressed latents through an RMSNorm, so no per-head W_Q/W_K/W_V maps the residual stream to them."""
    from transformer_lens.model_bridge.generalized_components.mla_attention import MLAAttentionBridge

    return [i for i, block in enumerate(model.blocks) if isinstance(getattr(block, "attn", None), MLAAttentionBridge)]


def head_W_O(model, layer: int) -> Tensor:
    """Layer `layer`'s W_O per query head, [head, d_head, d_model] (on multi-head latent attention: the output
    projection split into its heads of `v_head_dim`, which is what `hook_z` holds there)."""
    attn = model.blocks[layer].attn
    if layer not in mla_layers(model):
        return attn.W_O.detach()
    weight = attn.o.original_component.weight.detach()  # [d_model, n_heads · v_head_dim]
    return weight.T.reshape(model.cfg.n_heads, -1, weight.shape[0])


def _patch_mla_head_hooks() -> None:
    """TransformerLens' multi-head latent attention bridge splits `hook_z` (the output projection's input) by
    `cfg.d_head` (the rope head dim) instead of `v_head_dim`, which gives the wrong number of heads, and fires
    `hook_q/k/v` as [batch, head, pos, d_head]. Split `hook_z` into the model's heads of `v_head_dim` and show
    `hook_q/k/v` as [batch, pos, head, d_head] like every other attention (hooks may edit them: both revert)."""
    from transformer_lens.model_bridge.generalized_components.mla_attention import MLAAttentionBridge

    original = MLAAttentionBridge._setup_qkv_hook_reshaping
    if getattr(original, "_interp_patched", False):
        return

    def _setup_qkv_hook_reshaping(self):
        original(self)
        hf = self.original_component
        conversion = getattr(getattr(getattr(self, "o", None), "hook_in", None), "hook_conversion", None)
        v_head_dim = getattr(hf, "v_head_dim", None)
        n_heads = getattr(getattr(hf, "config", None), "num_attention_heads", None) or getattr(self.config, "n_heads")
        if conversion is not None and v_head_dim:
            conversion.n_heads, conversion.d_head = n_heads, v_head_dim
        transpose = getattr(self.hook_rot_q, "hook_conversion", None)
        if transpose is not None:
            for hook in (self.hook_q, self.hook_k, self.hook_v):
                hook.hook_conversion, hook.pos_dim = type(transpose)(), None

    _setup_qkv_hook_reshaping._interp_patched = True
    MLAAttentionBridge._setup_qkv_hook_reshaping = _setup_qkv_hook_reshaping


PATTERN_ATTENTION = "interp_pattern"  # the HF attention-interface name of `_pattern_attention`
PATTERN_BLOCK_BYTES = 64 * 2 ** 20  # float32 bytes of one block of score rows


def _pattern_attention(module, query: Float[Tensor, "batch head q d"], key: Float[Tensor, "batch kv k d"],
                       value: Float[Tensor, "batch kv k d"], attention_mask: Tensor | None,
                       scaling: float | None = None, dropout: float = 0.0, **kwargs) -> tuple[Tensor, None]:
    """Softmax attention for an HF attention module (its q and k already normed and rotated, the KV cache applied)
    that builds the pattern a block of query rows at a time, passes it through the bridge's `hook_pattern`, and
    multiplies it with the values: the scores never exist for all rows at once, so one layer's pattern is the largest
    tensor (the bridge's eager attention holds the scores, their masked copy and the pattern). The same numbers as
    the eager path: scores in the model's dtype, masked with the dtype's minimum, softmax in float32, cast back."""
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    b, h, q, _ = query.shape
    k = key.shape[-2]
    scaling = module.head_dim ** -0.5 if scaling is None else scaling
    sinks = getattr(module, "sinks", None)  # GPT-OSS: a learned logit per head joins the softmax as an extra column
    pattern = query.new_empty(b, h, q, k)
    rows = max(1, PATTERN_BLOCK_BYTES // max(1, b * h * k * 4))
    key_t = key.transpose(-1, -2)
    for a in range(0, q, rows):
        scores = torch.matmul(query[:, :, a:a + rows], key_t) * scaling
        if attention_mask is not None:
            block = attention_mask[:, :, a:a + rows, :k] if attention_mask.shape[-2] > 1 else attention_mask[..., :k]
            allowed = block if block.dtype == torch.bool else block > torch.finfo(block.dtype).min / 2
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        if sinks is not None:
            column = sinks.reshape(1, -1, 1, 1).expand(b, -1, scores.shape[-2], 1).to(scores.dtype)
            scores = torch.cat([scores, column], dim=-1)
        weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
        pattern[:, :, a:a + rows] = weights[..., :k] if sinks is not None else weights
        del scores, weights
    hook = module.__dict__.get("_interp_hook_pattern")
    if hook is not None:
        pattern = hook(pattern)
    return torch.matmul(pattern, value).transpose(1, 2).contiguous(), None


def _register_pattern_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(PATTERN_ATTENTION, _pattern_attention)
    AttentionMaskInterface.register(PATTERN_ATTENTION, eager_mask)


def _sdpa_blocks(model) -> list:
    """The blocks whose attention the SDPA path can take over (none unless every softmax layer can)."""
    from transformer_lens.model_bridge.generalized_components.position_embeddings_attention import (
        PositionEmbeddingsAttentionBridge,
    )

    if getattr(model.original_model.config, "attn_logit_softcapping", None):  # Gemma-2: SDPA has no soft-capping
        return []
    blocks = [model.blocks[i] for i in attention_layers(model)[0]] if hasattr(model, "blocks") else []
    return blocks if blocks and all(type(b.attn) is PositionEmbeddingsAttentionBridge for b in blocks) else []


def _active_hook_names(model) -> list[str]:
    return [name for name, hp in model.hook_dict.items() if hp.fwd_hooks]


def hooks_active(model) -> bool:
    """Whether a removable forward hook is attached to any hook point (an intervention's context is open); the
    bridge's own permanent hooks (aliases on some architectures) do not count."""
    return any(not h.is_permanent for hp in model.hook_dict.values() for h in hp.fwd_hooks)


@contextlib.contextmanager
def sdpa_attention(model, needed_hooks: Sequence[str] = ()) -> Iterator[bool]:
    """Run attention through the wrapped HF modules instead of the bridge's eager re-implementation.

    With PyTorch SDPA when no requested or active hook needs attention internals; when the only such hook is
    `hook_pattern`, with `_pattern_attention` (the pattern built a block of query rows at a time and passed through
    the hook, so the scores are never whole: memory one layer's pattern). Other internals (scores, rotary, the
    bridge's q-gate hook), or architectures it does not cover: a no-op (the bridge's eager attention). Yields whether
    it is on. Generation may use it: the wrapped HF attention then updates the KV cache itself (`interp.generation`).
    """
    names = list(needed_hooks) + _active_hook_names(model)
    eager = [n for n in names if _EAGER_ONLY.search(n)]
    needs_eager = any(not n.endswith("attn.hook_pattern") for n in eager)
    blocks = [] if needs_eager else _sdpa_blocks(model)
    if not blocks:
        yield False
        return
    if "forward" in vars(blocks[0].attn):  # already on (nested use): the outer context restores
        yield True
        return
    config = model.original_model.config
    previous = config._attn_implementation
    for block in blocks:
        object.__setattr__(block.attn, "forward", types.MethodType(_sdpa_forward, block.attn))
        if eager:  # hook_pattern: the HF module's attention function fires the bridge's hook point
            block.attn.original_component.__dict__["_interp_hook_pattern"] = block.attn.hook_pattern
    if eager:
        _register_pattern_attention()
    config._attn_implementation = PATTERN_ATTENTION if eager else "sdpa"
    try:
        yield True
    finally:
        config._attn_implementation = previous
        for block in blocks:
            object.__delattr__(block.attn, "forward")
            block.attn.original_component.__dict__.pop("_interp_hook_pattern", None)


@contextlib.contextmanager
def checkpointed_blocks(model) -> Iterator[None]:
    """While active, a forward with gradients keeps only each block's inputs for the backward pass and
    recomputes the block's internals there (`torch.utils.checkpoint`, non-reentrant), so a backward
    through n blocks holds n × batch × T × d_model plus one block's graph instead of every block's graph.
    Hooks inside a block fire again during its recomputation (with the same values); forwards without
    gradients are unchanged."""
    from torch.utils.checkpoint import checkpoint
    from transformers.cache_utils import Cache

    blocks = list(getattr(model, "blocks", []))
    own = [vars(b).get("forward") for b in blocks]
    for block in blocks:
        forward = block.forward

        def run(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            # a KV cache would take the block's keys again when it is recomputed: none in a gradient forward
            kwargs = {k: None if isinstance(v, Cache) else v for k, v in kwargs.items()}
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)
        object.__setattr__(block, "forward", run)
    try:
        yield
    finally:
        for block, previous in zip(blocks, own):
            if previous is None:
                object.__delattr__(block, "forward")
            else:
                object.__setattr__(block, "forward", previous)


@contextlib.contextmanager
def per_row_sampling(row_seeds: Sequence[int]) -> Iterator[None]:
    """While active, the bridge's sampled generation draws each row's token with the global RNG seeded
    from that row's seed and the step, so a sequence's sample does not depend on the other sequences
    in its batch (or on the batch size). Greedy decoding is untouched."""
    from transformer_lens import utilities

    original = utilities.sample_logits
    step = 0

    def sample_logits(final_logits, temperature=1.0, tokens=None, **kwargs):
        nonlocal step
        if temperature == 0.0 or final_logits.shape[0] != len(row_seeds):
            return original(final_logits, temperature=temperature, tokens=tokens, **kwargs)
        rows = []
        for i, seed in enumerate(row_seeds):
            torch.manual_seed(seed * 1_000_003 + step)
            rows.append(original(final_logits[i:i + 1], temperature=temperature,
                                 tokens=None if tokens is None else tokens[i:i + 1], **kwargs))
        step += 1
        return torch.cat(rows)

    utilities.sample_logits = sample_logits
    try:
        yield
    finally:
        utilities.sample_logits = original


def replace_tokenizer(bridge, tokenizer):
    """Install `tokenizer` on a loaded bridge as it is. The bridge's `tokenizer` setter re-runs
    TransformerLens's set-up, which reloads the tokenizer from the checkpoint by name (rebuilding
    the very one being replaced), so the stored attributes are set directly."""
    bridge._tokenizer = tokenizer
    driver = getattr(bridge, "driver", None) or getattr(bridge, "_driver", None)
    if driver is not None and hasattr(driver, "tokenizer"):
        driver.tokenizer = tokenizer
    return tokenizer


def _patch_kv_cache_keyword() -> None:
    """transformers 5.2x passes the KV cache to attention as `cache=`, but the bridge's attention
    only reads `past_key_values`/`layer_past`: with the KV cache on, every decode step would attend
    to itself alone. Forward `cache` under the name the bridge reads."""
    original = AttentionBridge._update_kv_cache
    if getattr(original, "_interp_patched", False):
        return

    def _update_kv_cache(self, key_states, value_states, **kwargs):
        if kwargs.get("past_key_values") is None and kwargs.get("cache") is not None:
            kwargs["past_key_values"] = kwargs["cache"]
        return original(self, key_states, value_states, **kwargs)

    _update_kv_cache._interp_patched = True
    AttentionBridge._update_kv_cache = _update_kv_cache


def _patch_block_signature_cache() -> None:
    """TransformerLens' block bridge filters every forward's keyword arguments by
    `inspect.signature(original_component.forward)`, computed anew on every call of every block: about a third of a
    millisecond each, most of a decode step's overhead on a GPU. Compute it once per forward function (the same
    filtering, the same result)."""
    from transformer_lens.model_bridge.generalized_components.block import BlockBridge

    if getattr(BlockBridge._filter_kwargs_for_forward, "_interp_patched", False):
        return
    signatures: dict = {}

    def _filter_kwargs_for_forward(self, kwargs, num_positional_args=0):
        if self.original_component is None:
            return kwargs
        forward = self.original_component.forward
        key = getattr(forward, "__func__", forward)
        if key not in signatures:
            try:
                params = inspect.signature(forward).parameters
            except (ValueError, TypeError):
                signatures[key] = None
            else:
                signatures[key] = (list(params), any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()))
        entry = signatures[key]
        if entry is None or entry[1]:
            return kwargs
        names, positional = set(entry[0]), set(entry[0][:num_positional_args])
        return {k: v for k, v in kwargs.items() if k in names and k not in positional}

    _filter_kwargs_for_forward._interp_patched = True
    BlockBridge._filter_kwargs_for_forward = _filter_kwargs_for_forward


def _patch_norm_fast_path() -> None:
    """TransformerLens' normalization bridge (native-autograd path) computes the scale and the normalized input for
    `hook_scale` / `hook_normalized` and then returns HF's own forward whenever those hooks did not edit them. With
    no hook on either, that work is thrown away: call HF's forward alone (the same result; any hook on them, e.g. a
    cache, takes the original path)."""
    from transformer_lens.model_bridge.generalized_components.normalization import NormalizationBridge

    original = NormalizationBridge._hf_autograd_forward_with_hooks
    if getattr(original, "_interp_patched", False):
        return

    def _hf_autograd_forward_with_hooks(self, x):
        scale, normalized = self.hook_scale, self.hook_normalized
        if (self.original_component is None or isinstance(self.original_component, torch.nn.Identity)
                or scale.fwd_hooks or normalized.fwd_hooks or scale.bwd_hooks or normalized.bwd_hooks):
            return original(self, x)
        result = self.original_component(x)
        return result if result.dtype == x.dtype else result.to(x.dtype)

    _hf_autograd_forward_with_hooks._interp_patched = True
    NormalizationBridge._hf_autograd_forward_with_hooks = _hf_autograd_forward_with_hooks


def _patch_offload_check() -> None:
    """Every bridge component's call enters Accelerate's `align_module_device` around its forward, a context manager
    that does nothing unless the wrapped module carries an Accelerate offload hook (`_hf_hook`). Skip the context
    where there is no such hook (the same call; offloaded models keep the original path)."""
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    original = GeneralizedComponent.__call__
    if getattr(original, "_interp_patched", False):
        return

    def __call__(self, *args, **kwargs):
        wrapped = self._modules.get("_original_component")
        if wrapped is None or "_hf_hook" not in wrapped.__dict__:
            return torch.nn.Module.__call__(self, *args, **kwargs)
        return original(self, *args, **kwargs)

    __call__._interp_patched = True
    GeneralizedComponent.__call__ = __call__


_patch_kv_cache_keyword()
_patch_mla_head_hooks()
_patch_block_signature_cache()
_patch_norm_fast_path()
_patch_offload_check()
# The bridge's generate loop still passes `past_key_values`, which transformers 5.2x deprecates noisily
# on every call; the keyword is forwarded correctly (see above), so the warning tells a user nothing.
warnings.filterwarnings("ignore", message=r"`past_key_values` is deprecated", category=FutureWarning)
