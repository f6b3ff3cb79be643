"""Resume after SIGKILL: `python -m medix.run ... resume=<run dir>` continues the same MLflow run with every metric
step logged exactly once, the same data order as an uninterrupted run, and the same numbers for the step it redoes.

The run is killed in the middle of step 4 while its last checkpoint is from step 2 and MLflow already holds step 3:
the resumed run (Lightning's checkpoint: weights, optimizer, scheduler, loops; the data position; the module's RNG
and step) must redo step 3 to reach the same weights without logging it again, then log step 4.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from medix.config import register_configs
from medix_cli import offline_env, sigkill_when

pytestmark = pytest.mark.slow  # real training runs killed and resumed

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 4
CHECKPOINT_EVERY = 2
KILL_AFTER_STEP = 3  # logged, but after the checkpoint of step 2: the resumed run redoes it without logging it
# One prompt x 2 completions of 8 tokens per step; the continuous embedding reward differs between the two, so every
# step updates the LoRA weights and the redone step matches only if weights, optimizer and RNG were all restored.
OVERRIDES = ["experiment=smoke", "reward=embed_only", "reward.components.embedding.mode=continuous",
             "algorithm.prompts_per_step=1", "algorithm.sampling.max_new_tokens=8", f"trainer.max_steps={MAX_STEPS}",
             f"callbacks.checkpoint.every_n_steps={CHECKPOINT_EVERY}", f"trainer.val_check_interval={MAX_STEPS}"]
EVERY_STEP = ["loss", "kl", "clip_ratio", "entropy", "lr", "reward/overall/mean", "reward/embedding/mean",
              "completion/mean_length", "time/rollout_s"]


def command(tmp: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medix.run", *OVERRIDES, f"hydra.run.dir={tmp}/hydra", f"paths.output_dir={tmp}/out",
            f"logger.tracking_uri=sqlite:///{tmp}/mlflow.db", "+callbacks.record._target_=run_probes.StepRecorder",
            f"+callbacks.record.dirpath={tmp}/record", *extra]


def env() -> dict[str, str]:
    # one BLAS thread: steady on a shared machine, and the same kernels in the killed and in the resumed process
    return offline_env(OMP_NUM_THREADS="1")


def records(tmp: Path) -> list[dict]:
    path = tmp / "record" / "rank0.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def kill_mid_run(tmp: Path) -> list[dict]:
    """Start the run and SIGKILL it as soon as step KILL_AFTER_STEP + 1 begins (step KILL_AFTER_STEP's metrics and
    sample table written); returns what it recorded."""
    sigkill_when(command(tmp), cwd=tmp, env=env(), log_path=tmp / "killed.log", what=f"step {KILL_AFTER_STEP}",
                 reached=lambda: any(r["phase"] == "start" and r["step"] == KILL_AFTER_STEP + 1 for r in records(tmp)))
    return records(tmp)


def expected_ids_per_step() -> list[list[str]]:
    """The data order of an uninterrupted run: the first MAX_STEPS batches of its training DataLoader."""
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[*OVERRIDES, "paths.output_dir=/tmp/x"])
    data = instantiate(cfg.dataset)
    data.setup("fit")
    batches = iter(data.train_dataloader())
    return [[s.id for s in next(batches).samples] for _ in range(MAX_STEPS)]


def train_steps(rows: list[dict]) -> dict[int, dict]:
    return {r["step"]: r for r in rows if r["phase"] == "train"}


# Two runs of medix.run: about 60-90 s on this 2-core machine when quiet.
def test_resume_after_sigkill_continues_the_same_mlflow_run_without_losing_or_repeating_a_step(tmp_path):
    killed = train_steps(kill_mid_run(tmp_path))
    checkpoint = tmp_path / "out" / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["grpo"]["step"] == CHECKPOINT_EVERY, f"killed too late: checkpoint of step {state['grpo']['step']}"
    assert state["PromptDataModule"] == {"epoch": 0, "batches_done": CHECKPOINT_EVERY}
    lora_b = [v for k, v in state["state_dict"].items() if "lora_B" in k]
    assert lora_b and all("lora_" in k for k in state["state_dict"])  # only the adapter is saved
    assert any(bool(v.abs().sum() > 0) for v in lora_b)  # the steps so far moved the adapter off its init
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    [killed_run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert killed_run.info.status == "RUNNING"  # SIGKILL: nobody marked it
    assert killed_run.info.run_id == state["grpo"]["mlflow_run_id"]
    assert sorted(m.step for m in client.get_metric_history(killed_run.info.run_id, "loss")) == [1, 2, 3]

    (tmp_path / "record" / "rank0.jsonl").rename(tmp_path / "record" / "killed.jsonl")
    resumed = subprocess.run(command(tmp_path, f"resume={tmp_path / 'out'}"), cwd=tmp_path, env=env(),
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    redone = train_steps(records(tmp_path))
    assert sorted(redone) == [3, 4]

    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1, runs[["run_id", "status"]]
    run_id = runs.iloc[0].run_id
    assert run_id == state["grpo"]["mlflow_run_id"] and runs.iloc[0].status == "FINISHED"

    # every metric: each step at most once; the per-step ones at exactly 1..MAX_STEPS
    for name in client.get_run(run_id).data.metrics:
        steps = [m.step for m in client.get_metric_history(run_id, name)]
        assert len(steps) == len(set(steps)), f"{name}: a step written twice: {sorted(steps)}"
    for name in EVERY_STEP:
        steps = sorted(m.step for m in client.get_metric_history(run_id, name))
        assert steps == list(range(1, MAX_STEPS + 1)), f"{name}: steps {steps}"
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/reward/overall/mean")) == [MAX_STEPS]
    assert [m.step for m in client.get_metric_history(run_id, "data/train_rows")] == [0]

    # the same data order as an uninterrupted run, and the redone step 3 equals the logged one (weights, optimizer,
    # RNG and data position restored): same prompts, rewards and loss
    ids = [killed[s]["batch_ids"] for s in (1, 2, 3)] + [redone[4]["batch_ids"]]
    assert ids == expected_ids_per_step()
    assert redone[KILL_AFTER_STEP]["batch_ids"] == killed[KILL_AFTER_STEP]["batch_ids"]
    assert redone[KILL_AFTER_STEP]["overall"] == pytest.approx(killed[KILL_AFTER_STEP]["overall"], rel=1e-6)
    for key in ("loss", "kl", "entropy", "completion/mean_length"):
        assert redone[KILL_AFTER_STEP]["logged"][key] == pytest.approx(killed[KILL_AFTER_STEP]["logged"][key],
                                                                       rel=1e-5, abs=1e-9), key
    logged_loss = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert logged_loss[KILL_AFTER_STEP] == pytest.approx(killed[KILL_AFTER_STEP]["logged"]["loss"], rel=1e-6)

    tables = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert tables == [f"samples/step_{s:05d}.json" for s in range(1, MAX_STEPS + 1)]
    final = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert final["grpo"]["step"] == MAX_STEPS and final["PromptDataModule"]["batches_done"] == MAX_STEPS
    assert final["grpo"]["mlflow_run_id"] == run_id
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()


def test_a_judge_error_leaves_a_checkpoint_that_redoes_the_failed_step(tmp_path):
    """A judge error in step 3 stops the run with a checkpoint of step 2 whose data position is 2, not 3: resuming
    trains step 3 on the prompts the failed step had, and continues the same MLflow run."""
    failing = subprocess.run(command(tmp_path, "+reward.components.outage._target_=run_probes.judge_error_at",
                                     "+reward.components.outage.step=3", "+reward.weights.outage=0.1"),
                             cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900)
    assert failing.returncode == 2 and "judge unreachable (test: step 3)" in failing.stderr
    assert f"resume={tmp_path / 'out'}" in failing.stdout + failing.stderr  # how to continue, in the log
    state = torch.load(tmp_path / "out" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert state["grpo"]["step"] == 2 and state["PromptDataModule"]["batches_done"] == 2
    failed_batch = [r["batch_ids"] for r in records(tmp_path) if r["phase"] == "start" and r["step"] == 3]
    (tmp_path / "record" / "rank0.jsonl").unlink()

    resumed = subprocess.run(command(tmp_path, f"resume={tmp_path / 'out'}",
                                     "+reward.components.outage._target_=run_probes.judge_error_at",
                                     "+reward.components.outage.step=-1", "+reward.weights.outage=0.1"),
                             cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = train_steps(records(tmp_path))
    assert sorted(steps) == [3, 4] and [steps[3]["batch_ids"]] == failed_batch
    assert [steps[s]["batch_ids"] for s in (3, 4)] == expected_ids_per_step()[2:]
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    [run] = mlflow.search_runs(search_all_experiments=True).itertuples()
    assert run.status == "FINISHED"
    assert sorted(m.step for m in mlflow.MlflowClient().get_metric_history(run.run_id, "loss")) == [1, 2, 3, 4]
