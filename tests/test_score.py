"""`python -m medix.score` end to end in a subprocess, against the fake OpenAI-compatible judge server."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fake_openai import FakeHTTPError, FakeOpenAIServer
from medix_cli import offline_env

PAPER = {"llm_judge": 0.5175, "embedding": 0.3375, "modality": 0.045, "format": 0.1}
PREDICTED = re.compile(r"<predicted>\n(.*?)\n</predicted>", re.DOTALL)
TRUTH = re.compile(r"<ground_truth>\n(.*?)\n</ground_truth>", re.DOTALL)


def judged_pair(body: dict) -> tuple[str, str]:
    content = body["messages"][-1]["content"]
    return PREDICTED.search(content).group(1), TRUTH.search(content).group(1)


def yes_if_same_words(body: dict) -> str:
    prediction, truth = judged_pair(body)
    if prediction == "server breaks":
        raise FakeHTTPError(500, "boom")
    return "YES" if prediction.lower() == truth.lower() else "NO"


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run_score(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = offline_env(MEDIX_CACHE_DIR=str(tmp_path / "cache"))
    return subprocess.run([sys.executable, "-m", "medix.score", *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)


def cot(answer: str, tag: str = "<X_RAY>") -> str:
    return f"{tag}\n<thinking>\nI look at the film.\n</thinking>\n<answer>{answer}</answer>"


ROWS = [
    {"id": "same", "completion": cot("Pneumothorax."), "solution": "<X_RAY> Pneumothorax"},
    {"id": "one-char", "completion": cot("B"), "solution": "<X_RAY> Pneumothorax"},
    {"id": "colon", "completion": cot("Answer: pneumothorax"), "solution": "<X_RAY> Pneumothorax"},
    {"id": "blank", "completion": cot("  "), "solution": "<X_RAY> Pneumothorax"},
    {"id": "case", "completion": cot("pneumothorax", "<ct_scan>"), "solution": "<X_RAY> Pneumothorax",
     "question": "What does the chest film show?"},
    {"id": "wrong", "completion": cot("pleural effusion"), "solution": "<X_RAY> Pneumothorax"},
    {"completion": "Large pneumothorax", "solution": "<MRI_SCAN> large pneumothorax."},
]


@pytest.mark.slow  # medix.score in a subprocess
def test_score_end_to_end_calls_the_judge_only_for_valid_non_identical_answers_and_caches(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", ROWS)
    with FakeOpenAIServer(yes_if_same_words, model="Qwen/Qwen3-4B-Instruct-2507") as server:
        args = (f"input={src}", f"output={tmp_path / 'out.jsonl'}", "judge=qwen", f"judge.base_url={server.base_url}")
        first = run_score(tmp_path, *args)
        assert first.returncode == 0, first.stderr
        requests = server.chat_requests
        assert sorted(judged_pair(b)[0] for b in requests) == ["pleural effusion", "pneumothorax"]
        assert all(b["temperature"] == 0.0 and b["model"] == "Qwen/Qwen3-4B-Instruct-2507" for b in requests)
        out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]

        second = run_score(tmp_path, *args[:1], f"output={tmp_path / 'again.jsonl'}", *args[2:])
        assert second.returncode == 0, second.stderr
        assert len(server.chat_requests) == 2  # every verdict came from the judge cache
    assert (tmp_path / "again.jsonl").read_text() == (tmp_path / "out.jsonl").read_text()
    assert re.search(r"judge/requests: 2\b", first.stdout) and re.search(r"judge/items: 2\b", first.stdout)
    assert re.search(r"judge/requests: 0\b", second.stdout) and re.search(r"judge/cache_hits: 2\b", second.stdout)

    assert [r["id"] for r in out] == ["same", "one-char", "colon", "blank", "case", "wrong", "7"]
    by_id = {r["id"]: r for r in out}
    assert [by_id[i]["llm_judge"] for i in ("same", "one-char", "colon", "blank", "case", "wrong", "7")] == \
        [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert [by_id[i]["embedding"] for i in ("same", "one-char", "colon", "blank")] == [1.0, 0.0, 0.0, 0.0]
    assert by_id["case"]["embedding"] == 1.0  # MiniLM: case-only difference is far above 0.8
    assert [r["format"] for r in out] == [1.0] * 6 + [0.0]
    assert [r["modality"] for r in out] == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    # the degenerate guard: a blank answer, and a completion without an <answer> block (the paper would judge it)
    assert [r["guarded"] for r in out] == [None, None, None, "empty", None, None, "no_answer_block"]
    assert re.search(r"reward/guarded_share: 0.2857\b", first.stdout)
    for r in out:
        assert set(r) == {"id", "llm_judge", "embedding", "modality", "format", "overall", "guarded"}
        assert r["overall"] == pytest.approx(sum(w * r[c] for c, w in PAPER.items()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.jsonl", "cache", "in.jsonl", "out.jsonl"]


@pytest.mark.slow  # medix.score in a subprocess
def test_a_failed_judge_call_gives_null_llm_judge_and_overall(tmp_path):
    rows = [{"id": "ok", "completion": cot("edema"), "solution": "<X_RAY> Edema"},
            {"id": "bad", "completion": cot("server breaks"), "solution": "<X_RAY> Edema"}]
    src = write_jsonl(tmp_path / "in.jsonl", rows)
    with FakeOpenAIServer(yes_if_same_words) as server:
        done = run_score(tmp_path, f"input={src}", f"output={tmp_path / 'out.jsonl'}", "judge=qwen",
                         f"judge.base_url={server.base_url}", "judge.max_retries=0", "judge.model=fake-judge",
                         "reward=llm_only")
    assert done.returncode == 0, done.stderr
    ok, bad = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert ok["llm_judge"] == 1.0 and ok["overall"] == pytest.approx(1.0) and ok["embedding"] is None
    assert bad["llm_judge"] is None and bad["overall"] is None and bad["format"] == 1.0
    assert re.search(r"judge/failures: 1\b", done.stdout)


@pytest.mark.parametrize("lines, message", [
    (['{"completion": "x", "solution": "<X_RAY> a"}', '{"solution": "<X_RAY> a"}'],
     "input line 2: field 'completion' is missing"),
    (['{"completion": "x", "solution": "<X_RAY> a"}', "", '{"completion": "x", "solution": 5}'],
     "input line 3: field 'solution' is of type int"),
    (['{"completion": "x", "solution": "Pneumonia"}'], "input line 1: field 'solution': "),
    (['{"completion": "x", "solution": "<X_RAY> a"', ], "input line 1: not valid JSON"),
    (['["completion"]'], "input line 1: a JSON list, not an object"),
    (['{"completion": "x", "solution": "<X_RAY> a", "question": 3}'], "input line 1: field 'question' is of type"),
])
@pytest.mark.slow  # medix.score in a subprocess
def test_bad_input_line_is_one_line_error_with_exit_code_2(tmp_path, lines, message):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    done = run_score(tmp_path, f"input={src}", f"output={tmp_path / 'out.jsonl'}", "judge=rule")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    assert "Traceback" not in done.stderr and not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("args, message", [
    ([], "error: input= is required"),
    (["input=in.jsonl"], "error: output= is required"),
    (["input=nowhere.jsonl", "output=out.jsonl"], "error: input=nowhere.jsonl does not exist"),
    (["input=x", "output=y", "+reward.weights.accuracy=1"], "error: reward.weights.accuracy names no component"),
])
@pytest.mark.slow  # medix.score in a subprocess
def test_usage_errors_are_one_line(tmp_path, args, message):
    done = run_score(tmp_path, *args, "judge=rule")
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1].startswith(message)
    assert "Traceback" not in done.stderr
