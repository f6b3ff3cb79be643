"""The composite reward on real SLAKE and VQA-RAD items (read from /work/shared/benchmarks, never copied here)."""

import json
import os
from pathlib import Path

import pytest

from medix.rewards import CompositeReward
from medix.rewards.components import format_rewards, modality_rewards
from medix.rewards.embedding import EmbeddingReward
from medix.rewards.judge_reward import JudgeReward

BENCHMARKS = Path(os.environ.get("MEDIX_BENCHMARKS_DIR", "/work/shared/benchmarks"))
PAPER = {"llm_judge": 0.5175, "embedding": 0.3375, "modality": 0.045, "format": 0.1}


class CountingJudge:
    def __init__(self):
        self.items = []

    def score(self, items):
        self.items.extend(items)
        return [0.0] * len(items)

    def stats(self):
        return {"judge/requests": float(len(self.items))}


class CountingEmbedder:
    def __init__(self):
        self.pairs = []

    def similarity(self, a, b):
        self.pairs.extend(zip(a, b))
        return [0.0] * len(a)


def paper_reward(judge, embedder) -> CompositeReward:
    return CompositeReward(PAPER, {"llm_judge": JudgeReward(judge), "embedding": EmbeddingReward(embedder),
                                   "modality": modality_rewards, "format": format_rewards})


def tagged_items(name: str, limit: int = 200) -> list[dict]:
    path = BENCHMARKS / name / "test.jsonl"
    if not path.is_file():
        pytest.skip(f"benchmark file {path} is not on this machine")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if r["modality"] and r["answer"].strip()][:limit]


def spec_invalid(answer: str) -> bool:
    return len(answer) <= 1 or any(marker in answer for marker in ("__", ":", "?"))


@pytest.mark.parametrize("benchmark", ["slake", "vqa_rad"])
def test_gold_completions_score_without_any_model_call(benchmark):
    items = tagged_items(benchmark)
    judge, embedder = CountingJudge(), CountingEmbedder()
    completions = [f"<{r['modality']}>\n<thinking>\nReading the image.\n</thinking>\n<answer>{r['answer']}.</answer>"
                   for r in items]
    solutions = [f"<{r['modality']}> {r['answer']}" for r in items]
    batch = paper_reward(judge, embedder)(completions, solutions, questions=[r["question"] for r in items])
    assert judge.items == [] and embedder.pairs == []
    expected_accuracy = [0.0 if spec_invalid(r["answer"].strip().strip(".")) else 1.0 for r in items]
    assert batch.components["llm_judge"] == batch.components["embedding"] == expected_accuracy
    assert batch.components["format"] == batch.components["modality"] == [1.0] * len(items)
    assert batch.overall == pytest.approx([0.145 + 0.855 * a for a in expected_accuracy])


@pytest.mark.parametrize("benchmark", ["slake", "vqa_rad"])
def test_swapped_answers_reach_the_judge_once_each_when_valid_and_different(benchmark):
    items = tagged_items(benchmark)
    shifted = items[1:] + items[:1]
    completions = [f"<OTHER><thinking>r</thinking><answer>{s['answer']}</answer>" for s in shifted]
    solutions = [f"<{r['modality']}> {r['answer']}" for r in items]
    judge, embedder = CountingJudge(), CountingEmbedder()
    batch = paper_reward(judge, embedder)(completions, solutions, questions=[r["question"] for r in items])
    expected = [(s["answer"].strip().strip("."), r["answer"].strip().strip(".")) for s, r in zip(shifted, items)
                if not spec_invalid(s["answer"].strip().strip("."))
                and s["answer"].strip().strip(".") != r["answer"].strip().strip(".")]
    assert [(i.prediction, i.reference) for i in judge.items] == expected == embedder.pairs
    assert len(expected) > len(items) // 4  # real data: many pairs really need the judge
    assert batch.components["modality"] == [1.0 if r["modality"] == "OTHER" else 0.0 for r in items]
