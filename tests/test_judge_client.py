"""OpenAIJudge against a fake OpenAI-compatible server over real HTTP: concurrency, retries, cache, failure policy."""

import asyncio
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fake_openai import FakeHTTPError, FakeOpenAIServer, always
from medix.errors import ConfigError, JudgeError
from medix.judges import JudgeItem, LocalJudge, OpenAIJudge, RuleJudge, build_judge
from medix.judges.local_server import free_port

REPO = Path(__file__).resolve().parents[1]


def items(*predictions, reference="pneumonia"):
    return [JudgeItem(None, p, reference) for p in predictions]


def judge_for(url, tmp_path, **overrides):
    cfg = {"kind": "openai", "model": "fake-judge", "base_url": url, "max_retries": 0, "retry_backoff_s": 0.01,
           "timeout_s": 5, "on_failure": "exclude", "max_failure_rate": 1.0, "cache": {"enabled": False}}
    cfg.update(overrides)
    return build_judge(cfg, tmp_path)


def predicted(body):
    """The prediction as it appears between the prompt's <predicted> tags."""
    content = body["messages"][0]["content"]
    return content.split("<predicted>\n", 1)[1].split("\n</predicted>", 1)[0]


def test_sends_paper_sampling_params_and_parses_replies(tmp_path):
    with FakeOpenAIServer(lambda b: "YES" if predicted(b) == "pneumonia" else "NO") as server:
        with judge_for(server.base_url, tmp_path, max_tokens=4, extra_body={"chat_template_kwargs": {"enable_thinking": False}}) as judge:
            assert judge.score(items("pneumonia", "fracture")) == [1.0, 0.0]
    body = server.requests[0]
    assert body["model"] == "fake-judge" and body["temperature"] == 0.0 and body["max_tokens"] == 4
    assert body["chat_template_kwargs"] == {"enable_thinking": False}
    assert "logprobs" not in body


@pytest.mark.parametrize("cap", [1, 4])
def test_concurrency_is_capped_and_really_overlaps(tmp_path, cap):
    with FakeOpenAIServer(always("YES"), delay_s=0.3) as server:
        with judge_for(server.base_url, tmp_path, max_concurrency=cap) as judge:
            started = time.perf_counter()
            scores = judge.score(items(*[f"answer {i}" for i in range(8)]))
            elapsed = time.perf_counter() - started
    assert scores == [1.0] * 8
    assert server.max_in_flight == cap
    assert elapsed >= 8 / cap * 0.3 - 0.05
    if cap > 1:
        assert elapsed < 8 * 0.3  # faster than one at a time


def test_retries_server_errors_with_exponential_backoff(tmp_path):
    seen: list[float] = []

    def flaky(body):
        seen.append(time.perf_counter())
        if len(seen) < 3:
            raise RuntimeError("overloaded")
        return "YES"

    with FakeOpenAIServer(flaky) as server:
        with judge_for(server.base_url, tmp_path, max_retries=3, retry_backoff_s=0.2) as judge:
            assert judge.score(items("pneumonia")) == [1.0]
            stats = judge.stats()
    assert len(server.requests) == 3
    assert seen[1] - seen[0] >= 0.2 and seen[2] - seen[1] >= 0.4
    assert stats["judge/http_requests"] == 3 and stats["judge/failures"] == 0


def test_timeout_then_failure_policy(tmp_path):
    with FakeOpenAIServer(always("YES"), delay_s=3.0) as server:
        with judge_for(server.base_url, tmp_path, timeout_s=0.3, max_retries=1) as judge:
            started = time.perf_counter()
            assert judge.score(items("pneumonia")) == [None]
            elapsed = time.perf_counter() - started
            assert judge.stats()["judge/failures"] == 1
    assert len(server.requests) == 2  # first try + one retry
    assert elapsed < 2.0


@pytest.mark.parametrize(("policy", "expected"), [("exclude", [None, 1.0]), ("zero", [0.0, 1.0])])
def test_failure_policy_exclude_and_zero(tmp_path, policy, expected):
    def handler(body):
        if "broken" in predicted(body):
            raise RuntimeError("boom")
        return "YES"

    with FakeOpenAIServer(handler) as server:
        with judge_for(server.base_url, tmp_path, on_failure=policy, max_retries=1) as judge:
            assert judge.score(items("broken answer", "pneumonia")) == expected
            assert judge.stats()["judge/failures"] == 1


def test_failure_policy_raise(tmp_path):
    with FakeOpenAIServer(lambda b: (_ for _ in ()).throw(RuntimeError("boom"))) as server:
        with judge_for(server.base_url, tmp_path, on_failure="raise") as judge:
            with pytest.raises(JudgeError, match="on_failure=raise.*InternalServerError"):
                judge.score(items("pneumonia"))


def test_strict_parser_turns_rambling_reply_into_failure(tmp_path):
    with FakeOpenAIServer(always("The answer is YES")) as server:
        with judge_for(server.base_url, tmp_path) as judge:  # strict is the default
            assert judge.score(items("pneumonia")) == [None]
            assert judge.stats()["judge/failures"] == 1
        with judge_for(server.base_url, tmp_path, parser="strict") as judge:
            assert judge.score(items("pneumonia")) == [None]
        with judge_for(server.base_url, tmp_path, parser="contains") as judge:
            assert judge.score(items("pneumonia")) == [1.0]


def test_failure_rate_over_window_stops_the_run(tmp_path):
    def handler(body):
        if "bad" in predicted(body):
            raise FakeHTTPError(503, "overloaded")
        return "YES"

    with FakeOpenAIServer(handler) as server:
        with judge_for(server.base_url, tmp_path, on_failure="zero", failure_window=4, max_failure_rate=0.5,
                       max_concurrency=1) as judge:  # in order: which call leaves the window is fixed
            assert judge.score(items("good 1", "good 2", "bad 1", "bad 2")) == [1.0, 1.0, 0.0, 0.0]  # rate 0.5: allowed
            with pytest.raises(JudgeError, match=r"failure rate 75% over the last 4 calls exceeds judge.max_failure_rate=0.5"):
                judge.score(items("bad 3"))


def test_logprob_scoring(tmp_path):
    top = {"YES": math.log(0.8), "NO": math.log(0.2), "Maybe": math.log(0.001)}
    with FakeOpenAIServer(always("YES"), top_logprobs=top) as server:
        with judge_for(server.base_url, tmp_path, scoring="logprob", top_logprobs=5) as judge:
            (score,) = judge.score(items("pneumonia"))
    assert score == pytest.approx(0.8)
    assert server.requests[0]["logprobs"] is True and server.requests[0]["top_logprobs"] == 5
    with FakeOpenAIServer(always("YES"), top_logprobs=None) as server:  # server without logprobs: a failure
        with judge_for(server.base_url, tmp_path, scoring="logprob") as judge:
            assert judge.score(items("pneumonia")) == [None]


def test_unreachable_server_says_how_to_start_it(tmp_path):
    port = free_port()
    with judge_for(f"http://127.0.0.1:{port}/v1", tmp_path, on_failure="zero", model="Qwen/Qwen3-4B-Instruct-2507") as judge:
        with pytest.raises(JudgeError, match=f"vllm serve Qwen/Qwen3-4B-Instruct-2507 --port {port}"):
            judge.score(items("pneumonia"))


def test_unknown_model_is_a_clear_error(tmp_path):
    with FakeOpenAIServer(lambda b: (_ for _ in ()).throw(FakeHTTPError(404, "model not found"))) as server:
        with judge_for(server.base_url, tmp_path, on_failure="zero") as judge:
            with pytest.raises(JudgeError, match="check judge.model"):
                judge.score(items("pneumonia"))


def test_duplicates_in_a_batch_are_sent_once(tmp_path):
    with FakeOpenAIServer(always("YES")) as server:
        with judge_for(server.base_url, tmp_path) as judge:
            assert judge.score(items("same", "same", "same")) == [1.0, 1.0, 1.0]
            stats = judge.stats()
    assert len(server.requests) == 1
    assert stats["judge/calls"] == 3 and stats["judge/cache_hit_rate"] == pytest.approx(2 / 3)


def test_sync_score_inside_a_running_event_loop_and_ascore(tmp_path):
    with FakeOpenAIServer(always("NO")) as server:
        with judge_for(server.base_url, tmp_path) as judge:

            async def caller():
                sync_result = judge.score(items("a"))  # blocks this loop, but runs on the judge's private loop
                async_result = await judge.ascore(items("b"))
                return sync_result, async_result

            assert asyncio.run(caller()) == ([0.0], [0.0])
            # and from several caller threads at once
            results = []
            threads = [threading.Thread(target=lambda i=i: results.append(judge.score(items(f"t{i}")))) for i in range(4)]
            [t.start() for t in threads]
            [t.join() for t in threads]
            assert results == [[0.0]] * 4


CACHE_SCRIPT = """
import json, sys
from medix.judges import build_judge, JudgeItem
cfg = json.loads(sys.argv[1])
with build_judge(cfg, sys.argv[2]) as judge:
    scores = judge.score([JudgeItem(None, p, "pneumonia") for p in ("pneumonia", "fracture", "lobar pneumonia")])
    print(json.dumps({"scores": scores, "stats": judge.stats()}))
"""


def test_cache_is_shared_across_processes(tmp_path):
    def run(cfg):
        out = subprocess.run([sys.executable, "-c", CACHE_SCRIPT, json.dumps(cfg), str(tmp_path)], cwd=REPO,
                             capture_output=True, text=True, timeout=120, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    with FakeOpenAIServer(lambda b: "YES" if "pneumonia" in predicted(b) else "NO") as server:
        cfg = {"kind": "openai", "model": "fake-judge", "base_url": server.base_url,
               "cache": {"enabled": True, "path": str(tmp_path / "judge_cache.sqlite")}}
        first = run(cfg)
        assert len(server.requests) == 3
        second = run(cfg)
        assert len(server.requests) == 3  # nothing new went over HTTP
        assert second["scores"] == first["scores"] == [1.0, 0.0, 1.0]
        assert first["stats"]["judge/cache_hit_rate"] == 0.0 and second["stats"]["judge/cache_hit_rate"] == 1.0
        run({**cfg, "max_tokens": 8})  # other sampling params: another cache key
        assert len(server.requests) == 6


def compose_judge(name, tmp_path):
    root = OmegaConf.create({"paths": {"cache_dir": str(tmp_path)}, "judge": OmegaConf.load(REPO / "conf" / "judge" / f"{name}.yaml")})
    return root.judge


@pytest.mark.parametrize(("name", "kind"), [("qwen", OpenAIJudge), ("openai", OpenAIJudge), ("local", LocalJudge), ("rule", RuleJudge)])
def test_shipped_configs_build(tmp_path, name, kind):
    judge = build_judge(compose_judge(name, tmp_path), tmp_path)  # not entered: the local kind starts lazily
    try:
        assert isinstance(judge, kind)
        if name == "qwen":
            assert judge.settings.base_url == "http://127.0.0.1:8085/v1"
            assert judge.settings.model == "Qwen/Qwen3-4B-Instruct-2507"
            assert judge.cache is not None and judge.cache.path == tmp_path / "judge_cache.sqlite"
        if name == "local":
            assert judge.server_cfg["logits_all"] is True and judge.server is None
    finally:
        judge.close()


def test_qwen_config_against_fake_server(tmp_path):
    cfg = compose_judge("qwen", tmp_path)
    with FakeOpenAIServer(always("YES")) as server:
        cfg.base_url = server.base_url
        with build_judge(cfg, tmp_path) as judge:
            assert judge.score(items("pneumonia")) == [1.0]
    assert server.requests[0]["chat_template_kwargs"] == {"enable_thinking": False}
    assert server.requests[0]["model"] == "Qwen/Qwen3-4B-Instruct-2507"


@pytest.mark.parametrize(
    ("override", "match"),
    [({"kind": "magic"}, "judge.kind"), ({"on_failure": "ignore"}, "judge.on_failure"),
     ({"scoring": "vibes"}, "judge.scoring"), ({"parser": "fuzzy"}, "judge.parser"),
     ({"colour": "red"}, "unknown keys"), ({"model": None}, "judge.model"), ({"base_url": None}, "judge.base_url")],
)
def test_bad_config_names_the_key(tmp_path, override, match):
    cfg = {"kind": "openai", "model": "m", "base_url": "http://127.0.0.1:1/v1", **override}
    with pytest.raises(ConfigError, match=match):
        build_judge(cfg, tmp_path)
