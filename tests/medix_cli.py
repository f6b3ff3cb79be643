"""Running medix's entry points as a user does, `python -m medix.<entry> <overrides>` in a subprocess: offline, with
this repo importable and tests/ too (for the plugins of run_probes.py that tests add by config), and without the
distributed variables of an enclosing launcher (a DDP/FSDP run must start its own ranks)."""

from __future__ import annotations

import os
import subprocess
import sys
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
