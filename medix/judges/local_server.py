"""Start, health-check and stop llama.cpp's OpenAI-compatible server (llama-cpp-python) for the offline judge, and
share one such server between the processes of a node (the ranks of a DDP/FSDP run)."""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Callable

from medix.errors import JudgeError
from medix.server_process import ServerProcess, serves

SERVER_MODULES = ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context", "pydantic_settings")


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


class LocalLlamaServer(ServerProcess):
    """One llama.cpp server subprocess serving `model_path` as `model_alias`; its output goes to `log_path`; use as
    a context manager. It may outlive this process (SharedServer hands it to the node's other processes)."""

    error = JudgeError
    timeout_key = "judge.server.startup_timeout_s"

    def __init__(self, model_path: Path, model_alias: str, *, host: str = "127.0.0.1", port: int | None = None,
                 n_ctx: int = 2048, n_threads: int = 2, logits_all: bool = True, startup_timeout_s: float = 120.0,
                 log_path: Path):
        super().__init__(host=host, port=port, startup_timeout_s=startup_timeout_s, log_path=log_path)
        self.model_path = Path(model_path)
        self.model_alias = model_alias
        self.n_ctx = n_ctx
        self.n_threads = n_threads
        self.logits_all = logits_all

    def describe(self) -> str:
        return f"local judge server {self.url}"

    def check(self, env) -> None:
        require_llama_server()

    def command(self) -> list[str]:
        return server_command(self.model_path, self.model_alias, self.host, self.port, self.n_ctx, self.n_threads,
                              self.logits_all)

    def healthy(self) -> bool:
        return serves(self.base_url, self.model_alias)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def file_lock(path: Path):
    """An exclusive advisory lock on `path` (created if missing), held for the `with` block, across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class SharedServer:
    """One server per node for every process that asks for the same one (`key`): the first starts it (`start()`), the
    others find its address in `<state_dir>/<key>.json`, read and written under the file lock `<key>.lock`, which
    also lists the processes using it; the last one to release it stops it. A user that died is dropped from the list
    by the next one that takes the lock; a server left behind by a killed run is joined while it still answers.
    llama.cpp answers /models only between requests, so a live server process is waited for up to `busy_wait_s`
    before it counts as gone (a busy server is not replaced by a second one)."""

    def __init__(self, state_dir: Path, key: str, model_alias: str, start: Callable[[], LocalLlamaServer],
                 busy_wait_s: float = 120.0):
        self.state_path = Path(state_dir) / f"{key}.json"
        self.lock_path = Path(state_dir) / f"{key}.lock"
        self.model_alias = model_alias
        self._start = start
        self.busy_wait_s = busy_wait_s
        self.server: LocalLlamaServer | None = None  # set in the process that started it
        self.base_url: str | None = None
        self.started_here = False

    def acquire(self) -> str:
        """The base URL of the node's server, started here if no live one exists."""
        with file_lock(self.lock_path):
            state = self._read()
            if state is not None and self._answers(state):
                state["users"] = [pid for pid in state["users"] if pid_alive(pid)] + [os.getpid()]
            else:
                self.server = self._start()
                self.started_here = True
                state = {"base_url": self.server.base_url, "pid": self.server.process.pid, "users": [os.getpid()],
                         "log": str(self.server.log_path)}
            self._write(state)
        self.base_url = state["base_url"]
        return self.base_url

    def release(self) -> None:
        """Leave; the last user stops the server (its starter through the process handle, any other by its pid)."""
        with file_lock(self.lock_path):
            state = self._read()
            users = list(state["users"]) if state is not None else []
            if os.getpid() in users:
                users.remove(os.getpid())
            users = [pid for pid in users if pid_alive(pid)]
            if users:
                self._write({**state, "users": users})
            else:
                if self.server is not None:
                    self.server.stop()
                elif state is not None and self._answers(state):
                    stop_pid(state["pid"], state["base_url"])
                self.state_path.unlink(missing_ok=True)
        self.server = None
        self.base_url = None

    def _answers(self, state: dict) -> bool:
        """Whether the recorded server answers: at once, or, while its process lives, within `busy_wait_s`."""
        deadline = time.monotonic() + self.busy_wait_s
        while True:
            if serves(state["base_url"], self.model_alias, timeout_s=10.0):
                return True
            if not pid_alive(int(state["pid"])) or time.monotonic() >= deadline:
                return False
            time.sleep(0.5)

    def _read(self) -> dict | None:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) and {"base_url", "pid", "users"} <= set(state) else None

    def _write(self, state: dict) -> None:
        tmp = self.state_path.with_name(self.state_path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_path)


def stop_pid(pid: int, base_url: str, grace_s: float = 10.0) -> None:
    """SIGTERM a server another process started, and wait until its port stops answering (SIGKILL after grace_s)."""
    from urllib.parse import urlparse

    url = urlparse(base_url)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex((url.hostname, url.port)) != 0:
                    return
            time.sleep(0.1)
