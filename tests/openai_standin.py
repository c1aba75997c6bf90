"""A stand-in for `vllm serve` on loopback: vLLM's `/v1/completions` schema (token-id prompts, `return_token_ids`,
`logprobs: k` with `return_tokens_as_token_ids`, `stop_token_ids`, `finish_reason`), `/v1/models` and `/version`.
It decodes greedily with a Hugging Face model and its own cache (one request at a time), so it shares no code with
`interp.generation`. `text_only=True` answers like `transformers serve` instead: string prompts only, unknown fields
rejected (422), text decoded without special tokens, `usage.completion_tokens` counting the EOS.
`fail_first=N`: the first N completion requests answer 503. `die_after=N`: the server stops (its port closed) after
answering N completion requests."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

OPENAI_FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "logprobs", "n",
                 "echo", "suffix", "user", "best_of", "frequency_penalty", "presence_penalty", "logit_bias"}


class StandIn:
    def __init__(self, hf_model, tokenizer, name: str, *, text_only: bool = False, fail_first: int = 0,
                 die_after: int | None = None):
        self.hf, self.tok, self.name, self.text_only, self.fail_first = hf_model, tokenizer, name, text_only, fail_first
        self.die_after = die_after
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> StandIn:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    @torch.no_grad()
    def complete(self, body: dict) -> tuple[int, dict]:
        if self.text_only:
            unexpected = set(body) - OPENAI_FIELDS
            if unexpected or not isinstance(body.get("prompt"), str):
                return 422, {"detail": f"Unexpected fields in the request: {unexpected}" if unexpected
                             else "prompt must be a string."}
        if body.get("model") != self.name:
            return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}}
        if body.get("temperature", 1.0) != 0:
            return 400, {"error": {"message": "the stand-in decodes greedily only (temperature 0)"}}
        prompt = body["prompt"]
        ids = self.tok(prompt)["input_ids"] if isinstance(prompt, str) else [int(t) for t in prompt]
        stop = set(body.get("stop_token_ids") or []) | {self.tok.eos_token_id}
        k = body.get("logprobs") or 0
        new, steps = [], []
        with self.lock:
            past, step = None, torch.tensor([ids])
            for _ in range(int(body["max_tokens"])):
                out = self.hf(input_ids=step, past_key_values=past, use_cache=True)
                logits, past = out.logits[0, -1].float(), out.past_key_values
                lps = logits.log_softmax(-1)
                nxt = int(lps.argmax())
                top = lps.topk(k) if k else None
                steps.append((nxt, float(lps[nxt]), {} if top is None else
                              {int(i): float(v) for i, v in zip(top.indices, top.values)} | {nxt: float(lps[nxt])}))
                new.append(nxt)
                step = torch.tensor([[nxt]])
                if nxt in stop:
                    break
        finish = "stop" if new and new[-1] in stop else "length"
        choice = {"index": 0, "text": self.tok.decode(new, skip_special_tokens=True), "finish_reason": finish,
                  "logprobs": None}
        if not self.text_only:
            if body.get("return_token_ids"):
                choice["prompt_token_ids"], choice["token_ids"] = ids, new
            if k:
                name = (lambda t: f"token_id:{t}") if body.get("return_tokens_as_token_ids") else \
                    (lambda t: self.tok.decode([t]))
                choice["logprobs"] = {"tokens": [name(t) for t, _, _ in steps],
                                      "token_logprobs": [lp for _, lp, _ in steps],
                                      "top_logprobs": [{name(t): v for t, v in top.items()} for _, _, top in steps]}
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(new), "total_tokens": len(ids) + len(new)}
        return 200, {"id": "cmpl-standin", "object": "text_completion", "model": self.name, "choices": [choice],
                     "usage": usage}

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, obj: dict) -> None:
                data = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [{"id": standin.name, "object": "model",
                                                                 "owned_by": "vllm"}]})
                elif self.path == "/version" and not standin.text_only:
                    self._send(200, {"version": "standin-0"})
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                standin.requests.append(body)
                if self.path != "/v1/completions":
                    self._send(404, {"detail": "Not Found"})
                    return
                with standin.lock:
                    failing = standin.fail_first > 0
                    standin.fail_first -= failing
                if failing:
                    self._send(503, {"error": {"message": "warming up"}})
                    return
                self._send(*standin.complete(body))
                with standin.lock:
                    dies = standin.die_after is not None and sum(r.get("max_tokens", 0) > 1 for r in standin.requests) \
                        >= standin.die_after
                if dies:  # killed: stop serving and close the port (later connections are refused)
                    threading.Thread(target=lambda: (standin.server.shutdown(), standin.server.server_close())).start()

        return Handler
