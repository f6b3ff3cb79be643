"""Hydra multirun sweeps of `python -m medix.run` on CPU against a fake judge over real HTTP: a grid sweep leaves one
FINISHED MLflow run per value, a failed job is recorded FAILED and the sweep goes on, and an Optuna search maximises
the validation metric; plus MLflow organisation read back with MlflowClient and the system-metrics helper."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from fake_openai import FakeHTTPError, FakeOpenAIServer
from medix_cli import offline_env

pytestmark = pytest.mark.slow  # sweeps of real training runs

REPO = Path(__file__).resolve().parents[1]
QWEN = "Qwen/Qwen3-4B-Instruct-2507"
REWARD_METRICS = ["reward/overall/mean", "reward/llm_judge/mean", "reward/format/mean", "reward/modality/mean"]


def sweep_env() -> dict[str, str]:
    # one BLAS thread per job: on a shared 2-core machine OpenMP's spinning threads slow every job down
    return offline_env(OMP_NUM_THREADS="1")


def run_sweep(args: list[str], tmp: Path, *, timeout: int = 2400) -> subprocess.CompletedProcess:
    """`python -m medix.run <args>` started in `tmp` (MLflow artifacts land in tmp/mlruns), sweep folder tmp/multirun."""
    cmd = [sys.executable, "-m", "medix.run", *args, f"logger.tracking_uri=sqlite:///{tmp}/mlflow.db",
           f"judge.cache.path={tmp}/judge.sqlite", f"hydra.sweep.dir={tmp}/multirun"]
    return subprocess.run(cmd, cwd=tmp, env=sweep_env(), capture_output=True, text=True, timeout=timeout)


def runs_of(tmp: Path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    runs = mlflow.search_runs(search_all_experiments=True)
    return runs.sort_values("tags.job_number").reset_index(drop=True)


def run_grid_sweep_once(tmp_path_factory) -> Path:
    """The 2-job grid sweep over reward.weights.embedding; run once per pytest session (test_notebook reuses it)."""
    tmp = tmp_path_factory.getbasetemp() / "grid_sweep"
    done = tmp / "done"
    if done.exists():
        return tmp
    tmp.mkdir(exist_ok=True)
    with FakeOpenAIServer(lambda body: "YES") as judge:
        out = run_sweep(["-m", "experiment=smoke", "reward.weights.embedding=0,0.3375", "judge=qwen",
                         f"judge.base_url={judge.base_url}", "logger.experiment_name=grid_sweep"], tmp)
    (tmp / "stderr.txt").write_text(out.stderr)
    assert out.returncode == 0, out.stderr[-4000:]
    done.write_text("ok")
    return tmp


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory) -> Path:
    return run_grid_sweep_once(tmp_path_factory)


def test_grid_sweep_leaves_one_finished_run_per_value(grid_sweep):
    runs = runs_of(grid_sweep)
    assert len(runs) == 2 and set(runs.status) == {"FINISHED"}
    assert [float(v) for v in runs["params.reward.weights.embedding"]] == [0.0, 0.3375]
    assert list(runs["tags.job_number"]) == ["0", "1"]
    assert set(runs["tags.sweep_id"]) == {str(grid_sweep / "multirun")}
    client = mlflow.MlflowClient()
    for run_id in runs.run_id:
        for name in REWARD_METRICS:
            assert [m.step for m in client.get_metric_history(run_id, name)] == [1, 2], name
        val = client.get_metric_history(run_id, "val/reward/llm_judge/mean")
        assert len(val) == 1 and 0.0 <= val[0].value <= 1.0  # the validation at the last step
    without_embedding, with_embedding = runs.run_id
    assert len(client.get_metric_history(with_embedding, "reward/embedding/mean")) == 2
    assert client.get_metric_history(without_embedding, "reward/embedding/mean") == []  # weight 0: not computed


def test_runs_say_their_reward_mix_and_algorithm(grid_sweep):
    runs = runs_of(grid_sweep)
    client = mlflow.MlflowClient()
    names = list(runs["tags.mlflow.runName"])
    assert names[0] != names[1] and all(n.startswith("grpo|") and "smollm2_135m" in n for n in names)
    assert "emb0-" in names[0] and "emb0.338-" in names[1]  # reward_mix_signature: 3 significant digits
    assert list(runs["tags.reward_mix"]) == [n.split("|")[1] for n in names]
    assert set(runs["tags.algorithm"]) == {"grpo"} and set(runs["tags.backbone"]) == {"smollm2_135m"}
    assert all(re.fullmatch(r"[0-9a-f]{7,40}", c) for c in runs["tags.git_commit"])
    assert set(runs["experiment_id"]) == {client.get_experiment_by_name("grid_sweep").experiment_id}
    for run_id, weight in zip(runs.run_id, (0.0, 0.3375)):
        params = client.get_run(run_id).data.params
        assert params["judge.api_key"] == "<redacted>" and params["judge.model"] == QWEN
        assert params["algorithm.name"] == "grpo" and params["trainer.max_steps"] == "2"
        artifacts = {a.path for a in client.list_artifacts(run_id)}
        assert {"resolved_config.yaml", "samples"} <= artifacts
        config = yaml.safe_load(Path(client.download_artifacts(run_id, "resolved_config.yaml")).read_text())
        assert config["reward"]["weights"]["embedding"] == weight and config["judge"]["api_key"] == "<redacted>"
        tables = [a.path for a in client.list_artifacts(run_id, "samples")]
        assert tables == ["samples/step_00001.json", "samples/step_00002.json"]  # smoke: a table every step
        table = json.loads(Path(client.download_artifacts(run_id, tables[0])).read_text())
        rows = [dict(zip(table["columns"], row)) for row in table["data"]]
        assert all(isinstance(r["truncated"], bool) and r["id"] and r["completion"] is not None for r in rows)
        assert "guarded" not in table["columns"]  # experiment=smoke turns the degenerate guard off


def judge_down_for(model: str):
    def handler(body: dict) -> str:
        if body["model"] == model:
            raise FakeHTTPError(503, "judge overloaded")
        return "YES"
    return handler


def test_a_failed_job_is_recorded_failed_and_the_sweep_goes_on(tmp_path):
    """Job 0's judge answers 503 (judge.on_failure=raise): that run ends FAILED, job 1 still runs and finishes."""
    with FakeOpenAIServer(judge_down_for("broken-judge")) as judge:
        out = run_sweep(["-m", "experiment=smoke", "trainer.max_steps=1", "judge=qwen",
                         f"judge.base_url={judge.base_url}", f"judge.model=broken-judge,{QWEN}",
                         "judge.on_failure=raise", "judge.max_retries=0", "logger.experiment_name=failing_sweep"],
                        tmp_path)
        models = [r["model"] for r in judge.requests]
    assert out.returncode == 0, out.stderr[-4000:]  # a failed job does not end the sweep
    assert "job failed: JudgeError" in out.stdout + out.stderr  # Hydra's job log goes to stdout
    assert "broken-judge" in models and QWEN in models
    assert models.index(QWEN) > models.index("broken-judge")  # job 1 ran after job 0 failed
    runs = runs_of(tmp_path)
    assert list(runs.status) == ["FAILED", "FINISHED"]
    assert list(runs["params.judge.model"]) == ["broken-judge", QWEN]
    client = mlflow.MlflowClient()
    failed = runs.run_id[0]
    trace = Path(client.download_artifacts(failed, "exception.txt")).read_text()
    assert "JudgeError" in trace and "on_failure=raise" in trace
    assert len(client.get_metric_history(runs.run_id[1], "reward/overall/mean")) == 1


def hparams_search_override(name: str) -> str:
    """`hparams_search=<name>` once conf/config.yaml lists the group in its defaults, else `+hparams_search=<name>`."""
    defaults = yaml.safe_load((REPO / "conf" / "config.yaml").read_text())["defaults"]
    listed = any(isinstance(d, dict) and any(k.endswith("hparams_search") for k in d) for d in defaults)
    return f"{'' if listed else '+'}hparams_search={name}"


def test_optuna_search_maximises_the_validation_metric(tmp_path):
    space = yaml.safe_load((REPO / "conf" / "hparams_search" / "reward_weights.yaml").read_text())
    bounds = {k: tuple(float(x) for x in re.fullmatch(r"interval\((.*),(.*)\)", v.replace(" ", "")).groups())
              for k, v in space["hydra"]["sweeper"]["params"].items()}
    with FakeOpenAIServer(lambda body: "YES") as judge:
        out = run_sweep([hparams_search_override("reward_weights"), "hydra.sweeper.n_trials=2", "experiment=smoke",
                         "judge=qwen", f"judge.base_url={judge.base_url}", "logger.experiment_name=optuna_sweep"],
                        tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    runs = runs_of(tmp_path)
    assert len(runs) == 2 and set(runs.status) == {"FINISHED"}
    assert set(runs["tags.sweep_id"]) == {str(tmp_path / "multirun")}
    weights = [{k: float(row[f"params.{k}"]) for k in bounds} for _, row in runs.iterrows()]
    assert weights[0] != weights[1]
    for w in weights:
        assert all(lo <= w[k] <= hi for k, (lo, hi) in bounds.items()), w
    client = mlflow.MlflowClient()
    objective = [client.get_metric_history(r, "val/reward/llm_judge/mean")[-1].value for r in runs.run_id]
    result = yaml.safe_load((tmp_path / "multirun" / "optimization_results.yaml").read_text())
    assert result["best_value"] == pytest.approx(max(objective))  # the job's return value is the MLflow metric
    best = [w for w, v in zip(weights, objective) if v == pytest.approx(max(objective))]
    assert any(all(math.isclose(w[k], float(result["best_params"][k])) for k in bounds) for w in best)


def test_a_submitit_sweep_lands_one_finished_mlflow_run_per_job(tmp_path):
    """hydra/launcher=submitit_local: each sweep job is a submitit job (here a local process; on a cluster,
    hydra/launcher=slurm) running one medix training run."""
    out = run_sweep(["-m", "hydra/launcher=submitit_local", "experiment=smoke", "trainer.max_steps=1",
                     "reward=embed_only", "reward.weights.format=0.1,0.2", "logger.experiment_name=submitit_sweep"],
                    tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    runs = runs_of(tmp_path)
    assert list(runs.status) == ["FINISHED", "FINISHED"]
    assert [float(v) for v in runs["params.reward.weights.format"]] == [0.1, 0.2]
    assert set(runs["tags.sweep_id"]) == {str(tmp_path / "multirun")}
    assert (tmp_path / "multirun" / ".submitit").is_dir()  # submitit's own job folders
    client = mlflow.MlflowClient()
    assert all(len(client.get_metric_history(r, "reward/overall/mean")) == 1 for r in runs.run_id)


def test_the_slurm_launcher_sizes_each_job_from_the_trainer_config():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from medix.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "experiment=paper_8b_dapo", "trainer.num_nodes=2",
                                           "paths.output_dir=/tmp/x"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 8, 8)
