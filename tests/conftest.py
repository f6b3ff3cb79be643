"""Shared test fixtures: paths to the shared benchmark files, a fake judge server, the repo root."""

from __future__ import annotations

from pathlib import Path

import pytest

from fake_openai import FakeOpenAIServer
from medix_cli import offline_env

REPO = Path(__file__).resolve().parents[1]
SHARED_BENCHMARKS = REPO.parent / "shared" / "benchmarks"


def pytest_collection_modifyitems(config, items):
    """A vllm test is slow too, so `-m "not slow"` leaves it out."""
    for item in items:
        if item.get_closest_marker("vllm") is not None:
            item.add_marker(pytest.mark.slow)


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
def medix_env() -> dict[str, str]:
    """Environment for `python -m medix.*` subprocesses: offline, repo on the path (medix_cli.offline_env)."""
    return offline_env()
