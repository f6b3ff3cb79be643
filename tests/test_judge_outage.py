"""Judge outages over real HTTP: the judge process is killed (SIGKILL) and restarted on the same port while the client
scores batches; retries carry short outages, long ones are counted and excluded, the cache survives, a sustained
failure rate stops with one clear JudgeError, and a training run against a failing judge ends FAILED in MLflow."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest

from judge_http import RestartableJudgeServer, free_port
from medix.errors import JudgeError
from medix.judges import JudgeItem, OpenAIJudge
from medix_cli import offline_env

HERE = Path(__file__).resolve().parent


class JudgeProcess:
    """`tests/judge_http.py` in its own process on a fixed port: start, kill -9, start again."""

    def __init__(self, port: int, delay_s: float = 0.0):
        self.port = port
        self.delay_s = delay_s
        self.proc: subprocess.Popen | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, str(HERE / "judge_http.py"), "--port", str(self.port),
                                      "--delay", str(self.delay_s)], stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def judge_process():
    process = JudgeProcess(free_port(), delay_s=0.2)
    process.start()
    yield process
    process.kill()


def batch(name: str, n: int = 4) -> list[JudgeItem]:
    return [JudgeItem(None, f"{name} answer {i}", "pneumonia") for i in range(n)]


def judge_for(url: str, cache_path: Path, **overrides):
    cfg = {"model": "fake-judge", "base_url": url, "timeout_s": 5, "max_retries": 4, "on_failure": "exclude",
           "max_failure_rate": 0.9, "failure_window": 50, "max_concurrency": 8,
           "cache": {"enabled": True, "path": str(cache_path)}}
    cfg.update(overrides)
    return OpenAIJudge(**cfg)


def test_killed_judge_is_survived_counted_and_its_cache_kept(judge_process, tmp_path):
    cache = tmp_path / "judge.sqlite"
    with judge_for(judge_process.base_url, cache) as judge:
        assert judge.score(batch("first")) == [1.0] * 4

        # Killed while a batch is in flight, back on the same port 1 s later: the SDK's retries (about 0.5+1+2+4 s)
        # carry it.
        result: list = []
        worker = threading.Thread(target=lambda: result.append(judge.score(batch("during", 8))))
        worker.start()
        time.sleep(0.1)
        judge_process.kill()
        time.sleep(1.0)
        judge_process.start()
        worker.join(timeout=60)
        assert result == [[1.0] * 8]
        stats = judge.stats()
        assert stats["judge/failures"] == 0 and stats["judge/requests"] > 12  # some requests were retried
        assert stats["judge/items"] == 12

        # Down for longer than the retry budget: the items fail, are counted and excluded (None), not cached.
        judge_process.kill()
        assert judge.score(batch("outage")) == [None] * 4
        assert judge.stats()["judge/failures"] == 4

        judge_process.start()
        requests_before = judge.stats()["judge/requests"]
        assert judge.score(batch("first")) == [1.0] * 4  # from the cache: no request
        assert judge.stats()["judge/requests"] == requests_before
        assert judge.score(batch("outage")) == [1.0] * 4  # failures were not cached; judged now
        assert judge.stats()["judge/failures"] == 4

    judge_process.kill()  # the cache file outlives the judge and the server
    with judge_for(judge_process.base_url, cache) as fresh:
        assert fresh.score(batch("first") + batch("during", 8) + batch("outage")) == [1.0] * 16
        assert fresh.stats()["judge/requests"] == 0 and fresh.stats()["judge/cache_hits"] == 16


def test_sustained_outage_stops_with_one_clear_error(judge_process, tmp_path):
    with judge_for(judge_process.base_url, tmp_path / "judge.sqlite", max_retries=1, failure_window=8,
                   max_failure_rate=0.5) as judge:
        assert judge.score(batch("up")) == [1.0] * 4
        judge_process.kill()
        assert judge.score(batch("down 1")) == [None] * 4  # 4 of the last 8 failed: 50%, still allowed
        with pytest.raises(JudgeError) as caught:
            judge.score(batch("down 2"))
    message = str(caught.value)
    assert "\n" not in message
    assert "exceeds judge.max_failure_rate=0.5" in message and judge_process.base_url in message
    assert "Connect" in message  # the last failure says what went wrong


def test_on_failure_zero_and_raise_during_an_outage(tmp_path):
    with RestartableJudgeServer(lambda body: "YES") as server:
        with judge_for(server.base_url, tmp_path / "a.sqlite", max_retries=0, on_failure="zero") as judge:
            assert judge.score(batch("up")) == [1.0] * 4
            server.stop()
            assert judge.score(batch("down")) == [0.0] * 4
            assert judge.stats()["judge/failures"] == 4
        server.start()
        with judge_for(server.base_url, tmp_path / "b.sqlite", max_retries=0, on_failure="raise") as judge:
            assert judge.score(batch("up")) == [1.0] * 4
            server.stop()
            with pytest.raises(JudgeError, match="on_failure=raise"):
                judge.score(batch("down"))


@pytest.mark.slow  # a real training run
def test_training_run_against_a_failing_judge_ends_failed_with_one_line(tmp_path):
    """Every judge call answers HTTP 500: the run stops at the failure-rate check, exit != 0, MLflow run FAILED."""
    env = offline_env()

    def broken(body):
        raise RuntimeError("judge GPU fell over")

    with RestartableJudgeServer(broken) as judge:
        cmd = [sys.executable, "-m", "medix.run", "experiment=smoke", "judge=qwen", f"judge.base_url={judge.base_url}",
               "judge.max_failure_rate=0.5", "judge.failure_window=2", "judge.max_retries=1",
               f"judge.cache.path={tmp_path}/judge.sqlite",
               f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db", f"hydra.run.dir={tmp_path}/hydra",
               f"paths.output_dir={tmp_path}/out"]
        out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode != 0
    assert judge.requests, "the judge was never called"
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    assert "judge failure rate" in errors[0] and "judge.max_failure_rate=0.5" in errors[0]
    assert "Traceback" not in out.stderr
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs] == ["FAILED"]
    assert "exception.txt" in {a.path for a in client.list_artifacts(runs[0].info.run_id)}
