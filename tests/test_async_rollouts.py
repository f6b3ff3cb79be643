"""Asynchronous rollouts (`rollout.max_staleness`): 0 trains exactly as the synchronous step did; with k >= 1 a
producer thread samples and scores ahead of the trainer and the staleness bound holds whether the engine or the
trainer is the slower one; stale batches are dropped and counted; DAPO refills go through the producer; its
exceptions reach the trainer; its thread is joined at the end, on an exception and on Ctrl-C. The engine here is
`tests/lagging_engine.py` (its own copy of the policy, synced every step, as a server); the same through a real
vLLM server, killed mid-run, is the `vllm`-marked test at the end."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from lagging_engine import LaggingEngine
from medix.data.datamodule import PromptDataModule
from medix.errors import ConfigError
from medix.grpo.module import GRPOModule
from medix.grpo.producer import RESAMPLED, RolloutProducer, position_seed
from medix.rewards.composite import RewardBatch
from medix.rollout.hf import HFEngine
from medix_cli import offline_env, run_medix, sigkill_when
from sync_golden import ALGORITHMS, GROUP, PROMPTS, SETTINGS, TOKENS, digest, mismatches, trainable_sizes
from tiny_lm import (TargetWordReward, algorithm, memory_logger, one_thread, save_tiny_model,  # noqa: F401
                     tiny_backbone, trainer, word_samples)

pytestmark = pytest.mark.usefixtures("one_thread")
REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "assets" / "sync_step_golden.json"


def producer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "medix-rollout-producer"]


def fit(engine, *, steps=4, algo=None, reward=None, callbacks=(), samples=8):
    torch.manual_seed(0)
    algo = algo or algorithm("grpo", **SETTINGS)
    module = GRPOModule(tiny_backbone(lora=True), engine, reward or TargetWordReward(max_new_tokens=TOKENS),
                        algorithm=algo, reasoning_tag="thinking", seed=0)
    data = PromptDataModule.from_samples(word_samples(samples), [], batch_size=algo.prompts_per_step, seed=0)
    logger = memory_logger()
    trainer(max_steps=steps, logger=logger, callbacks=list(callbacks)).fit(module, datamodule=data)
    return module, logger


# ---- max_staleness = 0: the synchronous step, unchanged ---------------------------------------------------------
@pytest.mark.parametrize("name", sorted(ALGORITHMS))
def test_max_staleness_0_trains_exactly_as_the_synchronous_step_did(name):
    """The weights after 2 GRPO steps (same seed) equal those the synchronous step left
    (tests/assets/sync_step_golden.json; tests/sync_golden.py says where they come from), up to float32 reordering
    between CPUs; no producer thread runs."""
    seen = []

    class Threads(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(len(producer_threads()))

    engine = HFEngine(max_staleness=0)
    got = digest(name, engine=engine)
    want = json.loads(GOLDEN.read_text())[name]
    assert sorted(got) == sorted(want)
    assert mismatches(got, want, trainable_sizes()) == []
    _, logger = fit(HFEngine(), steps=1, callbacks=[Threads()])
    assert seen == [0] and "rollout/staleness/max" not in logger.steps[1]


def test_rollout_hf_refuses_a_staleness_naming_the_key():
    with pytest.raises(ConfigError, match=r"rollout.max_staleness=1 with rollout=hf"):
        HFEngine(max_staleness=1)


# ---- the bound, in both speed regimes ---------------------------------------------------------------------------
class SlowTrainer(Callback):
    """The trainer takes `seconds` longer per step than its update (outside `training_step`)."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)


class SlowUpdate(LaggingEngine):
    """The trainer slower than the engine by construction, whatever else loads the machine: each step's sync (the end
    of its update) first waits until the producer holds `max_staleness` batches sampled ahead. (A sleep alone raced
    the producer's sampling against the update and failed on a loaded CI machine: staleness 1, 2, 2 for 2, 2, 2.)"""

    producer = None  # the module's, set when training starts

    def sync(self, policy) -> dict[str, float]:
        deadline = time.monotonic() + 60
        while self.producer and self.producer.queue_depth() < self.max_staleness and time.monotonic() < deadline:
            time.sleep(0.01)
        return super().sync(policy)


class ProducerToEngine(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.engine.producer = pl_module.producer


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("regime", ["engine_slower", "trainer_slower"])
def test_the_staleness_bound_holds_when_either_side_is_slower(k, regime):
    if regime == "trainer_slower":
        engine, callbacks = SlowUpdate(max_staleness=k), [ProducerToEngine(), SlowTrainer(0.5)]
    else:
        engine, callbacks = LaggingEngine(delay_s=0.5, max_staleness=k), []
    steps = 5
    module, logger = fit(engine, steps=steps, callbacks=callbacks, samples=16)  # one epoch: see the report on #21
    assert module.grpo_step == steps and producer_threads() == []
    staleness = [logger.steps[s]["rollout/staleness/max"] for s in range(1, steps + 1)]
    assert max(staleness) <= k, staleness
    assert sum(logger.steps[s]["rollout/stale_dropped"] for s in range(1, steps + 1)) == 0
    # every step's batch sampled with the seed of its position, by the producer's thread; syncs by the trainer's
    seeds = [seed for _, seed, _ in engine.calls]
    assert seeds[:steps] == [position_seed(0, p) for p in range(steps)]
    assert engine.generate_threads == {"medix-rollout-producer"} and engine.sync_threads == {"MainThread"}
    waits = [logger.steps[s]["time/wait_for_rollout_s"] for s in range(2, steps + 1)]
    idle = [logger.steps[s]["time/engine_idle_s"] for s in range(2, steps + 1)]
    if regime == "trainer_slower":  # the producer runs k steps ahead: every batch after the first k is k versions old
        assert staleness[k:] == [float(k)] * (steps - k), staleness
        assert max(waits) < 0.25, waits  # the trainer never waits long: its batch was ready
        assert min(idle) > 0.25, idle  # the engine waits for the trainer
    else:  # the engine is the bottleneck: the trainer waits for each batch, the engine hardly idles
        assert min(waits) > 0.2, waits
        assert max(idle) < 0.4, idle


# ---- stale batches dropped, exceptions, close -------------------------------------------------------------------
class Rows:
    """A stand-in rollout: a policy version and a length."""

    def __init__(self, version: int, rows: int = 4):
        self.policy_version, self.rows = version, rows

    def __len__(self):
        return self.rows


def test_a_batch_older_than_the_bound_is_dropped_counted_and_sampled_again():
    engine = SimpleNamespace(version=0)
    made = []

    def produce(position, attempt):
        made.append((position, attempt, engine.version))
        return SimpleNamespace(rollout=Rows(engine.version))

    producer = RolloutProducer(produce, engine, max_staleness=1)
    try:
        assert producer.take(0).staleness == 0
        deadline = time.monotonic() + 5
        while producer.queue_depth() < 1:  # position 1 sampled ahead at version 0
            assert time.monotonic() < deadline
            time.sleep(0.01)
        engine.version = 3  # three syncs since: three versions old
        taken = producer.take(1)
        assert taken.staleness == 0 and taken.batch.rollout.policy_version == 3
        assert made[:3] == [(0, 0, 0), (1, 0, 0), (1, RESAMPLED, 3)]
        assert producer.stale_dropped() == 4 and producer.stale_dropped() == 0
    finally:
        producer.close()
    assert not producer.alive


def test_an_exception_in_the_producer_is_raised_in_the_trainer_and_close_joins_the_thread():
    engine = SimpleNamespace(version=0)

    def produce(position, attempt):
        if position == 1:
            raise ValueError("judge exploded at position 1")
        return SimpleNamespace(rollout=Rows(0))

    producer = RolloutProducer(produce, engine, max_staleness=1)
    assert producer.take(0).position == 0  # what was ready before the failure is still handed over
    with pytest.raises(ValueError, match="position 1"):
        producer.take(1)
    producer.close()
    assert not producer.alive and producer_threads() == []


def test_a_failing_reward_in_the_producer_stops_the_run_with_its_error_and_no_thread_left():
    class Exploding(TargetWordReward):
        def __call__(self, completions, solutions, **columns):
            if len(self.history) >= 2:
                raise RuntimeError("the judge server went away")
            return super().__call__(completions, solutions, **columns)

    with pytest.raises(RuntimeError, match="judge server went away"):
        fit(LaggingEngine(max_staleness=1), reward=Exploding(max_new_tokens=TOKENS))
    assert producer_threads() == []


def test_ctrl_c_joins_the_producer():
    class CtrlC(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if pl_module.grpo_step == 2:
                raise KeyboardInterrupt

    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's graceful shutdown on KeyboardInterrupt
            fit(LaggingEngine(delay_s=0.2, max_staleness=2), callbacks=[CtrlC()])
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores SIGINT after the first
    assert producer_threads() == []


# ---- DAPO ---------------------------------------------------------------------------------------------------------
class FirstGroupFlat(TargetWordReward):
    """The first group of every call scores 0 throughout (DAPO drops it and refills one prompt)."""

    def __call__(self, completions, solutions, **columns) -> RewardBatch:
        scores = super().__call__(completions, solutions, **columns).overall
        scores = [0.0] * GROUP + scores[GROUP:]
        return RewardBatch(components={"target": scores}, overall=scores)


def test_dapo_refills_are_sampled_by_the_producer_with_seeds_of_their_step():
    algo = algorithm("dapo", **SETTINGS, **{"dynamic_sampling.max_tries": 2})
    engine = LaggingEngine(max_staleness=1)
    _, logger = fit(engine, steps=3, algo=algo, reward=FirstGroupFlat(max_new_tokens=TOKENS))
    assert [logger.steps[s]["dapo/tries"] for s in (1, 2, 3)] == [2.0, 2.0, 2.0]
    seeds = {seed for _, seed, _ in engine.calls}
    assert {position_seed(0, p, 1) for p in range(3)} <= seeds  # each step's refill: attempt 1 of its position
    assert engine.generate_threads == {"medix-rollout-producer"}
    assert all(logger.steps[s]["rollout/staleness/max"] <= 1 for s in (1, 2, 3))


# ---- resume after SIGKILL (a real run in a subprocess) ------------------------------------------------------------
RESUME = ["experiment=smoke", "reward=embed_only", "reward.components.embedding.mode=continuous",
          "algorithm.prompts_per_step=1", "algorithm.sampling.max_new_tokens=8", "trainer.max_steps=4",
          "callbacks.checkpoint.every_n_steps=2", "trainer.val_check_interval=4",
          "rollout._target_=lagging_engine.LaggingEngine", "rollout.max_staleness=1"]


def records(tmp: Path) -> list[dict]:
    path = tmp / "record" / "rank0.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")] if path.is_file() else []


@pytest.mark.slow
def test_resume_after_sigkill_trains_every_position_once_from_the_checkpoint(tmp_path):
    """Killed as step 4 begins (its last checkpoint after step 2, the producer's queue lost): the resumed run
    samples again from step 3's data position with the checkpoint's policy, and each data position is trained once
    in the MLflow run, in the loader's order."""
    def command(*extra):
        return [sys.executable, "-m", "medix.run", *RESUME, f"hydra.run.dir={tmp_path}/hydra",
                f"paths.output_dir={tmp_path}/out", f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                "+callbacks.record._target_=run_probes.StepRecorder", f"+callbacks.record.dirpath={tmp_path}/record",
                *extra]

    env = offline_env(OMP_NUM_THREADS="1")
    sigkill_when(command(), cwd=tmp_path, env=env, log_path=tmp_path / "killed.log", what="step 3",
                 reached=lambda: any(r["phase"] == "start" and r["step"] == 4 for r in records(tmp_path)))
    killed = records(tmp_path)
    out = subprocess.run(command(f"resume={tmp_path}/out"), cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    resumed = records(tmp_path)[len(killed):]
    trained = {r["step"]: r["trained_ids"] for r in killed if r["phase"] == "train" and r["step"] <= 2}
    trained.update({r["step"]: r["trained_ids"] for r in resumed if r["phase"] == "train"})
    assert sorted(trained) == [1, 2, 3, 4]
    assert all(r["trained_ids"] == r["batch_ids"] for r in killed + resumed if r["phase"] == "train")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "rollout/staleness/max")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]  # each step logged once
    assert max(m.value for m in history) <= 1


@pytest.mark.slow
def test_ddp_ranks_each_train_their_own_share_within_the_bound(tmp_path):
    """trainer=ddp, 2 gloo ranks, each with a producer sampling ahead (max_staleness 1): over two epochs of 8 rows
    (1 prompt a step on each rank) every rank trains exactly the batches its loader gives it, the ranks' shares are
    disjoint and cover each epoch, the second epoch's order differs from the first, the bound holds on both ranks,
    and the ranks end with the same trained weights."""
    model = save_tiny_model(tmp_path / "tiny_llama")
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"Question {i}: what is the diagnosis?",
                                        "solution": "<X_RAY> Pneumothorax"}) + "\n" for i in range(10)))
    out = run_medix("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
                    "trainer.max_steps=8", "trainer.val_check_interval=4", "backbone.source=local",
                    f"backbone.model={model}", "backbone.name=tiny_llama", "backbone.lora.r=4",
                    "backbone.lora.lora_alpha=8", "dataset=jsonl", f"dataset.path={data}", "dataset.val_size=2",
                    "reward=embed_only", "reward.components.embedding.mode=continuous", "algorithm.group_size=2",
                    "algorithm.prompts_per_step=1", "algorithm.sampling.max_new_tokens=8", "algorithm.mini_batch_size=2",
                    "algorithm.optimizer.lr=0.01", "callbacks.warm_start.steps=0", "callbacks.checkpoint.every_n_steps=0",
                    "rollout._target_=lagging_engine.LaggingEngine", "rollout.max_staleness=1",
                    f"logger.tracking_uri=sqlite:///{tmp_path}/mlflow.db",
                    "+callbacks.record._target_=run_probes.StepRecorder", f"+callbacks.record.dirpath={tmp_path}/record",
                    f"hydra.run.dir={tmp_path}/hydra", f"paths.output_dir={tmp_path}/out",
                    cwd=tmp_path, env=offline_env(OMP_NUM_THREADS="1"), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    trains = []
    for rank in (0, 1):
        rows = [json.loads(line) for line in (tmp_path / "record" / f"rank{rank}.jsonl").read_text().splitlines()]
        train = [r for r in rows if r["phase"] == "train"]
        assert [r["step"] for r in train] == list(range(1, 9))
        assert all(r["trained_ids"] == r["batch_ids"] for r in train)  # the producer served the loader's batch
        assert max(r["logged"]["rollout/staleness/max"] for r in train) <= 1
        assert 1.0 in [r["logged"]["rollout/staleness/max"] for r in train]  # it did sample ahead
        trains.append(train)
    epochs = []
    for first in (0, 4):  # 8 training rows, 1 per rank a step: an epoch is 4 steps
        shares = [[i for r in train[first:first + 4] for i in r["batch_ids"]] for train in trains]
        assert not set(shares[0]) & set(shares[1]) and len(set(shares[0]) | set(shares[1])) == 8, shares
        epochs.append(shares)
    assert epochs[0] != epochs[1]  # each epoch shuffled anew
    weights = [torch.load(tmp_path / "record" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert any(not torch.equal(weights[0]["start"][k], weights[0]["end"][k]) for k in weights[0]["end"])
    assert all(torch.equal(weights[0]["end"][k], weights[1]["end"][k]) for k in weights[0]["end"])
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    client = mlflow.MlflowClient()
    [run] = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.status == "FINISHED"


# ---- a real vLLM server, killed mid-run --------------------------------------------------------------------------
@pytest.mark.vllm
def test_the_bound_holds_through_a_server_restart(repo_root, tmp_path):
    from test_vllm_rollout import medix_run

    history, _ = medix_run(repo_root, tmp_path, "rollout.max_staleness=1",
                           "+callbacks.kill._target_=run_probes.KillServer", "+callbacks.kill.step=2")
    assert history["rollout/server_restarts"][-1] == 1.0
    assert len(history["rollout/staleness/max"]) == 4 and max(history["rollout/staleness/max"]) <= 1
    assert all(w >= 0 for w in history["time/wait_for_rollout_s"])
