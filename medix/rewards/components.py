"""The rule-based reward components (format, modality) and the answer guards shared by judge and embedding.

Every reward component has one contract (TRL's): `fn(completions, solutions, **columns) -> list[float | None]`, one
value per completion (None = not scored, left out of the group baseline); `solutions` are `"<TAG> answer"`; columns
are extra per-completion lists by name (`questions`, `ids`, or any JSONL field given to medix.score).
"""

from __future__ import annotations

import re
from functools import lru_cache

from medix.data.tags import split_solution
from medix.errors import ConfigError, DataError
from medix.rewards.parsing import extract_answer, normalize_completion, reference_parts

INVALID_ANSWER_MARKERS = ("__", ":", "?")


@lru_cache(maxsize=16)
def _format_pattern(reasoning_tag: str) -> re.Pattern:
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", reasoning_tag or ""):
        raise ConfigError(f"reasoning_tag={reasoning_tag!r}; expected a bare tag name such as 'thinking' or 'think'")
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
    """1.0 iff the text before the first `<tag>`, stripped, equals `solution_tag` (as `reference_parts` reads it)
    ignoring case."""
    _format_pattern(reasoning_tag)  # checks the tag name
    normalized = normalize_completion(completion)
    start = normalized.find(f"<{reasoning_tag}>")
    if start == -1:
        return 0.0
    return 1.0 if normalized[:start].strip().upper() == solution_tag.upper() else 0.0


def format_rewards(completions: list[str], solutions: list[str], *, reasoning_tag: str = "thinking",
                   **columns) -> list[float]:
    """The format component: `format_reward` of each completion."""
    return [format_reward(c, reasoning_tag) for c in completions]


def modality_rewards(completions: list[str], solutions: list[str], *, reasoning_tag: str = "thinking",
                     **columns) -> list[float]:
    """The modality component: does each completion open with its solution's modality tag?"""
    split_solutions(solutions)  # a solution without a known "<TAG> " prefix is a DataError naming the row
    return [modality_reward(c, reference_parts(s)[0], reasoning_tag) for c, s in zip(completions, solutions)]


def split_solutions(solutions: list[str]) -> list[tuple[str, str]]:
    """('<TAG>', answer) of every solution; DataError naming the first one without a tag."""
    out = []
    for index, solution in enumerate(solutions):
        try:
            out.append(split_solution(solution))
        except ValueError as err:
            raise DataError(f"reward input {index}: {err}") from err
    return out


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


def answers_to_score(completions: list[str], solutions: list[str]):
    """For the model-scored components: (predicted answers, reference answers, scores decided without a model,
    the rows that still need the model)."""
    split_solutions(solutions)
    predictions = [extract_answer(c) for c in completions]
    references = [reference_parts(s)[1] for s in solutions]
    shortcuts = [answer_shortcut(p, r) for p, r in zip(predictions, references)]
    return predictions, references, shortcuts, [i for i, s in enumerate(shortcuts) if s is None]
