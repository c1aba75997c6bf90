"""Generation throughput: interp's cached decode loop (plain and with heads ablated) against Hugging Face
`generate` on the same model, batch and prompts (greedy, KV cache, SDPA). Target: ablated ≥ 0.7 × HF.

Tokens/s counts generated tokens of the whole batch. A random model rarely emits EOS; HF is held to the
same length with `min_new_tokens`, and each path's count is what it produced. Example:

    python benchmarks/generation.py                          # CPU, 8-layer 512-wide random Qwen2
    python benchmarks/generation.py --json gen.json --no-cache-row   # also the whole-sequence recompute
    python benchmarks/generation.py --device cuda --dtype bfloat16 --d-model 1536 --layers 28 --heads 12 \
        --kv-heads 2 --d-mlp 8960 --vocab 151936 --batch 16 --prompt 512 --new 256   # R1-Distill-1.5B shape

Measured (best of the interleaved reps; interp ablated / HF generate):
- CPU, 1 thread, a loaded 2-core machine (x86-64), float32, batch 8, prompts ≤ 64, 64 new tokens: the default
  8-layer 512-wide model 0.80 (78.9 vs 98.3 tok/s; plain interp 0.93); 4 layers × 256, 32 new tokens: 0.88 (190 vs
  217 tok/s). Before interp.bridge's overhead patches: 0.78 and 0.61; recomputing the sequence each step (the old
  skill_unlearning loop, `--no-cache-row`): 5.5 tok/s, 0.05.
- H200, bfloat16, Qwen2.5-0.5B shape (24 × 896, vocab 151,936), prompts ≤ 256, 128 new tokens (transformers 5.17):
  batch 16 0.76 (617 vs 808 tok/s; plain 0.81), batch 1 0.70 (45.5 vs 64.8 tok/s); before the patches 0.45 and 0.49.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_model_options, bridge_and_hf, sync  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(p)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt", type=int, default=64, help="longest prompt (rows ragged down to 3/4 of it)")
    p.add_argument("--new", type=int, default=64, help="new tokens per row")
    p.add_argument("--ablate", type=int, default=4, help="heads ablated (zero, hook_z), spread over layers")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--no-cache-row", action="store_true", help="also time the recompute-every-step loop")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)

    from interp.batching import pad_left
    from interp.generation import generate_tokens
    from interp.interventions import ablate_heads

    model, hf, device, _tmp = bridge_and_hf(args, args.prompt + args.new + 8)
    dtype = next(hf.parameters()).dtype
    tok = model.tokenizer
    eos, pad = tok.eos_token_id, tok.pad_token_id

    gen = torch.Generator().manual_seed(0)
    lengths = [args.prompt - (i * args.prompt) // (4 * args.batch) for i in range(args.batch)]
    specials = set(tok.all_special_ids)
    seqs = [[t for t in torch.randint(0, model.cfg.d_vocab, (n,), generator=gen).tolist() if t not in specials]
            for n in lengths]
    tokens, mask = pad_left(seqs, pad)
    tokens, mask = tokens.to(device), mask.to(device)
    n_layers, n_heads = model.cfg.n_layers, model.cfg.n_heads
    heads = [(i % n_layers, (i * 3) % n_heads) for i in range(args.ablate)]

    @torch.no_grad()
    def hf_generate() -> int:
        out = hf.generate(tokens, attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new,
                          do_sample=False, pad_token_id=pad, eos_token_id=eos)
        return int(out[:, tokens.shape[1]:].numel())

    def interp_generate(ablate: bool, use_cache: bool = True) -> int:
        ctx = ablate_heads(model, heads) if ablate else contextlib.nullcontext()
        with ctx:
            new = generate_tokens(model, seqs, max_new_tokens=args.new, batch_size=args.batch, progress=False,
                                  use_cache=use_cache)
        return sum(len(ids) for ids in new)

    paths = {"hf_generate": hf_generate, "interp": lambda: interp_generate(False),
             "interp_ablated": lambda: interp_generate(True)}
    if args.no_cache_row:
        paths["interp_ablated_no_cache"] = lambda: interp_generate(True, use_cache=False)
    for fn in paths.values():  # warm-up
        fn()
    runs: dict[str, list[float]] = {name: [] for name in paths}
    counts: dict[str, int] = {}
    for _ in range(args.reps):  # interleaved, so drift hits every path alike
        for name, fn in paths.items():
            sync(device)
            start = time.perf_counter()
            counts[name] = fn()
            sync(device)
            runs[name].append(counts[name] / (time.perf_counter() - start))
    base = max(runs["hf_generate"])
    rows = {name: {"tokens": counts[name], "best_tokens_per_s": max(r), "median_tokens_per_s": statistics.median(r),
                   "x_hf_best": max(r) / base} for name, r in runs.items()}
    ratio = rows["interp_ablated"]["x_hf_best"]
    result = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "device": str(device),
              "dtype": str(dtype), "threads": torch.get_num_threads(), "layers": model.cfg.n_layers,
              "d_model": model.cfg.d_model, "vocab": model.cfg.d_vocab, "batch": args.batch,
              "prompt": args.prompt, "new_tokens": args.new, "ablated_heads": heads, "rows": rows,
              "ablated_over_hf": ratio, "target": 0.7, "pass": ratio >= 0.7}
    print(f"device {device}, dtype {dtype}, {model.cfg.n_layers} layers x d_model {model.cfg.d_model}, vocab "
          f"{model.cfg.d_vocab}, batch {args.batch} x prompts up to {args.prompt} (ragged, left-padded), "
          f"{args.new} new tokens, {len(heads)} heads ablated, threads {torch.get_num_threads()}")
    print(f"{'path':26} {'tokens':>7} {'best tok/s':>11} {'median tok/s':>13} {'x HF (best)':>12}")
    for name, row in rows.items():
        print(f"{name:26} {row['tokens']:7d} {row['best_tokens_per_s']:11.1f} {row['median_tokens_per_s']:13.1f} "
              f"{row['x_hf_best']:12.3f}")
    print(f"interp ablated / HF generate = {ratio:.3f} (target >= 0.7): {'PASS' if ratio >= 0.7 else 'FAIL'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
