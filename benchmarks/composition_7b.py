"""Peak memory and time of the per-component composition scan on a 7B-shaped model (random weights).

The scan takes weight tensors, so no model is built: W_Q [L, H, d, dh], W_K / W_V [L, KV, d, dh],
W_O [L, H, dh, d] are drawn directly (float32). It times the writer SVD of every head, then the scan
of the chosen reader layers (one reader layer is one chunked einsum pass over all earlier writers;
layer ℓ costs ∝ ℓ), and extrapolates to all reader layers. Examples:

    python benchmarks/composition_7b.py                          # Llama/Qwen-7B shape, reader layer 31 only
    python benchmarks/composition_7b.py --reader-layers all      # the whole scan (CPU: tens of minutes)
    python benchmarks/composition_7b.py --layers 4 --d-model 128 --heads 4 --kv-heads 2 --d-head 32  # organism
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from interp import composition as comp


def rss_gib() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--d-model", type=int, default=4096)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--d-head", type=int, default=128)
    p.add_argument("--mode", default="q", choices=comp.MODES)
    p.add_argument("--reader-layers", default="last", help="'last', 'all' or comma-separated layer indices")
    p.add_argument("--chunk-layers", type=int, default=4)
    p.add_argument("--no-rotary-invariant", action="store_true", help="skip the W_Q-only score (half the work)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    L, H, KV, d, dh = args.layers, args.heads, args.kv_heads, args.d_model, args.d_head
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    w = comp.HeadWeights(torch.randn(L, H, d, dh, generator=g), torch.randn(L, KV, d, dh, generator=g),
                         torch.randn(L, KV, d, dh, generator=g), torch.randn(L, H, dh, d, generator=g))
    weight_gib = sum(t.numel() * 4 for t in (w.W_Q, w.W_K, w.W_V, w.W_O)) / 2 ** 30
    print(f"weights: {weight_gib:.2f} GiB float32, built in {time.perf_counter() - start:.1f} s; "
          f"peak RSS {rss_gib():.2f} GiB")
    start, cpu = time.perf_counter(), time.process_time()
    S, V = comp.writer_svd(w)
    t_svd, c_svd = time.perf_counter() - start, time.process_time() - cpu
    print(f"writer SVD of {L * H} heads: {t_svd:.1f} s wall, {c_svd:.1f} s CPU; peak RSS {rss_gib():.2f} GiB")
    readers = {"last": [L - 1], "all": list(range(1, L))}.get(args.reader_layers)
    if readers is None:
        readers = [int(x) for x in args.reader_layers.split(",")]
    start, cpu = time.perf_counter(), time.process_time()
    comp.scan(w, args.mode, S=S, V=V, rotary_invariant=not args.no_rotary_invariant,
              chunk_layers=args.chunk_layers, reader_layers=readers, progress=True)
    t_scan, c_scan = time.perf_counter() - start, time.process_time() - cpu
    factor = sum(range(1, L)) / sum(readers)  # reader layer ℓ scores ℓ writer layers
    print(f"scan ({args.mode}{'' if args.no_rotary_invariant else ' + rotary-invariant'}) of reader layers {readers}: "
          f"{t_scan:.1f} s wall, {c_scan:.1f} s CPU; all {L - 1} reader layers ≈ {t_scan * factor:.0f} s wall, "
          f"{c_scan * factor:.0f} s CPU (extrapolated ∝ writer layers)")
    print(f"peak RSS {rss_gib():.2f} GiB; writer SVD + full scan ≈ {t_svd + t_scan * factor:.0f} s wall, "
          f"{c_svd + c_scan * factor:.0f} s CPU on {torch.get_num_threads()} thread(s)")


if __name__ == "__main__":
    main()
