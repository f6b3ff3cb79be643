"""Format warm start: a few supervised steps on reference answers written in the required form, before GRPO.

A policy that never writes `<TAG><thinking>…</thinking><answer>…</answer>` scores 0 format and 0 modality reward on
every completion of every group, so those rewards have no within-group variance and GRPO gets no gradient from them
(`experiments/learning_curve/`: SmolLM2-135M wrote the form in 0 of 54 samples). A few teacher-forced steps on the
training questions' own `<TAG> answer` references, wrapped in the form, give the policy a foothold that RL can then
reinforce. The reasoning text is one fixed sentence (`callbacks.warm_start.thinking`): the warm start teaches the
form, not medicine. On in the default run (`callbacks.warm_start.steps: 6`); the paper presets and the smoke run set
it to 0.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import torch
from lightning.pytorch.callbacks import Callback

from medix.data.prompts import render_prompt
from medix.data.samples import Sample
from medix.errors import ConfigError

IGNORE_INDEX = -100


def demonstration(sample: Sample, reasoning_tag: str, thinking: str) -> str:
    """The completion the warm start teaches: `<TAG><thinking>…</thinking><answer>reference</answer>`."""
    return f"{sample.tag}<{reasoning_tag}>{thinking}</{reasoning_tag}><answer>{sample.answer}</answer>"


def supervised_batch(samples: list[Sample], tokenizer, reasoning_tag: str, thinking: str) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels: prompt (chat template) + demonstration + EOS; labels are
    IGNORE_INDEX on the prompt and the padding, so the loss covers the demonstration and its EOS only."""
    if tokenizer.eos_token_id is None:
        raise ConfigError("the backbone's tokenizer has no eos_token; the warm start needs one to teach stopping")
    rows, labels = [], []
    for sample in samples:
        prompt = tokenizer(render_prompt(sample, tokenizer, reasoning_tag), add_special_tokens=False)["input_ids"]
        target = tokenizer(demonstration(sample, reasoning_tag, thinking), add_special_tokens=False)["input_ids"]
        target = target + [tokenizer.eos_token_id]
        rows.append(prompt + target)
        labels.append([IGNORE_INDEX] * len(prompt) + target)
    width = max(map(len, rows))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {
        "input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
        "labels": torch.tensor([lab + [IGNORE_INDEX] * (width - len(lab)) for lab in labels]),
    }


def backward_row_by_row(model, rows: list[dict[str, torch.Tensor]], device) -> float:
    """Backward of the mean token loss over `rows` (one-row supervised batches), one row per forward/backward so
    that peak memory is one row's: each row's mean loss weighted by its share of the target tokens, so the summed
    gradient is the padded batch's. Returns that mean loss."""
    counts = [int((row["labels"][:, 1:] != IGNORE_INDEX).sum()) for row in rows]
    total = 0.0
    for row, count in zip(rows, counts):
        loss = model(**{k: v.to(device) for k, v in row.items()}).loss * (count / sum(counts))
        loss.backward()
        total += loss.item()
    return total


class WarmStart(Callback):
    """`callbacks.warm_start`: the supervised steps at the start of training (not when resuming: the checkpoint
    holds the warmed weights)."""

    def __init__(self, *, steps: int, lr: float, batch_size: int, thinking: str, reasoning_tag: str, seed: int):
        for key, value, least in (("steps", steps, 0), ("batch_size", batch_size, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ConfigError(f"callbacks.warm_start.{key}={value!r}; expected an integer >= {least}")
        if not lr > 0:
            raise ConfigError(f"callbacks.warm_start.lr={lr!r}; expected a positive number")
        if steps and not thinking.strip():
            raise ConfigError("callbacks.warm_start.thinking is empty; expected the sentence written inside the "
                              "reasoning tags")
        self.steps, self.lr, self.batch_size, self.thinking = steps, lr, batch_size, thinking
        self.reasoning_tag, self.seed = reasoning_tag, seed
        self.losses: list[float] = []

    def on_train_start(self, trainer, pl_module):
        if self.steps == 0 or trainer.ckpt_path is not None:
            return
        log_metrics = trainer.logger.log_metrics if trainer.logger is not None and trainer.is_global_zero else None
        self.losses = warm_start(pl_module.backbone, trainer.datamodule.train, steps=self.steps, lr=self.lr,
                                 batch_size=self.batch_size, thinking=self.thinking, reasoning_tag=self.reasoning_tag,
                                 seed=self.seed, log_metrics=log_metrics)


def warm_start(backbone, samples: list[Sample], *, steps: int, lr: float, batch_size: int, thinking: str,
               reasoning_tag: str, seed: int, log_metrics: Callable[[dict, int], None] | None = None) -> list[float]:
    """`steps` AdamW steps (`lr`, `batch_size` samples drawn with a seeded RNG) of next-token loss on the
    demonstrations; updates the trainable parameters (the LoRA adapter, or all weights) in place. Returns the loss
    of each step and logs it as `warm_start/loss`."""
    if steps == 0:
        return []
    if backbone.is_vlm:
        raise ConfigError("callbacks.warm_start.steps > 0 supports text-only backbones; set it to 0 for a VLM")
    model, tokenizer = backbone.model, backbone.tokenizer
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.train()
    losses = []
    for step in range(1, steps + 1):
        rows = [supervised_batch([s], tokenizer, reasoning_tag, thinking)
                for s in rng.sample(samples, min(batch_size, len(samples)))]
        step_loss = backward_row_by_row(model, rows, device)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        if log_metrics is not None:
            log_metrics({"warm_start/loss": losses[-1]}, step)
    model.train(was_training)
    return losses
