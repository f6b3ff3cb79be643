"""The llm_judge component: the judge's strict YES/NO on each predicted answer against its reference."""

from __future__ import annotations

from medix.rewards.components import answers_to_score


class JudgeReward:
    """Garbage answers score 0 and exact matches 1 without a call; every other answer of the batch goes to the judge
    in one `score` call (None where the judge failed: left out, never silently 0)."""

    def __init__(self, judge):
        self.judge = judge

    def __call__(self, completions: list[str], solutions: list[str], *, questions: list[str | None] | None = None,
                 **columns) -> list[float | None]:
        from medix.judges import JudgeItem

        predictions, references, scores, open_rows = answers_to_score(completions, solutions)
        if open_rows:
            questions = questions if questions is not None else [None] * len(completions)
            items = [JudgeItem(questions[i], predictions[i], references[i]) for i in open_rows]
            for i, verdict in zip(open_rows, self.judge.score(items)):
                scores[i] = verdict
        return scores

    def stats(self) -> dict[str, float]:
        return self.judge.stats()

    def close(self) -> None:
        self.judge.close()
