"""The paper's evaluation judge protocol as pure functions: prompts, reply parsing, round voting, item scores.

Wording follows MediX-R1 `eval/utils.py` (BASE_PROMPT for binary tasks, MIMIC_PROMPT for the 0-5 rubric).
"""

from __future__ import annotations

import json
import re

REEVALUATE = "Please reevaluate and make sure your judgment is correct."
PARSE_RETRY = 'Your reply could not be read. Respond only with the JSON object {"score": <score>}.'
VERDICT_RETRY = 'Your reply could not be read. Respond only with "YES" or "NO".'  # judge_protocol.prompt=judge
MAX_SCORE = {"binary": 1, "rubric": 5}

BINARY_PROMPT = """You are a medical expert.

Your task is to evaluate whether the Predicted Answer correctly answers the Medical Question, based on the Ground Truth (Correct Answer) provided.

Question:
{question}

Correct Answer:
{reference}

Predicted Answer:
{prediction}

Score 1 if the predicted answer matches the correct answer either fully in text or by indicating the correct option label (e.g., "B", "Option B", or a paraphrased version that clearly identifies the correct choice). Score 0 if the predicted answer is incorrect or points to the wrong option.

Respond strictly in the following JSON format:

```json
{{
"score": <score>
}}
```{suffix}"""

RUBRIC_PROMPT = """You are a medical expert evaluating the clinical accuracy, completeness, and relevance of a generated medical report or summary.

Your task is to compare an AI-generated report or summary to a reference (gold standard) report or summary, based on a clinical instruction or question. Assess the generated output on how well it preserves key clinical information, factual correctness, and clinical reasoning relevant to the task.

Assign a score between 0 and 5 using the following scale:

0 - Completely incorrect: Clinically irrelevant, misleading, or factually wrong. No meaningful alignment with the instruction or reference.

1 - Poor match: Barely relevant or mostly incorrect. Contains significant clinical misinformation or omits nearly all critical details.

2 - Weak match: Some fragments of relevant content are present, but major clinical errors or omissions exist. Clinical utility is low.

3 - Fair match: Contains several relevant points, but includes notable errors, missing findings, or misinterpretations that affect clinical reliability.

4 - Good match: Mostly accurate and clinically sound. Minor issues or missing details, but the overall meaning and purpose are preserved.

5 - Perfect or near-perfect match: Clinically accurate, complete, and faithful to the instruction and reference. No significant omissions or errors.

Respond only in the following example JSON format:

Example JSON format:
```json
{{
"score": <score between 0 and 5>
}}
```

Now, evaluate the following:

### Clinical Instruction or Question::
{question}

### Reference Report or Summary:
{reference}

### AI-Generated Report or Summary:
{prediction}{suffix}"""


def strip_reasoning(text: str, reasoning_tag: str) -> str:
    """The text after the last closing reasoning tag (`</{reasoning_tag}>` or `</think>`), stripped."""
    cut = -1
    for tag in {f"</{reasoning_tag}>", "</think>"}:
        at = text.rfind(tag)
        if at >= 0:
            cut = max(cut, at + len(tag))
    return (text[cut:] if cut >= 0 else text).strip()


def judged_answer(prediction: str, reasoning_tag: str, max_chars: int | None = None) -> str:
    """What the judge reads of a prediction: the text after the last closing reasoning tag, cleaned as the training
    judge cleans it (`medix.judges.prompts.clean_prediction`: look-alikes folded, invisible characters dropped, tag-like
    `<` written `&lt;`, cut to `max_chars` with a mark)."""
    from medix.judges.prompts import clean_prediction

    return clean_prediction(strip_reasoning(prediction, reasoning_tag), max_chars)


def names_several_options(prediction: str, choices: tuple[str, ...] | list[str] | None, reasoning_tag: str) -> bool:
    """A multiple-choice prediction that names two or more of the item's options (by letter or text): not correct,
    whatever the judge says (`medix.rewards.guard.options_named` reads the answer after the reasoning)."""
    from medix.rewards.guard import options_named
    from medix.rewards.parsing import extract_answer

    return bool(choices) and len(options_named(extract_answer(strip_reasoning(prediction, reasoning_tag)),
                                               list(choices))) >= 2


def judge_prompt(scoring: str, question: str, reference: str, prediction: str, suffix: str = "") -> str:
    """The first user message of the judge conversation for a `binary` or `rubric` task."""
    template = RUBRIC_PROMPT if scoring == "rubric" else BINARY_PROMPT
    return template.format(question=question, reference=reference, prediction=prediction, suffix=suffix)


def parse_score(reply: str, scoring: str, reasoning_tag: str = "thinking") -> float | None:
    """The `score` of the last JSON object in a judge reply, or None when absent or outside 0..max for `scoring`."""
    text = strip_reasoning(reply, reasoning_tag)
    candidates = re.findall(r"\{[^{}]*\}", text)
    for raw in reversed(candidates):
        try:
            value = json.loads(raw).get("score")
        except (json.JSONDecodeError, AttributeError):
            continue
        try:
            score = float(value)
        except (TypeError, ValueError):
            continue
        if 0 <= score <= MAX_SCORE[scoring] and (scoring != "binary" or score in (0.0, 1.0)):
            return score
        return None
    return None


def majority(scores: list[float], rounds: int) -> float | None:
    """The binary verdict once one value holds a majority of `rounds`, else None (more rounds needed)."""
    need = rounds // 2 + 1
    for value in (1.0, 0.0):
        if sum(1 for s in scores if s == value) >= need:
            return value
    return None


def item_score(scoring: str, round_scores: list[float], rounds: int) -> float:
    """Binary: the majority verdict (ties count as 0). Rubric: the mean 0-5 score divided by 5."""
    if scoring == "rubric":
        return sum(round_scores) / len(round_scores) / MAX_SCORE["rubric"] if round_scores else 0.0
    verdict = majority(round_scores, rounds)
    return 0.0 if verdict is None else verdict


def rounds_done(scoring: str, round_scores: list[float], rounds: int) -> bool:
    """Binary tasks stop as soon as the majority is settled; rubric tasks always run every round."""
    if len(round_scores) >= rounds:
        return True
    return scoring == "binary" and majority(round_scores, rounds) is not None
