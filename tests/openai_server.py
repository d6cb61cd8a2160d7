"""A small local OpenAI-compatible server for tests (stdlib only, 127.0.0.1, no sleeps).

    with OpenAITestServer() as server:
        cfg = LLMConfig(backend="openai", model="test-model", base_url=server.base_url)
        ...
        server.requests        # every request received, in arrival order
        server.max_in_flight   # most requests being handled at once

It answers POST {base_url}/chat/completions, and {base_url}/completions (raw-text completions, as
vLLM serves them to the guard classifiers: `ok` echoes the prompt). A test that needs real answers
passes `responder(path, body) -> reply`: a dict is sent as the JSON body with status 200 (build it
with `chat_completion` or `text_completion`, which also writes the `top_logprobs` a server
returns for `logprobs: N`), None falls back to the behaviours below. The behaviour of a request is chosen by the content of
its last user message: a content that starts with `BEHAVE:<name>` gets behaviour <name>, any other
content gets `ok`. The rest of the content (after the name) is free, so several requests of one
call can share a behaviour and still be told apart, e.g. "BEHAVE:500-once first", "BEHAVE:500-once
second".

    ok            200, a chat.completion whose choices[0].message.content is "echo: <content>" and
                  whose usage.completion_tokens is the number of whitespace-separated words of
                  <content> (the whole last user content, prefix included).
    500-once      500 the first time this exact content is seen, with `retry-after-ms: 1` so the
                  openai client retries at once (its `_calculate_retry_timeout` honours server
                  delays in (0, 60] s, preferring `retry-after-ms`); `ok` on every later attempt.
    400           400 with an OpenAI-style error body, every time (the client does not retry 4xx).
    hang          sends nothing until the server shuts down (or `release_hung()` is called), so the
                  client's own timeout fires; then closes the connection without an answer.
    bad-json      200 with a truncated JSON body: `{"choices": [`.
    not-completion 200 with valid JSON that is no chat completion: `{"foo": 1}`.
    gate          waits until the test calls `open_gate()`, or, with `release_at=N`, until N
                  requests are in flight at once; then answers like `ok`. A client that never
                  gets the gate opened waits up to `gate_timeout_s` (a safety net so a broken
                  client fails the test instead of hanging it; nothing sleeps on the success path).
                  To check a concurrency bound N: hold the gate, `wait_in_flight(N, ...)` (event
                  driven: True as soon as N are in), check `wait_in_flight(N + 1, short)` is False,
                  then `open_gate()`.

`max_in_flight` is the most requests of any behaviour handled at once (each counted from the moment
its body is read until just before its answer is written, so a client that waits for one answer
before sending the next request is never seen with two); `in_flight` is the number now. `attempts(content)` is how many requests carried that last
user content. Each entry of `requests` is a `Received(path, body, authorization, headers)` with the
parsed JSON body and the raw Authorization header value.
"""
from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PREFIX = "BEHAVE:"
HANG_SAFETY_S = 60.0            # a hung handler never outlives this, even if shutdown is skipped


@dataclass
class Received:
    path: str
    body: dict | None
    authorization: str | None
    headers: dict = field(default_factory=dict)


def behaviour_of(body: dict | None) -> tuple[str, str]:
    """(behaviour, last user content) of a request body; a raw completion's content is its prompt."""
    content = ""
    if isinstance((body or {}).get("prompt"), str):
        content = body["prompt"]
        return (content[len(PREFIX):].split(None, 1)[0] or "ok", content) if content.startswith(PREFIX) else ("ok", content)
    for message in reversed((body or {}).get("messages") or []):
        if message.get("role") == "user":
            content = message.get("content") or ""
            if not isinstance(content, str):   # list-of-parts content
                content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            break
    if content.startswith(PREFIX):
        return content[len(PREFIX):].split(None, 1)[0] if content[len(PREFIX):].strip() else "ok", content
    return "ok", content


def completion(body: dict, content: str) -> dict:
    words = len(content.split())
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
        "model": body.get("model", "test-model"),
        "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                     "message": {"role": "assistant", "content": f"echo: {content}"}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": words, "total_tokens": 1 + words},
    }


def chat_completion(body: dict, text: str) -> dict:
    """A chat.completion answering `text`, for a responder."""
    reply = completion(body, "")
    reply["choices"][0]["message"]["content"] = text
    reply["usage"]["completion_tokens"] = len(text.split())
    return reply


def text_completion(body: dict, text: str, top_logprobs: dict | None = None) -> dict:
    """A text_completion answering `text`; with `top_logprobs` ({token: logprob}) the first
    position's alternatives, in the legacy completions format vLLM writes."""
    logprobs = None
    if top_logprobs is not None:
        first = max(top_logprobs, key=top_logprobs.get)
        logprobs = {"tokens": [first], "token_logprobs": [top_logprobs[first]], "top_logprobs": [top_logprobs],
                    "text_offset": [0]}
    return {"id": "cmpl-test", "object": "text_completion", "created": int(time.time()),
            "model": body.get("model", "test-model"),
            "choices": [{"index": 0, "text": text, "finish_reason": "stop", "logprobs": logprobs}],
            "usage": {"prompt_tokens": 1, "completion_tokens": max(1, len(text.split())), "total_tokens": 2}}


class _Server(ThreadingHTTPServer):
    daemon_threads = False      # so server_close() joins every handler thread: a clean shutdown
    block_on_close = True
    request_queue_size = 128    # listen backlog: the default 5 drops bursts of connects, which the
                                # kernel then retries only after a second


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"   # one request per connection: no idle keep-alive threads
    timeout = 10                     # socket timeout for reads, so no handler waits forever
    server: _Server

    def log_message(self, *args):    # quiet
        pass

    def _send(self, status: int, payload: bytes, headers: dict | None = None):
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(payload)
        except OSError:              # the client gave up (timeout) and closed the socket
            pass

    def do_POST(self):
        test: OpenAITestServer = self.server.test_server
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        behaviour, content = behaviour_of(body)
        test._arrive(Received(self.path, body, self.headers.get("Authorization"), dict(self.headers)), content)
        try:
            answer = self._answer(test, behaviour, body, content)
        finally:
            # Leave before writing: once the answer is on the wire the client may send its next
            # request, which must not find this one still counted.
            test._leave()
        if answer is not None:
            self._send(*answer)

    def _answer(self, test: "OpenAITestServer", behaviour: str, body: dict | None, content: str):
        """(status, payload, headers) to send, or None to close without an answer."""
        path = self.path.rstrip("/")
        if not (path.endswith("/chat/completions") or path.endswith("/completions")) or body is None:
            return _json(404, {"error": {"message": f"no route {self.path}", "type": "not_found"}})
        if test.responder is not None:
            scripted = test.responder(path, body)
            if scripted is not None:
                return _json(200, scripted)
        if not path.endswith("/chat/completions"):
            return _json(200, text_completion(body, f"echo: {content}"))
        if behaviour == "500-once" and test.attempts(content) == 1:
            return _json(500, {"error": {"message": "transient failure", "type": "server_error"}},
                         {"retry-after-ms": "1"})
        if behaviour == "400":
            return _json(400, {"error": {"message": "bad request (test)", "type": "invalid_request_error",
                                         "param": None, "code": None}})
        if behaviour == "hang":
            test._hung.wait(HANG_SAFETY_S)
            return None
        if behaviour == "bad-json":
            return 200, b'{"choices": [', {}
        if behaviour == "not-completion":
            return _json(200, {"foo": 1})
        if behaviour == "strict" and any(m.get("role") == "system" for m in body.get("messages") or []):
            # what vLLM answers when the model's template (Mistral v0.1/v0.2) has no system role
            return _json(400, {"error": {"message": "Conversation roles must alternate user/assistant/user/assistant/...",
                                         "type": "BadRequestError", "param": None, "code": 400}})
        if behaviour == "gate":
            test._gate.wait(test.gate_timeout_s)
        reply = completion(body, content)
        if behaviour == "length":  # ran out of max_tokens
            reply["choices"][0]["finish_reason"] = "length"
        if behaviour == "reasoning":  # a server with a reasoning parser returns the reasoning apart
            reply["choices"][0]["message"]["reasoning_content"] = "The request is harmless."
        return _json(200, reply)


def _json(status: int, obj: dict, headers: dict | None = None) -> tuple[int, bytes, dict]:
    return status, json.dumps(obj).encode(), headers or {}


class OpenAITestServer:
    """See the module docstring. A context manager; `base_url` ends in /v1."""

    def __init__(self, release_at: int | None = None, gate_timeout_s: float = 10.0, responder=None):
        self.responder = responder           # (path, body) -> reply dict, or None for the behaviours
        self.release_at = release_at         # open the gate when this many requests are in flight
        self.gate_timeout_s = gate_timeout_s
        self.requests: list[Received] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)   # notified whenever in_flight changes
        self._gate = threading.Event()
        self._hung = threading.Event()
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---
    def start(self) -> "OpenAITestServer":
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.test_server = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="openai-test-server", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._httpd is None:
            return
        self._hung.set()                     # release hung and gated handlers
        self._gate.set()
        self._httpd.shutdown()               # stop serve_forever
        self._httpd.server_close()           # close the socket, join handler threads
        self._thread.join()
        self._httpd = None

    def __enter__(self) -> "OpenAITestServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def port(self) -> int:
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # --- controls and observations ---
    def open_gate(self) -> None:
        self._gate.set()

    def release_hung(self) -> None:
        self._hung.set()

    def wait_in_flight(self, n: int, timeout: float) -> bool:
        """Block until at least `n` requests are in flight at once; False if `timeout` passes
        first. Woken by the server's own counter, so it returns as soon as the n-th arrives."""
        with self._changed:
            return self._changed.wait_for(lambda: self.in_flight >= n, timeout)

    def attempts(self, content: str) -> int:
        with self._lock:
            return self._counts.get(content, 0)

    def _arrive(self, received: Received, content: str) -> None:
        with self._lock:
            self.requests.append(received)
            self._counts[content] = self._counts.get(content, 0) + 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            if self.release_at is not None and self.in_flight >= self.release_at:
                self._gate.set()
            self._changed.notify_all()

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1
            self._changed.notify_all()
