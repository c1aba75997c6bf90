"""The one place that says which settings the model organisms recommend for each analysis.

`load_model` attaches `ANALYSIS_DEFAULTS` to every checkpoint whose card (`interp_model.json`) says
`"organism": true` (the chat-corpus twins) and `SINK_ANALYSIS_DEFAULTS` to the sink twins
(`"sink_organism": true`); `interp.analysis.config_for` and the CLI apply them unless an option is given.
Each analysis adds its key here when the organisms need settings other than the paper's.
"""

ANALYSIS_DEFAULTS: dict[str, dict] = {
    # measured in interp/organisms/README.md ("refusal_cliff on organism")
    "refusal_cliff": {
        "harmful": "organism-harmful", "harmless": "organism-harmless",
        "thinking_prefix": "",  # the corpus's main format: "<think>\n" + thinking
        # the last-token probe saturates at the final token and reads ~0.5 on every thinking token
        # (out of distribution there): no plateau, no cliff; the span probe sees thinking tokens
        "probe_mode": "thinking_span",
        "head_method": "causal",  # the only ranking with the marker-reading head (0,2) in its top two
        "max_new_tokens": 96,
        "asr_regenerate": "response",  # regenerating the thinking under ablation breaks it
    },
    # measured in docs/instability.md ("On the organisms")
    "instability": {
        "tasks": "arithmetic",  # the organisms' own word-problem chats (checkable "The answer is N.")
        "max_new_tokens": 96,  # a trace is 30-70 tokens
        "windows": (8, 16, 32),  # prefixes scaled to the short traces (paper-style 32/64/128 exceed them)
    },
    # measured in docs/gated_attention.md ("On the organisms")
    "gated_attention": {
        "text_set": "organism-plain",  # the organisms' own plain text (natural prose is out of their distribution)
    },
    # measured in docs/systematic_outliers.md ("On the organisms")
    "systematic_outliers": {
        "text_set": "organism-plain",  # natural prose is out of distribution for them (loss 8.3 nats > log 1024)
        "bos": True,  # their plain documents follow <|endoftext|>, the BOS-like token interp picks
    },
    # measured in docs/talking_heads.md ("On the organisms")
    "talking_heads": {
        "n_items": (2, 3, 4, 5, 6),  # recall is at chance from N = 6 on (model card); longer lists add only noise
        "prompts_per_cell": 100,  # 2000 prompts per split: accuracy s.e. ≈ 1 point; the sweep takes ~2 CPU minutes
        "batch_size": 64,  # 1M-parameter model: bigger batches are faster on CPU (numbers do not depend on it)
    },
    # measured in docs/skill_unlearning.md ("On the organisms")
    "skill_unlearning": {
        # the organisms' own skills (GSM8K/MBPP are out of reach offline)
        "forget": "arithmetic", "retain": "laundry,chat",
        "n_probe": 64, "n_eval": 32,  # about 5,000 probe tokens per chat skill; the whole run takes ~1.5 CPU-minutes
        "max_new_tokens": 64,  # an arithmetic answer is 20-50 tokens
        "batch_size": 32,  # tiny model: bigger batches are faster on CPU (numbers do not depend on it)
    },
}

# The Bigram-Backcopy sink twins (organism-sink, organism-sink-gated): measured in docs/gated_attention.md
SINK_ANALYSIS_DEFAULTS: dict[str, dict] = {
    "gated_attention": {"text_set": "backcopy", "bos": True, "seq_len": 64},  # their training task and length
    "systematic_outliers": {"text_set": "backcopy", "bos": True, "seq_len": 64},  # the same (measured in its docs page)
}
