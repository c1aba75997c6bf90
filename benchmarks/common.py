"""What the bridge-vs-HF benchmarks share: the model-shape options, and one checkpoint loaded both ways."""

from __future__ import annotations

import argparse
import tempfile

import torch


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model (an existing model) or the shape of a random Qwen2 checkpoint; --device, --dtype, --threads."""
    p.add_argument("--model", help="existing model directory/alias instead of a random checkpoint")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--d-mlp", type=int, default=1408)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bridge_and_hf(args: argparse.Namespace, max_len: int):
    """(bridge model, the same checkpoint as a plain HF model with SDPA, device, temp dir to keep alive):
    `args.model` when given, else a random Qwen2 of the asked shape written to a temp dir."""
    from transformers import AutoModelForCausalLM

    from interp.models import load_model, locate_model, resolve_dtype
    from interp.tiny import write_tiny_checkpoint

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    tmp = tempfile.TemporaryDirectory()
    if args.model:
        path = locate_model(args.model)[0]
    else:
        path = write_tiny_checkpoint(tmp.name, "qwen2", n_layers=args.layers, d_model=args.d_model,
                                     n_heads=args.heads, n_kv_heads=args.kv_heads, d_mlp=args.d_mlp,
                                     vocab_size=args.vocab, max_len=max(512, max_len))
    model = load_model(str(path), device=args.device, dtype=args.dtype)
    dtype = resolve_dtype(args.dtype, device)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    return model, hf, device, tmp
