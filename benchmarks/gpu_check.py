"""The Python pieces of benchmarks/gpu_check.sh: environment, a real out-of-memory backoff, a device map against one
device, a local vLLM server's tokens/s, and the one table.

    python benchmarks/gpu_check.py env --out env.json
    python benchmarks/gpu_check.py oom --checkpoint DIR --device cuda --out oom.json
    python benchmarks/gpu_check.py device-map --checkpoint DIR --out map.json
    python benchmarks/gpu_check.py vllm --checkpoint DIR --out vllm.json
    python benchmarks/gpu_check.py capture-log capture.log --out capture.json   # capture_vs_hf.py's numbers
    python benchmarks/gpu_check.py table DIR          # every JSON the check wrote in DIR, one table

`oom` on CUDA caps the process's GPU memory (torch.cuda.set_per_process_memory_fraction) below what one batch
needs, so the capture and the residual statistics really run out of memory and back off (interp.batching); on the
CPU (the dry run) the same error is injected by a pre-hook when a batch is larger than --inject. Both compare with
the unforced run. `device-map` loads the model with --device-map balanced over every GPU (2 or more; with one GPU
the map {"": 0}; on the CPU block 1 offloaded to disk) and compares its captured activations and greedy tokens with
the model on one device. No GPU was lent while this was written: only the CPU paths have run (tests/test_gpu_check).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

GIB = 1024 ** 3


def _write(out: str, row: dict) -> dict:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(row, indent=1) + "\n")
    return row


def env(args) -> dict:
    import torch
    import transformer_lens
    import transformers

    gpus = [{"name": torch.cuda.get_device_name(i), "memory_gib": round(torch.cuda.get_device_properties(i)
                                                                         .total_memory / GIB, 1)}
            for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    try:
        import vllm

        vllm_version = vllm.__version__
    except Exception:  # noqa: BLE001 - any failure to import means "no vLLM here"
        vllm_version = None
    return _write(args.out, {"piece": "env", "host": platform.node(), "python": platform.python_version(),
                             "torch": torch.__version__, "cuda": torch.version.cuda, "gpus": gpus,
                             "transformers": transformers.__version__,
                             "transformer_lens": getattr(transformer_lens, "__version__", "?"),
                             "vllm": vllm_version})


def _seqs(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    import torch
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (length - (i % 4),), generator=gen).tolist() for i in range(n)]


@contextlib.contextmanager
def _injected_oom(model, k: int):
    """CUDA's out-of-memory error from the last decoder layer when a batch is larger than `k` (the CPU dry run)."""
    import torch

    def pre(module, a, kw):
        x = a[0] if a else kw["hidden_states"]
        if x.shape[0] > k:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (injected at batch {x.shape[0]})")

    handle = model.original_model.model.layers[-1].register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextlib.contextmanager
def _capped_memory(device, batch_bytes: int):
    """Cap this process's GPU memory at what is allocated now plus a third of what one batch needed."""
    import torch

    total = torch.cuda.get_device_properties(device).total_memory
    cap = torch.cuda.memory_allocated(device) + batch_bytes // 3
    torch.cuda.set_per_process_memory_fraction(min(cap / total, 1.0), device)
    try:
        yield cap
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()


def oom(args) -> dict:
    """Capture and residual statistics with an out-of-memory error forced, against the unforced run."""
    import torch

    from interp.batching import fitted_sizes
    from interp.capture import capture
    from interp.models import load_model
    from interp.outliers import residual_stats

    model = load_model(args.checkpoint, device=args.device, dtype=args.dtype)
    device = torch.device(args.device if args.device != "auto" else model.cfg.device)
    seqs = _seqs(model.cfg.d_vocab, args.seqs, args.length)
    hook = f"blocks.{model.cfg.n_layers - 1}.hook_resid_post"
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if cuda else 0
    start = time.perf_counter()
    ref = capture(model, seqs, [hook], batch_size=len(seqs), progress=False)[hook]
    plain_s = time.perf_counter() - start
    ref_stats = residual_stats(model, seqs, batch_size=len(seqs), down=True, progress=False).profile()
    batch_bytes = (torch.cuda.max_memory_allocated(device) - base) if cuda else 0
    forcing = _capped_memory(device, batch_bytes) if cuda else _injected_oom(model, args.inject)
    start = time.perf_counter()
    with forcing:
        forced = capture(model, seqs, [hook], batch_size=len(seqs), progress=False)[hook]
        forced_s = time.perf_counter() - start
        stats = residual_stats(model, seqs, batch_size=len(seqs), down=True, progress=False).profile()
    fitted = {stage: dict(fitted_sizes(model, stage)) for stage in ("capture", "residual")}
    scale = ref.abs().max().clamp_min(1e-6)
    capture_diff = float((ref - forced).abs().max() / scale)
    stats_diff = max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-6) for a, b in zip(stats, ref_stats)
                     for k in ("max_abs", "top1", "median_abs", "mean_abs"))
    tol = 1e-4 if model.cfg.dtype == torch.float32 else 5e-2
    backed_off = all(fitted[s] for s in fitted)
    return _write(args.out, {
        "piece": "oom", "device": str(device), "forced_by": "memory cap" if cuda else f"injected above {args.inject}",
        "batch": len(seqs), "length": args.length, "one_batch_gib": round(batch_bytes / GIB, 2),
        "fitted": {s: {str(k): v for k, v in f.items()} for s, f in fitted.items()},
        "capture_max_rel_diff": capture_diff, "stats_max_rel_diff": stats_diff, "plain_s": round(plain_s, 3),
        "forced_s": round(forced_s, 3),
        "status": "ok" if backed_off and capture_diff < tol and stats_diff < tol else "FAIL"})


def device_map(args) -> dict:
    """The model split by --device-map (balanced over the GPUs) against the same model on one device."""
    import torch

    from interp.capture import capture
    from interp.generation import generate_tokens
    from interp.models import load_model, model_info

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_gpus >= 2:
        spec, single = "balanced", "cuda:0"
    else:
        mapping = {"": 0} if n_gpus == 1 else \
            {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu", "lm_head": "cpu",
             **{f"model.layers.{i}": "disk" if i % 2 else "cpu" for i in range(_n_layers(args.checkpoint))}}
        spec = str(Path(args.out).with_suffix(".map.json"))
        Path(spec).write_text(json.dumps(mapping))
        single = "cuda:0" if n_gpus == 1 else "cpu"
    start = time.perf_counter()
    split = load_model(args.checkpoint, device_map=spec, dtype=args.dtype)
    load_s = time.perf_counter() - start
    one = load_model(args.checkpoint, device=single, dtype=args.dtype)
    seqs = _seqs(one.cfg.d_vocab, 8, args.length)
    hooks = [f"blocks.{layer}.hook_resid_post" for layer in range(one.cfg.n_layers)]
    times = {}
    acts = {}
    for name, model in (("split", split), ("one", one)):
        start = time.perf_counter()
        acts[name] = capture(model, seqs, hooks, batch_size=8, progress=False)
        times[f"{name}_capture_s"] = round(time.perf_counter() - start, 3)
    diff = max(float((acts["split"][h] - acts["one"][h]).abs().max() / acts["one"][h].abs().max().clamp_min(1e-6))
               for h in hooks)
    kw = dict(max_new_tokens=args.new, temperature=0.0, batch_size=8, progress=False)
    same_tokens = list(generate_tokens(split, seqs, **kw)) == list(generate_tokens(one, seqs, **kw))
    tol = 1e-4 if one.cfg.dtype == torch.float32 else 5e-2
    return _write(args.out, {
        "piece": "device_map", "asked": spec if n_gpus >= 2 else json.loads(Path(spec).read_text()),
        "placed": model_info(split).device_map["placed"], "n_devices": getattr(split.cfg, "n_devices", 1),
        "against": single, "load_s": round(load_s, 2), **times, "max_rel_diff": diff, "same_greedy_tokens": same_tokens,
        "status": "ok" if diff < tol and (same_tokens or one.cfg.dtype != torch.float32) else "FAIL"})


def _n_layers(checkpoint: str) -> int:
    return json.loads((Path(checkpoint) / "config.json").read_text())["num_hidden_layers"]


def _get(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _post(url: str, body: dict, timeout: float = 300.0) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def vllm(args) -> dict:
    """Start `vllm serve` on the checkpoint (loopback), time --requests concurrent greedy completions of --new tokens
    from token-id prompts, stop it."""
    try:
        import vllm as _vllm  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return _write(args.out, {"piece": "vllm", "status": "skipped", "why": f"vllm not importable ({exc!s:.80})"})
    from concurrent.futures import ThreadPoolExecutor

    url = f"http://127.0.0.1:{args.port}/v1"
    log = open(Path(args.out).with_suffix(".log"), "w")  # noqa: SIM115 - closed after the server stops
    server = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", args.checkpoint,
                               "--served-model-name", "check", "--port", str(args.port), "--dtype", "bfloat16",
                               "--max-model-len", str(args.length + args.new + 16), "--gpu-memory-utilization",
                               "0.5", "--seed", "0", "--enforce-eager"],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    start = time.perf_counter()
    try:
        while True:
            if server.poll() is not None:
                return _write(args.out, {"piece": "vllm", "status": "FAIL", "why": "server exited; see the log"})
            if time.perf_counter() - start > args.start_timeout:
                return _write(args.out, {"piece": "vllm", "status": "FAIL", "why": "server did not start in time"})
            with contextlib.suppress(OSError, ValueError):
                version = _get(f"http://127.0.0.1:{args.port}/version").get("version")
                _get(f"{url}/models")
                break
            time.sleep(2)
        startup_s = time.perf_counter() - start
        vocab = json.loads((Path(args.checkpoint) / "config.json").read_text())["vocab_size"]
        prompts = _seqs(min(vocab, 500), args.requests, args.length)  # ids the small tokenizer knows

        def one(ids):
            body = {"model": "check", "prompt": ids, "max_tokens": args.new, "temperature": 0.0,
                    "ignore_eos": True}
            return _post(f"{url}/completions", body)["usage"]["completion_tokens"]

        one(prompts[0][:16])  # warm-up
        start = time.perf_counter()
        with ThreadPoolExecutor(args.requests) as pool:
            tokens = sum(pool.map(one, prompts))
        wall = time.perf_counter() - start
        return _write(args.out, {"piece": "vllm", "status": "ok", "vllm": version, "startup_s": round(startup_s, 1),
                                 "requests": args.requests, "prompt": args.length, "new": args.new,
                                 "tokens": tokens, "tokens_per_s": round(tokens / wall, 1)})
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def capture_log(args) -> dict:
    """The numbers benchmarks/capture_vs_hf.py printed (it writes no JSON): ratio to HF and the largest difference."""
    import re

    text = Path(args.log).read_text()
    ratio = re.search(r"interp capture / HF SDPA = ([0-9.]+)", text)
    diff = re.search(r"max relative difference interp vs HF: ([0-9.e+-]+) \((\w+)\)", text)
    if not ratio or not diff:
        return _write(args.out, {"benchmark": "capture_vs_hf", "status": "FAIL", "why": "no result in the log"})
    return _write(args.out, {"benchmark": "capture_vs_hf", "ratio": float(ratio.group(1)),
                             "max_rel_diff": float(diff.group(1)),
                             "status": "ok" if float(ratio.group(1)) <= 1.10 and diff.group(2) == "ok" else "FAIL"})


def _rows(name: str, data: dict) -> list[tuple[str, str, str]]:
    """(what, value, status) lines of one piece's JSON."""
    piece = data.get("piece") or data.get("benchmark") or ("generation" if "ablated_over_hf" in data else name)
    if data.get("status") == "FAIL" and "why" in data:  # a step that did not finish (gpu_check.sh's note)
        return [(name, data["why"], "FAIL")]
    if piece == "env":
        gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in data["gpus"]) or "none"
        return [("machine", f"{gpus}; torch {data['torch']}, transformers {data['transformers']}, "
                            f"vllm {data['vllm'] or '-'}", "")]
    if piece == "paper_scale":
        label = name.removeprefix("paper_scale_")
        return [(f"{label} {c['analysis']} T={c['T'] if c['T'] is not None else '-'}",
                 f"{c['time_s']:.1f} s, {c['above_bytes'] / GIB:.2f} GiB above the weights"
                 if c["status"] == "ok" else str(c.get("error", ""))[:60], c["status"]) for c in data["cells"]]
    if piece == "capture_vs_hf":
        return [(f"{name}: interp capture / HF", f"{data['ratio']:.3f} (target <= 1.10), rel diff "
                                                 f"{data['max_rel_diff']:.1e}", data["status"])]
    if piece == "generation":
        rows = data.get("rows", {})
        parts = ", ".join(f"{k} {v['best_tokens_per_s']:.0f}" for k, v in rows.items())
        return [(f"{name}: tokens/s", f"{parts}; ablated / HF {data['ablated_over_hf']:.2f} (target >= 0.7)",
                 "ok" if data["pass"] else "FAIL")]
    if piece == "vllm":
        value = f"{data['tokens_per_s']} tok/s ({data['requests']} requests, startup {data['startup_s']} s)" \
            if data["status"] == "ok" else data.get("why", "")
        return [("vLLM server tokens/s", value, data["status"])]
    if piece == "oom":
        return [(f"OOM backoff ({data['forced_by']})", f"fitted {data['fitted']}, rel diff capture "
                 f"{data['capture_max_rel_diff']:.1e}, stats {data['stats_max_rel_diff']:.1e}", data["status"])]
    if piece == "device_map":
        return [(f"device map vs {data['against']}", f"{data['n_devices']} devices, rel diff "
                 f"{data['max_rel_diff']:.1e}, same greedy tokens {data['same_greedy_tokens']}", data["status"])]
    return [(name, json.dumps(data)[:80], data.get("status", ""))]


def table(args) -> str:
    rows = []
    for file in sorted(Path(args.dir).glob("*.json"), key=lambda f: f.stat().st_mtime):  # the steps' order
        if file.name.endswith(".map.json"):
            continue
        try:
            rows += _rows(file.stem, json.loads(file.read_text()))
        except (KeyError, TypeError, ValueError) as exc:
            rows.append((file.stem, f"unreadable ({type(exc).__name__}: {exc!s:.50})", "FAIL"))
    width = max((len(r[0]) for r in rows), default=10)
    text = "\n".join([f"{'check':{width}} | status | result", "-" * (width + 40)] +
                     [f"{what:{width}} | {status:6} | {value}" for what, value, status in rows])
    print(text)
    return text


def main(argv: list[str] | None = None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="piece", required=True)
    s = sub.add_parser("env", help="versions and GPUs")
    s.add_argument("--out", required=True)
    for name, fn_help in (("oom", "out-of-memory backoff, forced"), ("device-map", "split model vs one device"),
                          ("vllm", "local vLLM server tokens/s")):
        s = sub.add_parser(name, help=fn_help)
        s.add_argument("--checkpoint", required=True)
        s.add_argument("--out", required=True)
        s.add_argument("--dtype", default="auto")
        s.add_argument("--length", type=int, default=256, help="prompt / sequence length")
        if name == "oom":
            s.add_argument("--device", default="auto")
            s.add_argument("--seqs", type=int, default=16, help="sequences, all in one batch unless memory runs out")
            s.add_argument("--inject", type=int, default=4, help="CPU: the injected error fires above this batch")
        if name in ("device-map", "vllm"):
            s.add_argument("--new", type=int, default=16, help="new tokens per sequence")
        if name == "vllm":
            s.add_argument("--port", type=int, default=8765)
            s.add_argument("--requests", type=int, default=16)
            s.add_argument("--start-timeout", type=float, default=150.0)
    s = sub.add_parser("capture-log", help="capture_vs_hf.py's printed numbers as JSON")
    s.add_argument("log")
    s.add_argument("--out", required=True)
    s = sub.add_parser("table", help="one table of every JSON in DIR")
    s.add_argument("dir")
    args = p.parse_args(argv)
    return {"env": env, "oom": oom, "device-map": device_map, "vllm": vllm, "capture-log": capture_log,
            "table": table}[args.piece](args)


if __name__ == "__main__":
    main()
