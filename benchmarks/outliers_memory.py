"""Peak memory of the streamed outlier and sink statistics when the text set grows 10×.

Each size runs in its own process: load the model, run one warm-up batch, record the peak RSS, then stream
`n` chunks through `interp.outliers.residual_stats` and `interp.sinks.attention_metrics` and record the
peak again. Memory is bounded by the batch, so the growth must not scale with `n`. Example:

    python benchmarks/outliers_memory.py                      # organism, 20 vs 200 chunks of 128 tokens
    python benchmarks/outliers_memory.py --model gpt2 --seq-len 1024 --sizes 10 100
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def measure(model_name: str, text_set: str, seq_len: int, n: int, batch_size: int) -> dict:
    import torch

    from interp import outliers, sinks
    from interp.datasets import load_dataset
    from interp.models import load_model
    from interp.texts import chunk_texts

    torch.set_num_threads(1)
    model = load_model(model_name, device="cpu")
    docs = load_dataset(text_set, "texts")
    chunks = chunk_texts(model.tokenizer, docs * (1 + n * seq_len // 20000), seq_len, n, source=text_set).chunks
    assert len(chunks) == n, f"only {len(chunks)} chunks"
    outliers.residual_stats(model, chunks[:batch_size], batch_size=batch_size, progress=False)
    sinks.attention_metrics(model, chunks[:batch_size], batch_size=batch_size, qkv_norms=True, progress=False)
    before = _peak_mib()
    outliers.residual_stats(model, chunks, batch_size=batch_size, progress=False)
    sinks.attention_metrics(model, chunks, batch_size=batch_size, qkv_norms=True, progress=False)
    return {"n_chunks": n, "tokens": n * seq_len, "peak_before_mib": before, "peak_after_mib": _peak_mib(),
            "growth_mib": _peak_mib() - before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="organism")
    parser.add_argument("--dataset", default="organism-plain")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 200])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(measure(args.model, args.dataset, args.seq_len, args.child, args.batch_size)))
        return
    rows = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--model", args.model, "--dataset", args.dataset,
                              "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--child", str(n)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1])
    print(f"peak growth: {rows[0]['growth_mib']:.1f} MiB at {rows[0]['n_chunks']} chunks, "
          f"{rows[-1]['growth_mib']:.1f} MiB at {rows[-1]['n_chunks']} chunks")


if __name__ == "__main__":
    main()
