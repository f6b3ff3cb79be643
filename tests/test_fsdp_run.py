"""trainer=fsdp through `python -m medix.run` on CPU: 2 gloo ranks of Lightning's ModelParallelStrategy, the
GRPO module sharding SmolLM2-135M (full fine-tune, with its frozen KL reference) per decoder layer with FSDP2.
The math of data-parallel FSDP2 against one process is checked in tests/test_fsdp.py."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
import pytest
import torch

from medix_cli import offline_env

pytestmark = pytest.mark.slow  # a 2-process FSDP2 training run


@pytest.fixture(scope="module")
def fsdp_run(repo_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_run")
    env = offline_env(OMP_NUM_THREADS="1")
    # The command, plus: no judge (its server is not what this test is about), a reward with signal and no
    # weight decay, so the saved weights can only differ from the base through the policy gradient.
    cmd = [sys.executable, "-m", "medix.run", "experiment=smoke", "trainer=fsdp", "trainer.accelerator=cpu",
           "trainer.devices=2", "trainer.precision=32-true", "backbone.lora=null",
           "reward=embed_only", "reward.components.embedding.mode=continuous", "algorithm.optimizer.weight_decay=0",
           "algorithm.optimizer.lr=1e-4", "callbacks.checkpoint.every_n_steps=1",
           "callbacks.warm_start.steps=1", "callbacks.warm_start.batch_size=2",  # on the sharded policy
           f"logger.tracking_uri=sqlite:///{tmp}/mlflow.db", f"hydra.run.dir={tmp}/hydra", f"paths.output_dir={tmp}/out"]
    out = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=900, start_new_session=True)
    assert out.returncode == 0, out.stderr[-4000:]
    return tmp


def test_the_run_finishes_with_the_reward_metrics(fsdp_run):
    mlflow.set_tracking_uri(f"sqlite:///{fsdp_run}/mlflow.db")
    [run] = mlflow.MlflowClient().search_runs([e.experiment_id for e in mlflow.MlflowClient().search_experiments()])
    assert run.info.status == "FINISHED"
    client = mlflow.MlflowClient()
    for key in ("reward/overall/mean", "reward/embedding/mean", "loss", "kl", "val/reward/overall/mean",
                "warm_start/loss"):
        assert client.get_metric_history(run.info.run_id, key), key
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]


def test_the_saved_full_model_loads_is_finite_and_trained(fsdp_run):
    from transformers import AutoModelForCausalLM

    from medix.models.gguf import smollm2_folder

    trained = AutoModelForCausalLM.from_pretrained(fsdp_run / "out" / "model").state_dict()
    base = AutoModelForCausalLM.from_pretrained(smollm2_folder(os.environ.get(
        "MEDIX_CACHE_DIR", os.path.expanduser("~/.cache/medix")))).state_dict()
    assert trained.keys() == base.keys()
    assert all(torch.isfinite(v).all() for v in trained.values())
    moved = max((trained[k] - base[k]).abs().max().item() for k in trained)
    assert moved > 1e-5  # no weight decay: only the policy gradient moves weights


def test_checkpoints_are_folders_of_per_rank_shards_holding_the_grpo_state(fsdp_run):
    from medix.grpo.callbacks import checkpoint_state, resolve_checkpoint

    checkpoint = resolve_checkpoint(fsdp_run / "out")
    assert checkpoint.is_dir() and {"__0_0.distcp", "__1_0.distcp", "meta.pt"} <= {p.name for p in checkpoint.iterdir()}
    assert checkpoint_state(checkpoint)["step"] == 2 and checkpoint_state(checkpoint)["mlflow_run_id"]
