"""RuleJudge: no LLM; a deterministic normalised word-set match of prediction against reference."""

from __future__ import annotations

import re
import string
import time

ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = str.maketrans({ch: " " for ch in string.punctuation})


def normalized_words(text: str) -> frozenset[str]:
    """Lowercased words of `text` with punctuation and the articles a/an/the removed."""
    words = re.split(r"\s+", text.lower().translate(_PUNCTUATION))
    return frozenset(w for w in words if w and w not in ARTICLES)


def rule_match(prediction: str, reference: str) -> float:
    """1.0 iff every normalised word of the reference appears in the prediction (and the reference has words)."""
    ref = normalized_words(reference)
    return 1.0 if ref and ref <= normalized_words(prediction) else 0.0


class RuleJudge:
    """A judge with the Judge interface that never calls a model (for offline runs and as a baseline)."""

    name = "rule"

    def __init__(self):
        self._calls = 0
        self._seconds = 0.0

    def score(self, items) -> list[float | None]:
        started = time.perf_counter()
        scores: list[float | None] = [rule_match(item.prediction, item.reference) for item in items]
        self._calls += len(items)
        self._seconds += time.perf_counter() - started
        return scores

    def stats(self) -> dict[str, float]:
        return {
            "judge/calls": float(self._calls),
            "judge/cache_hit_rate": 0.0,
            "judge/failures": 0.0,
            "judge/latency_s": self._seconds / self._calls if self._calls else 0.0,
        }

    def close(self) -> None:
        pass

    def __enter__(self) -> "RuleJudge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
