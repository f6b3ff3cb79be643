"""The offline judges on llama.cpp's server (needs llama-cpp-python[server]): the server's life cycle, judge=local_small
(Qwen2.5-Coder-0.5B) end to end with the cache, the default judge=local (Qwen2.5-Coder-1.5B, logprob verdict at the
configured threshold), and one server per node shared by two ranks."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.utils import instantiate

from medix.errors import JudgeError
from medix.judges import JudgeItem, LocalJudge
from medix.judges.assets import asset_gguf
from medix.judges.local_server import LocalLlamaServer
from test_judge_client import compose_judge

pytestmark = [pytest.mark.llama, pytest.mark.slow]  # starts the llama.cpp judge server

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("MEDIX_CACHE_DIR", Path.home() / ".cache" / "medix"))  # the GGUFs live here
SMALL, DEFAULT = "qwen2.5-coder-0.5b-instruct-q4_k_m", "qwen2.5-coder-1.5b-instruct-q4_k_m"


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def local_judge(name: str, tmp_path: Path, *overrides: str) -> LocalJudge:
    """conf/judge/<name>.yaml with its state under tmp_path and the GGUF from the shared model cache."""
    gguf = asset_gguf(SMALL if name == "local_small" else DEFAULT, CACHE_DIR)
    return instantiate(compose_judge(name, tmp_path, f"judge.server.gguf={gguf}", *overrides))


def test_server_starts_answers_health_and_stops(tmp_path):
    server = LocalLlamaServer(asset_gguf(SMALL, CACHE_DIR), "judge-under-test", n_ctx=512,
                              log_path=tmp_path / "server.log")
    with server:
        assert server.healthy()
        assert port_open(server.port)
        process = server.process
        assert server.startup_s is not None and server.startup_s < server.startup_timeout_s
    assert process.poll() is not None  # terminated
    assert not port_open(server.port)
    assert "llama_cpp.server" in (tmp_path / "server.log").read_text()


def test_broken_model_file_fails_fast_with_log_tail(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file" * 10)
    server = LocalLlamaServer(junk, "junk", log_path=tmp_path / "server.log", startup_timeout_s=60)
    started = time.perf_counter()
    with pytest.raises(JudgeError, match="exited with code"):
        server.start()
    assert time.perf_counter() - started < 60
    assert server.process is None


def test_local_small_end_to_end_with_cache(tmp_path):
    batch = [JudgeItem(None, "Pneumothorax", "pneumothorax"),
             JudgeItem(None, "Type 1 diabetes mellitus", "Right pneumothorax"),
             JudgeItem("What is the diagnosis?", "Atrial fibrillation", "atrial fibrillation")]
    with local_judge("local_small", tmp_path) as judge:
        port = int(judge.base_url.rsplit(":", 1)[1].split("/")[0])
        assert port_open(port)
        scores = judge.score(batch)
        stats = judge.stats()
        again = judge.score(batch)
        after = judge.stats()
    assert all(s in (0.0, 1.0) for s in scores) and again == scores
    assert scores[0] == 1.0 and scores[2] == 1.0  # identical answers
    assert stats["judge/failures"] == 0 and stats["judge/items"] == 3 and stats["judge/requests"] == 3
    assert 0 < stats["judge/latency_s"] < 60
    assert after["judge/cache_hits"] == 3 and after["judge/requests"] == 3  # the second batch came from the cache
    print(f"\nlocal_small: startup {stats['judge/server_startup_s']:.1f}s, {stats['judge/latency_s']:.2f}s per request")
    assert not port_open(port)  # stopped on exit
    assert not list((tmp_path / "judge_servers").glob("*.json"))


def test_default_local_judge_separates_a_paraphrase_from_a_near_miss(tmp_path):
    """judge=local as shipped (the 1.5B, its template, logprob scoring at judge.yes_threshold): a verdict that tells
    these two apart, and the probabilities that the threshold cuts."""
    batch = [JudgeItem("What does the chest X-ray show?", "Air around the left lung, which has collapsed",
                       "Left pneumothorax"),
             JudgeItem("Which femur is fractured?", "The right femur", "Left femoral fracture")]
    with local_judge("local", tmp_path, "judge.cache.enabled=false") as judge:
        probabilities = judge.probabilities(batch)
        verdicts = judge.score(batch)
        stats = judge.stats()
    assert verdicts == [1.0, 0.0], probabilities
    assert probabilities[0] >= judge.yes_threshold > probabilities[1]
    assert stats["judge/failures"] == 0 and stats["judge/requests"] == 4
    print(f"\nlocal (1.5B): P(YES) {probabilities}, startup {stats['judge/server_startup_s']:.1f}s, "
          f"{stats['judge/latency_s']:.2f}s per request")


RANK_SCRIPT = """
import json, os, sys, time
from hydra.utils import instantiate
sys.path.insert(0, "tests")
from test_judge_client import compose_judge
from medix.judges import JudgeItem
cache_dir, gguf, ready, go = sys.argv[1:5]
judge = instantiate(compose_judge("local_small", cache_dir, f"judge.server.gguf={gguf}", "judge.max_concurrency=4"))
with judge:
    open(ready + os.environ["LOCAL_RANK"], "w").close()
    while not os.path.exists(go):  # both ranks hold the server before either scores
        time.sleep(0.05)
    state = json.loads(judge.shared.state_path.read_text())
    scores = judge.score([JudgeItem(None, "Pneumothorax", "pneumothorax"), JudgeItem(None, os.environ["LOCAL_RANK"], "x")])
    print(json.dumps({"base_url": judge.base_url, "scores": scores, "concurrency": judge.concurrency, "state": state}))
"""


def test_two_ranks_on_a_node_share_one_server_that_the_last_one_stops(tmp_path):
    """Two plain processes as Lightning's launcher leaves them (WORLD_SIZE=2, LOCAL_RANK=0/1) build judge=local_small:
    one llama.cpp server starts, both score through it, each with half of max_concurrency, and it stops when both
    have closed."""
    gguf = asset_gguf(SMALL, CACHE_DIR)
    ready, go = tmp_path / "ready", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(tmp_path), str(gguf), str(ready), str(go)],
                              cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**os.environ, "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)}) for rank in range(2)]
    deadline = time.monotonic() + 300
    while not all((tmp_path / f"ready{rank}").exists() for rank in range(2)) and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs]
        time.sleep(0.2)
    go.touch()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["base_url"] == results[1]["base_url"]
    assert [r["concurrency"] for r in results] == [2, 2]
    assert [r["scores"][0] for r in results] == [1.0, 1.0]
    assert sorted(results[1]["state"]["users"]) == sorted(p.pid for p in procs)  # both registered with the server
    log = (tmp_path / "logs" / "judge_server.log").read_text()
    assert log.count("-m llama_cpp.server") == 1  # started once
    port = int(results[0]["base_url"].rsplit(":", 1)[1].split("/")[0])
    assert not port_open(port)  # stopped by the last rank to close
    assert not list((tmp_path / "judge_servers").glob("*.json"))


def test_a_server_left_by_a_killed_run_is_joined_then_stopped(tmp_path):
    """A judge process killed with SIGKILL leaves its server running: the next judge on the node uses it and stops it."""
    gguf = asset_gguf(SMALL, CACHE_DIR)
    script = ("import sys, os, signal; sys.path.insert(0, 'tests'); from hydra.utils import instantiate; "
              "from test_judge_client import compose_judge; "
              f"j = instantiate(compose_judge('local_small', {str(tmp_path)!r}, 'judge.server.gguf={gguf}')).start(); "
              "print(j.base_url, flush=True); os.kill(os.getpid(), signal.SIGKILL)")
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    left_url = out.stdout.strip()
    port = int(left_url.rsplit(":", 1)[1].split("/")[0])
    assert port_open(port), out.stderr[-2000:]
    with local_judge("local_small", tmp_path) as judge:
        assert judge.base_url == left_url and judge.score([JudgeItem(None, "Pneumothorax", "pneumothorax")]) == [1.0]
    assert not port_open(port)


def test_a_busy_server_is_joined_not_replaced_by_a_second_one(tmp_path):
    """llama.cpp answers /models only between requests: a recorded server whose process lives but which answers late
    (here 3 s) is joined; one whose process is gone is replaced."""
    from fake_openai import FakeOpenAIServer

    from medix.judges.local_server import SharedServer

    started = []

    def start():
        started.append(True)
        raise AssertionError("a second server was started")

    with FakeOpenAIServer(model="busy", models_delay_s=3.0) as busy:
        state = {"base_url": busy.base_url, "pid": os.getpid(), "users": [], "log": "-"}
        (tmp_path / "k.json").write_text(json.dumps(state))
        shared = SharedServer(tmp_path, "k", "busy", start, busy_wait_s=30)
        assert shared.acquire() == busy.base_url and not started
        assert json.loads((tmp_path / "k.json").read_text())["users"] == [os.getpid()]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / "k.json").write_text(json.dumps({**state, "pid": gone.pid}))  # the server's process has exited
    with pytest.raises(AssertionError, match="a second server"):
        SharedServer(tmp_path, "k", "busy", start, busy_wait_s=30).acquire()
    assert started == [True]
