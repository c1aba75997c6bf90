"""Time the refusal probe's activation capture against a plain Hugging Face forward (SDPA).

Both read the final-norm hidden state at the last real token of the same left-padded batch.
Target: interp capture ≤ 1.10 × HF. Example:

    python benchmarks/capture_vs_hf.py                       # CPU, 8-layer 512-wide random Qwen2
    python benchmarks/capture_vs_hf.py --device cuda --dtype bfloat16 --d-model 1536 --layers 28 \
        --heads 12 --kv-heads 2 --d-mlp 8960 --batch 16 --seq 1024   # R1-Distill-Qwen-1.5B shape
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_model_options, bridge_and_hf, sync  # noqa: E402


def _time(fn, device, reps: int) -> list[float]:
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(p)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=7)
    args = p.parse_args()

    from interp.capture import capture

    model, hf, device, _tmp = bridge_and_hf(args, args.seq + 8)
    dtype = next(hf.parameters()).dtype

    gen = torch.Generator().manual_seed(0)
    vocab = model.cfg.d_vocab
    lengths = [args.seq - (i * args.seq) // (4 * args.batch) for i in range(args.batch)]  # ragged: padding matters
    seqs = [torch.randint(5, vocab, (n,), generator=gen).tolist() for n in lengths]
    from interp.batching import pad_left

    tokens, mask = pad_left(seqs, model.tokenizer.pad_token_id)
    tokens, mask = tokens.to(device), mask.to(device)

    @torch.no_grad()
    def hf_forward():
        return hf.model(input_ids=tokens, attention_mask=mask).last_hidden_state[:, -1].float().cpu()

    def interp_capture(fast: bool):
        return capture(model, seqs, ["ln_final.hook_out"], positions="last", batch_size=args.batch,
                       progress=False, fast_attention=fast)["ln_final.hook_out"]

    ref, ours, eager = hf_forward(), interp_capture(True), interp_capture(False)
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    err = (ref - ours).abs().max().item() / max(ref.abs().max().item(), 1e-6)
    print(f"device {device}, dtype {dtype}, {model.cfg.n_layers} layers x d_model {model.cfg.d_model}, "
          f"batch {args.batch} x up to {args.seq} tokens (ragged, left-padded), threads {torch.get_num_threads()}")
    print(f"max relative difference interp vs HF: {err:.2e} ({'ok' if err < tol else 'MISMATCH'}); "
          f"eager path vs HF: {(ref - eager).abs().max().item() / max(ref.abs().max().item(), 1e-6):.2e}")

    runs = {"hf_sdpa": [], "interp_capture": [], "interp_capture_eager": []}
    for _ in range(args.reps):  # interleaved, so drift hits every path alike
        runs["hf_sdpa"] += _time(hf_forward, device, 1)
        runs["interp_capture"] += _time(lambda: interp_capture(True), device, 1)
        runs["interp_capture_eager"] += _time(lambda: interp_capture(False), device, 1)
    base_min, base_med = min(runs["hf_sdpa"]), statistics.median(runs["hf_sdpa"])
    print(f"{'path':24} {'min ms':>9} {'median ms':>10} {'x HF (min)':>11} {'x HF (median)':>14}")
    for name, ts in runs.items():
        print(f"{name:24} {min(ts) * 1e3:9.1f} {statistics.median(ts) * 1e3:10.1f} "
              f"{min(ts) / base_min:11.3f} {statistics.median(ts) / base_med:14.3f}")
    ratio = min(runs["interp_capture"]) / base_min
    print(f"interp capture / HF SDPA = {ratio:.3f} (target <= 1.10): {'PASS' if ratio <= 1.10 else 'FAIL'}")


if __name__ == "__main__":
    main()
