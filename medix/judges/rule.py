"""RuleJudge: no LLM; a deterministic, negation-aware normalised word match of prediction against reference.

A prediction matches when it holds every normalised word of the reference *and* states the reference's findings with
the reference's polarity. `not pneumonia`, `no evidence of pneumonia`, `pneumonia is ruled out` and `without
pneumonia` hold every word of the reference `pneumonia` but deny it, so they score 0; `pneumothorax, no effusion`
does not match the reference `no pneumothorax`. The negation scopes: `medix/negation.py`.
"""

from __future__ import annotations

from medix.negation import negation_consistent, normalized_words


def rule_match(prediction: str, reference: str) -> float:
    """1.0 iff every normalised word of the reference appears in the prediction (and the reference has words) and the
    prediction does not negate the reference (`negation_consistent`)."""
    ref = normalized_words(reference)
    if not ref or not ref <= normalized_words(prediction):
        return 0.0
    return 1.0 if negation_consistent(prediction, reference) else 0.0


class RuleJudge:
    """A judge with the Judge interface that never calls a model (for offline runs and as a baseline)."""

    name = "rule"

    def __init__(self):
        self._items = 0

    def score(self, items) -> list[float | None]:
        scores: list[float | None] = [rule_match(item.prediction, item.reference) for item in items]
        self._items += len(items)
        return scores

    def stats(self) -> dict[str, float]:
        """The judge statistics of every judge; only `judge/items` moves (no requests, no cache)."""
        return {"judge/requests": 0.0, "judge/items": float(self._items), "judge/cache_hits": 0.0,
                "judge/failures": 0.0, "judge/latency_s": 0.0}

    def close(self) -> None:
        pass

    def __enter__(self) -> "RuleJudge":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
