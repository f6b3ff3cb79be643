"""The rule-based reward components (format, modality) and the answer guards shared by judge and embedding."""

from __future__ import annotations

import re
from functools import lru_cache

from medix.rewards.parsing import normalize_completion

INVALID_ANSWER_MARKERS = ("__", ":", "?")


@lru_cache(maxsize=16)
def _format_pattern(reasoning_tag: str) -> re.Pattern:
    tag = re.escape(reasoning_tag)
    return re.compile(rf"<{tag}>.*?</{tag}>\s*<answer>.*?</answer>", re.DOTALL)


def format_reward(completion: str, reasoning_tag: str = "thinking") -> float:
    """1.0 iff the text from the first `<tag>` on, stripped, is exactly `<tag>…</tag> <answer>…</answer>`."""
    normalized = normalize_completion(completion)
    start = normalized.find(f"<{reasoning_tag}>")
    if start == -1:
        return 0.0
    return 1.0 if _format_pattern(reasoning_tag).fullmatch(normalized[start:].strip()) else 0.0


def modality_reward(completion: str, solution_tag: str, reasoning_tag: str = "thinking") -> float:
    """1.0 iff the text before the first `<tag>`, stripped, equals `solution_tag` ignoring case."""
    normalized = normalize_completion(completion)
    start = normalized.find(f"<{reasoning_tag}>")
    if start == -1:
        return 0.0
    return 1.0 if normalized[:start].strip().upper() == solution_tag.upper() else 0.0


def is_invalid_answer(answer: str) -> bool:
    """An empty or one-character answer, or one containing `__`, `:` or `?`, is garbage and scores 0."""
    return len(answer) <= 1 or any(marker in answer for marker in INVALID_ANSWER_MARKERS)


def answer_shortcut(prediction: str, reference: str) -> float | None:
    """The accuracy score decided without a model: 0.0 for a garbage answer, 1.0 for an exact match, else None."""
    if is_invalid_answer(prediction):
        return 0.0
    if prediction == reference:
        return 1.0
    return None
