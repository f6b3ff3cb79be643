"""LLM judges (does a prediction match the reference?), each built by `hydra.utils.instantiate(cfg.judge)` from
`conf/judge/<name>.yaml`: OpenAIJudge (any OpenAI-compatible server), LocalJudge (llama.cpp started by medix), RuleJudge
(no model)."""

from __future__ import annotations

from typing import Protocol

from medix.judges.client import JudgeItem, OpenAIJudge
from medix.judges.local import LocalJudge
from medix.judges.rule import RuleJudge

__all__ = ["Judge", "JudgeItem", "LocalJudge", "OpenAIJudge", "RuleJudge"]


class Judge(Protocol):
    """What the reward, medix.score and the evaluation need from any judge."""

    def score(self, items: list[JudgeItem]) -> list[float | None]: ...
    def stats(self) -> dict[str, float]: ...
    def close(self) -> None: ...
    def __enter__(self) -> "Judge": ...
    def __exit__(self, *exc) -> None: ...
