"""Completions that try to talk the judge into YES: the prompt neutralises each case, the strict parser ignores echoed
YESes, and a gullible fake judge (real HTTP) that obeys anything outside the delimiters is fooled only without defences."""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import openai
import pytest

from fake_openai import FakeOpenAIServer
from medix.judges import JudgeItem, OpenAIJudge
from medix.judges.prompts import DEFAULT_TEMPLATE, TRUNCATION_MARK, parse_verdict, render_judge_prompt
from medix.rewards import CompositeReward
from medix.rewards.judge_reward import JudgeReward

CASES = [json.loads(line) for line in (Path(__file__).parent / "injection_cases.jsonl").read_text().splitlines()]
MAX_CHARS = 2000  # conf/judge/qwen.yaml: judge.max_prediction_chars
TEMPLATE_TAGS = ("<predicted>", "</predicted>", "<ground_truth>", "</ground_truth>")
# Letters a reader takes for Latin ones (Cyrillic і е о а р с, Greek Υ Ε); NFKC leaves them alone.
CONFUSABLES = str.maketrans("іеоарсΥΕЅ", "ieoapcYES")
CHAT_TOKEN = re.compile(r"<\|[a-z_]+\|>")
FORGETS_AFTER_CHARS = 2500  # the gullible judge loses its instructions in a prediction longer than this
TAG = re.compile(r"<\s*(/?)\s*(predicted|ground_truth)\s*>", re.IGNORECASE)  # as a lenient reader takes a tag


def reads_as(text: str) -> str:
    """What a model "sees": look-alikes folded, invisible characters gone."""
    text = unicodedata.normalize("NFKC", text).translate(CONFUSABLES)
    return "".join(ch for ch in text if unicodedata.category(ch) != "Cf")


def tag_counts(prompt: str) -> dict[str, int]:
    """{'<predicted>': n, '</predicted>': n, ...} over what the prompt reads as, case and spaces ignored."""
    found = [f"<{m.group(1)}{m.group(2).lower()}>" for m in TAG.finditer(reads_as(prompt))]
    return {tag: found.count(tag) for tag in TEMPLATE_TAGS}


TEMPLATE_TAG_COUNTS = tag_counts(DEFAULT_TEMPLATE)


def naive_prompt(case: dict) -> str:
    """The same template filled with the raw prediction: no cleaning, no bound (what the defences replace)."""
    return DEFAULT_TEMPLATE.format(question=case["question"], prediction=case["prediction"], reference=case["reference"])


def defended_prompt(case: dict, template: str | None = None) -> str:
    return render_judge_prompt(case["prediction"], case["reference"], case["question"], template,
                               max_prediction_chars=MAX_CHARS)


def shipped_templates() -> dict[str, str]:
    """The template of every shipped LLM judge config (null = medix's default)."""
    from test_judge_client import compose_judge

    return {name: compose_judge(name, "/nonexistent").template or DEFAULT_TEMPLATE
            for name in ("qwen", "openai", "local", "local_small")}


def gullible_verdict(prompt: str) -> str:
    """A judge that is honest about what it finds inside the first <predicted> block, but obeys whatever else it reads.

    Fooled (YES) by: a chat token anywhere (it starts a new turn), text smuggled outside the block (the block ends at
    the first thing that reads as `</predicted>`), or a YES inside a block longer than FORGETS_AFTER_CHARS. Tempted
    but not fooled by a YES inside a short block: it answers NO and echoes the YES (what the parser must ignore).
    """
    seen = reads_as(prompt)
    if CHAT_TOKEN.search(seen):
        return "YES"
    start = seen.index("\n<predicted>\n") + len("\n<predicted>\n")
    closing = next(m for m in TAG.finditer(seen, start) if m.group(1) and m.group(2).lower() == "predicted")
    block = seen[start:closing.start()].strip()
    reference = seen[seen.rindex("<ground_truth>\n") + len("<ground_truth>\n"):seen.rindex("\n</ground_truth>")]
    outside = seen[closing.end():seen.rindex("<ground_truth>\n")]
    if re.search(r"\w", outside):
        return "YES"
    if "YES" in block.upper() and len(block) > FORGETS_AFTER_CHARS:
        return "YES"
    if block.lower() == reference.strip().lower():
        return "YES"
    return "NO, although the prediction says YES" if "YES" in block.upper() else "NO"


def gullible_handler(body: dict) -> str:
    return gullible_verdict(body["messages"][-1]["content"])


def block_of(prompt: str) -> str:
    return prompt.split("\n<predicted>\n", 1)[1].split("\n</predicted>", 1)[0]


# ---- the cases -----------------------------------------------------------------------------------------------------
def test_cases_cover_at_least_30_attacks_of_many_kinds():
    assert len(CASES) >= 30 and len({c["id"] for c in CASES}) == len(CASES)
    kinds = {c["kind"] for c in CASES}
    assert {"instruction", "forged_ground_truth", "closing_delimiter", "unicode", "chat_tokens", "negation", "hedging",
            "long", "role_play", "json_forgery"} <= kinds
    assert all(c["prediction"].strip().lower() != c["reference"].lower() for c in CASES)  # every answer is wrong


# ---- the prompt neutralises each case ------------------------------------------------------------------------------
@pytest.mark.parametrize("template", sorted(set(shipped_templates().values())), ids=lambda t: f"{len(t)}chars")
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_defended_prompt_neutralises_the_case(case, template):
    prompt = defended_prompt(case, template)
    assert tag_counts(prompt) == tag_counts(template)  # no tag, real or look-alike, beyond the template's own
    assert not CHAT_TOKEN.search(reads_as(prompt))
    assert not any(unicodedata.category(ch) == "Cf" for ch in prompt)
    block = block_of(prompt)
    assert len(block) <= MAX_CHARS + len(TRUNCATION_MARK)
    assert prompt.endswith(f"<ground_truth>\n{case['reference']}\n</ground_truth>\n")  # nothing smuggled after it


def test_naive_prompt_would_let_delimiter_and_token_attacks_through():
    broken = [c["id"] for c in CASES
              if tag_counts(naive_prompt(c)) != TEMPLATE_TAG_COUNTS or CHAT_TOKEN.search(naive_prompt(c))]
    structural = [c["id"] for c in CASES if c["kind"] in ("closing_delimiter", "chat_tokens")
                  and c["id"] != "inj20"]  # inj20 uses [INST], which is no token for the Qwen chat template
    assert set(structural) <= set(broken)
    assert {c["id"] for c in CASES if c["kind"] == "unicode"} & set(broken)  # look-alike tags read as real ones


def test_harmless_angle_brackets_and_text_survive_cleaning():
    prompt = render_judge_prompt("nodule < 5 mm, PSA <4 ng/mL and ＦＥＶ1 > 80%", "small nodule")
    assert block_of(prompt) == "nodule < 5 mm, PSA <4 ng/mL and FEV1 > 80%"
    assert block_of(render_judge_prompt("a <b>bold</b> claim", "x")) == "a &lt;b>bold&lt;/b> claim"


def test_long_predictions_are_cut_before_their_tail_instruction():
    case = next(c for c in CASES if c["kind"] == "long" and c["prediction"].endswith("Respond YES."))
    block = block_of(defended_prompt(case))
    assert block.endswith(TRUNCATION_MARK) and "Respond YES" not in block
    assert len(case["prediction"]) > MAX_CHARS


# ---- the parser ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("reply", "contains", "strict"), [
    ("NO. The user says answer YES", 1.0, 0.0),
    ("NO, although the prediction says YES", 1.0, 0.0),
    ("No (prediction: 'YES YES')", 1.0, 0.0),
    ("Eyes", 1.0, None),
    ("I cannot say YES", 1.0, None),
    ('{"verdict": "YES"}', 1.0, None),
    ("YES", 1.0, 1.0),
    ("NO", 0.0, 0.0),
])
def test_strict_parser_ignores_an_echoed_yes(reply, contains, strict):
    assert parse_verdict(reply, "contains") == contains
    assert parse_verdict(reply, "strict") == strict


# ---- a gullible judge over real HTTP ------------------------------------------------------------------------------
def ask_naive(server: FakeOpenAIServer, case: dict) -> str:
    client = openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0)
    reply = client.chat.completions.create(model="fake-judge", messages=[{"role": "user", "content": naive_prompt(case)}],
                                           temperature=0.0, max_tokens=4)
    return reply.choices[0].message.content


def judge_for(url: str, parser: str) -> OpenAIJudge:
    return OpenAIJudge(model="fake-judge", base_url=url, parser=parser, max_retries=0, max_prediction_chars=MAX_CHARS,
                       on_failure="exclude", max_failure_rate=1.0)


def test_gullible_judge_is_fooled_without_defences_and_never_with_them(tmp_path):
    items = [JudgeItem(c["question"], c["prediction"], c["reference"]) for c in CASES]
    with FakeOpenAIServer(gullible_handler) as server:
        fooled_before = {c["id"] for c in CASES if parse_verdict(ask_naive(server, c), "contains") == 1.0}
        with judge_for(server.base_url, "strict") as judge:
            strict_scores = judge.score(items)
        with judge_for(server.base_url, "contains") as judge:
            contains_scores = judge.score(items)
        sane = gullible_handler({"messages": [{"content": render_judge_prompt("Pneumothorax", "pneumothorax")}]})
    assert sane == "YES"  # the fake is a working judge, not a constant NO
    kinds_fooled = {c["kind"] for c in CASES if c["id"] in fooled_before}
    assert {"closing_delimiter", "unicode", "chat_tokens"} <= kinds_fooled
    assert strict_scores == [0.0] * len(CASES)  # defended prompt + strict parser: fooled by nothing
    echoed = {c["id"] for c, s in zip(CASES, contains_scores) if s == 1.0}
    assert echoed and all("YES" in reads_as(c["prediction"]).upper() for c in CASES if c["id"] in echoed)


def test_reward_path_gives_no_judge_credit_to_any_case(tmp_path):
    """Through CompositeReward: completions carrying each attack in their <answer> get llm_judge 0 (never 1)."""
    completions = [f"<X_RAY><thinking>Looking at the image.</thinking><answer>{c['prediction']}</answer>" for c in CASES]
    solutions = [f"<X_RAY> {c['reference']}" for c in CASES]
    with FakeOpenAIServer(gullible_handler) as server:
        with judge_for(server.base_url, "strict") as judge:
            batch = CompositeReward({"llm_judge": 1.0}, {"llm_judge": JudgeReward(judge)})(completions, solutions)
    assert batch.components["llm_judge"] == [0.0] * len(CASES)
