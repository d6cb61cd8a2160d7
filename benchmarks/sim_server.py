"""A latency-simulating OpenAI-compatible chat server on 127.0.0.1 (stdlib only), shared by the
benchmarks against a served model: `bench_generate.py --arms openai-sim` (stages 1-2) and
`bench_eval.py` (stage 5). A subclass says what each request gets back and how long it takes:

    class Sim(SimServer):
        def respond(self, body):      # the request's JSON body
            return text, seconds, logged

Each request sleeps `seconds` (inside the server's own batch of `capacity` when one is given:
requests past it queue), then gets a chat completion of `text`. `log` holds (logged, seconds) of
every request, `first` and `last` the span the server worked (first request in, last answer out),
so a benchmark's lower bound comes from the very latencies the server slept.
"""
from __future__ import annotations

import contextlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class SimServer:
    def __init__(self, median_s: float, sigma: float, capacity: int | None = None):
        self.median_s, self.sigma = median_s, sigma
        self.slots = threading.Semaphore(capacity) if capacity else contextlib.nullcontext()
        self.log: list[tuple[str, float]] = []
        self.first = self.last = None
        self.lock = threading.Lock()
        sim = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)))
                with sim.lock:
                    sim.first = sim.first or time.perf_counter()
                text, seconds, logged = sim.respond(body)
                with sim.slots:    # the server's own batch: queued requests wait here
                    time.sleep(seconds)
                with sim.lock:
                    sim.log.append((logged, seconds))
                    sim.last = time.perf_counter()
                words = len(text.split())
                payload = json.dumps({
                    "id": "chatcmpl-sim", "object": "chat.completion", "created": int(time.time()), "model": body.get("model"),
                    "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": words, "total_tokens": 1 + words}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 1024   # bursts of connects must not wait for the kernel's retry

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def respond(self, body: dict) -> tuple[str, float, str]:
        """(answer text, latency in seconds, what `log` records) for one request."""
        raise NotImplementedError

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def restart(self) -> None:
        """Forget the requests seen so far (the next run is measured on its own)."""
        with self.lock:
            self.log, self.first, self.last = [], None, None
