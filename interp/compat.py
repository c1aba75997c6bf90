"""Work-arounds for known TransformerLens 4.3 / transformers 5.x mismatches, applied on import."""

from __future__ import annotations

from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge


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


_patch_kv_cache_keyword()
