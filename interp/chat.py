"""Chat-template formatting, thinking spans and token-level bookkeeping."""

from __future__ import annotations

from dataclasses import dataclass

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
# The closing marker the refusal-cliff probe reads: its last token is the probe position.
CLOSE_MARKER = "\n</think>\n\n"


def chat_prefix(tokenizer, prompt: str, system: str | None = None) -> str:
    """The model's chat template for one user turn, ending where the assistant starts."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def opens_thinking(tokenizer) -> bool:
    """True when the generation prompt already opens a `<think>` span (R1 distills, Qwen3-Thinking)."""
    return THINK_OPEN in chat_prefix(tokenizer, "x")[-len(THINK_OPEN) - 2:]


def has_thinking_tokens(tokenizer) -> bool:
    return THINK_CLOSE in tokenizer.get_vocab() or THINK_CLOSE in getattr(tokenizer, "added_tokens_encoder", {})


def split_thinking(generated: str) -> tuple[str, str]:
    """Split a generation at the first `</think>` into (thinking, response); no marker → ("", text)."""
    text = generated.removeprefix(THINK_OPEN)
    if THINK_CLOSE not in text:
        return "", text.strip()
    thinking, response = text.split(THINK_CLOSE, 1)
    return thinking.strip(), response.strip()


@dataclass(frozen=True)
class Encoded:
    """Token ids of one sequence and the token span [start, end) of its marked middle part."""

    input_ids: list[int]
    span: tuple[int, int]


def encode_with_span(tokenizer, prefix: str, middle: str, suffix: str, continuation: str = "") -> Encoded:
    """Tokenize prefix+middle+suffix as one string and locate the tokens of `middle`.

    Tokens are assigned by character offsets, so merges across the boundaries are handled; a
    token that straddles a boundary belongs to the part where it starts. With `continuation`
    (e.g. the response that followed), the text is tokenized as it was in context and cut before
    the first token that reaches into the continuation: "\n\n" before "I'm" can tokenize
    differently from "\n\n" at the end of a string, and the last position must be the one the
    model saw just before its answer.
    """
    text = prefix + middle + suffix
    enc = tokenizer(text + continuation, add_special_tokens=False, return_offsets_mapping=True)
    keep = sum(1 for _, end in enc["offset_mapping"] if end <= len(text))
    ids, offsets = enc["input_ids"][:keep], enc["offset_mapping"][:keep]
    lo, hi = len(prefix), len(prefix) + len(middle)
    start = next((i for i, (a, _) in enumerate(offsets) if a >= lo), len(ids))
    end = next((i for i, (a, _) in enumerate(offsets) if a >= hi), len(ids))
    return Encoded(ids, (start, max(start, end)))


def thinking_sequence(tokenizer, prompt: str, thinking: str, *, thinking_prefix: str = "\n\n",
                      marker: str = CLOSE_MARKER, system: str | None = None, response: str = "") -> Encoded:
    """template(prompt) + thinking_prefix + thinking + marker, with the thinking span marked.

    `response` (what the model answered) only fixes how the marker's last characters tokenize.
    Templates that do not open `<think>` themselves get `<think>\\n` appended when the tokenizer
    knows the token. Models without thinking tokens get template(prompt) + thinking only.
    """
    prefix = chat_prefix(tokenizer, prompt, system)
    if not has_thinking_tokens(tokenizer):
        return encode_with_span(tokenizer, prefix, thinking, "", response)
    if not opens_thinking(tokenizer):
        prefix += THINK_OPEN + "\n"
    return encode_with_span(tokenizer, prefix + thinking_prefix, thinking, marker, response)


def prompt_sequence(tokenizer, prompt: str, system: str | None = None) -> Encoded:
    """template(prompt) with the generation prompt; the span is the user's prompt text."""
    full = chat_prefix(tokenizer, prompt, system)
    at = full.rindex(prompt) if prompt else len(full)
    return encode_with_span(tokenizer, full[:at], prompt, full[at + len(prompt):])
