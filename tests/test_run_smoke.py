"""`python -m medix.run` end to end on CPU: the smoke run against a fake judge over real HTTP, and bad input."""

from __future__ import annotations

import json

import mlflow
import pytest

from fake_openai import FakeOpenAIServer
from medix_cli import offline_env, run_medix

pytestmark = pytest.mark.slow  # a real `python -m medix.run` (minutes on this CPU)

METRICS = ["reward/overall/mean", "reward/overall/std", "loss", "completion/mean_length", "kl", "clip_ratio",
           "entropy", "frac_reward_zero_std", "judge/requests", "judge/items", "judge/cache_hits", "judge/failures",
           "judge/cache_hit_rate", "judge/latency_s", "time/rollout_s", "time/reward_s", "time/update_s",
           "time/step_s", "lr"] + [
    f"reward/{c}/mean" for c in ("llm_judge", "embedding", "modality", "format")]


def run_in(tmp_path, args, repo_root, env):
    return run_medix(*args, f"hydra.run.dir={tmp_path}/hydra", f"paths.output_dir={tmp_path}/out", cwd=repo_root,
                     env=env)


@pytest.fixture(scope="module")
def smoke_run(repo_root, tmp_path_factory):
    """One smoke run, shared by the assertions below (it is the slow part)."""
    tmp = tmp_path_factory.mktemp("smoke")
    env = offline_env()
    with FakeOpenAIServer(lambda body: "YES") as judge:
        out = run_in(tmp, ["experiment=smoke", "judge=qwen", f"judge.base_url={judge.base_url}",
                           f"judge.cache.path={tmp}/judge.sqlite", f"logger.tracking_uri=sqlite:///{tmp}/mlflow.db"],
                     repo_root, env)
        requests = list(judge.requests)
    return out, requests, tmp


def finished_runs(tracking_uri):
    mlflow.set_tracking_uri(tracking_uri)
    return mlflow.search_runs(search_all_experiments=True)


def test_smoke_run_finishes_with_every_metric(smoke_run):
    out, requests, tmp = smoke_run
    assert out.returncode == 0, out.stderr[-3000:]
    runs = finished_runs(f"sqlite:///{tmp}/mlflow.db")
    assert len(runs) == 1 and runs.iloc[0].status == "FINISHED"
    run_id = runs.iloc[0].run_id
    client = mlflow.MlflowClient()
    for name in METRICS:
        history = client.get_metric_history(run_id, name)
        assert [m.step for m in history] == [1, 2], name  # one value per GRPO step
    params = client.get_run(run_id).data.params
    assert params["reward.weights.embedding"] == "0.3375" and params["algorithm.name"] == "grpo"
    assert params["judge.api_key"] == "<redacted>"
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"resolved_config.yaml", "samples"} <= artifacts


def test_smoke_run_calls_the_judge_over_http_at_temperature_zero(smoke_run):
    out, requests, tmp = smoke_run
    assert requests, "the judge was never called"
    assert all(r["temperature"] == 0 for r in requests)
    assert all(r["model"] == "Qwen/Qwen3-4B-Instruct-2507" for r in requests)
    runs = finished_runs(f"sqlite:///{tmp}/mlflow.db")
    calls = mlflow.MlflowClient().get_metric_history(runs.iloc[0].run_id, "judge/requests")
    assert calls[-1].value == len(requests)  # every logged request is a real HTTP request (the cache starts empty)


def test_smoke_run_saves_the_trained_adapter_and_it_loads_back(smoke_run):
    """backbone.adapter=<run>/adapter gives the policy the run ended with: every trainable weight is the final
    checkpoint's (a wrong or partial save, or a load that dropped tensors, fails here)."""
    import torch

    from tiny_lm import build_backbone

    out, requests, tmp = smoke_run
    loaded = build_backbone("smollm2_135m", adapter=tmp / "out" / "adapter")
    trained = torch.load(tmp / "out" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    weights = {n: p for n, p in loaded.model.named_parameters() if p.requires_grad}
    assert trained and {k.removeprefix("model.") for k in trained} == set(weights)
    assert all(torch.equal(weights[k.removeprefix("model.")], v) for k, v in trained.items())


def test_a_row_without_a_tag_stops_the_run_with_one_line(repo_root, medix_env, tmp_path):
    rows = [{"id": f"row-{i}", "problem": "Which bone is fractured?", "solution": "<X_RAY> Radius"} for i in (1, 2)]
    rows.append({"id": "bad-row-3", "problem": "Which organ is enlarged?", "solution": "Spleen"})
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = run_in(tmp_path, ["experiment=smoke", "dataset=jsonl", f"dataset.path={path}",
                            f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db"], repo_root, medix_env)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "bad-row-3" in lines[0] and "solution" in lines[0]
    assert "Traceback" not in out.stderr
    assert len(finished_runs(f"sqlite:///{tmp_path}/mlflow.db")) == 0  # no half-written run
