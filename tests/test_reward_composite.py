"""CompositeReward: guards and identity skip model calls, one batched judge/embedder call, weights, None handling,
the plugin contract, and the reward yaml files as composed and built by Hydra."""

import math
import sys
from functools import partial
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from medix.config import register_configs
from medix.instantiate import build
from medix.errors import ConfigError, DataError
from medix.rewards import CompositeReward, RewardBatch
from medix.rewards.components import format_rewards, modality_rewards
from medix.rewards.composite import validate_weights, weighted_overall
from medix.rewards.embedding import EmbeddingReward, embedding_score
from medix.rewards.judge_reward import JudgeReward
from medix.rewards.statistics import RewardStatistics, reward_metrics

CONF = Path(__file__).resolve().parents[1] / "conf"
PAPER = {"llm_judge": 0.5175, "embedding": 0.3375, "modality": 0.045, "format": 0.1}


class RecordingJudge:
    """A Judge (score/stats/close) whose verdict is a function of the item; records every score() call."""

    def __init__(self, verdict=lambda item: 1.0 if item.prediction.lower() == item.reference.lower() else 0.0):
        self.verdict = verdict
        self.calls: list[list] = []
        self.closed = False

    def score(self, items):
        self.calls.append(list(items))
        return [self.verdict(item) for item in items]

    def stats(self):
        return {"judge/items": float(sum(len(c) for c in self.calls))}

    def close(self):
        self.closed = True


class RecordingEmbedder:
    """An Embedder whose cosine is a function of the pair; records every similarity() call."""

    def __init__(self, cosine=lambda a, b: 0.9 if a.lower() == b.lower() else 0.1):
        self.cosine = cosine
        self.calls: list[tuple[list, list]] = []

    def similarity(self, a, b):
        self.calls.append((list(a), list(b)))
        return [self.cosine(x, y) for x, y in zip(a, b)]


def completion(answer, tag="<X_RAY>", reasoning="thinking"):
    return f"{tag}<{reasoning}>Look at the image.</{reasoning}><answer>{answer}</answer>"


def make(weights=PAPER, judge=None, embedder=None, threshold=0.8, mode="binary", reasoning_tag="thinking"):
    return CompositeReward(weights, {
        "llm_judge": JudgeReward(judge or RecordingJudge()),
        "embedding": EmbeddingReward(embedder or RecordingEmbedder(), threshold=threshold, mode=mode),
        "modality": partial(modality_rewards, reasoning_tag=reasoning_tag),
        "format": partial(format_rewards, reasoning_tag=reasoning_tag),
    })


def test_all_components_and_overall_for_a_perfect_and_a_wrong_answer():
    judge, embedder = RecordingJudge(), RecordingEmbedder()
    batch = make(judge=judge, embedder=embedder)(
        [completion("pneumothorax"), "no tags, just Pneumonia"], ["<X_RAY> Pneumothorax", "<CT_SCAN> Pneumothorax"])
    assert batch.components == {
        "llm_judge": [1.0, 0.0], "embedding": [1.0, 0.0], "modality": [1.0, 0.0], "format": [1.0, 0.0]}
    assert batch.overall[0] == pytest.approx(1.0)
    assert batch.overall[1] == 0.0
    assert [i.prediction for i in judge.calls[0]] == ["pneumothorax", "no tags, just Pneumonia"]
    assert [i.reference for i in judge.calls[0]] == ["Pneumothorax", "Pneumothorax"]


def test_invalid_and_identical_answers_never_reach_judge_or_embedder():
    judge, embedder = RecordingJudge(), RecordingEmbedder()
    answers = ["", "B", "see __", "Dx: pneumonia", "pneumonia?", "Pneumothorax", "Pneumothorax.", "pneumonia"]
    batch = make(judge=judge, embedder=embedder)([completion(a) for a in answers], ["<X_RAY> Pneumothorax."] * 8)
    assert batch.components["llm_judge"] == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert batch.components["embedding"] == [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert len(judge.calls) == 1 and [i.prediction for i in judge.calls[0]] == ["pneumonia"]
    assert embedder.calls == [(["pneumonia"], ["Pneumothorax"])]


def test_a_batch_with_nothing_to_judge_makes_no_call_at_all():
    judge, embedder = RecordingJudge(), RecordingEmbedder()
    batch = make(judge=judge, embedder=embedder)([completion("x"), completion("Edema")], ["<X_RAY> Edema"] * 2)
    assert judge.calls == [] and embedder.calls == []
    assert batch.components["llm_judge"] == [0.0, 1.0]


def test_whole_batch_goes_in_one_judge_call_and_one_embedder_call_in_order():
    judge, embedder = RecordingJudge(), RecordingEmbedder()
    answers = [f"finding {i}" for i in range(7)]
    questions = [f"q{i}" for i in range(7)]
    make(judge=judge, embedder=embedder)([completion(a) for a in answers], ["<MRI_SCAN> finding 3"] * 7,
                                         questions=questions)
    assert len(judge.calls) == 1 and len(embedder.calls) == 1
    assert [i.prediction for i in judge.calls[0]] == [a for a in answers if a != "finding 3"]
    assert [i.question for i in judge.calls[0]] == [q for q in questions if q != "q3"]
    assert embedder.calls[0][0] == [a for a in answers if a != "finding 3"]


def test_questions_default_to_none_for_the_judge():
    judge = RecordingJudge()
    make(judge=judge)([completion("edema")], ["<X_RAY> effusion"])
    assert judge.calls[0][0].question is None


def test_judge_failure_gives_none_and_excludes_overall_only_where_it_failed():
    judge = RecordingJudge(lambda item: None if item.prediction == "flaky" else 1.0)
    batch = make(judge=judge)([completion("flaky"), completion("fine")], ["<X_RAY> Edema"] * 2)
    assert batch.components["llm_judge"] == [None, 1.0]
    assert batch.overall[0] is None and batch.overall[1] is not None
    assert batch.components["format"] == [1.0, 1.0]


def test_a_zero_weight_component_is_never_called_and_scores_none():
    judge, embedder = RecordingJudge(lambda item: None), RecordingEmbedder()
    batch = make({"llm_judge": 0.0, "embedding": 0.9, "modality": 0.0, "format": 0.1}, judge, embedder)(
        [completion("edema")], ["<X_RAY> Effusion"])
    assert judge.calls == [] and len(embedder.calls) == 1
    assert batch.components["llm_judge"] == [None] and batch.components["modality"] == [None]
    assert batch.overall == [pytest.approx(0.1)]  # embedding 0 (cosine 0.1) + format 1 x 0.1


def test_overall_is_the_weighted_sum_of_components():
    weights = {"llm_judge": 0.2, "embedding": 0.3, "modality": 0.4, "format": 0.1}
    batch = make(weights, RecordingJudge(lambda item: 1.0), RecordingEmbedder(lambda a, b: 0.0))(
        ["<X_RAY><thinking>r</thinking> <answer>Edema</answer> extra"], ["<x_ray> Effusion"])
    assert batch.components == {"llm_judge": [1.0], "embedding": [0.0], "modality": [1.0], "format": [0.0]}
    assert batch.overall == [pytest.approx(0.2 + 0.4)]


def test_weighted_overall_none_rule():
    scores = {"llm_judge": None, "embedding": 1.0, "modality": 1.0, "format": 0.0}
    assert weighted_overall(scores, PAPER) is None
    assert weighted_overall(scores, {**PAPER, "llm_judge": 0.0}) == pytest.approx(0.3375 + 0.045)


def test_embedding_threshold_and_continuous_mode():
    assert embedding_score(0.8, 0.8, "binary") == 1.0
    assert embedding_score(0.7999, 0.8, "binary") == 0.0
    assert embedding_score(0.42, 0.8, "continuous") == pytest.approx(0.42)
    assert embedding_score(-0.3, 0.8, "continuous") == 0.0
    assert embedding_score(1.0000001, 0.8, "continuous") == 1.0
    embedder = RecordingEmbedder(lambda a, b: 0.65)
    args = ([completion("edema")], ["<X_RAY> effusion"])
    assert make(embedder=embedder)(*args).components["embedding"] == [0.0]
    assert make(embedder=embedder, threshold=0.6)(*args).components["embedding"] == [1.0]
    assert make(embedder=embedder, mode="continuous")(*args).components["embedding"] == [pytest.approx(0.65)]


def test_reasoning_tag_setting_switches_format_and_modality():
    think = completion("Edema", reasoning="think")
    assert make()([think], ["<X_RAY> Edema"]).components["format"] == [0.0]
    batch = make(reasoning_tag="think")([think], ["<X_RAY> Edema"])
    assert batch.components["format"] == [1.0] and batch.components["modality"] == [1.0]


def test_whitespace_and_newlines_around_tags_are_tolerated_end_to_end():
    text = "  < X_RAY >\n< thinking >\nstep 1\nstep 2\n</ thinking >\n\n< answer >\n Pneumothorax. \n</ answer >\n"
    batch = make()([text], ["<X_RAY> Pneumothorax"])
    assert batch.components == {"llm_judge": [1.0], "embedding": [1.0], "modality": [1.0], "format": [1.0]}


def test_statistics_mean_and_std_over_non_none_values():
    batch = RewardBatch(
        components={"llm_judge": [1.0, None, 0.0], "embedding": [1.0, 1.0, 1.0], "modality": [0.0] * 3,
                    "format": [1.0, 0.0, 1.0]},
        overall=[0.9, None, 0.1])
    m = reward_metrics(batch)
    assert m["reward/overall/mean"] == pytest.approx(0.5) and m["reward/overall/std"] == pytest.approx(0.4)
    assert m["reward/llm_judge/mean"] == pytest.approx(0.5) and m["reward/llm_judge/std"] == pytest.approx(0.5)
    assert m["reward/embedding/std"] == pytest.approx(0.0)
    assert m["reward/format/mean"] == pytest.approx(2 / 3)
    assert m["reward/format/std"] == pytest.approx(math.sqrt(2 / 9))
    assert set(m) == {f"reward/{c}/{s}" for c in ("overall", *PAPER) for s in ("mean", "std")}
    assert reward_metrics(RewardBatch({"llm_judge": [None]}, [None])) == {}
    assert reward_metrics(batch, rows=[1])["reward/embedding/mean"] == 1.0 and \
        "reward/llm_judge/mean" not in reward_metrics(batch, rows=[1])


def test_statistics_accumulate_over_batches_like_one_batch():
    a = RewardBatch({"format": [1.0, 0.0]}, [0.5, 0.25])
    b = RewardBatch({"format": [1.0]}, [None])
    stats = RewardStatistics(["format"])
    stats.update(a)
    stats.update(b)
    assert stats.compute() == pytest.approx(reward_metrics(RewardBatch.concat([a, b])))


@pytest.mark.parametrize("weights, key", [
    ({"embedding": 0.3, "modality": 0.1, "format": 0.1}, "reward.weights.llm_judge is missing"),
    ({**PAPER, "accuracy": 0.1}, "reward.weights.accuracy names no component"),
    ({**PAPER, "format": "high"}, "reward.weights.format='high' is not a number"),
    ({**PAPER, "modality": -0.1}, "reward.weights.modality=-0.1 must be"),
    ({**PAPER, "embedding": None}, "reward.weights.embedding is missing"),
])
def test_weights_validation_names_the_key(weights, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.").replace("(", r"\(")):
        validate_weights(weights, PAPER)


@pytest.mark.parametrize("kw, key", [
    ({"mode": "soft"}, "reward.components.embedding.mode"),
    ({"threshold": 1.5}, "reward.components.embedding.threshold"),
    ({"reasoning_tag": "<think>"}, "reasoning_tag"),
])
def test_other_settings_are_validated(kw, key):
    with pytest.raises(ConfigError, match=key):
        make(**kw)([completion("a b")], ["<X_RAY> ab"])


def test_solution_without_a_tag_is_a_data_error_naming_the_row():
    with pytest.raises(DataError, match="reward input 1"):
        make()([completion("a b"), completion("a b")], ["<X_RAY> ab", "no tag"])


@pytest.mark.parametrize("output, message", [
    ([1.0], "returned 1 values for 2 completions"),
    ([1.0, "high"], "gave 'high' for completion 1"),
    ([float("nan"), 0.0], "gave nan for completion 0; expected a finite value"),
])
def test_a_component_breaking_the_contract_is_a_data_error_naming_it(output, message):
    reward = CompositeReward({"mine": 1.0}, {"mine": lambda completions, solutions, **columns: output})
    with pytest.raises(DataError, match=f"reward component 'mine' {message}"):
        reward(["a", "b"], ["<X_RAY> a", "<X_RAY> b"])


def compose_reward(*overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=["paths.output_dir=/tmp/x", *overrides])


@pytest.mark.parametrize("name, expected", [
    ("composite", PAPER),
    ("llm_only", {"llm_judge": 0.855, "embedding": 0.0, "modality": 0.045, "format": 0.1}),
    ("embed_only", {"llm_judge": 0.0, "embedding": 0.855, "modality": 0.045, "format": 0.1}),
    ("llm_embed", {"llm_judge": 0.544737, "embedding": 0.355263, "modality": 0.0, "format": 0.1}),
])
def test_each_reward_mix_builds_exactly_its_positive_weight_components(name, expected):
    cfg = compose_reward(f"reward={name}", "judge=rule", "reasoning_tag=think")
    reward = instantiate(cfg.reward)
    assert reward.weights == pytest.approx(expected) and sum(reward.weights.values()) == pytest.approx(1.0, abs=1e-6)
    assert set(reward.components) == {c for c, w in expected.items() if w > 0}
    batch = reward([completion("Edema", reasoning="think")], ["<X_RAY> Edema"])
    assert batch.overall == [pytest.approx(1.0)]  # an exact answer in the required form: every component scores 1
    if "embedding" in reward.components:
        assert reward.components["embedding"].threshold == 0.8 and reward.components["embedding"].mode == "binary"


def test_a_users_own_component_is_added_by_config_alone(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(completions, solutions, *, limit=20, **columns):\n"
        "    return [1.0 if len(c) <= limit else 0.0 for c in completions]\n"
        "class Echo:\n"
        "    def __init__(self, column):\n"
        "        self.column = column\n"
        "    def __call__(self, completions, solutions, **columns):\n"
        "        return [float(v) for v in columns[self.column]]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = compose_reward("reward=embed_only", "+reward.components.brevity._target_=my_rewards.brevity",
                         "+reward.components.brevity.limit=5", "+reward.weights.brevity=0.5",
                         "+reward.components.echo._target_=my_rewards.Echo", "+reward.components.echo.column=level",
                         "+reward.weights.echo=0.25")
    reward = instantiate(cfg.reward)
    batch = reward(["short", "a much longer completion"], ["<X_RAY> a", "<X_RAY> b"], level=[2, 0])
    assert batch.components["brevity"] == [1.0, 0.0] and batch.components["echo"] == [2.0, 0.0]
    assert batch.overall == [pytest.approx(0.5 + 0.5), pytest.approx(0.0)]
    sys.modules.pop("my_rewards", None)


def test_a_component_that_cannot_be_imported_names_its_key():
    cfg = compose_reward("reward=embed_only", "+reward.components.x._target_=medix.rewards.nothing_here",
                         "+reward.weights.x=0.1")
    with pytest.raises(ConfigError, match=r"reward\.components\.x\._target_='medix\.rewards\.nothing_here'"):
        build(cfg.reward)


def test_closing_the_reward_closes_its_judge():
    judge = RecordingJudge()
    with make(judge=judge) as reward:
        reward([completion("edema")], ["<X_RAY> effusion"])
        assert reward.stats() == {"judge/items": 1.0}
    assert judge.closed
