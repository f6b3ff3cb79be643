"""OpenAIJudge against a fake OpenAI-compatible server over real HTTP: concurrency (and its share per rank), the SDK's
retries, cache, failure policy, statistics; the judge configs composed with their schemas and instantiated."""

import asyncio
import json
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException
from hydra.utils import instantiate

from fake_openai import FakeHTTPError, FakeOpenAIServer, always
from medix.errors import ConfigError, JudgeError
from medix.judges import JudgeItem, LocalJudge, OpenAIJudge, RuleJudge
from medix.judges.config import register
from medix.server_process import free_port

REPO = Path(__file__).resolve().parents[1]
STATS_KEYS = {"judge/requests", "judge/items", "judge/cache_hits", "judge/failures", "judge/latency_s"}


def compose_judge(name, cache_dir, *overrides):
    """conf/judge/<name>.yaml composed with its schema (as the entry points compose it), paths.cache_dir set."""
    register(ConfigStore.instance())
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name=None, overrides=[f"+judge={name}", f"+paths.cache_dir={cache_dir}", *overrides])
    return cfg.judge


def items(*predictions, reference="pneumonia"):
    return [JudgeItem(None, p, reference) for p in predictions]


def judge_for(url, tmp_path, **overrides):
    cfg = {"model": "fake-judge", "base_url": url, "max_retries": 0, "timeout_s": 5, "on_failure": "exclude",
           "max_failure_rate": 1.0, "cache": {"enabled": False}, "cache_dir": tmp_path}
    cfg.update(overrides)
    return OpenAIJudge(**cfg)


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


def test_the_sdk_retries_server_errors_with_backoff_and_every_request_is_counted(tmp_path):
    seen: list[float] = []

    def flaky(body):
        seen.append(time.perf_counter())
        if len(seen) < 3:
            raise RuntimeError("overloaded")
        return "YES"

    with FakeOpenAIServer(flaky) as server:
        with judge_for(server.base_url, tmp_path, max_retries=3) as judge:
            assert judge.score(items("pneumonia")) == [1.0]
            stats = judge.stats()
    assert len(server.requests) == 3
    # the openai SDK's backoff: 0.5 s, then 1 s, each shortened by up to 25 % jitter
    assert seen[1] - seen[0] >= 0.37 and seen[2] - seen[1] >= 0.75
    assert stats == {"judge/requests": 3.0, "judge/items": 1.0, "judge/cache_hits": 0.0, "judge/failures": 0.0,
                     "judge/latency_s": pytest.approx(stats["judge/latency_s"])}
    assert 0 < stats["judge/latency_s"] < 1.0  # the mean over the 3 requests, not the 1.5 s of backoff


def test_latency_is_the_mean_seconds_per_request(tmp_path):
    with FakeOpenAIServer(always("YES"), delay_s=0.2) as server:
        with judge_for(server.base_url, tmp_path, max_concurrency=1) as judge:
            judge.score(items("a", "b", "c"))
            stats = judge.stats()
    assert stats["judge/requests"] == 3 and 0.2 <= stats["judge/latency_s"] < 0.5


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


@pytest.mark.parametrize(("threshold", "verdict"), [(0.5, 1.0), (0.8, 1.0), (0.81, 0.0)])
def test_logprob_scoring_gives_a_binary_verdict_at_the_threshold(tmp_path, threshold, verdict):
    top = {"YES": math.log(0.6), " Yes": math.log(0.2), "NO": math.log(0.2), "Maybe": math.log(0.001)}
    with FakeOpenAIServer(always("NO"), top_logprobs=top) as server:  # the reply text is ignored
        with judge_for(server.base_url, tmp_path, scoring="logprob", top_logprobs=5, yes_threshold=threshold) as judge:
            assert judge.score(items("pneumonia")) == [verdict]
            assert judge.probabilities(items("pneumonia")) == [pytest.approx(0.8)]
    assert server.requests[0]["logprobs"] is True and server.requests[0]["top_logprobs"] == 5


def test_logprob_scoring_without_logprobs_is_a_failure(tmp_path):
    with FakeOpenAIServer(always("YES"), top_logprobs=None) as server:
        with judge_for(server.base_url, tmp_path, scoring="logprob") as judge:
            assert judge.score(items("pneumonia")) == [None]
            assert judge.stats()["judge/failures"] == 1


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
    assert stats["judge/items"] == 3 and stats["judge/cache_hits"] == 2 and stats["judge/requests"] == 1


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
from medix.judges import OpenAIJudge, JudgeItem
cfg = json.loads(sys.argv[1])
with OpenAIJudge(**cfg, cache_dir=sys.argv[2]) as judge:
    scores = judge.score([JudgeItem(None, p, "pneumonia") for p in ("pneumonia", "fracture", "lobar pneumonia")])
    print(json.dumps({"scores": scores, "stats": judge.stats()}))
"""


@pytest.mark.slow  # several processes
def test_cache_is_shared_across_processes(tmp_path):
    def run(cfg):
        out = subprocess.run([sys.executable, "-c", CACHE_SCRIPT, json.dumps(cfg), str(tmp_path)], cwd=REPO,
                             capture_output=True, text=True, timeout=120, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])

    with FakeOpenAIServer(lambda b: "YES" if "pneumonia" in predicted(b) else "NO") as server:
        cfg = {"model": "fake-judge", "base_url": server.base_url, "cache": {"enabled": True, "path": None}}
        first = run(cfg)
        assert len(server.requests) == 3
        second = run(cfg)
        assert len(server.requests) == 3  # nothing new went over HTTP
        assert second["scores"] == first["scores"] == [1.0, 0.0, 1.0]
        assert (tmp_path / "judge_cache.sqlite").is_file()  # cache.path null: <cache_dir>/judge_cache.sqlite
        assert first["stats"]["judge/cache_hits"] == 0 and first["stats"]["judge/requests"] == 3
        assert second["stats"]["judge/cache_hits"] == 3 and second["stats"]["judge/requests"] == 0
        run({**cfg, "max_tokens": 8})  # other sampling params: another cache key
        assert len(server.requests) == 6


@pytest.mark.parametrize(("name", "kind"), [("qwen", OpenAIJudge), ("openai", OpenAIJudge), ("local", LocalJudge),
                                           ("local_small", LocalJudge), ("rule", RuleJudge)])
def test_shipped_configs_compose_with_their_schema_and_instantiate(tmp_path, name, kind):
    cfg = compose_judge(name, tmp_path)
    assert "kind" not in cfg and cfg._target_ == f"{kind.__module__}.{kind.__name__}"
    judge = instantiate(cfg)  # not entered: the local kinds start their server at first use
    try:
        assert type(judge) is kind
        assert set(judge.stats()) == STATS_KEYS
        if name == "qwen":
            assert judge.base_url == "http://127.0.0.1:8085/v1" and judge.model == "Qwen/Qwen3-4B-Instruct-2507"
            assert judge.cache is not None and judge.cache.path == tmp_path / "judge_cache.sqlite"
            assert judge.extra_body == {"chat_template_kwargs": {"enable_thinking": False}}
        if name.startswith("local"):
            assert judge.server.logits_all is True and judge.shared is None
    finally:
        judge.close()


def test_the_default_local_judge_is_the_pinned_1_5b_with_a_binary_logprob_verdict(tmp_path):
    judge = instantiate(compose_judge("local", tmp_path))
    assert judge.server.gguf == "qwen2.5-coder-1.5b-instruct-q4_k_m" and judge.scoring == "logprob"
    assert 0 < judge.yes_threshold < 1 and judge.max_tokens == 1
    # the fixed text comes first, so llama.cpp reuses it; the item comes last
    assert judge.template.index("{prediction}") > len(judge.template) // 2
    small = instantiate(compose_judge("local_small", tmp_path))
    assert small.server.gguf == "qwen2.5-coder-0.5b-instruct-q4_k_m"


def test_qwen_config_against_fake_server(tmp_path):
    with FakeOpenAIServer(always("YES")) as server:
        with instantiate(compose_judge("qwen", tmp_path, f"judge.base_url={server.base_url}")) as judge:
            assert judge.score(items("pneumonia")) == [1.0]
    assert server.requests[0]["chat_template_kwargs"] == {"enable_thinking": False}
    assert server.requests[0]["model"] == "Qwen/Qwen3-4B-Instruct-2507"


def test_the_api_key_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDIX_JUDGE_API_KEY", "sk-from-env")
    assert compose_judge("qwen", tmp_path).api_key == "sk-from-env"


@pytest.mark.parametrize("override", ["judge.colour=red", "judge.cache.colour=red", "judge.server.colour=red"])
def test_an_unknown_key_fails_at_compose_time_naming_it(tmp_path, override):
    with pytest.raises(ConfigCompositionException, match="colour"):
        compose_judge("local", tmp_path, override)


def test_a_wrongly_typed_value_fails_at_compose_time(tmp_path):
    with pytest.raises(ConfigCompositionException, match="max_retries"):
        compose_judge("qwen", tmp_path, "judge.max_retries=many")


@pytest.mark.parametrize(
    ("override", "match"),
    [({"on_failure": "ignore"}, "judge.on_failure"), ({"scoring": "vibes"}, "judge.scoring"),
     ({"parser": "fuzzy"}, "judge.parser"), ({"yes_threshold": 1.5}, "judge.yes_threshold"),
     ({"template": "{answer}"}, "judge.template"), ({"model": None}, "judge.model"), ({"base_url": None}, "judge.base_url"),
     ({"cache": {"enabled": True, "colour": 1}}, "judge.cache")],
)
def test_bad_values_name_the_key(tmp_path, override, match):
    cfg = {"model": "m", "base_url": "http://127.0.0.1:1/v1", "cache_dir": tmp_path, **override}
    with pytest.raises(ConfigError, match=match):
        OpenAIJudge(**cfg)


def test_a_bad_value_through_instantiate_is_one_config_error(tmp_path):
    from medix.instantiate import build

    with pytest.raises(ConfigError, match="judge.on_failure: 'ignore' is not valid"):
        build(compose_judge("qwen", tmp_path, "judge.on_failure=ignore"))


# ---- DDP/FSDP: the ranks share the remote judge's concurrency --------------------------------------------------
RANK_SCRIPT = """
import json, sys
from medix.judges import OpenAIJudge, JudgeItem
with OpenAIJudge(model="fake-judge", base_url=sys.argv[1], max_concurrency=4, timeout_s=30) as judge:
    print(json.dumps({"scores": judge.score([JudgeItem(None, f"answer {i}", "x") for i in range(8)]),
                      "concurrency": judge.concurrency}))
"""


@pytest.mark.slow  # several processes
def test_ranks_of_a_run_share_max_concurrency(tmp_path):
    """Two plain processes as Lightning's launcher leaves them (WORLD_SIZE=2, LOCAL_RANK=0/1) send 8 items each to a
    judge with max_concurrency=4: at most 4 requests are ever in flight at the server, 2 per rank."""
    with FakeOpenAIServer(always("YES"), delay_s=0.3) as server:
        procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, server.base_url], cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, env={**os.environ, "WORLD_SIZE": "2", "LOCAL_RANK": str(rank)})
                 for rank in range(2)]
        outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    assert [o["scores"] for o in outs] == [[1.0] * 8] * 2 and [o["concurrency"] for o in outs] == [2, 2]
    assert len(server.requests) == 16 and server.max_in_flight == 4


def test_world_size_is_read_at_first_use_not_at_construction(tmp_path, monkeypatch):
    with FakeOpenAIServer(always("YES")) as server:
        judge = judge_for(server.base_url, tmp_path, max_concurrency=8)
        monkeypatch.setenv("WORLD_SIZE", "4")  # set by the launcher after the judge was built from the config
        with judge:
            judge.score(items("a"))
            assert judge.concurrency == 2
