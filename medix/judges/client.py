"""The judge client for training and evaluation: any OpenAI-compatible chat server, behind a concurrency cap (shared
by the ranks of a DDP/FSDP run), the openai SDK's retries and timeout, an SQLite cache and a failure policy, with one
set of statistics (`judge/requests`, `judge/items`, `judge/cache_hits`, `judge/failures`, `judge/latency_s`)."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import openai

from medix.errors import ConfigError, JudgeError
from medix.judges.cache import JudgeCache, cache_key
from medix.judges.prompts import parse_verdict, render_judge_prompt, yes_probability

ON_FAILURE = ("exclude", "zero", "raise")
SCORING = ("text", "logprob")
FATAL = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)


@dataclass(frozen=True)
class JudgeItem:
    """One thing to judge: does `prediction` match `reference` (for `question`, which may be None)?"""

    question: str | None
    prediction: str
    reference: str


class JudgeFailure(Exception):
    """A request got no reply after the SDK's retries; the message says why."""


class JudgeStats:
    """Cumulative counters, safe across threads. `requests`: HTTP requests sent (retries included); `items`: replies
    asked for (a JudgeItem in training, a conversation turn in evaluation); `cache_hits`: items answered from the
    cache or by an identical item of the same batch; `failures`: items left without a usable reply; `latency_s`: mean
    seconds from sending an HTTP request to its response (time queued at the server included)."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests = self.items = self.cache_hits = self.failures = self.answered = 0
        self.latency_total_s = 0.0

    def add(self, **counts) -> None:
        with self._lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def metrics(self) -> dict[str, float]:
        with self._lock:
            return {
                "judge/requests": float(self.requests),
                "judge/items": float(self.items),
                "judge/cache_hits": float(self.cache_hits),
                "judge/failures": float(self.failures),
                "judge/latency_s": self.latency_total_s / self.answered if self.answered else 0.0,
            }


def start_hint(model: str, base_url: str) -> str:
    """How to bring up the judge server that `base_url` points at."""
    url = urlparse(base_url)
    if url.hostname in ("127.0.0.1", "localhost", "0.0.0.0"):
        return f"start it with `vllm serve {model} --port {url.port or 8000}` (or point judge.base_url elsewhere)"
    return "check judge.base_url, the network and the API key"


def processes_sharing(local: bool) -> int:
    """How many processes share one judge server: the ranks of the run (env WORLD_SIZE, set by Lightning's launcher and
    torchrun), or for a server on this node the ranks on this node (LOCAL_WORLD_SIZE where the launcher sets it)."""
    world = int(os.environ.get("WORLD_SIZE") or 1)
    if local:
        return int(os.environ.get("LOCAL_WORLD_SIZE") or world)
    return world


class OpenAIJudge:
    """Judges with an LLM behind an OpenAI-compatible chat endpoint: `score` gives 1.0 (YES) / 0.0 (NO) / None (a
    failure, judge.on_failure=exclude). Every argument is a key of `conf/judge/*.yaml` (see conf/judge/qwen.yaml)."""

    local = False  # a server on this node (LocalJudge) or one shared by every rank of the run

    def __init__(self, model: str, base_url: str | None = None, api_key: str = "EMPTY", temperature: float = 0.0,
                 max_tokens: int = 4, scoring: str = "text", parser: str = "strict", top_logprobs: int = 10,
                 yes_threshold: float = 0.5, template: str | None = None, max_prediction_chars: int | None = 2000,
                 max_concurrency: int = 8, timeout_s: float = 30.0, max_retries: int = 3, on_failure: str = "exclude",
                 max_failure_rate: float = 0.5, failure_window: int = 50, extra_body: dict | None = None,
                 cache: dict | None = None, cache_dir: str | Path | None = None):
        if not model:
            raise ConfigError("judge.model: missing; name the model the judge server serves")
        self.model = model
        self.base_url = base_url
        self.api_key = api_key
        self.temperature = float(temperature)
        self.max_tokens = int(max_tokens)
        self.scoring = scoring
        self.parser = parser
        self.top_logprobs = int(top_logprobs)
        self.yes_threshold = float(yes_threshold)
        self.template = template
        self.max_prediction_chars = max_prediction_chars
        self.max_concurrency = int(max_concurrency)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.on_failure = on_failure
        self.max_failure_rate = float(max_failure_rate)
        self.failure_window = int(failure_window)
        self.extra_body = dict(extra_body) if extra_body else None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._check()
        self.cache = self._open_cache(cache or {"enabled": False})
        self.concurrency: int | None = None  # this process's share of max_concurrency, set at first use
        self.failure_score = 0.0 if on_failure == "zero" else None
        self._stats = JudgeStats()
        self._window: collections.deque = collections.deque(maxlen=self.failure_window)
        self._window_lock = threading.Lock()
        self._start_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: openai.AsyncOpenAI | None = None
        self._slots: asyncio.Semaphore | None = None
        self._sent: dict[int, float] = {}

    def _check(self) -> None:
        checks = {
            "base_url": self.local or bool(self.base_url),
            "scoring": self.scoring in SCORING,
            "on_failure": self.on_failure in ON_FAILURE,
            "yes_threshold": 0.0 <= self.yes_threshold <= 1.0,
            "max_concurrency": self.max_concurrency >= 1,
            "timeout_s": self.timeout_s > 0,
            "max_retries": self.max_retries >= 0,
            "max_failure_rate": 0.0 <= self.max_failure_rate <= 1.0,
            "failure_window": self.failure_window >= 1,
            "max_tokens": self.max_tokens >= 1,
            "top_logprobs": self.top_logprobs >= 1,
        }
        hints = {"scoring": f"one of {SCORING}", "on_failure": f"one of {ON_FAILURE}",
                 "base_url": "a URL such as http://127.0.0.1:8085/v1 (a vLLM server)"}
        for key, ok in checks.items():
            if not ok:
                raise ConfigError(f"judge.{key}: {getattr(self, key)!r} is not valid; expected "
                                  f"{hints.get(key, 'a value in range')}")
        parse_verdict("YES", self.parser)  # raises ConfigError naming judge.parser
        render_judge_prompt("p", "r", "q", self.template)  # raises ConfigError naming judge.template

    def _open_cache(self, cache: dict) -> JudgeCache | None:
        unknown = set(cache) - {"enabled", "path"}
        if unknown:
            raise ConfigError(f"judge.cache: unknown keys {sorted(unknown)}; expected enabled, path")
        if not cache.get("enabled", True):
            return None
        path = cache.get("path") or (self.cache_dir / "judge_cache.sqlite" if self.cache_dir else None)
        if path is None:
            raise ConfigError("judge.cache.path: missing (and no judge.cache_dir to put judge_cache.sqlite in)")
        return JudgeCache(path)

    # -- public API --------------------------------------------------------------------------------------------
    def score(self, items: list[JudgeItem]) -> list[float | None]:
        """The verdict per item: 1.0 YES, 0.0 NO (scoring=logprob: P(YES) >= judge.yes_threshold), None = failed."""
        return self._run(self._judge(list(items), verdicts=True))

    async def ascore(self, items: list[JudgeItem]) -> list[float | None]:
        """Awaitable `score` for callers that run their own event loop."""
        return await asyncio.wrap_future(self._submit(self._judge(list(items), verdicts=True)))

    def probabilities(self, items: list[JudgeItem]) -> list[float | None]:
        """scoring=logprob: P(YES)/(P(YES)+P(NO)) per item, before the threshold; scoring=text: the verdict."""
        return self._run(self._judge(list(items), verdicts=False))

    def prompt(self, item: JudgeItem) -> str:
        """The user message that asks for this item's verdict (judge.template, the prediction cleaned and cut)."""
        return render_judge_prompt(item.prediction, item.reference, item.question, self.template,
                                   self.max_prediction_chars)

    def verdict(self, reply: dict) -> float | None:
        """1.0 / 0.0 from a reply as `areply` returns it (judge.scoring, judge.parser, judge.yes_threshold); None when
        it holds no verdict."""
        value = self._value(reply)
        if value is None or self.scoring == "text":
            return value
        return 1.0 if value >= self.yes_threshold else 0.0

    async def areply(self, messages: list[dict], max_tokens: int | None = None) -> dict | None:
        """One chat turn (evaluation's conversations): {"text", "top_logprobs"} from the cache or the server, or None
        when it failed (counted; judge.on_failure=raise raises JudgeError instead)."""
        return await asyncio.wrap_future(self._submit(self._turn(messages, max_tokens)))

    def stats(self) -> dict[str, float]:
        """The cumulative counters (see JudgeStats)."""
        return self._stats.metrics()

    def start(self) -> "OpenAIJudge":
        """Resolve the endpoint and build the HTTP client (done at first use; LocalJudge starts its server here)."""
        with self._start_lock:
            if self._client is None:
                self._client = self._connect()
        return self

    def close(self) -> None:
        loop, self._loop = self._loop, None
        client, self._client = self._client, None
        if loop is not None:
            if client is not None:
                asyncio.run_coroutine_threadsafe(client.close(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(timeout=10)
            loop.close()
        self._slots = None  # bound to the closed loop; a later use starts afresh

    def __enter__(self) -> "OpenAIJudge":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the HTTP client ---------------------------------------------------------------------------------------
    def endpoint(self) -> str:
        """The server's base URL (LocalJudge: the node's llama.cpp server, started or joined)."""
        return self.base_url

    def _connect(self) -> openai.AsyncOpenAI:
        base_url = self.endpoint()
        self.concurrency = max(1, self.max_concurrency // processes_sharing(self.local))
        hooks = {"request": [self._request_sent], "response": [self._response_received]}
        return openai.AsyncOpenAI(base_url=base_url, api_key=self.api_key, timeout=self.timeout_s,
                                  max_retries=self.max_retries,
                                  http_client=openai.DefaultAsyncHttpxClient(event_hooks=hooks))

    async def _request_sent(self, request) -> None:
        self._sent[id(request)] = time.perf_counter()
        self._stats.add(requests=1)

    async def _response_received(self, response) -> None:
        started = self._sent.pop(id(response.request), None)
        if started is not None:
            self._stats.add(answered=1, latency_total_s=time.perf_counter() - started)

    def _submit(self, coro):
        self.start()
        if self._loop is None:
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=loop.run_forever, name="medix-judge-loop", daemon=True)
            self._thread.start()
            self._loop = loop
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def _run(self, coro):
        """Run on the judge's own event loop thread; blocks; works whether or not the caller runs a loop."""
        return self._submit(coro).result()

    def _params(self, max_tokens: int | None = None) -> dict:
        params: dict = {"temperature": self.temperature, "max_tokens": max_tokens or self.max_tokens}
        if self.scoring == "logprob":
            params.update(logprobs=True, top_logprobs=self.top_logprobs)
        if self.extra_body:
            params["extra_body"] = self.extra_body
        return params

    async def _request(self, messages: list[dict], params: dict) -> dict:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
        call = dict(params)
        extra_body = call.pop("extra_body", None)
        url = self._client.base_url
        async with self._slots:
            try:
                response = await self._client.chat.completions.create(
                    model=self.model, messages=messages, extra_body=extra_body, **call)
            except FATAL as err:
                raise JudgeError(f"judge server at {url} refused model {self.model!r}: {err}; check judge.model "
                                 "and judge.api_key") from err
            except openai.APIConnectionError as err:
                if not isinstance(err, openai.APITimeoutError) and not self._stats.answered:
                    raise JudgeError(f"judge server {url} is unreachable ({err}); {self._start_hint()}") from err
                raise JudgeFailure(f"{type(err).__name__} after {self.max_retries + 1} attempts to {url}: {err}") from err
            except openai.APIStatusError as err:
                raise JudgeFailure(f"{type(err).__name__} (HTTP {err.status_code}) from {url} after at most "
                                   f"{self.max_retries + 1} attempts: {err.message}") from err
        return reply_of(response)

    def _start_hint(self) -> str:
        return start_hint(self.model, str(self._client.base_url))

    # -- verdicts ----------------------------------------------------------------------------------------------
    async def _reply(self, key: str, messages: list[dict], params: dict) -> tuple[dict, bool]:
        """(reply, fresh): from the cache, else from the server (then cached). Raises JudgeFailure."""
        cached = self.cache.get(key) if self.cache is not None else None
        reply = json.loads(cached) if cached is not None else None
        if isinstance(reply, dict) and "text" in reply:
            self._stats.add(cache_hits=1)
            return reply, False
        reply = await self._request(messages, params)
        if self.cache is not None:
            self.cache.put(key, json.dumps(reply))
        return reply, True

    async def _judge(self, items: list[JudgeItem], verdicts: bool) -> list[float | None]:
        params = self._params()
        messages = [[{"role": "user", "content": self.prompt(item)}] for item in items]
        keys = [cache_key(self.model, m, params) for m in messages]
        unique: dict[str, list[dict]] = {}
        for key, m in zip(keys, messages):
            unique.setdefault(key, m)
        self._stats.add(items=len(items), cache_hits=len(items) - len(unique))  # in-batch duplicates go once
        tasks = {key: asyncio.ensure_future(self._item(key, m, params, verdicts)) for key, m in unique.items()}
        try:
            await asyncio.gather(*tasks.values())
        except BaseException:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            raise
        return [tasks[key].result() for key in keys]

    async def _item(self, key: str, messages: list[dict], params: dict, verdicts: bool) -> float | None:
        try:
            reply, fresh = await self._reply(key, messages, params)
        except JudgeFailure as failure:
            return self._failed(str(failure))
        value = self.verdict(reply) if verdicts else self._value(reply)
        if value is None:
            return self._failed(f"unusable judge reply {reply['text']!r} (judge.scoring={self.scoring}, "
                                f"judge.parser={self.parser})")
        if fresh:
            self._record(ok=True)
        return value

    async def _turn(self, messages: list[dict], max_tokens: int | None) -> dict | None:
        params = self._params(max_tokens)
        self._stats.add(items=1)
        try:
            reply, fresh = await self._reply(cache_key(self.model, messages, params), messages, params)
        except JudgeFailure as failure:
            self._failed(str(failure))
            return None
        if fresh:
            self._record(ok=True)
        return reply

    def _value(self, reply: dict) -> float | None:
        if self.scoring == "logprob":
            return None if reply.get("top_logprobs") is None else yes_probability(reply["top_logprobs"])
        return parse_verdict(reply["text"], self.parser)

    def _failed(self, reason: str) -> float | None:
        self._stats.add(failures=1)
        if self.on_failure == "raise":
            raise JudgeError(f"judge failed and judge.on_failure=raise: {reason}")
        self._record(ok=False, reason=reason)
        return self.failure_score

    def _record(self, ok: bool, reason: str = "") -> None:
        with self._window_lock:
            self._window.append(ok)
            if len(self._window) < self.failure_window:
                return
            rate = self._window.count(False) / len(self._window)
        if rate > self.max_failure_rate:
            raise JudgeError(
                f"judge failure rate {rate:.0%} over the last {self.failure_window} calls exceeds "
                f"judge.max_failure_rate={self.max_failure_rate} (last failure: {reason or 'n/a'}); check the judge "
                f"server at {self._client.base_url if self._client else self.base_url}")


def reply_of(response) -> dict:
    """{"text": ..., "top_logprobs": {token: logprob} | None} from a chat completion."""
    choice = response.choices[0]
    text = choice.message.content or ""
    top = None
    content = getattr(choice.logprobs, "content", None) if choice.logprobs is not None else None
    if content:
        top = {t.token: t.logprob for t in (content[0].top_logprobs or [])} or {content[0].token: content[0].logprob}
    return {"text": text, "top_logprobs": top}
