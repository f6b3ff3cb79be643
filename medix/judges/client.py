"""Async judge client for any OpenAI-compatible server: concurrency cap, timeout, retries, SQLite cache, failure policy."""

from __future__ import annotations

import asyncio
import collections
import json
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import openai

from medix.errors import ConfigError, JudgeError
from medix.judges.cache import JudgeCache, cache_key
from medix.judges.prompts import parse_verdict, render_judge_prompt, yes_probability

ON_FAILURE = ("exclude", "zero", "raise")
SCORING = ("text", "logprob")
RETRYABLE = (openai.APIConnectionError, openai.InternalServerError, openai.RateLimitError)  # timeouts included
FATAL = (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError)


@dataclass(frozen=True)
class JudgeItem:
    """One thing to judge: does `prediction` match `reference` (for `question`, which may be None)?"""

    question: str | None
    prediction: str
    reference: str


@dataclass
class ClientSettings:
    """Everything an OpenAIJudge reads from `conf/judge/*.yaml` (see there for the meaning of each key)."""

    model: str
    base_url: str
    api_key: str = "EMPTY"
    temperature: float = 0.0
    max_tokens: int = 4
    scoring: str = "text"
    parser: str = "strict"
    top_logprobs: int = 10
    template: str | None = None
    max_prediction_chars: int | None = 2000
    max_concurrency: int = 8
    timeout_s: float = 30.0
    max_retries: int = 3
    retry_backoff_s: float = 0.5
    on_failure: str = "exclude"
    max_failure_rate: float = 0.5
    failure_window: int = 50
    extra_body: dict | None = None
    start_hint: str | None = None

    def __post_init__(self):
        checks = {
            "scoring": self.scoring in SCORING,
            "on_failure": self.on_failure in ON_FAILURE,
            "max_concurrency": self.max_concurrency >= 1,
            "timeout_s": self.timeout_s > 0,
            "max_retries": self.max_retries >= 0,
            "max_failure_rate": 0.0 <= self.max_failure_rate <= 1.0,
            "failure_window": self.failure_window >= 1,
            "max_tokens": self.max_tokens >= 1,
        }
        allowed = {"scoring": SCORING, "on_failure": ON_FAILURE}
        for key, ok in checks.items():
            if not ok:
                hint = f"one of {allowed[key]}" if key in allowed else "a value in range"
                raise ConfigError(f"judge.{key}: {getattr(self, key)!r} is not valid; expected {hint}")
        parse_verdict("YES", self.parser)  # raises ConfigError naming judge.parser


def start_hint(model: str, base_url: str) -> str:
    """How to bring up the judge server that `base_url` points at."""
    url = urlparse(base_url)
    if url.hostname in ("127.0.0.1", "localhost", "0.0.0.0"):
        return f"start it with `vllm serve {model} --port {url.port or 8000}` (or point judge.base_url elsewhere)"
    return "check judge.base_url, the network and the API key"


@dataclass
class _Stats:
    calls: int = 0
    cache_hits: int = 0
    failures: int = 0
    http_requests: int = 0
    latency_total_s: float = 0.0
    judged: int = 0
    succeeded_once: bool = False
    window: collections.deque = field(default_factory=collections.deque)


class _Failure(Exception):
    """One item could not be judged (after retries)."""


class OpenAIJudge:
    """Scores JudgeItems with an LLM behind an OpenAI-compatible chat endpoint; 1.0 = YES, 0.0 = NO."""

    def __init__(self, settings: ClientSettings, cache: JudgeCache | None = None):
        self.settings = settings
        self.cache = cache
        self._stats = _Stats(window=collections.deque(maxlen=settings.failure_window))
        self._stats_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: openai.AsyncOpenAI | None = None
        self._semaphore: asyncio.Semaphore | None = None

    # -- public API --------------------------------------------------------------------------------------------
    def score(self, items: list[JudgeItem]) -> list[float | None]:
        """Judge a batch; blocks; safe to call whether or not an event loop runs in this thread."""
        future = asyncio.run_coroutine_threadsafe(self._score(list(items)), self._private_loop())
        return future.result()

    async def ascore(self, items: list[JudgeItem]) -> list[float | None]:
        """Awaitable `score` for callers that run their own event loop."""
        future = asyncio.run_coroutine_threadsafe(self._score(list(items)), self._private_loop())
        return await asyncio.wrap_future(future)

    def stats(self) -> dict[str, float]:
        """Cumulative counters: judge/calls, judge/cache_hit_rate, judge/failures, judge/latency_s (mean per request)."""
        with self._stats_lock:
            s = self._stats
            return {
                "judge/calls": float(s.calls),
                "judge/cache_hit_rate": s.cache_hits / s.calls if s.calls else 0.0,
                "judge/failures": float(s.failures),
                "judge/latency_s": s.latency_total_s / s.judged if s.judged else 0.0,
                "judge/http_requests": float(s.http_requests),
            }

    def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        if self._client is not None:
            asyncio.run_coroutine_threadsafe(self._client.close(), loop).result(timeout=10)
            self._client = None
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        loop.close()

    def __enter__(self) -> "OpenAIJudge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals -----------------------------------------------------------------------------------------------
    def _private_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=loop.run_forever, name="medix-judge-loop", daemon=True)
            self._thread.start()
            self._loop = loop
        return self._loop

    def _request_params(self) -> dict:
        s = self.settings
        params: dict = {"temperature": s.temperature, "max_tokens": s.max_tokens}
        if s.scoring == "logprob":
            params.update(logprobs=True, top_logprobs=s.top_logprobs)
        if s.extra_body:
            params["extra_body"] = s.extra_body
        return params

    def _messages(self, item: JudgeItem) -> list[dict]:
        s = self.settings
        prompt = render_judge_prompt(item.prediction, item.reference, item.question, s.template, s.max_prediction_chars)
        return [{"role": "user", "content": prompt}]

    async def _score(self, items: list[JudgeItem]) -> list[float | None]:
        if self._client is None:
            s = self.settings
            self._client = openai.AsyncOpenAI(base_url=s.base_url, api_key=s.api_key, timeout=s.timeout_s, max_retries=0)
            self._semaphore = asyncio.Semaphore(s.max_concurrency)
        params = self._request_params()
        messages = [self._messages(item) for item in items]
        keys = [cache_key(self.settings.model, m, params) for m in messages]
        unique: dict[str, list[dict]] = {}
        for key, m in zip(keys, messages):
            unique.setdefault(key, m)
        with self._stats_lock:
            self._stats.calls += len(items)
            self._stats.cache_hits += len(items) - len(unique)  # in-batch duplicates are served once
        tasks = {key: asyncio.ensure_future(self._verdict(key, m, params)) for key, m in unique.items()}
        try:
            await asyncio.gather(*tasks.values())
        except BaseException:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
            raise
        return [tasks[key].result() for key in keys]

    async def _verdict(self, key: str, messages: list[dict], params: dict) -> float | None:
        cached = self.cache.get(key) if self.cache is not None else None
        if cached is not None:
            with self._stats_lock:
                self._stats.cache_hits += 1
            reply = json.loads(cached)
        else:
            try:
                reply = await self._request(messages, params)
            except _Failure as failure:
                return self._on_failure(str(failure))
            if self.cache is not None:
                self.cache.put(key, json.dumps(reply))
        score = self._score_reply(reply)
        if score is None:
            return self._on_failure(f"unusable judge reply {reply['text']!r} (judge.scoring={self.settings.scoring}, "
                                    f"judge.parser={self.settings.parser})")
        if cached is None:
            self._record(ok=True)
        return score

    def _score_reply(self, reply: dict) -> float | None:
        if self.settings.scoring == "logprob":
            return None if reply.get("top_logprobs") is None else yes_probability(reply["top_logprobs"])
        return parse_verdict(reply["text"], self.settings.parser)

    async def _request(self, messages: list[dict], params: dict) -> dict:
        s = self.settings
        call = dict(params)
        extra_body = call.pop("extra_body", None)
        last_error: Exception | None = None
        for attempt in range(s.max_retries + 1):
            if attempt:
                await asyncio.sleep(s.retry_backoff_s * 2 ** (attempt - 1))
            assert self._semaphore is not None and self._client is not None
            async with self._semaphore:
                started = time.perf_counter()
                with self._stats_lock:
                    self._stats.http_requests += 1
                try:
                    response = await self._client.chat.completions.create(
                        model=s.model, messages=messages, extra_body=extra_body, **call
                    )
                except FATAL as err:
                    raise JudgeError(f"judge server at {s.base_url} refused model {s.model!r}: {err}; check judge.model "
                                     "and judge.api_key") from err
                except RETRYABLE as err:
                    last_error = err
                    continue
                except openai.APIStatusError as err:  # other 4xx: retrying will not help
                    raise _Failure(f"HTTP {err.status_code} from {s.base_url}: {err.message}") from err
            with self._stats_lock:
                self._stats.latency_total_s += time.perf_counter() - started
                self._stats.judged += 1
                self._stats.succeeded_once = True
            return reply_of(response)
        if isinstance(last_error, openai.APIConnectionError) and not isinstance(last_error, openai.APITimeoutError):
            with self._stats_lock:
                never_reached = not self._stats.succeeded_once
            if never_reached:
                hint = s.start_hint or start_hint(s.model, s.base_url)
                raise JudgeError(f"judge server {s.base_url} is unreachable ({last_error}); {hint}")
        raise _Failure(f"{type(last_error).__name__} after {s.max_retries + 1} attempts to {s.base_url}: {last_error}")

    def _on_failure(self, reason: str) -> float | None:
        s = self.settings
        with self._stats_lock:
            self._stats.failures += 1
        if s.on_failure == "raise":
            raise JudgeError(f"judge failed and judge.on_failure=raise: {reason}")
        self._record(ok=False, reason=reason)
        return None if s.on_failure == "exclude" else 0.0

    def _record(self, ok: bool, reason: str = "") -> None:
        s = self.settings
        with self._stats_lock:
            window = self._stats.window
            window.append(ok)
            if len(window) < s.failure_window:
                return
            rate = window.count(False) / len(window)
        if rate > s.max_failure_rate:
            raise JudgeError(
                f"judge failure rate {rate:.0%} over the last {len(window)} calls exceeds judge.max_failure_rate="
                f"{s.max_failure_rate} (last failure: {reason or 'n/a'}); check the judge server at {s.base_url}"
            )


def reply_of(response) -> dict:
    """{"text": ..., "top_logprobs": {token: logprob} | None} from a chat completion."""
    choice = response.choices[0]
    text = choice.message.content or ""
    top = None
    content = getattr(choice.logprobs, "content", None) if choice.logprobs is not None else None
    if content:
        top = {t.token: t.logprob for t in (content[0].top_logprobs or [])} or {content[0].token: content[0].logprob}
    return {"text": text, "top_logprobs": top}
