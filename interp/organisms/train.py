"""Train the model organisms: a standard-attention Qwen3 and its gated-attention Qwen3.5 twin.

    python -m interp.organisms.train --out interp/organisms/standard --arch qwen3
    python -m interp.organisms.train --out interp/organisms/gated --arch qwen3_5

Both twins see the same tokenizer, corpus, batch order, seed and number of steps; they differ
only in the architecture (Qwen3.5 = Qwen3 attention + a per-head elementwise sigmoid output gate
whose logits are the second half of each head's q_proj rows, Qwen3-Next style, zero-centred RMSNorm;
all layers full attention, dense MLP). Deterministic on CPU for a fixed `--threads`.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch

from interp.organisms.corpus import generate_corpus
from interp.tiny import SPECIAL_TOKENS, THINKING_CHAT_TEMPLATE

ARCHS = ("qwen3", "qwen3_5")


def build_tokenizer(texts: list[str], vocab_size: int = 1024):
    """Byte-level BPE over the corpus (any text encodes), single-digit number tokens, chat specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token=None, padding_side="left")
    fast.chat_template = THINKING_CHAT_TEMPLATE
    return fast


def build_config(arch: str, tokenizer, *, d_model: int, n_layers: int, n_heads: int, n_kv_heads: int,
                 d_head: int, d_mlp: int, max_len: int):
    from transformers import Qwen3_5TextConfig, Qwen3Config

    common = dict(vocab_size=len(tokenizer), hidden_size=d_model, intermediate_size=d_mlp,
                  num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                  head_dim=d_head, max_position_embeddings=max_len, tie_word_embeddings=False,
                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.pad_token_id, rms_norm_eps=1e-6)
    if len(tokenizer) == d_model:
        raise ValueError("d_model must differ from the vocabulary size")
    if arch == "qwen3":
        return Qwen3Config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common)
    if arch == "qwen3_5":
        return Qwen3_5TextConfig(layer_types=["full_attention"] * n_layers,
                                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                  "partial_rotary_factor": 1.0}, **common)
    raise ValueError(f"arch must be one of {ARCHS}")


def pack(docs_ids: list[list[int]], seq_len: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy packing of whole documents (truncated to seq_len) into rows; returns (ids, loss mask)."""
    rows, masks, cur = [], [], []
    for ids in docs_ids:
        ids = ids[:seq_len]
        if len(cur) + len(ids) > seq_len:
            rows.append(cur + [pad_id] * (seq_len - len(cur)))
            masks.append([1] * len(cur) + [0] * (seq_len - len(cur)))
            cur = []
        cur = cur + ids
    if cur:
        rows.append(cur + [pad_id] * (seq_len - len(cur)))
        masks.append([1] * len(cur) + [0] * (seq_len - len(cur)))
    return torch.tensor(rows), torch.tensor(masks)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--arch", choices=ARCHS, default="qwen3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--docs", type=int, default=60000)
    p.add_argument("--steps", type=int, default=1800)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--d-head", type=int, default=32)
    p.add_argument("--d-mlp", type=int, default=384)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--mix", default=None, help="task shares, e.g. safety=0.2,math=0.3,code=0.06,prose=0.04,plain=0.4")
    p.add_argument("--log-every", type=int, default=25)
    a = p.parse_args(argv)

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    random.seed(a.seed)
    torch.use_deterministic_algorithms(True)
    t0 = time.time()

    mix = {k: float(v) for k, v in (kv.split("=") for kv in a.mix.split(","))} if a.mix else None
    docs = generate_corpus(a.docs, a.seed, mix)
    tokenizer = build_tokenizer(docs[:5000], a.vocab)
    sample = docs[:200]
    for d in sample:  # the tokenizer must round-trip the corpus
        assert tokenizer.decode(tokenizer(d, add_special_tokens=False)["input_ids"]) == d, d[:80]
    docs_ids = tokenizer(docs, add_special_tokens=False)["input_ids"]
    ids, mask = pack(docs_ids, a.seq_len, tokenizer.pad_token_id)
    n_tokens = int(mask.sum())
    print(f"corpus: {a.docs} docs, {n_tokens} tokens in {len(ids)} rows of {a.seq_len}; vocab {len(tokenizer)}; "
          f"prep {time.time() - t0:.0f}s", flush=True)

    from transformers import AutoModelForCausalLM

    config = build_config(a.arch, tokenizer, d_model=a.d_model, n_layers=a.layers, n_heads=a.heads,
                          n_kv_heads=a.kv_heads, d_head=a.d_head, d_mlp=a.d_mlp, max_len=max(512, a.seq_len))
    torch.manual_seed(a.seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{type(model).__name__}: {n_params} parameters", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=a.lr, betas=(0.9, 0.95), eps=1e-8)

    def lr_at(step: int) -> float:
        if step < a.warmup:
            return a.lr * (step + 1) / a.warmup
        frac = (step - a.warmup) / max(1, a.steps - a.warmup)
        return a.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    gen = torch.Generator().manual_seed(a.seed)
    order = torch.randperm(len(ids), generator=gen)
    cursor, log, t_train, running = 0, [], time.time(), []
    for step in range(a.steps):
        if cursor + a.batch > len(order):
            order, cursor = torch.randperm(len(ids), generator=gen), 0
        idx = order[cursor: cursor + a.batch]
        cursor += a.batch
        x, m = ids[idx], mask[idx]
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits = model(input_ids=x, attention_mask=None).logits[:, :-1]
        target, tmask = x[:, 1:], m[:, 1:].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                reduction="none").view_as(tmask)
        loss = (nll * tmask).sum() / tmask.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        running.append(loss.item())
        if (step + 1) % a.log_every == 0 or step == a.steps - 1:
            entry = {"step": step + 1, "loss": round(sum(running) / len(running), 4), "lr": round(lr_at(step), 6),
                     "tokens": (step + 1) * a.batch * a.seq_len, "elapsed_s": round(time.time() - t_train, 1)}
            log.append(entry)
            running = []
            print(json.dumps(entry), flush=True)

    model.eval()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    train_s = time.time() - t_train
    meta = {"random_weights": False, "organism": True, "arch": a.arch,
            "architecture": type(model).__name__, "gated_attention": a.arch == "qwen3_5",
            "parameters": n_params, "train_seconds": round(train_s, 1),
            "corpus_tokens": n_tokens, "args": vars(a)}
    (out / "interp_model.json").write_text(json.dumps(meta, indent=1) + "\n")
    (out / "training_log.json").write_text(json.dumps({"args": vars(a), "log": log}, indent=1) + "\n")
    print(f"saved {out} ({train_s:.0f}s training)", flush=True)


if __name__ == "__main__":
    main()
