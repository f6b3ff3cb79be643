"""reward.semantics=paper holds medix to MediX-R1's released reward rules on generated edge cases, and both
semantics read references (their tag and answer) as the paper does.

`paper_compute_score` below is transcribed from mbzuai-oryx/MediX-R1, commit 94fd0184b54d5e77abf909aef87aa6ada1310099,
training/examples/reward_function/medical.py (format_reward, create_prompt, llm_answer_match, _extract_answer,
_is_invalid_answer, accuracy_reward_llm, accuracy_reward_embed, modality_reward, compute_score), with the HTTP call
and the embedding model passed in as functions.
"""

import itertools
import re

import pytest
from hydra.utils import instantiate

from medix.errors import ConfigError
from medix.instantiate import build
from medix.rewards.components import modality_rewards
from medix.rewards.parsing import reference_parts
from tests.test_reward_composite import compose_reward


# ---- the paper's rules, transcribed ------------------------------------------------------------------------------
def paper_format_reward(predict):
    idx = predict.find("<thinking>")
    if idx == -1:
        return 0.0
    predict_new = predict[idx:].strip()
    pattern = re.compile(r"<thinking>.*?</thinking>\s*<answer>.*?</answer>", re.DOTALL)
    return 1.0 if re.fullmatch(pattern, predict_new) else 0.0


def paper_create_prompt(predict, ground_truth):
    return f"""You are a helpful assistant.
Given a predicted answer and the ground truth answer, respond with exactly "YES" if the content matches, otherwise respond with "NO".
Start your response with "YES" or "NO" in uppercase.

Predicted:{predict}
Ground Truth:{ground_truth}
"""


def paper_llm_answer_match(predict, ground_truth, chat):
    try:
        reply = chat(paper_create_prompt(predict, ground_truth))
        return 1.0 if "YES" in reply.strip().upper() else 0.0
    except Exception:
        return 0.0


def paper_extract_answer(predict, ground_truth):
    content_match = re.search(r"<answer>(.*?)</answer>", predict, re.DOTALL)
    given_answer = content_match.group(1).strip() if content_match else predict.strip()
    given_answer = given_answer.strip(".")
    ground_truth = ground_truth.split(">", maxsplit=1)[1].strip()
    ground_truth = ground_truth.strip(".")
    return given_answer, ground_truth


def paper_is_invalid_answer(answer):
    if answer == "" or len(answer) == 1:
        return True
    return any(symbol in answer for symbol in ["__", ":", "?"])


def paper_accuracy(predict, ground_truth, model_score):
    try:
        given_answer, ground_truth = paper_extract_answer(predict, ground_truth)
        if paper_is_invalid_answer(given_answer):
            return 0.0
        if given_answer == ground_truth:
            return 1.0
        return model_score(given_answer, ground_truth)
    except Exception:
        return 0.0


def paper_modality_reward(predict, ground_truth):
    idx = predict.find("<thinking>")
    if idx == -1:
        return 0.0
    predict_modality = predict[:idx].strip()
    ground_truth_modality = ground_truth.split(">", maxsplit=1)[0] + ">"
    return 1.0 if predict_modality.upper() == ground_truth_modality.upper() else 0.0


def paper_compute_score(response, ground_truth, chat, cosine, format_weight=0.1):
    content_weight = 1 - format_weight
    predict = re.sub(r"\s*(<|>|/)\s*", r"\1", response)
    format_score = paper_format_reward(predict)
    llm = paper_accuracy(predict, ground_truth, lambda p, g: paper_llm_answer_match(p, g, chat))
    embed = paper_accuracy(predict, ground_truth, lambda p, g: float(cosine(p, g) >= 0.8))
    modality = paper_modality_reward(predict, ground_truth)
    overall = (content_weight * 0.575 * llm + content_weight * 0.375 * embed + content_weight * 0.05 * modality
               + format_weight * format_score)
    return {"overall": overall, "format": format_score, "llm_judge": llm, "embedding": embed, "modality": modality}


# ---- the judge and embedder both sides use -------------------------------------------------------------------------
REPLIES = ["YES", "NO", "yes.", "No, not YES", "Yesterday", "maybe", None]  # None: the call fails


def reply_for(prompt):
    """A deterministic judge: the reply depends on the prompt's text (None = a failed call)."""
    return REPLIES[sum(map(ord, prompt)) % len(REPLIES)]


def cosine_for(a, b):
    return 0.9 if a.strip().lower() == b.strip().lower() else 0.3


class ChatJudge:
    """The judge client's chat-turn API (`areply`), recording every prompt."""

    def __init__(self):
        self.prompts = []

    async def areply(self, messages, max_tokens=None):
        assert max_tokens == 4  # medical.py asks for 4 tokens
        [message] = messages
        self.prompts.append(message["content"])
        text = reply_for(message["content"])
        return None if text is None else {"text": text, "top_logprobs": None}

    def score(self, items):
        raise AssertionError("semantics=paper must not use the judge's own prompt and parser")


class FixedEmbedder:
    def similarity(self, a, b):
        return [cosine_for(x, y) for x, y in zip(a, b)]


def paper_reward():
    """reward.semantics=paper as composed from conf/, its judge and embedder replaced by the deterministic ones."""
    cfg = compose_reward("reward.semantics=paper", "judge=qwen", "judge.cache.enabled=false")
    reward = instantiate(cfg.reward)
    judge = ChatJudge()
    reward.components["llm_judge"].judge = judge
    reward.components["embedding"].embedder = FixedEmbedder()
    return reward, judge


PREFIXES = ["<X_RAY>", " <X_RAY> ", "< x_ray >", "<SPECT>", "Modality: <X_RAY>", ""]
BODIES = ["<thinking>r</thinking><answer>{a}</answer>", "< thinking >r</ thinking >\n< answer > {a} </ answer >",
          "<thinking>r</thinking>{a}", "<thinking>r<answer>{a}</answer>", "{a}"]
ANSWERS = ["Pneumothorax", "pneumothorax.", "ischemia .", "ischemia", "..Left lobe..", "", "a", "x: y", "why?",
           "blank __", "Lung </ answer > mass", "Pneumothorax and ischemia"]
SOLUTIONS = ["<X_RAY> Pneumothorax", "<SPECT> ischemia .", "< X_RAY > Pneumothorax.", " <X_RAY> Pneumothorax",
             "<x_ray> ischemia", "<X_RAY >  . Pneumothorax", "<SPECT> Left lobe"]
CASES = [(prefix + body.format(a=answer), solution)
         for prefix, body, answer, solution in itertools.product(PREFIXES, BODIES, ANSWERS, SOLUTIONS)]


def test_paper_semantics_matches_medical_py_on_generated_edge_cases():
    reward, judge = paper_reward()
    completions, solutions = zip(*CASES)
    batch = reward(list(completions), list(solutions))
    sent = []
    for i, (response, solution) in enumerate(CASES):
        expected = paper_compute_score(response, solution, chat=lambda p: sent.append(p) or reply_for(p) or 1 / 0,
                                       cosine=cosine_for)
        got = {name: values[i] for name, values in batch.components.items()}
        assert got == pytest.approx({k: v for k, v in expected.items() if k != "overall"}), (response, solution)
        assert batch.overall[i] == pytest.approx(expected["overall"]), (response, solution)
    assert sorted(judge.prompts) == sorted(sent)  # the same prompts, character for character
    assert len(CASES) == 2520 and batch.guarded is None  # no degenerate guard under the paper's semantics


@pytest.mark.parametrize("solution, tag, answer", [
    ("<SPECT> ischemia .", "<SPECT>", "ischemia "),  # the dot stripped, the space kept
    ("< X_RAY > Pneumothorax.", "< X_RAY >", "Pneumothorax"),
    (" <X_RAY> Pneumothorax", " <X_RAY>", "Pneumothorax"),
    ("<X_RAY>  . Pneumothorax", "<X_RAY>", " Pneumothorax"),
])
def test_references_are_read_as_the_paper_reads_them(solution, tag, answer):
    assert reference_parts(solution) == (tag, answer)


def test_default_semantics_reads_references_as_the_paper_does():
    calls = []

    class Judge:
        def score(self, items):
            calls.extend(items)
            return [0.0] * len(items)

    cfg = compose_reward("judge=qwen", "judge.cache.enabled=false")
    reward = instantiate(cfg.reward)
    reward.components["llm_judge"].judge = Judge()
    reward.components["embedding"].embedder = FixedEmbedder()
    batch = reward(["<SPECT><thinking>r</thinking><answer>ischemia .</answer>",
                    "<SPECT><thinking>r</thinking><answer>ischemia</answer>"], ["<SPECT> ischemia ."] * 2)
    assert batch.components["llm_judge"] == [1.0, 0.0]  # "ischemia " == "ischemia ": an exact match, no judge call
    assert [item.prediction for item in calls] == ["ischemia"]
    assert modality_rewards(["<X_RAY><thinking>r</thinking>"] * 3, ["<X_RAY> a", "< X_RAY > a", " <X_RAY> a"]) == \
        [1.0, 0.0, 0.0]


def test_an_unknown_semantics_names_the_key():
    cfg = compose_reward("reward.semantics=exact", "judge=rule")
    with pytest.raises(ConfigError, match=r"reward\.semantics='exact'"):
        build(cfg.reward)


def test_paper_semantics_needs_a_judge_that_chats():
    cfg = compose_reward("reward.semantics=paper", "judge=rule")
    with pytest.raises(ConfigError, match=r"reward\.semantics=paper asks the judge in chat turns"):
        build(cfg.reward)
