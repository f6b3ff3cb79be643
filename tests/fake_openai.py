"""A fake OpenAI-compatible chat server for tests: real HTTP on 127.0.0.1, threaded, records every request.

`FakeOpenAIServer(handler)` answers `POST /v1/chat/completions` with `handler(body)` as the reply text; a handler
that raises gives HTTP 500 (or `FakeHTTPError.status`). `delay_s` (seconds, or a function of the body) holds each
reply to provoke client timeouts; `top_logprobs` (dict token -> logprob, or a function of the body) is returned for
the first reply token when the request asks for `logprobs`.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

ReplyHandler = Callable[[dict], str]


class FakeHTTPError(Exception):
    """Raise from a handler to answer with this HTTP status instead of 500."""

    def __init__(self, status: int, message: str = "fake error"):
        super().__init__(message)
        self.status = status


def always(reply: str) -> ReplyHandler:
    """A handler that answers every request with the same text."""
    return lambda body: reply


def completion_body(model: str, text: str, top_logprobs: dict[str, float] | None) -> dict:
    """The JSON body of a chat completion, shaped as the OpenAI API returns it."""
    choice: dict[str, Any] = {
        "index": 0,
        "message": {"role": "assistant", "content": text},
        "finish_reason": "stop",
        "logprobs": None,
    }
    if top_logprobs is not None:
        ranked = sorted(top_logprobs.items(), key=lambda kv: kv[1], reverse=True)
        first = ranked[0] if ranked else (text, 0.0)
        choice["logprobs"] = {
            "content": [
                {
                    "token": first[0],
                    "logprob": first[1],
                    "bytes": list(first[0].encode()),
                    "top_logprobs": [
                        {"token": tok, "logprob": lp, "bytes": list(tok.encode())} for tok, lp in ranked
                    ],
                }
            ]
        }
    return {
        "id": f"chatcmpl-fake-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


class FakeOpenAIServer:
    """Threaded HTTP server speaking the chat-completions API; use as a context manager."""

    def __init__(
        self,
        handler: ReplyHandler = always("YES"),
        *,
        delay_s: float | Callable[[dict], float] = 0.0,
        top_logprobs: dict[str, float] | Callable[[dict], dict[str, float]] | None = None,
        model: str = "fake-judge",
        models_delay_s: float = 0.0,
    ):
        self.handler = handler
        self.models_delay_s = models_delay_s  # a busy single-slot server (llama.cpp) answers /models late
        self.delay_s = delay_s
        self.top_logprobs = top_logprobs
        self.model = model
        self.requests: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> "FakeOpenAIServer":
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                if self.path.rstrip("/") in ("/health", "/v1/health"):
                    self._send(200, {"status": "ok"})
                elif self.path.rstrip("/") == "/v1/models":
                    fake._closing.wait(fake.models_delay_s)
                    self._send(200, {"object": "list", "data": [{"id": fake.model, "object": "model"}]})
                else:
                    self._send(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self):
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, {"error": {"message": f"no route {self.path}"}})
                    return
                body = json.loads(raw or b"{}")
                fake._enter(body)
                try:
                    status, payload = fake._answer(body)
                finally:
                    fake._leave()
                self._send(status, payload)

            def _send(self, status: int, payload: dict):
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="fake-openai", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self) -> "FakeOpenAIServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- properties ------------------------------------------------------------------------------------------
    @property
    def port(self) -> int:
        assert self._httpd is not None, "server not started"
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def chat_requests(self) -> list[dict]:
        with self._lock:
            return list(self.requests)

    # -- request handling ------------------------------------------------------------------------------------
    def _enter(self, body: dict) -> None:
        with self._lock:
            self.requests.append(body)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _answer(self, body: dict) -> tuple[int, dict]:
        delay = self.delay_s(body) if callable(self.delay_s) else self.delay_s
        if delay > 0:
            self._closing.wait(delay)
        try:
            text = self.handler(body)
        except FakeHTTPError as err:
            return err.status, {"error": {"message": str(err), "type": "fake", "code": err.status}}
        except Exception as err:  # any handler failure is a server error
            return 500, {"error": {"message": f"handler failed: {err!r}", "type": "server_error"}}
        logprobs = None
        if body.get("logprobs") and self.top_logprobs is not None:
            logprobs = self.top_logprobs(body) if callable(self.top_logprobs) else self.top_logprobs
            k = body.get("top_logprobs")
            if k:
                logprobs = dict(sorted(logprobs.items(), key=lambda kv: kv[1], reverse=True)[:k])
        return 200, completion_body(body.get("model", self.model), text, logprobs)
