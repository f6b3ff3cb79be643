"""The llm_judge component: the judge's verdict on each predicted answer against its reference."""

from __future__ import annotations

import asyncio

from medix.errors import ConfigError
from medix.rewards.components import answers_to_score

# MediX-R1 training/examples/reward_function/medical.py create_prompt, verbatim (reward.semantics=paper).
PAPER_PROMPT = """You are a helpful assistant.
Given a predicted answer and the ground truth answer, respond with exactly "YES" if the content matches, otherwise respond with "NO".
Start your response with "YES" or "NO" in uppercase.

Predicted:{prediction}
Ground Truth:{reference}
"""
PAPER_MAX_TOKENS = 4


def paper_verdict(reply: dict | None) -> float:
    """medical.py's llm_answer_match: 1.0 iff "YES" is in the reply (upper-cased); 0.0 for any other or no reply."""
    return 1.0 if reply is not None and "YES" in reply["text"].strip().upper() else 0.0


class JudgeReward:
    """Garbage answers score 0 and exact matches 1 without a call; every other answer of the batch goes to the judge
    in one batch. semantics=medix: the judge's `score` (None where it failed: left out, never silently 0);
    semantics=paper: medical.py's prompt and reading, a failed call 0 (see medix.config.RewardConfig)."""

    def __init__(self, judge, semantics: str = "medix"):
        if semantics == "paper" and not callable(getattr(judge, "areply", None)):
            raise ConfigError(f"reward.semantics=paper asks the judge in chat turns; {type(judge).__name__} has none "
                              "(use an LLM judge: judge=qwen, local, openai)")
        self.judge = judge
        self.semantics = semantics

    def __call__(self, completions: list[str], solutions: list[str], *, questions: list[str | None] | None = None,
                 **columns) -> list[float | None]:
        from medix.judges import JudgeItem

        predictions, references, scores, open_rows = answers_to_score(completions, solutions)
        if open_rows:
            if self.semantics == "paper":
                verdicts = asyncio.run(self.paper_verdicts([(predictions[i], references[i]) for i in open_rows]))
            else:
                questions = questions if questions is not None else [None] * len(completions)
                verdicts = self.judge.score([JudgeItem(questions[i], predictions[i], references[i])
                                             for i in open_rows])
            for i, verdict in zip(open_rows, verdicts):
                scores[i] = verdict
        return scores

    async def paper_verdicts(self, pairs: list[tuple[str, str]]) -> list[float]:
        """medical.py's judge call per (answer, reference), through the judge client (cache, concurrency, retries)."""
        async def ask(prediction: str, reference: str) -> float:
            prompt = PAPER_PROMPT.format(prediction=prediction, reference=reference)
            reply = await self.judge.areply([{"role": "user", "content": prompt}], max_tokens=PAPER_MAX_TOKENS)
            return paper_verdict(reply)

        return list(await asyncio.gather(*(ask(p, r) for p, r in pairs)))

    def stats(self) -> dict[str, float]:
        return self.judge.stats()

    def close(self) -> None:
        self.judge.close()
