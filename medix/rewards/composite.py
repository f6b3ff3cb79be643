"""The composite MediX-R1 reward: overall = Σ weights[c] · c over llm_judge, embedding, modality and format."""

from __future__ import annotations

import math
from dataclasses import dataclass

from medix.data.tags import split_solution
from medix.errors import ConfigError, DataError
from medix.rewards.components import answer_shortcut, format_reward, modality_reward
from medix.rewards.parsing import extract_answer, normalize_completion

COMPONENTS = ("llm_judge", "embedding", "modality", "format")
EMBEDDING_MODES = ("binary", "continuous")


@dataclass
class RewardBatch:
    """Per-completion component scores (None = not scored) and the weighted overall (None = excluded)."""

    components: dict[str, list[float | None]]
    overall: list[float | None]

    def metrics(self) -> dict[str, float]:
        """`reward/overall/mean|std` and `reward/<c>/mean|std` over the non-None values (population std)."""
        out: dict[str, float] = {}
        for name, values in [("overall", self.overall), *self.components.items()]:
            scored = [v for v in values if v is not None]
            if scored:
                mean = sum(scored) / len(scored)
                out[f"reward/{name}/mean"] = mean
                out[f"reward/{name}/std"] = math.sqrt(sum((v - mean) ** 2 for v in scored) / len(scored))
        return out


def weighted_overall(scores: dict[str, float | None], weights: dict[str, float]) -> float | None:
    """Σ weights[c] · scores[c]; None when a component with a positive weight is None (a failed judge call)."""
    total = 0.0
    for name, weight in weights.items():
        if weight == 0:
            continue
        if scores[name] is None:
            return None
        total += weight * scores[name]
    return total


def embedding_score(cosine: float, threshold: float, mode: str) -> float:
    """binary: 1.0 iff cosine >= threshold; continuous: cosine clipped to [0, 1]."""
    if mode == "continuous":
        return min(1.0, max(0.0, cosine))
    return 1.0 if cosine >= threshold else 0.0


class CompositeReward:
    """Scores a batch of completions against `"<TAG> answer"` solutions; one judge and one embedder call per batch."""

    def __init__(self, weights: dict[str, float], judge=None, embedder=None, *, embedding_threshold: float = 0.8,
                 embedding_mode: str = "binary", reasoning_tag: str = "thinking"):
        self.weights = validate_weights(weights)
        if self.weights["llm_judge"] > 0 and judge is None:
            raise ConfigError("reward.weights.llm_judge > 0 but no judge was given; set a judge or the weight to 0")
        if self.weights["embedding"] > 0 and embedder is None:
            raise ConfigError("reward.weights.embedding > 0 but no embedder was given; set one or the weight to 0")
        if embedding_mode not in EMBEDDING_MODES:
            raise ConfigError(f"reward.embedding_mode={embedding_mode!r}; expected one of {', '.join(EMBEDDING_MODES)}")
        if not 0.0 <= embedding_threshold <= 1.0:
            raise ConfigError(f"reward.embedding_threshold={embedding_threshold} must lie in [0, 1]")
        if not reasoning_tag or any(c in reasoning_tag for c in "<>/ \t\n"):
            raise ConfigError(f"reward.reasoning_tag={reasoning_tag!r} must be a bare tag name such as 'thinking'")
        self.judge = judge
        self.embedder = embedder
        self.embedding_threshold = embedding_threshold
        self.embedding_mode = embedding_mode
        self.reasoning_tag = reasoning_tag

    def __call__(self, completions: list[str], solutions: list[str],
                 questions: list[str | None] | None = None) -> RewardBatch:
        if len(completions) != len(solutions) or (questions is not None and len(questions) != len(completions)):
            raise ValueError("completions, solutions and questions must have the same length")
        questions = questions if questions is not None else [None] * len(completions)
        texts = [normalize_completion(c) for c in completions]
        truths = [self._split(i, s) for i, s in enumerate(solutions)]
        predictions = [extract_answer(t) for t in texts]
        shortcuts = [answer_shortcut(p, ref) for p, (_, ref) in zip(predictions, truths)]
        open_rows = [i for i, s in enumerate(shortcuts) if s is None]

        components: dict[str, list[float | None]] = {
            "llm_judge": self._judge_scores(open_rows, shortcuts, predictions, truths, questions),
            "embedding": self._embedding_scores(open_rows, shortcuts, predictions, truths),
            "modality": [modality_reward(t, tag, self.reasoning_tag) for t, (tag, _) in zip(texts, truths)],
            "format": [format_reward(t, self.reasoning_tag) for t in texts],
        }
        overall = [weighted_overall({c: components[c][i] for c in COMPONENTS}, self.weights)
                   for i in range(len(texts))]
        return RewardBatch(components=components, overall=overall)

    @staticmethod
    def _split(index: int, solution: str) -> tuple[str, str]:
        try:
            return split_solution(solution)
        except ValueError as err:
            raise DataError(f"reward input {index}: {err}") from err

    def _judge_scores(self, open_rows, shortcuts, predictions, truths, questions) -> list[float | None]:
        if self.weights["llm_judge"] == 0:
            return [None] * len(shortcuts)
        from medix.judges import JudgeItem

        scores: list[float | None] = list(shortcuts)
        if open_rows:
            items = [JudgeItem(question=questions[i], prediction=predictions[i], reference=truths[i][1])
                     for i in open_rows]
            for i, verdict in zip(open_rows, self.judge.score(items)):
                scores[i] = verdict
        return scores

    def _embedding_scores(self, open_rows, shortcuts, predictions, truths) -> list[float | None]:
        if self.weights["embedding"] == 0:
            return [None] * len(shortcuts)
        scores: list[float | None] = list(shortcuts)
        if open_rows:
            cosines = self.embedder.similarity([predictions[i] for i in open_rows], [truths[i][1] for i in open_rows])
            for i, cosine in zip(open_rows, cosines):
                scores[i] = embedding_score(cosine, self.embedding_threshold, self.embedding_mode)
        return scores


def validate_weights(weights) -> dict[str, float]:
    """The four component weights as floats; ConfigError naming a missing, unknown, non-numeric or negative key."""
    given = dict(weights or {})
    for key in given:
        if key not in COMPONENTS:
            raise ConfigError(f"reward.weights.{key} is not a reward component; expected keys {', '.join(COMPONENTS)}")
    out: dict[str, float] = {}
    for key in COMPONENTS:
        if key not in given or given[key] is None:
            raise ConfigError(f"reward.weights.{key} is missing; give all of {', '.join(COMPONENTS)} (0 disables one)")
        try:
            out[key] = float(given[key])
        except (TypeError, ValueError):
            raise ConfigError(f"reward.weights.{key}={given[key]!r} is not a number") from None
        if out[key] < 0 or not math.isfinite(out[key]):
            raise ConfigError(f"reward.weights.{key}={given[key]!r} must be a finite number >= 0")
    return out


def build_reward(reward_cfg, judge=None, embedder=None) -> CompositeReward:
    """A CompositeReward from a `reward/*.yaml` config and the run's judge and embedder (None where weight is 0)."""
    return CompositeReward(
        reward_cfg.get("weights"), judge, embedder,
        embedding_threshold=float(reward_cfg.get("embedding_threshold", 0.8)),
        embedding_mode=str(reward_cfg.get("embedding_mode", "binary")),
        reasoning_tag=str(reward_cfg.get("reasoning_tag", "thinking")),
    )
