"""trainer=ddp on CPU: `python -m medix.run`'s entry point with 2 gloo processes, each rolling out its own prompts.

One real run (tests/ddp_driver.py records what each rank saw, then calls medix.run's Hydra main): a tiny random Llama
with LoRA (the KL reference is the disabled adapter), the MiniLM embedding reward, 2 mini-batches per step (two
gradient all-reduces per step), `trainer.max_steps=null` (until the one epoch ends) and MLflow on rank 0. At step 1
rank 1 trains on one of its two prompt groups (what DAPO's filter may leave), so it has one mini-batch to rank 0's two.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import mlflow
import pytest
import torch

from tiny_lm import save_tiny_model

N_ROWS, VAL_ROWS, PROMPTS, GROUP = 10, 2, 2, 4
ANSWERS = ["Pneumothorax", "Pleural effusion", "Appendicitis", "Kidney stone", "Pulmonary embolism",
           "Subdural hematoma", "Aortic dissection", "Osteosarcoma", "Cholecystitis", "Pneumonia"]


@pytest.fixture(scope="module")
def ddp_run(repo_root, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    model = save_tiny_model(tmp / "tiny_llama")
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"Question {i}: what is the diagnosis?",
                                        "solution": f"<X_RAY> {answer}"}) + "\n" for i, answer in enumerate(ANSWERS)))
    (tmp / "dump").mkdir()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               MEDIX_TEST_DUMP=str(tmp / "dump"), MEDIX_TEST_KEEP_ONE_GROUP="1:1", OMP_NUM_THREADS="1")
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "RANK"):
        env.pop(key, None)
    cmd = [sys.executable, str(repo_root / "tests" / "ddp_driver.py"),
           "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
           "trainer.num_workers=0", "trainer.max_steps=null", "trainer.max_epochs=1", "trainer.val_every=2",
           "trainer.checkpoint_every=0",
           "backbone.source=local", f"backbone.model={model}", "backbone.name=tiny_llama", "backbone.lora.r=4",
           "backbone.lora.alpha=8",
           "dataset=jsonl", f"dataset.path={data}", f"dataset.val_size={VAL_ROWS}",
           "reward=embed_only", "reward.embedding_mode=continuous",
           "algorithm=grpo", f"algorithm.group_size={GROUP}", f"algorithm.prompts_per_step={PROMPTS}",
           "algorithm.max_new_tokens=8", "algorithm.mini_batch_size=4", "algorithm.lr=0.01",
           f"logger.tracking_uri=sqlite:///{tmp}/mlflow.db", "logger.sample_table_every=1",
           f"hydra.run.dir={tmp}/hydra", f"paths.output_dir={tmp}/out"]
    # Its own session, so that a hang (ranks waiting on different collectives) ends with both ranks killed.
    proc = subprocess.Popen(cmd, cwd=repo_root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"the 2-rank run did not finish in 300 s (ranks stuck in a collective?): {stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-4000:]
    ranks = [torch.load(tmp / "dump" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return tmp, ranks


def train_steps(rank):
    return [r for r in rank["reductions"] if "loss" in r[0]]


def test_both_ranks_train_the_same_number_of_steps(ddp_run):
    _, ranks = ddp_run
    assert [r["rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    # 8 training rows, 4 per rank, 2 prompts per step: max_steps=null means 2 steps (one epoch of this rank's shard)
    steps = (N_ROWS - VAL_ROWS) // (2 * PROMPTS)
    assert all(r["max_steps"] == steps for r in ranks)
    assert all(len(r["batch_ids"]) == steps and len(r["logged"]) == steps for r in ranks)


def test_each_rank_rolls_out_a_disjoint_slice_of_whole_prompt_groups(ddp_run):
    _, ranks = ddp_run
    ids = [[i for batch in r["batch_ids"] for i in batch] for r in ranks]
    assert all(len(batch) == PROMPTS for r in ranks for batch in r["batch_ids"])
    assert not set(ids[0]) & set(ids[1])
    assert len(set(ids[0]) | set(ids[1])) == N_ROWS - VAL_ROWS  # together: every training row, once
    for r in ranks:  # each rank scores whole groups of its own prompts
        train_calls = [overall for phase, overall in r["reward_calls"] if phase == "train"]
        assert [len(c) for c in train_calls] == [PROMPTS * GROUP] * len(r["batch_ids"])
        val_calls = [overall for phase, overall in r["reward_calls"] if phase == "val"]
        assert [len(c) for c in val_calls] == [VAL_ROWS // 2]  # the held-out prompts are split across ranks too


def test_a_rank_with_fewer_groups_pads_its_mini_batches_to_the_others(ddp_run):
    _, ranks = ddp_run
    assert [len(r) for r in ranks[1]["train_rewards"]] == [GROUP, PROMPTS * GROUP]
    assert ranks[0]["chunks"] == [(2, 2), (2, 2)]
    assert ranks[1]["chunks"] == [(1, 2), (2, 2)]  # one no-op mini-batch, so both ranks all-reduce twice


def test_both_ranks_end_with_identical_weights_that_trained(ddp_run):
    tmp, ranks = ddp_run
    end0, end1 = ranks[0]["weights_end"], ranks[1]["weights_end"]
    assert end0.keys() == end1.keys() and end0
    assert all("lora_" in name for name in end0)
    for name in end0:
        assert torch.equal(end0[name], end1[name]), name
    start = ranks[0]["weights_start"]
    assert all(torch.equal(start[name], ranks[1]["weights_start"][name]) for name in start)
    changed = [name for name in end0 if not torch.equal(end0[name], start[name])]
    assert len(changed) == len(end0)  # every adapter tensor moved (lora_B from its zero init)
    assert max((end0[n] - start[n]).abs().max().item() for n in end0 if "lora_B" in n) > 1e-3
    checkpoint = torch.load(tmp / "out" / "checkpoints" / "last.ckpt", weights_only=False)  # written by rank 0
    assert all(torch.equal(checkpoint["weights"][name], end1[name]) for name in end1)
    assert (tmp / "out" / "adapter" / "adapter_config.json").is_file()


def population_stats(values):
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def test_metrics_are_reduced_across_ranks(ddp_run):
    _, ranks = ddp_run
    for step, (logged0, logged1) in enumerate(zip(ranks[0]["logged"], ranks[1]["logged"])):
        assert logged0.keys() == logged1.keys()
        for key in logged0:
            if key != "lr":
                assert logged0[key] == pytest.approx(logged1[key], rel=1e-12, abs=1e-12, nan_ok=True), key
        # step metrics: the mean of the two ranks' own values
        (local0, reduced0), (local1, _) = train_steps(ranks[0])[step], train_steps(ranks[1])[step]
        assert local0["loss"] != local1["loss"]  # the ranks really computed different things
        for key in ("loss", "entropy", "kl", "completion/mean_length", "time/rollout_s"):
            assert reduced0[key] == pytest.approx((local0[key] + local1[key]) / 2, rel=1e-9), key
            assert logged0[key] == reduced0[key], key
        # reward statistics: over the completions of both ranks together
        train0, train1 = ranks[0]["train_rewards"][step], ranks[1]["train_rewards"][step]
        mean, std = population_stats(train0 + train1)
        assert len(set(train0 + train1)) > 1
        assert logged0["reward/overall/mean"] == pytest.approx(mean, rel=1e-9)
        assert logged0["reward/overall/std"] == pytest.approx(std, rel=1e-9)
    val = [c for r in ranks for phase, c in r["reward_calls"] if phase == "val"]
    mean, _ = population_stats(val[0] + val[1])
    assert ranks[0]["logged"][-1]["val/reward/overall/mean"] == pytest.approx(mean, rel=1e-9)


def test_rank_zero_logs_the_reduced_metrics_to_one_finished_mlflow_run(ddp_run):
    tmp, ranks = ddp_run
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1 and runs.iloc[0].status == "FINISHED"
    client = mlflow.MlflowClient()
    for key in ("loss", "reward/overall/mean", "reward/embedding/mean", "kl"):
        history = sorted(client.get_metric_history(runs.iloc[0].run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2], key
        assert [m.value for m in history] == pytest.approx([logged[key] for logged in ranks[0]["logged"]]), key
    assert client.get_run(runs.iloc[0].run_id).data.params["trainer.strategy"] == "ddp"
