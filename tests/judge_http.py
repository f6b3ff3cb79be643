"""A chat-completions server for reliability tests: records request headers, stops and restarts on its port, and runs
as its own process (to be killed) with `python tests/judge_http.py --port P`.

`fake_openai.FakeOpenAIServer` binds a fresh port each time and keeps no headers; these tests need both (the
Authorization header that carries the API key, and a judge outage that ends with the server back on the same port).
"""

from __future__ import annotations

import argparse
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from fake_openai import FakeHTTPError, completion_body


class RestartableJudgeServer:
    """Real HTTP on 127.0.0.1; `handler(body) -> reply text` (raise for HTTP 500); `stop()` / `start()` keep the port."""

    def __init__(self, handler: Callable[[dict], str], port: int | None = None, delay_s: float = 0.0):
        self.handler = handler
        self.port = port or free_port()
        self.delay_s = delay_s
        self.requests: list[dict] = []
        self.headers: list[dict[str, str]] = []  # lower-cased header names
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._connections: set[socket.socket] = set()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def running(self) -> bool:
        return self._httpd is not None

    def start(self) -> "RestartableJudgeServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                with server._lock:
                    server._connections.add(self.connection)

            def finish(self):
                with server._lock:
                    server._connections.discard(self.connection)
                super().finish()

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server._lock:
                    server.requests.append(body)
                    server.headers.append({k.lower(): v for k, v in self.headers.items()})
                time.sleep(server.delay_s)
                try:
                    status, payload = 200, completion_body(body.get("model", "fake"), server.handler(body), None)
                except FakeHTTPError as err:
                    status, payload = err.status, {"error": {"message": str(err)}}
                except Exception as err:  # noqa: BLE001 - any handler failure is a server error
                    status, payload = 500, {"error": {"message": f"handler failed: {err!r}"}}
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, name="restartable-judge", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening and drop open keep-alive connections: every request fails until `start()`."""
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        with self._lock:
            connections, self._connections = self._connections, set()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self) -> "RestartableJudgeServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":  # a judge in its own process, to be killed: python tests/judge_http.py --port P
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--reply", default="YES")
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    RestartableJudgeServer(lambda body: args.reply, port=args.port, delay_s=args.delay).start()
    print("ready", flush=True)
    threading.Event().wait()
