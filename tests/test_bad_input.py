"""Bad input at every entry point (`medix.run`, `medix.evaluate`, `medix.score`): a non-zero exit with one clear line
that names what is wrong and what would be right, no traceback, and no MLflow run left RUNNING."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from medix_cli import offline_env

import mlflow
import pytest

pytestmark = pytest.mark.slow  # every test starts an entry point in a subprocess (imports: seconds each)

REPO = Path(__file__).resolve().parents[1]
SLAKE = REPO.parent / "shared" / "benchmarks" / "slake" / "test.jsonl"


def medix(entry: str, args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = offline_env()
    if entry != "medix.score":  # score writes no Hydra folder and has no tracking
        args = [*args, f"hydra.run.dir={tmp_path}/hydra", f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    return subprocess.run([sys.executable, "-m", entry, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)


def assert_one_error_line(out: subprocess.CompletedProcess, *needles: str) -> str:
    assert out.returncode != 0, out.stdout[-2000:]
    assert "Traceback" not in out.stderr + out.stdout
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def assert_hydra_names_the_key(out: subprocess.CompletedProcess, key: str) -> None:
    """Hydra's own message for an unknown key: names it and says how to add it instead."""
    assert out.returncode != 0
    assert "Traceback" not in out.stderr + out.stdout
    first = out.stderr.strip().splitlines()[0]
    assert first == f"Could not override '{key}'."
    assert f"To append to your config use +{key}=" in out.stderr


def assert_no_run_left_running(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    if not db.exists():
        return  # the error came before any run was created
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    client = mlflow.MlflowClient()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.status for r in runs if r.info.status == "RUNNING"] == []


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# ---- medix.run ------------------------------------------------------------------------------------------------
def test_run_config_typo(tmp_path):
    out = medix("medix.run", ["trainer.max_stepz=3"], tmp_path)
    assert_hydra_names_the_key(out, "trainer.max_stepz")


def test_run_unknown_group_choice_lists_the_choices(tmp_path):
    out = medix("medix.run", ["judge=qwne"], tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr
    assert "Could not find 'judge/qwne'" in out.stderr
    assert all(f"\t{choice}" in out.stderr for choice in ("local", "openai", "qwen", "rule"))


def test_run_missing_model(tmp_path):
    out = medix("medix.run", ["backbone.source=local", f"backbone.model={tmp_path}/no-model"], tmp_path)
    assert_one_error_line(out, "backbone.model=", "no-model")
    assert_no_run_left_running(tmp_path)


def test_run_missing_dataset_file(tmp_path):
    out = medix("medix.run", ["dataset=jsonl", f"dataset.path={tmp_path}/missing.jsonl"], tmp_path)
    assert_one_error_line(out, "dataset.path=", "missing.jsonl", ".jsonl or .parquet")
    assert_no_run_left_running(tmp_path)


def test_run_empty_dataset(tmp_path):
    path = write_jsonl(tmp_path / "empty.jsonl", [])
    out = medix("medix.run", ["dataset=jsonl", f"dataset.path={path}"], tmp_path)
    assert_one_error_line(out, "empty.jsonl", "no usable rows", "id, problem, solution")
    assert_no_run_left_running(tmp_path)


# (a training row without a tag: tests/test_run_smoke.py::test_a_row_without_a_tag_stops_the_run_with_one_line)


# ---- medix.evaluate -------------------------------------------------------------------------------------------
def test_evaluate_config_typo(tmp_path):
    out = medix("medix.evaluate", ["generation.max_new_tokenz=3"], tmp_path)
    assert_hydra_names_the_key(out, "generation.max_new_tokenz")


def test_evaluate_missing_benchmark_file(tmp_path):
    out = medix("medix.evaluate", ["benchmark=local", f"benchmark.path={tmp_path}/missing.jsonl"], tmp_path)
    assert_one_error_line(out, "missing.jsonl", "does not exist")
    assert_no_run_left_running(tmp_path)


def test_evaluate_malformed_benchmark_file(tmp_path):
    path = write_jsonl(tmp_path / "bench.jsonl", [{"id": "a", "question": "Which organ?", "answer": "Liver"},
                                                   "{'id': 'b', not json"])
    out = medix("medix.evaluate", ["benchmark=local", f"benchmark.path={path}", "judge=rule"], tmp_path)
    assert_one_error_line(out, "bench.jsonl:2", "not valid JSON")
    assert_no_run_left_running(tmp_path)


def test_evaluate_empty_benchmark_file(tmp_path):
    path = write_jsonl(tmp_path / "bench.jsonl", [])
    out = medix("medix.evaluate", ["benchmark=local", f"benchmark.path={path}", "judge=rule"], tmp_path)
    assert_one_error_line(out, "bench.jsonl", "has no items")
    assert_no_run_left_running(tmp_path)


def test_evaluate_row_without_an_answer(tmp_path):
    path = write_jsonl(tmp_path / "bench.jsonl", [{"id": "a", "question": "Which organ?", "answer": "Liver"},
                                                   {"id": "b", "question": "Which bone?"}])
    out = medix("medix.evaluate", ["benchmark=local", f"benchmark.path={path}", "judge=rule"], tmp_path)
    assert_one_error_line(out, "bench.jsonl:2", "'answer'", "non-empty string")
    assert_no_run_left_running(tmp_path)


def test_evaluate_missing_adapter(tmp_path):
    if not SLAKE.is_file():
        pytest.skip(f"shared benchmark file not found at {SLAKE}")
    out = medix("medix.evaluate", ["benchmark=local", f"benchmark.path={SLAKE}", "benchmark.limit=2", "judge=rule",
                                   f"model.adapter={tmp_path}/no-adapter"], tmp_path)
    assert_one_error_line(out, "no-adapter", "adapter_config.json")
    assert_no_run_left_running(tmp_path)


# ---- medix.score ----------------------------------------------------------------------------------------------
def test_score_config_typo(tmp_path):
    out = medix("medix.score", ["input=x.jsonl", "output=y.jsonl", "reward.weightz=1"], tmp_path)
    assert_hydra_names_the_key(out, "reward.weightz")


def test_score_missing_input_file(tmp_path):
    out = medix("medix.score", [f"input={tmp_path}/missing.jsonl", f"output={tmp_path}/s.jsonl", "judge=rule"],
                tmp_path)
    assert_one_error_line(out, "missing.jsonl", "does not exist", "JSONL file of completions")


def test_score_malformed_line(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"completion": "<answer>Radius</answer>", "solution": "<X_RAY> Radius"},
                                               "not json"])
    out = medix("medix.score", [f"input={path}", f"output={tmp_path}/s.jsonl", "judge=rule"], tmp_path)
    assert_one_error_line(out, "input line 2", "not valid JSON")
    assert not (tmp_path / "s.jsonl").exists()


def test_score_row_without_a_tag(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [{"completion": "<answer>Spleen</answer>", "solution": "Spleen"}])
    out = medix("medix.score", [f"input={path}", f"output={tmp_path}/s.jsonl", "judge=rule"], tmp_path)
    assert_one_error_line(out, "input line 1", "'solution'", "<X_RAY>")


def test_score_empty_input(tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", [])
    out = medix("medix.score", [f"input={path}", f"output={tmp_path}/s.jsonl", "judge=rule"], tmp_path)
    assert_one_error_line(out, "in.jsonl", "no rows")
