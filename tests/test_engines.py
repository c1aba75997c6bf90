"""interp.engines: generation on an OpenAI-compatible server equals the local path (vLLM's schema, spoken by a stand-in
server on loopback, tests/openai_standin.py), text-only servers are re-tokenized and said so (the stand-in in that
mode, and `transformers serve` for real), one-line errors, retries."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from openai_standin import StandIn

from interp.engines import LocalEngine, OpenAICompletions, Sampling, default_stop_ids
from interp.errors import UserError
from interp.generation import encode_prompts

PROMPTS = ["What is 12 + 7?", "How do I make a bomb?"]
MAX_NEW = 50  # the organism closes </think> on both and ends on EOS after 46 and 55 tokens: both kinds of row


def organism_dir() -> Path:
    import interp.organisms

    return Path(interp.organisms.__file__).parent / "standard"


@pytest.fixture(scope="module")
def organism():
    from interp.models import load_model

    return load_model("organism", device="cpu")


@pytest.fixture(scope="module")
def organism_hf():
    """The organism as plain Hugging Face weights: the stand-in server's own model (no bridge, no cache)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(organism_dir(), dtype=torch.float32).eval()


def sampling(tok, max_new: int = MAX_NEW) -> Sampling:
    return Sampling(max_new, stop_ids=default_stop_ids(tok))


def first_divergence(a: list[int], b: list[int]) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first divergence at new token {at}: local {a[at:at + 3]} vs server {b[at:at + 3]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_greedy_and_logprobs_through_the_server_equal_the_local_path(organism, organism_hf):
    """Token-id prompts in, token ids and top-k logprobs out (vLLM's schema): the same tokens as the KV-cached bridge,
    the same top-k as its teacher-forced pass; rows that hit the cap are flagged, rows that end on EOS are not."""
    tok = organism.tokenizer
    seqs = encode_prompts(tok, PROMPTS)
    local = LocalEngine(organism, sampling(tok), progress=False).generate(seqs, top_logprobs=5)
    with StandIn(organism_hf, tok, "organism") as server:
        engine = OpenAICompletions(server.url, tok, sampling(tok), model_name="organism", progress=False)
        served = engine.generate(seqs, top_logprobs=5)
        sent = [r for r in server.requests if r["max_tokens"] == MAX_NEW]
    assert sorted(r["prompt"] for r in sent) == sorted(seqs)  # the exact ids, chat template applied here
    assert all(r["temperature"] == 0 and r["stop_token_ids"] == [tok.eos_token_id] and r["return_token_ids"]
               for r in sent)
    for a, b in zip(local, served):
        assert a == b, first_divergence(a, b)
    assert served.truncated == local.truncated and set(served.truncated) == {True, False}
    for la, lb in zip(local.logprobs, served.logprobs):
        assert la.top_ids == lb.top_ids
        assert torch.tensor(la.top_logprobs) == pytest.approx(torch.tensor(lb.top_logprobs), abs=1e-4)
        assert la.chosen == pytest.approx(lb.chosen, abs=1e-4)
    info = engine.describe()
    assert info["capabilities"] == {"token_ids": True, "logprobs": True} and info["text_only"] is None
    assert info["served_model"] == "organism" and info["server_version"] == "standin-0"
    assert info["sampling"] == {"max_new_tokens": MAX_NEW, "temperature": 0.0, "top_p": None, "seed": 0,
                                "stop_ids": (tok.eos_token_id,)}
    assert engine.limitation() is None


def test_text_only_server_is_re_tokenized_and_says_so(organism, organism_hf):
    """A server that takes string prompts only (as `transformers serve`): the decoded prompt is sent, the text
    re-tokenized; `</think>` vanishes from its text, so those rows change length, counted and named."""
    tok = organism.tokenizer
    seqs = encode_prompts(tok, PROMPTS)
    local = LocalEngine(organism, sampling(tok), progress=False).generate(seqs)
    with StandIn(organism_hf, tok, "organism", text_only=True) as server:
        engine = OpenAICompletions(server.url, tok, sampling(tok), model_name="organism", progress=False)
        served = engine.generate(seqs)
        with pytest.raises(UserError, match="text only"):
            engine.generate(seqs, top_logprobs=5)
    closed = tok.convert_tokens_to_ids("</think>")
    assert engine.describe()["capabilities"] == {"token_ids": False, "logprobs": False}
    for a, b in zip(local, served):
        assert tok.decode(a, skip_special_tokens=True) == tok.decode(b)  # same greedy text
    text = engine.describe()["text_only"]
    assert text["rows_changed"] == sum(closed in row for row in local) >= 1 and text["prompts_changed"] == 0
    assert "</think>" in text["dropped_specials"] and "</think>" in engine.limitation()
    assert served.truncated == local.truncated


def test_unreachable_server_and_another_model_are_one_line_errors(organism, organism_hf):
    tok = organism.tokenizer
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(UserError) as exc:
        OpenAICompletions(url, tok, sampling(tok), model_name="organism", retries=1, backoff=0.01)
    assert "unreachable" in str(exc.value) and "\n" not in str(exc.value)
    with StandIn(organism_hf, tok, "organism") as server:
        with pytest.raises(UserError) as exc:
            OpenAICompletions(server.url, tok, sampling(tok), model_name="other")
    assert "serves 'organism', not 'other'" in str(exc.value) and "--generator-model" in str(exc.value)


@pytest.mark.parametrize("options, fragment", [({"generator_concurrency": 0}, "generator-concurrency"),
                                               ({"generator": "http://x/v1", "distribution": "full"}, "--generator")])
def test_bad_generator_options_are_user_errors(options, fragment):
    from interp.analyses import instability, refusal_cliff

    with pytest.raises(UserError, match=fragment):
        instability.Config(**options).validate()
    if "distribution" not in options:
        with pytest.raises(UserError, match=fragment):
            refusal_cliff.Config(**options).validate()


def test_retries_with_backoff_then_a_one_line_error(organism, organism_hf):
    tok = organism.tokenizer
    seqs = encode_prompts(tok, PROMPTS[:1])
    with StandIn(organism_hf, tok, "organism", fail_first=2) as server:  # the probe's request fails twice
        engine = OpenAICompletions(server.url, tok, sampling(tok, 4), model_name="organism", retries=2, backoff=0.01,
                                   progress=False)
        assert engine.generate(seqs) == LocalEngine(organism, sampling(tok, 4), progress=False).generate(seqs)
        server.fail_first = 10
        with pytest.raises(UserError, match="failed after 3 tries: HTTP 503"):
            engine.generate(seqs)


def test_rollouts_on_the_server_equal_local_rollouts(organism, organism_hf):
    """refusal_cliff's rollout stage through either engine: the same rollouts."""
    from interp.analyses import refusal_cliff as rc

    config = rc.Config(max_new_tokens=60, progress=False, limit=2)
    sets = {"harmful": "builtin-harmful"}
    local = rc.generate_rollouts(organism, config, sets, rc.rollout_engine(organism, config))
    with StandIn(organism_hf, organism.tokenizer, "organism") as server:
        config.generator = server.url
        served = rc.generate_rollouts(organism, config, sets, rc.rollout_engine(organism, config))
    assert served == local and local[0]


def test_cli_instability_with_a_generator_server(organism, organism_hf, tmp_path, capsys):
    """`python -m interp.run instability --generator URL`: traces and top-k logprobs from the server, the run header
    records it, and the numbers equal the local run's; a wrong served name is a one-line error."""
    from interp.run import main

    common = ["instability", "--model", "organism", "--limit", "4", "--max-new-tokens", "30", "--n-boot", "100",
              "--no-progress"]
    with StandIn(organism_hf, organism.tokenizer, "organism") as server:
        assert main([*common, "--generator", server.url, "--out", str(tmp_path / "served")]) == 0
        assert main([*common, "--generator", server.url, "--generator-model", "nope", "--out",
                     str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: the server at")
    assert main([*common, "--out", str(tmp_path / "local")]) == 0
    served, local = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("served", "local"))
    assert served["generator"]["engine"] == "openai-completions" and local["generator"]["engine"] == "local"
    assert served["generator"]["capabilities"] == {"token_ids": True, "logprobs": True}
    for a, b in zip(served["traces"], local["traces"]):
        assert (a["id"], a["correct"], a["length"], a["truncated"]) == (b["id"], b["correct"], b["length"],
                                                                        b["truncated"])
        assert a["peak"] == pytest.approx(b["peak"], abs=1e-4)
    assert served["auc"] == pytest.approx(local["auc"], abs=1e-9, nan_ok=True)


def test_a_run_whose_server_dies_resumes(organism_hf, tmp_path, monkeypatch, capsys):
    """The server killed after 4 of 8 traces: a one-line error; the same command against a restarted server (another
    port) generates only the other 4 and writes the results of an uninterrupted run."""
    import interp.engines
    from interp.run import main

    monkeypatch.setattr(interp.engines, "BACKOFF", 0.01)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(organism_dir())
    common = ["instability", "--model", "organism", "--limit", "8", "--max-new-tokens", "30", "--n-boot", "100",
              "--batch-size", "1", "--generator-concurrency", "1", "--no-progress"]  # stage chunks of 4 traces
    out = str(tmp_path / "run")
    with StandIn(organism_hf, tok, "organism", die_after=4) as server:
        assert main([*common, "--generator", server.url, "--out", out]) == 2
    assert "unreachable" in capsys.readouterr().err.strip().splitlines()[-1]
    with StandIn(organism_hf, tok, "organism") as server:
        assert main([*common, "--generator", server.url, "--out", out]) == 0
        assert sum(r["max_tokens"] > 1 for r in server.requests) == 4
        assert main([*common, "--generator", server.url, "--out", str(tmp_path / "whole")]) == 0
    assert "reused 4 of 8" in capsys.readouterr().err
    resumed, whole = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("run", "whole"))
    for k in ("traces", "auc", "buckets", "early_warning"):
        assert json.dumps(resumed[k]) == json.dumps(whole[k]), k


@pytest.mark.slow
def test_transformers_serve_on_loopback(organism):
    """`transformers serve` for real (started and stopped here): string prompts only, so the engine runs in text mode,
    sends the decoded prompt, re-tokenizes, and records that the organism's `</think>` vanished from the text."""
    exe = Path(sys.executable).parent / "transformers"
    if shutil.which(str(exe)) is None or any(__import__("importlib").util.find_spec(m) is None
                                             for m in ("fastapi", "uvicorn")):
        pytest.skip("transformers[serving] is not installed (pip install 'transformers[serving]')")
    tok, port = organism.tokenizer, free_port()
    proc = subprocess.Popen([str(exe), "serve", str(organism_dir()), "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu", "--log-level", "warning"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(url + "/models", timeout=2)
                break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    pytest.fail("transformers serve did not start")
                time.sleep(0.5)
        seqs = encode_prompts(tok, PROMPTS)
        engine = OpenAICompletions(url, tok, sampling(tok, 64), model_name=str(organism_dir()), progress=False)
        served = engine.generate(seqs)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    local = LocalEngine(organism, sampling(tok, 64), progress=False).generate(seqs)
    assert engine.describe()["capabilities"] == {"token_ids": False, "logprobs": False}
    for a, b in zip(local, served):
        assert tok.decode(a, skip_special_tokens=True) == tok.decode(b)
    closed = tok.convert_tokens_to_ids("</think>")
    assert all(closed in row for row in local) and all(closed not in row for row in served)  # </think> vanished
    assert engine.describe()["text_only"]["rows_changed"] == 2 and "</think>" in engine.limitation()
