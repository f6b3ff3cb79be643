"""The lifecycle of an HTTP server that medix runs as a subprocess (the llama.cpp judge, the vLLM rollout engine):
start it with its output in a log file, wait until it answers, stop it. Subclasses say what to run and when it is
healthy; this file knows nothing of judges or rollouts."""

from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from medix.errors import MedixError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serves(base_url: str, model: str, timeout_s: float = 2.0) -> bool:
    """Whether an OpenAI-compatible server at `base_url` (`.../v1`) answers /models within `timeout_s` and lists
    `model`."""
    try:
        with urllib.request.urlopen(f"{base_url}/models", timeout=timeout_s) as reply:
            models = json.loads(reply.read()).get("data", [])
    except (urllib.error.URLError, OSError, ValueError, AttributeError):
        return False
    return any(isinstance(m, dict) and m.get("id") == model for m in models)


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class ServerProcess:
    """One server subprocess at `host:port` (a free port when None), its stdout and stderr appended to `log_path`.
    `start()` returns once `healthy()` holds, or raises `error` naming the server (`describe()`), the config key of
    the timeout and the log's last lines. With `own_session` the server gets its own process group, which `stop()`
    signals as a whole, and it is stopped at exit; without, it may outlive this process (a server shared by a node's
    processes). Subclasses give `command()` and `healthy()`, and may give `environment()` and `check()`."""

    error: type[Exception] = MedixError
    timeout_key = "startup_timeout_s"
    own_session = False
    poll_s = 0.25

    def __init__(self, *, host: str, port: int | None, startup_timeout_s: float, log_path: str | Path):
        self.host = host
        self.port = port
        self.startup_timeout_s = startup_timeout_s
        self.log_path = Path(log_path)
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible root (`.../v1`)."""
        return f"{self.url}/v1"

    def describe(self) -> str:
        return f"server {self.url}"

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str] | None:
        return None  # inherit this process's

    def check(self, env: dict[str, str] | None) -> None:
        """Raise `error` before starting when the server cannot run here (a missing package or interpreter)."""

    def healthy(self) -> bool:
        raise NotImplementedError

    def start(self):
        env = self.environment()
        self.check(env)
        if self.port is None:
            self.port = free_port(self.host)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = self.command()
        started = time.perf_counter()
        with open(self.log_path, "ab") as log:
            log.write(f"\n$ {' '.join(self.shown(cmd))}\n".encode())
            log.flush()
            self.process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            env=env, start_new_session=self.own_session)
        if self.own_session:
            atexit.register(self.stop)
        try:
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - started
        return self

    def shown(self, cmd: list[str]) -> list[str]:
        """The command as the log shows it."""
        return cmd

    def wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise self.error(f"{self.describe()} {self.ended()} while starting; "
                                 f"last log lines from {self.log_path}:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(self.poll_s)
        raise self.error(f"{self.describe()} not healthy after {self.timeout_key}={self.startup_timeout_s:g}s; "
                         f"last log lines from {self.log_path}:\n{self.log_tail()}")

    def ended(self) -> str:
        """How the process ended ('exited with code 3', 'was killed by SIGILL (...)'); '' while it runs or before it
        started. A SIGILL says why: a native build for another CPU is the usual cause."""
        code = None if self.process is None else self.process.poll()
        if code is None:
            return ""
        if code >= 0:
            return f"exited with code {code}"
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        why = (" (an instruction this CPU cannot run: the server was built for another CPU; rebuild it, e.g. rerun "
               "scripts/setup.sh)") if name == "SIGILL" else ""
        return f"was killed by {name}{why}"

    def log_tail(self, lines: int = 25) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM, then SIGKILL after `grace_s` (with `own_session`, to whatever of its group is left too)."""
        if self.own_session:
            atexit.unregister(self.stop)
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                if self.own_session:
                    signal_group(process.pid, signal.SIGKILL)
                else:
                    process.kill()
                process.wait(timeout=grace_s)
        if self.own_session:
            signal_group(process.pid, signal.SIGKILL)  # whatever of the group outlived the server

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
