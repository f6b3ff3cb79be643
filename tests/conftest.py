"""Shared test fixtures: paths to the shared benchmark files, a fake judge server, the repo root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fake_openai import FakeOpenAIServer

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCHMARKS = REPO.parent / "shared" / "benchmarks"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_benchmarks() -> Path:
    if not SHARED_BENCHMARKS.is_dir():
        pytest.skip(f"shared benchmark files not found at {SHARED_BENCHMARKS}")
    return SHARED_BENCHMARKS


@pytest.fixture
def fake_judge():
    with FakeOpenAIServer(lambda body: "YES") as server:
        yield server


@pytest.fixture
def medix_env(tmp_path) -> dict[str, str]:
    """Environment for `python -m medix.*` subprocesses: offline, repo on the path."""
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    return env
