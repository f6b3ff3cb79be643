"""`python tests/ddp_driver.py <medix.run overrides>`: medix.run's Hydra entry point, unchanged, with a per-rank record
for tests/test_ddp.py. Lightning's DDP launcher starts rank 1 by running this same script again, so every rank
writes `$MEDIX_TEST_DUMP/rank<R>.pt` at the end of training:

- weights_start / weights_end: the trainable parameters when training starts and ends;
- batch_ids: the sample ids of each GRPO step's batch on this rank;
- train_rewards: the overall rewards of the completions each step trained on;
- reward_calls: (phase, overall rewards) of every reward call ("train" or "val");
- chunks: (this rank's mini-batch count, the count every rank runs) of each update;
- reductions: (local metrics, reduced metrics) of every `reduce_across_ranks` call;
- logged: the metrics `log_step` received at each step (what rank 0 sends to MLflow);
- world_size, rank, max_steps.

MEDIX_TEST_KEEP_ONE_GROUP=<rank>:<step> makes that rank train on the first prompt group of its batch only at that
step, as DAPO's filter does when it keeps fewer groups on one rank than on another.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import medix.grpo.module as grpo_module  # noqa: E402
import medix.rewards as rewards  # noqa: E402
from medix.grpo.checkpoint import trainable_state  # noqa: E402
from medix.grpo.rollout import select_rows  # noqa: E402

RECORD = {"batch_ids": [], "train_rewards": [], "reward_calls": [], "chunks": [], "reductions": [], "logged": [],
          "phase": "train"}
Module = grpo_module.GRPOModule


def wrap(name, before=None, after=None):
    original = getattr(Module, name)

    def wrapper(self, *args, **kwargs):
        if before is not None:
            before(self, *args, **kwargs)
        out = original(self, *args, **kwargs)
        if after is not None:
            after(self, out, *args, **kwargs)
        return out

    setattr(Module, name, wrapper)


def record_batch(self, batch, batch_idx):
    if self.grpo_step < (self.max_steps or 0):
        RECORD["batch_ids"].append([s.id for s in batch])


def start_val(self):
    RECORD["phase"] = "val"


def end_val(self, out):
    RECORD["phase"] = "train"


def dump(self):
    RECORD.update(weights_end=trainable_state(self.model), world_size=self.trainer.world_size, rank=self.global_rank,
                  max_steps=self.max_steps)
    RECORD.pop("phase")
    torch.save(RECORD, Path(os.environ["MEDIX_TEST_DUMP"]) / f"rank{self.global_rank}.pt")


collect = Module.collect


def collect_and_maybe_drop_groups(self, batch, timings):
    samples, rollout, rewards, reward_batch, metrics = collect(self, batch, timings)
    if os.environ.get("MEDIX_TEST_KEEP_ONE_GROUP") == f"{self.global_rank}:{self.grpo_step + 1}":
        rows = list(range(self.algo.group_size))
        samples, rollout, rewards = samples[:1], select_rows(rollout, rows), rewards[rows]
        reward_batch = grpo_module.select_rewards(reward_batch, rows)
    RECORD["train_rewards"].append(list(reward_batch.overall))
    return samples, rollout, rewards, reward_batch, metrics


Module.collect = collect_and_maybe_drop_groups
wrap("chunk_count_across_ranks", after=lambda self, out, count: RECORD["chunks"].append((count, out)))
wrap("on_train_start", after=lambda self, out: RECORD.update(weights_start=trainable_state(self.model)))
wrap("training_step", before=record_batch)
wrap("validation_rewards", before=start_val, after=end_val)
wrap("reduce_across_ranks", after=lambda self, out, metrics, *a, **k: RECORD["reductions"].append((dict(metrics),
                                                                                                  dict(out))))
wrap("log_step", before=lambda self, metrics, *a: RECORD["logged"].append(dict(metrics)))
Module.on_train_end = dump

build_reward = rewards.build_reward


def recording_reward(*args, **kwargs):
    reward = build_reward(*args, **kwargs)

    def call(completions, solutions, questions=None):
        batch = reward(completions, solutions, questions)
        RECORD["reward_calls"].append((RECORD["phase"], list(batch.overall)))
        return batch

    return call


rewards.build_reward = recording_reward

if __name__ == "__main__":
    import runpy

    # As `python -m medix.run` would: Hydra finds conf/ next to medix/run.py only when its main runs as __main__.
    runpy.run_module("medix.run", run_name="__main__")
