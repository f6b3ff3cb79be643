"""Running medix's entry points as a user does, `python -m medix.<entry> <overrides>` in a subprocess: offline, with
this repo importable and tests/ too (for the plugins of run_probes.py that tests add by config), and without the
distributed variables of an enclosing launcher (a DDP/FSDP run must start its own ranks)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTED = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "RANK")


def offline_env(**extra: str) -> dict[str, str]:
    """This process's environment, offline (no hub), repo and tests/ on PYTHONPATH, `extra` on top."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=f"{REPO}{os.pathsep}{REPO / 'tests'}")
    env.update(extra)
    return env


def run_medix(*args: str, cwd: Path, entry: str = "medix.run", env: dict[str, str] | None = None,
              timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m <entry> <args>` in `cwd`, its output captured as text; the process runs in its own session so a
    timed-out multi-process run can be killed whole by the caller."""
    return subprocess.run([sys.executable, "-m", entry, *args], cwd=cwd, env=env or offline_env(),
                          capture_output=True, text=True, timeout=timeout, start_new_session=True)


def sigkill_when(command: list[str], *, cwd: Path, env: dict[str, str], log_path: Path, reached, what: str,
                 timeout: float = 900) -> None:
    """Start `command` (output to `log_path`) and SIGKILL it as soon as `reached()` holds; fail with the log's tail
    if it ends first, or if `what` is not reached within `timeout` seconds."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout
            while not reached():
                assert proc.poll() is None, (f"the run ended (rc {proc.returncode}) before {what}:\n"
                                             + log_path.read_text()[-3000:])
                assert time.monotonic() < deadline, f"{what} not reached after {timeout:.0f} s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGKILL
