"""Sink organisms: a 2-layer Qwen3 and its gated Qwen3.5 twin trained on Bigram-Backcopy.

The task is Guo et al. 2024's (*Active-Dormant Attention Heads*, arXiv 2410.13835), with frequent
triggers so a 2-layer model learns the copy within minutes on one CPU core. Vocabulary of 64: id 0
`<|endoftext|>` (the BOS, first token of every training sequence), 4 trigger tokens `T1`–`T4`, 59
ordinary tokens `w5`–`w63`. After the BOS an ordinary token is drawn uniformly; then each next
token follows a fixed random bigram table over the ordinary tokens (seed 0), except that with
probability 0.12 a random trigger is inserted, and after a trigger the next token copies the token
before it (backcopy). A head that copies at triggers has nothing to do elsewhere: in the ungated
twin it parks its attention on the BOS (an attention sink); the gated twin can close its gate instead.

    python -m interp.organisms.sink --out DIR --arch qwen3|qwen3_5 --steps 2000   # ≈ 4 min on one core

Deterministic (seeds, one thread): the same step count gives the same weights. `backcopy_texts(n)`
are held-out sequences as text (the `backcopy` text set of `interp.datasets`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

VOCAB, N_TRIGGERS, P_TRIGGER = 64, 4, 0.12
SEQ_LEN, BATCH = 64, 32
BOS = "<|endoftext|>"
TOKENS = [BOS] + [f"T{i}" for i in range(1, N_TRIGGERS + 1)] + [f"w{i}" for i in range(N_TRIGGERS + 1, VOCAB)]
ARCHS = ("qwen3", "qwen3_5")


def bigram_table(seed: int = 0) -> torch.Tensor:
    """[VOCAB, n_ordinary] next-token probabilities over the ordinary tokens."""
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(VOCAB, VOCAB - N_TRIGGERS - 1, generator=g) * 2.0, -1)


def sample(n: int, seq_len: int, gen: torch.Generator, bigram: torch.Tensor) -> torch.Tensor:
    """[n, seq_len] token ids: BOS, then the Bigram-Backcopy process."""
    ordinary = torch.arange(N_TRIGGERS + 1, VOCAB)
    x = torch.zeros(n, seq_len, dtype=torch.long)
    x[:, 1] = ordinary[torch.randint(len(ordinary), (n,), generator=gen)]
    for t in range(1, seq_len - 1):
        cur = x[:, t]
        is_trigger = (cur >= 1) & (cur <= N_TRIGGERS)
        nxt = ordinary[torch.multinomial(bigram[cur], 1, generator=gen)[:, 0]]
        trigger = torch.randint(1, N_TRIGGERS + 1, (n,), generator=gen)
        insert = (torch.rand(n, generator=gen) < P_TRIGGER) & ~is_trigger
        nxt = torch.where(insert, trigger, nxt)
        x[:, t + 1] = torch.where(is_trigger, x[:, t - 1], nxt)
    return x


def backcopy_texts(n: int | None = None, seed: int = 99) -> list[str]:
    """`n` held-out sequences (default 64) as space-separated tokens, without the BOS."""
    x = sample(64 if n is None else n, SEQ_LEN, torch.Generator().manual_seed(seed), bigram_table())
    return [" ".join(TOKENS[i] for i in row[1:].tolist()) for row in x]


def build_tokenizer():
    """Word-level tokenizer over the 64 tokens (whitespace-separated; anything else maps to the BOS id)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(TOKENS)}, unk_token=BOS))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=BOS, pad_token=BOS,
                                   unk_token=BOS, padding_side="left")


def build_model(arch: str):
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig, Qwen3Config, Qwen3ForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=SEQ_LEN, tie_word_embeddings=False,
                  pad_token_id=0, bos_token_id=0, eos_token_id=0, rms_norm_eps=1e-6)
    torch.manual_seed(0)
    if arch == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common))
    if arch == "qwen3_5":
        cfg = Qwen3_5TextConfig(layer_types=["full_attention"] * 2, rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0}, **common)
        return Qwen3_5ForCausalLM(cfg)
    raise ValueError(f"arch must be one of {ARCHS}")


def train(arch: str, steps: int, lr: float = 3e-3, warmup: int = 100):
    """AdamW (β 0.9/0.95, no weight decay), linear warm-up then constant lr, batch 32 × 64, grad-clip 1."""
    torch.set_num_threads(1)
    model = build_model(arch)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    gen, bigram, log = torch.Generator().manual_seed(1), bigram_table(), []
    for step in range(1, steps + 1):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / warmup)
        x = sample(BATCH, SEQ_LEN, gen, bigram)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 250 == 0:
            log.append({"step": step, "loss": loss.item()})
    return model.eval(), log


def save(model, out: str | Path, *, arch: str, steps: int, log: list, seconds: float) -> Path:
    """HF checkpoint + tokenizer + card. `"sink_organism": true`, not `"organism": true`: the corpus
    organisms' settings do not apply; theirs are `SINK_ANALYSIS_DEFAULTS` in interp.organisms.defaults."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer().save_pretrained(out)
    card = {"random_weights": False, "sink_organism": True, "arch": arch, "architecture": type(model).__name__,
            "gated_attention": arch == "qwen3_5", "task": "bigram-backcopy", "steps": steps,
            "train_seconds": round(seconds, 1)}
    (out / "interp_model.json").write_text(json.dumps(card, indent=1))
    (out / "training_log.json").write_text(json.dumps(log))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--arch", choices=ARCHS, default="qwen3")
    p.add_argument("--steps", type=int, default=2000)
    a = p.parse_args(argv)
    t0 = time.time()
    model, log = train(a.arch, a.steps)
    save(model, a.out, arch=a.arch, steps=a.steps, log=log, seconds=time.time() - t0)


if __name__ == "__main__":
    main()
