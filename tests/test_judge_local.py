"""The offline judge: llama.cpp server with the pinned Qwen2.5-Coder-0.5B GGUF (needs llama-cpp-python[server])."""

import os
import socket
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from medix.errors import JudgeError
from medix.judges import JudgeItem, LocalJudge, build_judge
from medix.judges.assets import qwen_coder_gguf
from medix.judges.local_server import LocalLlamaServer

pytestmark = pytest.mark.llama

REPO = Path(__file__).resolve().parents[1]
CACHE_DIR = Path(os.environ.get("MEDIX_CACHE_DIR", Path.home() / ".cache" / "medix"))  # the 491 MB GGUF lives here


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_server_starts_answers_health_and_stops(tmp_path):
    server = LocalLlamaServer(qwen_coder_gguf(CACHE_DIR), "judge-under-test", n_ctx=512, log_path=tmp_path / "server.log")
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


def local_cfg(tmp_path, **overrides):
    root = OmegaConf.create({"paths": {"cache_dir": str(tmp_path)},
                             "judge": OmegaConf.load(REPO / "conf" / "judge" / "local.yaml")})
    cfg = OmegaConf.to_container(root.judge, resolve=True)
    cfg["server"]["log_file"] = str(tmp_path / "judge_server.log")
    cfg.update(overrides)
    return cfg


def test_local_judge_end_to_end_with_cache(tmp_path):
    gguf = qwen_coder_gguf(CACHE_DIR)
    cfg = local_cfg(tmp_path)
    cfg["server"]["gguf"] = str(gguf)
    batch = [JudgeItem(None, "Pneumothorax", "pneumothorax"),
             JudgeItem(None, "Type 1 diabetes mellitus", "Right pneumothorax"),
             JudgeItem("What is the diagnosis?", "Atrial fibrillation", "atrial fibrillation")]
    with build_judge(cfg, tmp_path) as judge:
        assert isinstance(judge, LocalJudge) and judge.server.healthy()
        scores = judge.score(batch)
        stats = judge.stats()
        again = judge.score(batch)
        after = judge.stats()
    assert all(s in (0.0, 1.0) for s in scores) and again == scores
    assert scores[0] == 1.0 and scores[2] == 1.0  # identical answers
    assert stats["judge/failures"] == 0 and stats["judge/calls"] == 3
    assert 0 < stats["judge/latency_s"] < 30
    assert after["judge/cache_hit_rate"] == pytest.approx(0.5)  # second batch fully from the cache
    print(f"\nlocal judge: startup {stats['judge/server_startup_s']:.1f}s, {stats['judge/latency_s']:.2f}s per call")
    assert judge.server is None  # stopped on exit


def test_local_judge_logprob_scoring(tmp_path):
    cfg = local_cfg(tmp_path, scoring="logprob")
    cfg["server"]["gguf"] = str(qwen_coder_gguf(CACHE_DIR))
    cfg["cache"]["enabled"] = False
    with build_judge(cfg, tmp_path) as judge:
        scores = judge.score([JudgeItem(None, "Pneumothorax", "pneumothorax")])
    assert scores[0] is not None and 0.5 < scores[0] <= 1.0
