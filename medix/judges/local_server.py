"""Start, health-check and stop llama.cpp's OpenAI-compatible server (llama-cpp-python) for the offline judge."""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from medix.errors import JudgeError

SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def require_llama_server() -> None:
    """JudgeError unless llama-cpp-python and its server extras are importable."""
    missing = [m for m in SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise JudgeError(
            f"the local judge needs llama-cpp-python[server] (missing: {', '.join(missing)}); run scripts/setup.sh "
            "or `pip install 'llama-cpp-python[server]==0.3.36'`, or use judge=rule / judge=qwen"
        )


def server_command(model_path: Path, model_alias: str, host: str, port: int, n_ctx: int, n_threads: int,
                   logits_all: bool) -> list[str]:
    return [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model_path), "--model_alias", model_alias,
        "--host", host, "--port", str(port),
        "--n_ctx", str(n_ctx), "--n_threads", str(n_threads),
        "--logits_all", "true" if logits_all else "false",
    ]  # fmt: skip


class LocalLlamaServer:
    """One llama.cpp server subprocess; its output goes to `log_path`; use as a context manager."""

    def __init__(self, model_path: Path, model_alias: str, *, host: str = "127.0.0.1", port: int | None = None,
                 n_ctx: int = 2048, n_threads: int = 2, logits_all: bool = True, startup_timeout_s: float = 120.0,
                 log_path: Path):
        self.model_path = Path(model_path)
        self.model_alias = model_alias
        self.host = host
        self.port = port
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.logits_all = logits_all
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self) -> "LocalLlamaServer":
        require_llama_server()
        if self.port is None:
            self.port = free_port(self.host)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = server_command(self.model_path, self.model_alias, self.host, self.port, self.n_ctx, self.n_threads,
                             self.logits_all)
        started = time.perf_counter()
        with open(self.log_path, "ab") as log:
            log.write(f"\n$ {' '.join(cmd)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - started
        return self

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/models", timeout=2) as reply:
                return reply.status == 200 and "data" in json.loads(reply.read())
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise JudgeError(f"local judge server exited with code {self.process.returncode} while starting; "
                                 f"last log lines from {self.log_path}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.25)
        raise JudgeError(f"local judge server not healthy after judge.server.startup_timeout_s="
                         f"{self.startup_timeout_s}s; log: {self.log_path}\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=grace_s)

    def __enter__(self) -> "LocalLlamaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
