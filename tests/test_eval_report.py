"""Evaluation reports: macro averages over shared benchmark tasks, MLflow metrics read back, run comparison, the CLI's
one-line errors (exit 2), and the rule judge."""

import json
import subprocess
import sys

import mlflow
import pytest

from medix.evaluate import evaluate
from medix.eval.tracking import compare_markdown
from test_eval_run import ITEMS, S0, S1, FakeWorld, eval_cfg, read_items, stripped, write_bench


class VerdictByQuestion(FakeWorld):
    """Judge says 1 twice when the question id is in `correct`, else 0 twice."""

    def __init__(self, correct):
        super().__init__({})
        self.correct = correct

    def handle(self, body):
        if body["model"] == "fake-model":
            return super().handle(body)
        return S1 if any(q in body["messages"][0]["content"] for q in self.correct) else S0


def test_macro_averages_over_shared_text_and_vision_tasks_and_images_reach_the_endpoint(repo_root, tmp_path, shared_benchmarks):
    medqa = [json.loads(l) for l in open(shared_benchmarks / "medqa" / "test.jsonl")][:2]
    world = VerdictByQuestion(correct=[medqa[0]["question"][:60]])
    with world.server:
        outcome = evaluate(eval_cfg(repo_root, tmp_path, world.server.base_url, "benchmark=all",
                                          f"benchmark.data_dir={shared_benchmarks}", "benchmark.limit=2",
                                          "benchmark.missing=skip"))
    m = outcome.metrics
    tasks = [k.split("/")[1] for k in m if k.endswith("/accuracy")]
    assert len(tasks) == 12 and m["eval/medqa/accuracy"] == 0.5
    assert all(m[f"eval/{t}/accuracy"] == 0.0 for t in tasks if t != "medqa")
    assert m["eval/text"] == pytest.approx(0.5 / 9) and m["eval/vision"] == 0.0
    assert m["eval/overall"] == pytest.approx(0.5 / 12)
    image_requests = [r for r in world.model_requests() if isinstance(r["messages"][0]["content"], list)]
    assert len(image_requests) == 4  # vqa_rad and pathvqa ship images; the SLAKE copy has none
    assert all(r["messages"][0]["content"][0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
               for r in image_requests)
    assert "| **vision** (macro) | | | **0.00** |" in outcome.markdown


def test_text_only_endpoints_get_no_images(repo_root, tmp_path, shared_benchmarks):
    world = VerdictByQuestion(correct=[])
    with world.server:
        evaluate(eval_cfg(repo_root, tmp_path, world.server.base_url, "benchmark=vqa_rad",
                                f"benchmark.data_dir={shared_benchmarks}", "benchmark.limit=2", "model.send_images=false"))
    assert [type(r["messages"][0]["content"]) for r in world.model_requests()] == [str, str]


def test_accuracy_logged_to_mlflow_equals_what_the_verdicts_imply_and_runs_compare(repo_root, tmp_path):
    bench = write_bench(tmp_path / "bench.jsonl")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_ids = []
    for name, correct in (("first", ["NSAID", "thigh"]), ("second", ["NSAID"])):
        world = VerdictByQuestion(correct=correct)
        with world.server:
            outcome = evaluate(eval_cfg(repo_root, tmp_path, world.server.base_url, f"benchmark.path={bench}",
                                              "logger=mlflow", f"logger.tracking_uri={uri}", f"eval.run_name={name}",
                                              f"eval.output_dir={tmp_path / name}", f"paths.cache_dir={tmp_path / name}"))
        run_ids.append(outcome.run_id)
        scores = [row["score"] for row in read_items(tmp_path / name / "bench" / "items.jsonl").values()]
        mlflow.set_tracking_uri(uri)
        [run] = mlflow.search_runs(experiment_names=["medix-eval"], filter_string=f"attributes.run_name = '{name}'",
                                   output_format="list")
        assert run.data.metrics["eval/bench/accuracy"] == pytest.approx(sum(scores) / len(scores))
        assert run.data.metrics["eval/overall"] == pytest.approx(sum(scores) / len(scores))
        assert run.data.metrics["judge/requests"] == 8 == run.data.metrics["judge/items"]
        assert run.data.params["model.name"] == "fake-model" and run.data.params["judge.api_key"] == "<redacted>"
        artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
        assert {"results.md", "eval_items.json", "items"} <= artifacts
    table = compare_markdown(uri, run_ids=run_ids)
    assert f"| bench | 50.00 | 25.00 |" in table and "first (" in table and "second (" in table
    assert compare_markdown(uri, experiment="medix-eval") == table


def test_rule_judge_gives_one_verdict_per_item_without_llm_calls(repo_root, tmp_path):
    bench = write_bench(tmp_path / "bench.jsonl", [
        {"id": "r1", "question": "Which drug is an NSAID?", "choices": ["Aspirin", "Insulin"], "answer": "Aspirin"},
        {"id": "r2", "question": "Which organ makes insulin?", "choices": None, "answer": "pancreas"}])
    world = FakeWorld({})
    world.server.handler = lambda body: "<thinking>pancreas?</thinking> Aspirin, of course"
    with world.server:
        outcome = evaluate(eval_cfg(repo_root, tmp_path, world.server.base_url, f"benchmark.path={bench}",
                                          judge="rule"))
    rows = read_items(tmp_path / "eval" / "bench" / "items.jsonl")
    assert (rows["r1"]["score"], rows["r2"]["score"]) == (1.0, 0.0)  # the reasoning block is cut before judging
    assert outcome.metrics["judge/requests"] == 0 and outcome.metrics["judge/items"] == 2
    assert len(world.server.chat_requests) == 2


def run_cli(repo_root, env, tmp_path, *args):
    return subprocess.run([sys.executable, "-m", "medix.evaluate", "logger=none", f"hydra.run.dir={tmp_path / 'h'}",
                           *args], cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("content, expected", [
    (None, "does not exist"),
    ('{"id": "a", "question": "q", "answer": "x"}\n{"id": "b", "question": "q"\n', "bench.jsonl:2: not valid JSON"),
    ('{"id": "a", "question": "q", "answer": 3}\n', "bench.jsonl:1: field 'answer' must be a non-empty string"),
    ("", "has no items"),
])
@pytest.mark.slow  # medix.evaluate in a subprocess
def test_cli_bad_benchmark_input_prints_one_line_and_exits_2(repo_root, medix_env, tmp_path, content, expected):
    bench = tmp_path / "bench.jsonl"
    if content is not None:
        bench.write_text(content)
    result = run_cli(repo_root, medix_env, tmp_path, f"benchmark.path={bench}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().count("\n") == 0 and expected in result.stderr and str(bench) in result.stderr


@pytest.mark.parametrize("override, expected, one_line", [
    ("judge.on_failure=ignore", "error: judge.on_failure: 'ignore' is not valid", True),
    ("judge_protocol.prompt=fancy", "error: judge_protocol.prompt: 'fancy' is not one of", True),
    ("judge.timout_s=3", "Key 'timout_s' not in 'OpenAIJudgeConfig'", False),  # Hydra's compose error, at once
])
@pytest.mark.slow  # medix.evaluate in a subprocess
def test_cli_bad_judge_config_names_the_key(repo_root, medix_env, tmp_path, override, expected, one_line):
    bench = write_bench(tmp_path / "bench.jsonl", ITEMS[:1])
    (tmp_path / "eval" / "bench").mkdir(parents=True)  # a saved prediction: nothing to generate, one item to judge
    (tmp_path / "eval" / "bench" / "predictions.jsonl").write_text(json.dumps({"id": "q1", "prediction": "x"}) + "\n")
    result = run_cli(repo_root, medix_env, tmp_path, f"benchmark.path={bench}", "judge=openai",
                     "judge.base_url=http://127.0.0.1:9/v1", f"eval.output_dir={tmp_path / 'eval'}", override)
    assert result.returncode != 0 and expected in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    if one_line:
        assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr


@pytest.mark.slow  # medix.evaluate in a subprocess
def test_cli_evaluates_then_compares(repo_root, medix_env, tmp_path):
    bench = write_bench(tmp_path / "bench.jsonl", ITEMS[:2])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    world = FakeWorld({stripped(ITEMS[0]): [S1, S1], stripped(ITEMS[1]): [S0, S0]})
    with world.server:
        url = world.server.base_url
        result = run_cli(repo_root, medix_env, tmp_path, f"benchmark.path={bench}", "model.kind=endpoint",
                         f"model.base_url={url}", "model.name=fake-model", "judge=openai", f"judge.base_url={url}",
                         "judge.model=fake-judge", f"eval.output_dir={tmp_path / 'out'}", "logger=mlflow",
                         f"logger.tracking_uri={uri}", f"paths.cache_dir={tmp_path / 'cache'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| bench | text | 2 | 50.00 |" in result.stdout
    run_id = result.stdout.split("mlflow run: ")[1].split()[0]
    compared = run_cli(repo_root, medix_env, tmp_path, "logger=mlflow", f"logger.tracking_uri={uri}", f"compare=[{run_id}]")
    assert compared.returncode == 0, compared.stderr[-3000:]
    assert "| bench | 50.00 |" in compared.stdout and "| **overall** (macro) | 50.00 |" in compared.stdout
    missing = run_cli(repo_root, medix_env, tmp_path, "logger=mlflow", f"logger.tracking_uri={uri}",
                      "+compare.experiment=nope")
    assert missing.returncode == 2 and "compare.experiment='nope'" in missing.stderr
