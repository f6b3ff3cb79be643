"""Plugins that tests add to a real `python -m medix.run` by config, the way a user adds their own:

- `StepRecorder`: `+callbacks.record._target_=run_probes.StepRecorder +callbacks.record.dirpath=<dir>` writes, per
  rank, `rank<R>.jsonl` (one line per GRPO step and per validation batch: the prompt ids, the overall rewards, the
  step's reward statistics and the metrics Lightning holds after the step; a `start` line when a step begins) and
  `rank<R>.pt` (the trainable weights
  at the start and at the end of training).
- `judge_error_at`: a reward component that raises JudgeError during the given GRPO step (with StepRecorder on).
- `zero_for_ids`: a reward component (`+reward.components.<name>._target_=run_probes.zero_for_ids`) that scores 0
  for the given prompt ids and 1 + completion length / 100 otherwise, so that DAPO's filter with a minimum mean
  between the two (e.g. 0.6) drops exactly the groups of those prompts.

Importable once tests/ is on PYTHONPATH (the tests set it for the subprocess).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from medix.errors import JudgeError

CURRENT_STEP = 0  # the GRPO step in progress in this process (set by StepRecorder)


def trainable(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


class StepRecorder(Callback):
    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        self.weights: dict[str, dict] = {}

    def write(self, trainer, record: dict) -> None:
        with open(self.dirpath / f"rank{trainer.global_rank}.jsonl", "a") as out:
            out.write(json.dumps({"rank": trainer.global_rank, "world_size": trainer.world_size, **record}) + "\n")

    def on_train_start(self, trainer, pl_module):
        self.weights["start"] = trainable(pl_module.model)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        """Written once the previous step is fully recorded (its metrics are in the logger by now)."""
        global CURRENT_STEP
        CURRENT_STEP = pl_module.grpo_step + 1
        self.write(trainer, {"phase": "start", "step": CURRENT_STEP, "batch_ids": [s.id for s in batch.samples]})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        scored = outputs["scored"]
        self.write(trainer, {
            "phase": "train", "step": pl_module.grpo_step, "batch_ids": [s.id for s in batch.samples],
            "trained_ids": [s.id for s in scored.prompts.samples], "overall": scored.rewards.overall,
            "rewards": outputs["metrics"],
            "logged": {k: float(v) for k, v in trainer.callback_metrics.items() if not k.startswith("val/")}})

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.write(trainer, {"phase": "val", "step": pl_module.grpo_step, "batch_ids": [s.id for s in batch.samples],
                             "counted": batch.counted, "overall": outputs["scored"].rewards.overall})

    def on_validation_end(self, trainer, pl_module):
        self.write(trainer, {"phase": "val_end", "step": pl_module.grpo_step,
                             "logged": {k: float(v) for k, v in trainer.callback_metrics.items()
                                        if k.startswith("val/")}})

    def on_train_end(self, trainer, pl_module):
        self.weights["end"] = trainable(pl_module.model)
        torch.save(self.weights, self.dirpath / f"rank{trainer.global_rank}.pt")


def zero_for_ids(completions, solutions, *, ids, zero_ids=(), **columns) -> list[float]:
    return [0.0 if i in set(zero_ids) else 1.0 + min(len(c), 100) / 100.0 for c, i in zip(completions, ids)]


def judge_error_at(completions, solutions, *, step: int, **columns) -> list[float]:
    if CURRENT_STEP == step:
        raise JudgeError(f"judge unreachable (test: step {step})")
    return [0.0] * len(completions)


class EngineProbe(Callback):
    """rollout=vllm: after every GRPO step (the server synced), scores the first completion of the step's rollout
    on the server (fresh prefill, the current adapter, the prompt's images) and with the trainer's policy (its pixel
    values, image grids and M-RoPE token types), and records the largest |difference|; also records whether each
    validation batch came from the engine. Written to `engine.jsonl` (rank 0) or `engine_rank<R>.jsonl`."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.dirpath.mkdir(parents=True, exist_ok=True)

    def write(self, trainer, record: dict) -> None:
        name = "engine.jsonl" if trainer.global_rank == 0 else f"engine_rank{trainer.global_rank}.jsonl"
        with open(self.dirpath / name, "a") as out:
            out.write(json.dumps(record) + "\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from medix.grpo.logprobs import completion_logprobs
        from medix.models.sharding import run_as_forward
        from medix.rollout.base import select_rows
        from medix.rollout.vllm import one_placeholder_per_image

        scored = outputs["scored"]
        rollout, row = scored.rollout, 0
        prompt = rollout.input_ids[row, :rollout.prompt_length][rollout.attention_mask[row, :rollout.prompt_length].bool()]
        length = int(rollout.completion_mask[row].sum())
        completion = rollout.completion_ids[row, :length]
        engine, backbone = pl_module.engine, pl_module.backbone
        images = scored.prompts.images[0] if scored.prompts.images else []
        served = engine.client.score(one_placeholder_per_image(prompt.tolist(), backbone.placeholder_token_ids),
                                     completion.tolist(), images=images or None,
                                     lora=engine.adapter_name if engine.lora else None)
        part = select_rows(rollout, [row])
        with torch.no_grad():
            trainer_logp, _ = run_as_forward(pl_module.model, completion_logprobs, pl_module.model, part.input_ids,
                                             part.attention_mask, part.prompt_length, backbone.model_inputs(part))
        self.write(trainer, {"phase": "train", "step": pl_module.grpo_step, "tokens": length, "images": len(images),
                             "sequence_inputs": sorted(rollout.sequence_inputs),
                             "max_diff": float((torch.tensor(served) - trainer_logp[0, :length].cpu()).abs().max()),
                             "engine_logprobs": rollout.engine_logprobs is not None})

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.write(trainer, {"phase": "val", "step": pl_module.grpo_step,
                             "engine_logprobs": outputs["scored"].rollout.engine_logprobs is not None})


class SkipSync(Callback):
    """Fault injection for rollout=vllm: from the sync that ends GRPO step `step` on, the server never loads the new
    policy (only its version number moves on), as a sync that silently did nothing would leave it."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        engine = pl_module.engine
        if pl_module.grpo_step + 1 == self.step:
            engine.load = lambda served: engine.client.set_weight_version(str(engine.version))


class StaleServer(Callback):
    """Fault injection for rollout=vllm: after every GRPO step puts the step-0 adapter back on the server under the
    policy's name (as a sync that silently did nothing would leave it)."""

    def __init__(self, dirpath: str):
        self.first = Path(dirpath) / "first_adapter"

    def on_train_start(self, trainer, pl_module):
        pl_module.model.save_pretrained(str(self.first))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        engine = pl_module.engine
        engine.client.load_adapter(engine.adapter_name, self.first)
        engine.client.reset_prefix_cache()


class KillServer(Callback):
    """Fault injection for rollout=vllm: SIGKILL the server medix started (its whole process group) at the end of
    GRPO step `step`."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import os
        import signal

        if pl_module.grpo_step == self.step:
            os.killpg(pl_module.engine.server.process.pid, signal.SIGKILL)


class GradientSyncCounter(Callback):
    """Counts DDP's gradient all-reduces (a communication hook around the default one, so each bucket reduced is
    counted) and the optimizer steps of each GRPO step; writes `rank<R>_syncs.jsonl` in `dirpath`. The tiny test
    model's trainable gradients fit one bucket, so one gradient synchronisation is one all-reduce."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        self.allreduces = 0
        self.optimizer_steps_before = 0

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counted(state, bucket):
            self.allreduces += 1
            return allreduce_hook(state, bucket)

        trainer.strategy.model.register_comm_hook(None, counted)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.allreduces = 0
        self.optimizer_steps_before = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        record = {"step": pl_module.grpo_step, "allreduces": self.allreduces,
                  "optimizer_steps": trainer.global_step - self.optimizer_steps_before}
        with open(self.dirpath / f"rank{trainer.global_rank}_syncs.jsonl", "a") as out:
            out.write(json.dumps(record) + "\n")
