"""trainer=ddp on CPU: one real `python -m medix.run` with 2 gloo processes, each rolling out its own prompts.

A tiny random Llama with LoRA (the KL reference is the disabled adapter), a 2-step warm start whose rows the ranks
share, 4 micro-batches of one row per mini-batch of four, the MiniLM embedding reward plus a
component that scores 0 for one chosen prompt, DAPO's filter without refills (so at step 1 rank 1 keeps one prompt
group to rank 0's two: one mini-batch to two, and rank 1 adds an empty one), `trainer.max_steps=null` (until the one
epoch ends) and MLflow on rank 0. `run_probes.StepRecorder`, added by config, records what each rank saw.
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

from medix.data.datamodule import ShardedBatches
from tiny_lm import save_tiny_model
from medix_cli import offline_env

pytestmark = pytest.mark.slow  # a 2-process training run

N_ROWS, VAL_ROWS, PROMPTS, GROUP = 10, 2, 2, 4
MINI, MICRO = 4, 1  # 4 micro-batches (forward/backward passes) per mini-batch (optimizer step)
WARM_STEPS = 2  # of 3 rows: rank 0 takes two, rank 1 one (and a zero-weight pad)
ANSWERS = ["Pneumothorax", "Pleural effusion", "Appendicitis", "Kidney stone", "Pulmonary embolism",
           "Subdural hematoma", "Aortic dissection", "Osteosarcoma", "Cholecystitis", "Pneumonia"]


def first_prompt_of_rank1(train_ids: list[str]) -> str:
    """The first training prompt rank 1 gets at step 1 (the order PromptDataModule's sampler gives it)."""
    batches = list(ShardedBatches(len(train_ids), PROMPTS, shuffle=True, seed=0, rank=1, world_size=2))
    return train_ids[batches[0][0][0]]


@pytest.fixture(scope="module")
def ddp_run(repo_root, tmp_path_factory):
    from medix.data.samples import split_samples
    from medix.data.sources import load_report

    tmp = tmp_path_factory.mktemp("ddp")
    model = save_tiny_model(tmp / "tiny_llama")
    data = tmp / "data.jsonl"
    data.write_text("".join(json.dumps({"id": f"q{i}", "problem": f"Question {i}: what is the diagnosis?",
                                        "solution": f"<X_RAY> {answer}"}) + "\n" for i, answer in enumerate(ANSWERS)))
    train, _ = split_samples(load_report({"name": "jsonl", "path": str(data)}).samples, VAL_ROWS, 0)
    dropped = first_prompt_of_rank1([s.id for s in train])
    env = offline_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "medix.run",
           "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
           "trainer.max_steps=null", "trainer.max_epochs=1", "trainer.val_check_interval=2",
           "backbone.source=local", f"backbone.model={model}", "backbone.name=tiny_llama", "backbone.lora.r=4",
           "backbone.lora.lora_alpha=8",
           "dataset=jsonl", f"dataset.path={data}", f"dataset.val_size={VAL_ROWS}",
           "reward=embed_only", "reward.components.embedding.mode=continuous",
           "+reward.components.length._target_=run_probes.zero_for_ids",
           f"+reward.components.length.zero_ids=[{dropped}]", "+reward.weights.length=1.0",
           "algorithm=dapo", "algorithm.dynamic_sampling.max_tries=1", "algorithm.dynamic_sampling.min_mean=0.6",
           "algorithm.dynamic_sampling.max_mean=10.0",
           f"algorithm.group_size={GROUP}", f"algorithm.prompts_per_step={PROMPTS}",
           "algorithm.sampling.max_new_tokens=8", f"algorithm.mini_batch_size={MINI}",
           f"algorithm.micro_batch_size={MICRO}", "algorithm.optimizer.lr=0.01", "algorithm.beta=0.01",
           f"logger.tracking_uri=sqlite:///{tmp}/mlflow.db", "callbacks.samples.every_n_steps=1",
           f"callbacks.warm_start.steps={WARM_STEPS}", "callbacks.warm_start.batch_size=3",
           "+callbacks.record._target_=run_probes.StepRecorder", f"+callbacks.record.dirpath={tmp}/record",
           "+callbacks.syncs._target_=run_probes.GradientSyncCounter", f"+callbacks.syncs.dirpath={tmp}/record",
           f"hydra.run.dir={tmp}/hydra", f"paths.output_dir={tmp}/out"]
    # Its own session, so that a hang (ranks waiting on different collectives) ends with both ranks killed.
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"the 2-rank run did not finish in 400 s (ranks stuck in a collective?): {stderr[-3000:]}")
    assert proc.returncode == 0, stderr[-4000:]
    records = [[json.loads(line) for line in (tmp / "record" / f"rank{r}.jsonl").read_text().splitlines()]
               for r in (0, 1)]
    weights = [torch.load(tmp / "record" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return tmp, records, weights, dropped


def phase(records, name):
    return [r for r in records if r["phase"] == name]


def test_both_ranks_train_the_same_number_of_steps(ddp_run):
    _, records, _, _ = ddp_run
    # 8 training rows, 4 per rank, 2 prompts per step: max_steps=null means 2 steps (one epoch of this rank's shard)
    steps = (N_ROWS - VAL_ROWS) // (2 * PROMPTS)
    for rank, rows in enumerate(records):
        assert [r["step"] for r in phase(rows, "train")] == list(range(1, steps + 1))
        assert all(r["rank"] == rank and r["world_size"] == 2 for r in rows)


def test_each_rank_rolls_out_a_disjoint_slice_of_whole_prompt_groups(ddp_run):
    _, records, _, _ = ddp_run
    ids = [[i for r in phase(rows, "train") for i in r["batch_ids"]] for rows in records]
    assert not set(ids[0]) & set(ids[1])
    assert len(set(ids[0]) | set(ids[1])) == N_ROWS - VAL_ROWS  # together: every training row, once
    val = [[i for r in phase(rows, "val") for i in r["batch_ids"]] for rows in records]
    assert len(val[0]) == len(val[1]) == VAL_ROWS // 2 and not set(val[0]) & set(val[1])  # held-out split too


def test_one_gradient_all_reduce_per_optimizer_step(ddp_run):
    """4 micro-batches per mini-batch, yet DDP all-reduces the gradient once per optimizer step (after the last
    backward), on both ranks, padding steps included; with a sync at every backward it would be 4 per step."""
    tmp, records, _, _ = ddp_run
    syncs = [[json.loads(line) for line in (tmp / "record" / f"rank{r}_syncs.jsonl").read_text().splitlines()]
             for r in (0, 1)]
    assert syncs[0] == syncs[1]  # the ranks meet in every collective
    per_step = GROUP * PROMPTS // MINI  # rank 0 at step 1: 2 mini-batches; rank 1 keeps one and pads the other
    assert [s["optimizer_steps"] for s in syncs[0]] == [per_step] * len(syncs[0]) and len(syncs[0]) >= 2
    assert all(s["allreduces"] == s["optimizer_steps"] for s in syncs[0]), syncs[0]


def test_a_rank_with_fewer_kept_groups_still_trains_in_step_with_the_other(ddp_run):
    _, records, _, dropped = ddp_run
    first = [phase(rows, "train")[0] for rows in records]
    assert dropped in first[1]["batch_ids"] and dropped not in first[1]["trained_ids"]
    assert [len(r["trained_ids"]) for r in first] == [PROMPTS, PROMPTS - 1]  # 2 mini-batches vs 1 (+ an empty one)


def test_both_ranks_end_with_identical_weights_that_trained(ddp_run):
    tmp, _, weights, _ = ddp_run
    end0, end1 = weights[0]["end"], weights[1]["end"]
    assert end0.keys() == end1.keys() and end0 and all("lora_" in name for name in end0)
    for name in end0:
        assert torch.equal(end0[name], end1[name]), name
    start = weights[0]["start"]  # after the warm start, which each rank ran on its share of the rows
    assert all(torch.equal(start[name], weights[1]["start"][name]) for name in start)
    assert min(start[n].abs().max().item() for n in start if "lora_B" in n) > 0  # peft starts lora_B at 0
    assert max((end0[n] - start[n]).abs().max().item() for n in end0 if "lora_B" in n) > 1e-3
    checkpoint = torch.load(tmp / "out" / "checkpoints" / "last.ckpt", weights_only=False)  # written by rank 0
    assert all(torch.equal(checkpoint["state_dict"][name], end1[name.removeprefix("model.")])
               for name in checkpoint["state_dict"])
    assert (tmp / "out" / "adapter" / "adapter_config.json").is_file()


def population_stats(values):
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))


def test_metrics_are_the_same_on_both_ranks_and_rewards_are_over_every_completion(ddp_run):
    _, records, _, _ = ddp_run
    for step0, step1 in zip(phase(records[0], "train"), phase(records[1], "train")):
        assert step0["logged"].keys() == step1["logged"].keys()
        for key in step0["logged"]:
            assert step0["logged"][key] == pytest.approx(step1["logged"][key], rel=1e-9, abs=1e-12), key
        mean, std = population_stats(step0["overall"] + step1["overall"]) if step0["step"] > 1 else (None, None)
        if mean is not None:  # no DAPO drop at step 2: the trained completions are all that was sampled
            assert step0["rewards"]["reward/overall/mean"] == pytest.approx(mean, rel=1e-9)
            assert step0["rewards"]["reward/overall/std"] == pytest.approx(std, rel=1e-9)
    val = [c for rows in records for r in phase(rows, "val") for c in r["overall"]]
    [val_end] = phase(records[0], "val_end")[-1:]
    assert val_end["logged"]["val/reward/overall/mean"] == pytest.approx(sum(val) / len(val), rel=1e-6)  # float32


def test_rank_zero_logs_the_reduced_metrics_to_one_finished_mlflow_run(ddp_run):
    tmp, records, _, _ = ddp_run
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    runs = mlflow.search_runs(search_all_experiments=True)
    assert len(runs) == 1 and runs.iloc[0].status == "FINISHED"
    client = mlflow.MlflowClient()
    steps = phase(records[0], "train")
    for key in ("loss", "reward/overall/mean", "reward/embedding/mean", "kl", "dapo/kept_groups"):
        history = sorted(client.get_metric_history(runs.iloc[0].run_id, key), key=lambda m: m.step)
        assert [m.step for m in history] == [1, 2], key
        expected = [s["rewards"].get(key, s["logged"].get(key)) for s in steps]
        assert [m.value for m in history] == pytest.approx(expected), key
    warm = client.get_metric_history(runs.iloc[0].run_id, "warm_start/loss")
    assert sorted(m.step for m in warm) == list(range(1, WARM_STEPS + 1)) and all(m.value > 0 for m in warm)
    kept = [m.value for m in sorted(client.get_metric_history(runs.iloc[0].run_id, "dapo/kept_groups"),
                                    key=lambda m: m.step)]
    assert kept == [2 * PROMPTS - 1, 2 * PROMPTS]  # summed over ranks
    assert client.get_run(runs.iloc[0].run_id).data.params["trainer.strategy"] == "ddp"
