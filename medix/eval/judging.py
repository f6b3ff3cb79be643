"""The evaluation judge: the paper's multi-round conversation per item, on the same judge client as training (its
template, parser, scoring, timeouts, retries, failure policy, cache and concurrency)."""

from __future__ import annotations

from dataclasses import dataclass

from medix.errors import ConfigError
from medix.eval.judge_protocol import (
    PARSE_RETRY,
    REEVALUATE,
    VERDICT_RETRY,
    item_score,
    judge_prompt,
    judged_answer,
    parse_score,
    rounds_done,
    strip_reasoning,
)
from medix.judges.client import JudgeItem

PROMPTS = ("paper", "judge")


@dataclass(frozen=True)
class ProtocolSettings:
    """`judge_protocol.*` of conf/eval.yaml."""

    rounds: int
    max_parse_retries: int
    parse_failure_score: float
    max_tokens: int
    prompt_suffix: str
    prompt: str

    def __post_init__(self):
        if self.prompt not in PROMPTS:
            raise ConfigError(f"judge_protocol.prompt: {self.prompt!r} is not one of {PROMPTS}")
        if self.rounds < 1 or self.max_parse_retries < 0:
            raise ConfigError(f"judge_protocol: rounds={self.rounds} must be >= 1 and max_parse_retries="
                              f"{self.max_parse_retries} >= 0")


@dataclass
class Verdict:
    """The judge's verdict on one prediction: a score per round, the raw replies, and the final item score."""

    round_scores: list[float]
    replies: list[str]
    parse_failures: int  # rounds that fell back to parse_failure_score
    unparsed_replies: int  # every reply that could not be read, retried or not
    score: float
    judge_failed: bool = False  # a request failed and judge.on_failure=zero scored the item 0


@dataclass
class ProtocolCounters:
    items: int = 0
    rounds: int = 0
    parse_failures: int = 0
    unparsed_replies: int = 0

    def metrics(self) -> dict[str, float]:
        return {
            "judge/rounds_per_item": self.rounds / self.items if self.items else 0.0,
            "judge/parse_failures": float(self.parse_failures),
            "judge/unparsed_replies": float(self.unparsed_replies),
        }


class ConversationJudge:
    """Runs the paper's protocol on a judge client (`OpenAIJudge.areply`): rounds in one conversation, re-evaluation
    prompts, bounded re-asks for an unreadable reply. judge_protocol.prompt=paper asks for the paper's JSON score;
    prompt=judge asks binary tasks with the judge's own YES/NO prompt and reads each round as training does
    (judge.template, judge.parser or judge.scoring=logprob with judge.yes_threshold)."""

    def __init__(self, client, protocol: ProtocolSettings, reasoning_tag: str):
        self.client = client
        self.protocol = protocol
        self.reasoning_tag = reasoning_tag
        self.counters = ProtocolCounters()

    async def judge(self, scoring: str, question: str, reference: str, prediction: str) -> Verdict | None:
        """The verdict, or None when a request failed and judge.on_failure=exclude (the item stays unjudged)."""
        own_prompt = self.protocol.prompt == "judge" and scoring == "binary"
        if own_prompt:
            first = self.client.prompt(JudgeItem(question, strip_reasoning(prediction, self.reasoning_tag), reference))
            max_tokens, retry = None, VERDICT_RETRY
        else:
            answer = judged_answer(prediction, self.reasoning_tag, self.client.max_prediction_chars)
            first = judge_prompt(scoring, question, reference, answer, self.protocol.prompt_suffix)
            max_tokens, retry = self.protocol.max_tokens, PARSE_RETRY
        messages = [{"role": "user", "content": first}]
        scores: list[float] = []
        replies: list[str] = []
        failures = unparsed = 0
        while not rounds_done(scoring, scores, self.protocol.rounds):
            if scores:
                messages.append({"role": "user", "content": REEVALUATE})
            score = None
            for attempt in range(self.protocol.max_parse_retries + 1):
                if attempt:
                    messages.append({"role": "user", "content": retry})
                reply = await self.client.areply(messages, max_tokens=max_tokens)
                if reply is None:  # failed after the client's retries; counted in judge/failures
                    if self.client.failure_score is None:
                        return None
                    return Verdict(scores, replies, failures, unparsed, float(self.client.failure_score), True)
                messages.append({"role": "assistant", "content": reply["text"]})
                replies.append(reply["text"])
                score = self.client.verdict(reply) if own_prompt else parse_score(reply["text"], scoring,
                                                                                 self.reasoning_tag)
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

    def metrics(self) -> dict[str, float]:
        return {**self.client.stats(), **self.counters.metrics()}


class RuleVerdicts:
    """A judge without conversations (judge=rule, or any `score`-only judge): one verdict per item, no rounds."""

    def __init__(self, client, reasoning_tag: str):
        self.client = client
        self.reasoning_tag = reasoning_tag

    async def judge(self, scoring: str, question: str, reference: str, prediction: str) -> Verdict | None:
        [score] = self.client.score([JudgeItem(question, strip_reasoning(prediction, self.reasoning_tag), reference)])
        if score is None:
            return None
        return Verdict([float(score)], [], 0, 0, float(score))

    def metrics(self) -> dict[str, float]:
        return self.client.stats()
