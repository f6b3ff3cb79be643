"""The evaluation judge: a multi-round conversation per item with an OpenAI-compatible server, cached in SQLite."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import openai

from medix.errors import JudgeError
from medix.eval.judge_protocol import (
    PARSE_RETRY,
    REEVALUATE,
    item_score,
    judge_prompt,
    judged_answer,
    parse_score,
    rounds_done,
)
from medix.judges.cache import JudgeCache, cache_key


@dataclass(frozen=True)
class ProtocolSettings:
    """`judge_protocol.*` of conf/eval.yaml."""

    rounds: int = 3
    max_parse_retries: int = 2
    parse_failure_score: float = 0.0
    max_tokens: int = 512
    prompt_suffix: str = ""
    max_prediction_chars: int | None = None  # longer answers reach the judge cut, with a mark


@dataclass
class Verdict:
    """The judge's verdict on one prediction: a score per round, the raw replies, and the final item score."""

    round_scores: list[float]
    replies: list[str]
    parse_failures: int  # rounds that fell back to parse_failure_score
    unparsed_replies: int  # every reply that could not be read, retried or not
    score: float


@dataclass
class JudgeCounters:
    calls: int = 0
    cache_hits: int = 0
    unparsed_replies: int = 0
    parse_failures: int = 0
    rounds: int = 0
    latency_s: float = 0.0
    items: int = 0

    def metrics(self) -> dict[str, float]:
        requests = self.calls + self.cache_hits
        return {
            "judge/calls": float(self.calls),
            "judge/cache_hits": float(self.cache_hits),
            "judge/cache_hit_rate": self.cache_hits / requests if requests else 0.0,
            "judge/unparsed_replies": float(self.unparsed_replies),
            "judge/parse_failures": float(self.parse_failures),
            "judge/rounds_per_item": self.rounds / self.items if self.items else 0.0,
            "judge/latency_s": self.latency_s / self.calls if self.calls else 0.0,
        }


class ConversationJudge:
    """Runs the paper's protocol: rounds in one conversation, re-evaluation prompts, bounded parse retries."""

    def __init__(self, client: openai.AsyncOpenAI, model: str, *, temperature: float, protocol: ProtocolSettings,
                 reasoning_tag: str, cache: JudgeCache | None = None, max_concurrency: int = 8):
        self.client = client
        self.model = model
        self.params = {"temperature": float(temperature), "max_tokens": int(protocol.max_tokens)}
        self.protocol = protocol
        self.reasoning_tag = reasoning_tag
        self.cache = cache
        self.counters = JudgeCounters()
        self._slots = asyncio.Semaphore(max_concurrency)

    async def judge(self, scoring: str, question: str, reference: str, prediction: str) -> Verdict:
        answer = judged_answer(prediction, self.reasoning_tag, self.protocol.max_prediction_chars)
        messages = [{"role": "user", "content": judge_prompt(scoring, question, reference, answer,
                                                            self.protocol.prompt_suffix)}]
        scores: list[float] = []
        replies: list[str] = []
        failures = unparsed = 0
        while not rounds_done(scoring, scores, self.protocol.rounds):
            if scores:
                messages.append({"role": "user", "content": REEVALUATE})
            score = None
            for attempt in range(self.protocol.max_parse_retries + 1):
                if attempt:
                    messages.append({"role": "user", "content": PARSE_RETRY})
                reply = await self._complete(messages)
                messages.append({"role": "assistant", "content": reply})
                replies.append(reply)
                score = parse_score(reply, scoring, self.reasoning_tag)
                if score is not None:
                    break
                unparsed += 1
            if score is None:
                failures += 1
                score = float(self.protocol.parse_failure_score)
            scores.append(score)
        self.counters.items += 1
        self.counters.rounds += len(scores)
        self.counters.parse_failures += failures
        self.counters.unparsed_replies += unparsed
        return Verdict(scores, replies, failures, unparsed, item_score(scoring, scores, self.protocol.rounds))

    async def _complete(self, messages: list[dict]) -> str:
        key = cache_key(self.model, messages, self.params)
        if self.cache is not None:
            cached = self.cache.get(key)
            if cached is not None:
                self.counters.cache_hits += 1
                return cached
        async with self._slots:
            started = time.perf_counter()
            try:
                response = await self.client.chat.completions.create(model=self.model, messages=messages, **self.params)
            except openai.OpenAIError as exc:
                raise JudgeError(
                    f"judge {self.model!r} at {self.client.base_url} failed: {exc.__class__.__name__}: {exc}. "
                    "Is the judge server running (judge.base_url)? Finished items are saved; rerun to resume."
                ) from exc
            self.counters.latency_s += time.perf_counter() - started
        self.counters.calls += 1
        reply = response.choices[0].message.content or ""
        if self.cache is not None:
            self.cache.put(key, reply)
        return reply
