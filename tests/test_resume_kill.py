"""Resume after SIGKILL: `python -m medix.run ... resume=<run dir>` continues the same MLflow run with every metric
step logged exactly once, the same data order as an uninterrupted run, and the same numbers for the step it redoes.

The run is killed in the middle of step 4 while its last checkpoint is from step 2 and MLflow already holds step 3: the
resumed run must redo step 3 (to reach the same weights) without logging it again, then log step 4.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import torch
from hydra import compose, initialize_config_dir

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 4
CHECKPOINT_EVERY = 2
KILL_AFTER_STEP = 3  # logged, but after the checkpoint of step 2: the resumed run redoes it without logging it
# One prompt x 2 completions of 8 tokens per step; the continuous embedding reward differs between the two, so every
# step updates the LoRA weights and the redone step matches only if weights, optimizer and RNG were all restored.
OVERRIDES = ["experiment=smoke", "judge=rule", "reward.embedding_mode=continuous", "algorithm.prompts_per_step=1",
             "algorithm.max_new_tokens=8", f"trainer.max_steps={MAX_STEPS}",
             f"trainer.checkpoint_every={CHECKPOINT_EVERY}", f"trainer.val_every={MAX_STEPS}"]
EVERY_STEP = ["loss", "kl", "clip_ratio", "entropy", "lr", "reward/overall/mean", "reward/llm_judge/mean",
              "reward/embedding/mean", "completion/mean_length", "judge/calls", "time/rollout_s"]
SUMMARY = re.compile(r"step (\d+)(?: recomputed after resume, already logged)? \| (.*)$", re.MULTILINE)


def command(tmp: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "medix.run", *OVERRIDES, f"hydra.run.dir={tmp}/hydra", f"paths.output_dir={tmp}/out",
            f"logger.tracking_uri=sqlite:///{tmp}/mlflow.db", *extra]


def env() -> dict[str, str]:
    # one BLAS thread: steady on a shared machine, and the same kernels in the killed and in the resumed process
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


def kill_mid_run(tmp: Path) -> str:
    """Start the run and SIGKILL it as soon as it reports step KILL_AFTER_STEP (metrics and sample table written, the
    next step under way); returns what it printed."""
    log_path = tmp / "killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command(tmp), cwd=tmp, env=env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 900
            while KILL_AFTER_STEP not in summaries(complete_lines(log_path.read_text())):
                assert proc.poll() is None, (f"the run ended (rc {proc.returncode}) before step {KILL_AFTER_STEP}:\n"
                                             + log_path.read_text()[-3000:])
                assert time.monotonic() < deadline, f"step {KILL_AFTER_STEP} not reached after 900 s"
                time.sleep(0.05)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == -signal.SIGKILL
    return log_path.read_text()


def expected_ids_per_step() -> list[list[str]]:
    """The data order of an uninterrupted run: the first MAX_STEPS batches of its training DataLoader."""
    from medix.data import PromptDataModule, load_report, split_samples

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=OVERRIDES)
    train, val = split_samples(load_report(cfg.dataset).samples, cfg.dataset.val_size, cfg.dataset.seed)
    loader = PromptDataModule(train, val, batch_size=cfg.algorithm.prompts_per_step, seed=cfg.seed).train_dataloader()
    batches = iter(loader)
    return [[s.id for s in next(batches)] for _ in range(MAX_STEPS)]


def complete_lines(text: str) -> str:
    return text[:text.rfind("\n") + 1]


def summaries(text: str) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for step, line in SUMMARY.findall(text):
        out.setdefault(int(step), []).append(line.strip())
    return out


# Two runs of medix.run: about 60 s on this 2-core machine when quiet; in the default suite (which then takes ~12.5 min).
def test_resume_after_sigkill_continues_the_same_mlflow_run_without_losing_or_repeating_a_step(tmp_path):
    killed_log = kill_mid_run(tmp_path)
    checkpoint = tmp_path / "out" / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert state["grpo_step"] == CHECKPOINT_EVERY, f"killed too late: checkpoint of step {state['grpo_step']}"
    lora_b = [v for k, v in state["weights"].items() if "lora_B" in k]
    assert lora_b and any(bool(v.abs().sum() > 0) for v in lora_b)  # the steps so far moved the adapter off its init
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    [killed_run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert killed_run.info.status == "RUNNING"  # SIGKILL: nobody marked it
    assert killed_run.info.run_id == state["mlflow_run_id"]
    assert sorted(m.step for m in client.get_metric_history(killed_run.info.run_id, "loss")) == [1, 2, 3]

    resumed = subprocess.run(command(tmp_path, f"resume={tmp_path / 'out'}"), cwd=tmp_path, env=env(),
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    resumed_log = resumed.stdout + resumed.stderr
    assert f"resumed at step {CHECKPOINT_EVERY} (data position {CHECKPOINT_EVERY})" in resumed_log

    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1, runs[["run_id", "status"]]
    run_id = runs.iloc[0].run_id
    assert run_id == state["mlflow_run_id"] and runs.iloc[0].status == "FINISHED"

    # every metric: each step at most once; the per-step ones at exactly 1..MAX_STEPS
    metric_names = client.get_run(run_id).data.metrics
    for name in metric_names:
        steps = [m.step for m in client.get_metric_history(run_id, name)]
        assert len(steps) == len(set(steps)), f"{name}: a step written twice: {sorted(steps)}"
    for name in EVERY_STEP:
        steps = sorted(m.step for m in client.get_metric_history(run_id, name))
        assert steps == list(range(1, MAX_STEPS + 1)), f"{name}: steps {steps}"
    assert sorted(m.step for m in client.get_metric_history(run_id, "val/reward/overall/mean")) == [MAX_STEPS]
    assert [m.step for m in client.get_metric_history(run_id, "data/train_rows")] == [0]

    # the same data order as an uninterrupted run: the sample tables hold the prompt ids of each step
    tables = [a.path for a in client.list_artifacts(run_id, "samples")]
    assert tables == [f"samples/step_{s:05d}.json" for s in range(1, MAX_STEPS + 1)]
    logged_ids = []
    for path in tables:
        table = json.loads(Path(client.download_artifacts(run_id, path, str(tmp_path / "dl"))).read_text())
        ids = [row[table["columns"].index("id")] for row in table["data"]]
        logged_ids.append(list(dict.fromkeys(ids)))  # G completions per prompt, in prompt order
    assert logged_ids == expected_ids_per_step()

    # the redone step 3 equals the logged one (weights, optimizer, RNG restored): same rewards, loss and lengths
    before, after = summaries(killed_log), summaries(resumed_log)
    assert sorted(before) == [1, 2, 3] and sorted(after) == [3, 4]
    assert "recomputed after resume, already logged" in resumed_log
    assert after[KILL_AFTER_STEP] == before[KILL_AFTER_STEP]
    logged_loss = client.get_metric_history(run_id, "loss")
    assert f"loss={next(m.value for m in logged_loss if m.step == KILL_AFTER_STEP):.4g}" in before[3][0]

    final = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert final["grpo_step"] == MAX_STEPS and final["batches_seen"] == MAX_STEPS
    assert final["mlflow_run_id"] == run_id
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
