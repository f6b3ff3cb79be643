"""Secrets never reach MLflow, Hydra's output folder or logs: key detection, redaction, the Hydra callback, and one
smoke run with planted keys (command line and environment) whose every output byte is scanned."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from judge_http import RestartableJudgeServer
from medix.config import register_configs
from medix.tracking.hydra_redact import hide_secret_overrides, secret_env_name
from medix.tracking.params import REDACTED, is_secret_key, redact, run_params, scrub_text, secret_values
from medix_cli import offline_env

REPO = Path(__file__).resolve().parents[1]
CALLBACK = "++hydra.callbacks.redact_secrets._target_=medix.tracking.hydra_redact.RedactSecrets"


@pytest.mark.parametrize("key", ["judge.api_key", "model.api_key", "hf_token", "access_token", "X-Api-Key", "apiKey",
                                 "db.password", "client_secret", "aws_secret_access_key", "Authorization"])
def test_secret_keys_are_recognised(key):
    assert is_secret_key(key)


@pytest.mark.parametrize("key", ["judge.max_tokens", "algorithm.sampling.max_new_tokens", "judge_protocol.max_tokens",
                                 "tokenizer", "top_logprobs", "cache_key", "keyword", "monkey"])
def test_token_counts_and_other_keys_stay_visible(key):
    assert not is_secret_key(key)


@pytest.mark.parametrize("root", ["config", "eval", "score"])
def test_composed_configs_redact_exactly_the_api_keys(root, monkeypatch):
    monkeypatch.setenv("MEDIX_JUDGE_API_KEY", "sk-env-" + uuid.uuid4().hex)
    monkeypatch.setenv("MEDIX_MODEL_API_KEY", "sk-env-" + uuid.uuid4().hex)
    register_configs()
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose(root, overrides=["judge=qwen"])
    OmegaConf.set_struct(cfg, False)
    cfg.paths.output_dir = "/tmp/out"  # ${hydra:...} does not resolve outside a Hydra run
    if "eval" in cfg:
        cfg.eval.output_dir = "/tmp/out/eval"
    params = run_params(cfg)
    hidden = sorted(k for k, v in params.items() if v == REDACTED)
    expected = {"config": ["judge.api_key"], "eval": ["judge.api_key", "model.api_key"], "score": ["judge.api_key"]}
    assert hidden == expected[root]
    assert params["judge.max_tokens"] == "4"
    assert all(os.environ["MEDIX_JUDGE_API_KEY"] not in v for v in params.values())


def test_credential_values_are_redacted_under_any_key():
    planted = "sk-test-PLANTED-" + uuid.uuid4().hex
    tree = {"judge": {"base_url": "https://user:hunter2@judge.example/v1", "note": f"key {planted} here",
                      "headers": ["Bearer abc.def-ghi"], "model": "Qwen/Qwen3-4B-Instruct-2507"}}
    out = redact(tree)["judge"]
    assert out["base_url"] == f"https://{REDACTED}@judge.example/v1"
    assert out["note"] == f"key {REDACTED} here" and out["headers"] == [REDACTED]
    assert out["model"] == "Qwen/Qwen3-4B-Instruct-2507"


def test_free_text_is_scrubbed_of_the_configs_secret_values():
    cfg = OmegaConf.create({"judge": {"api_key": "plain-secret-value-123", "model": "m"}, "model": {"api_key": "EMPTY"}})
    assert secret_values(cfg) == ["plain-secret-value-123"]
    text = "AuthenticationError: key plain-secret-value-123 rejected; model m"
    assert scrub_text(text, cfg) == f"AuthenticationError: key {REDACTED} rejected; model m"


def test_secret_overrides_move_into_the_environment():
    environ: dict[str, str] = {}
    overrides = ["judge=qwen", "judge.api_key=sk-abc", "+judge.extra_body.hf_token='hf value'",
                 "judge.max_tokens=8", "judge.api_key=${oc.env:OTHER}", "judge.api_key=a,b"]
    hidden, moved = hide_secret_overrides(overrides, environ)
    assert hidden == ["judge=qwen", "judge.api_key=${oc.env:MEDIX_SECRET_JUDGE_API_KEY}",
                      "+judge.extra_body.hf_token=${oc.env:MEDIX_SECRET_JUDGE_EXTRA_BODY_HF_TOKEN}",
                      "judge.max_tokens=8", "judge.api_key=${oc.env:OTHER}", "judge.api_key=a,b"]
    assert environ == {"MEDIX_SECRET_JUDGE_API_KEY": "sk-abc", "MEDIX_SECRET_JUDGE_EXTRA_BODY_HF_TOKEN": "hf value"}
    assert secret_env_name("judge.api_key") == "MEDIX_SECRET_JUDGE_API_KEY" and set(moved) == {
        "judge.api_key", "judge.extra_body.hf_token"}


@pytest.mark.slow  # medix.run in a subprocess
@pytest.mark.parametrize("mode", ["run", "multirun"])
def test_hydra_output_folder_never_holds_a_command_line_key(mode, tmp_path):
    """Fast (the run stops at a missing dataset file): Hydra has already written .hydra/ and, for -m, multirun.yaml."""
    cli_key, env_key = f"sk-test-PLANTED-{uuid.uuid4()}", f"sk-test-PLANTED-{uuid.uuid4()}"
    env = offline_env(MEDIX_JUDGE_API_KEY=env_key)
    folder = ["-m", f"hydra.sweep.dir={tmp_path}/hydra"] if mode == "multirun" else [f"hydra.run.dir={tmp_path}/hydra"]
    cmd = [sys.executable, "-m", "medix.run", *folder, "judge=qwen", f"judge.api_key={cli_key}",
           "+judge.extra_body.user_token=${oc.env:MEDIX_JUDGE_API_KEY}", CALLBACK, "dataset=jsonl",
           f"dataset.path={tmp_path}/missing.jsonl", f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert "missing.jsonl" in out.stdout + out.stderr  # it got as far as reading the dataset
    names = {p.name for p in tmp_path.rglob("*") if p.is_file()}
    assert {"config.yaml", "overrides.yaml", "hydra.yaml"} <= names and ("multirun.yaml" in names) == (mode == "multirun")
    assert files_holding([cli_key.encode(), env_key.encode()], [tmp_path]) == {}
    [overrides] = [p for p in tmp_path.rglob("overrides.yaml") if p.parent.name == ".hydra"]
    text = overrides.read_text()  # recorded as a reference to the environment variable the value moved into
    assert "judge.api_key=" in text and secret_env_name("judge.api_key") in text
    assert cli_key not in out.stdout + out.stderr and env_key not in out.stdout + out.stderr


# ---- one smoke run, every byte scanned --------------------------------------------------------------------------
def files_holding(needles: list[bytes], roots: list[Path], newer_than: float = 0.0) -> dict[str, list[str]]:
    """{file: [needles found]} over every file under `roots` (modified after `newer_than`), read as bytes."""
    found: dict[str, list[str]] = {}
    for root in roots:
        for path in root.rglob("*"):
            if not path.is_file() or path.stat().st_mtime < newer_than:
                continue
            data = path.read_bytes()
            hits = [n.decode() for n in needles if n in data]
            if hits:
                found[str(path)] = hits
    return found


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """A smoke run given one key on the command line and one through the environment (interpolated into the config)."""
    tmp = tmp_path_factory.mktemp("secrets")
    cli_key = f"sk-test-PLANTED-{uuid.uuid4()}"
    env_key = f"sk-test-PLANTED-{uuid.uuid4()}"
    env = offline_env(MEDIX_JUDGE_API_KEY=env_key)
    started = time.time() - 1
    with RestartableJudgeServer(lambda body: "YES") as judge:
        cmd = [sys.executable, "-m", "medix.run", "experiment=smoke", "judge=qwen", f"judge.base_url={judge.base_url}",
               f"judge.api_key={cli_key}", "+judge.extra_body.user_token=${oc.env:MEDIX_JUDGE_API_KEY}", CALLBACK,
               f"judge.cache.path={tmp}/cache/judge.sqlite", f"logger.tracking_uri=sqlite:///{tmp}/mlflow.db",
               f"hydra.run.dir={tmp}/hydra", f"paths.output_dir={tmp}/out"]
        # cwd=tmp: MLflow's default artifact folder (./mlruns) lands inside the scanned tree.
        out = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=1200)
    return out, judge, tmp, cli_key, env_key, started


@pytest.mark.slow  # the planted keys' smoke run
def test_planted_keys_are_used_by_the_judge_client(planted_run):
    out, judge, tmp, cli_key, env_key, _ = planted_run
    assert out.returncode == 0, out.stderr[-3000:]
    assert judge.requests, "the judge was never called"
    assert {h.get("authorization") for h in judge.headers} == {f"Bearer {cli_key}"}
    assert {r.get("user_token") for r in judge.requests} == {env_key}  # the env value resolved into the config


@pytest.mark.slow
def test_planted_keys_appear_in_no_output_file_and_no_log(planted_run):
    out, judge, tmp, cli_key, env_key, started = planted_run
    assert out.returncode == 0, out.stderr[-3000:]
    needles = [cli_key.encode(), env_key.encode()]
    scanned = [p for p in tmp.rglob("*") if p.is_file()]
    names = {p.name for p in scanned}
    # The scan covers what matters: Hydra's saved configs and log, the SQLite tracking db, MLflow artifacts, the cache.
    assert {"config.yaml", "overrides.yaml", "hydra.yaml", "run.log", "mlflow.db", "resolved_config.yaml",
            "judge.sqlite"} <= names, sorted(names)
    assert files_holding(needles, [tmp]) == {}
    cache_dir = Path(os.environ.get("MEDIX_CACHE_DIR", Path.home() / ".cache" / "medix"))
    if cache_dir.is_dir():
        assert files_holding(needles, [cache_dir], newer_than=started) == {}
    assert cli_key not in out.stdout + out.stderr and env_key not in out.stdout + out.stderr


@pytest.mark.slow
def test_mlflow_records_the_secret_keys_as_redacted(planted_run):
    out, judge, tmp, cli_key, env_key, _ = planted_run
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    [run] = mlflow.MlflowClient().search_runs(
        [e.experiment_id for e in mlflow.MlflowClient().search_experiments()])
    params = run.data.params
    assert params["judge.api_key"] == REDACTED and params["judge.extra_body.user_token"] == REDACTED
    assert params["judge.max_tokens"] == "4" and params["algorithm.sampling.max_new_tokens"] == "16"
    assert all(cli_key not in v and env_key not in v for v in [*params.values(), *run.data.tags.values()])
    hydra_config = (tmp / "hydra" / ".hydra" / "config.yaml").read_text()
    assert "api_key: ${oc.env:MEDIX_SECRET_JUDGE_API_KEY}" in hydra_config  # the value itself was never written
