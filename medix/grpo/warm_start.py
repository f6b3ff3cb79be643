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
from contextlib import nullcontext

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


def backward_rows(model, rows: list[dict[str, torch.Tensor]], weights: list[float], device, *,
                  backward: Callable = torch.Tensor.backward, sync: Callable = lambda enabled: nullcontext()) -> float:
    """Backward of sum_i weights[i] * (mean token loss of rows[i]), one-row supervised batches, one row per
    forward/backward so that peak memory is one row's. `backward(loss)` and `sync(enabled)` (a context in which a
    backward reduces gradients across ranks only when enabled: the last row) come from the strategy under a trainer.
    Returns the weighted loss."""
    total = 0.0
    for index, (row, weight) in enumerate(zip(rows, weights)):
        with sync(enabled=index == len(rows) - 1):
            loss = model(**{k: v.to(device) for k, v in row.items()}).loss * weight
            backward(loss)
        total += loss.item()
    return total


def target_tokens(row: dict[str, torch.Tensor]) -> int:
    """The tokens a one-row supervised batch teaches (the shifted labels that are not IGNORE_INDEX)."""
    return int((row["labels"][:, 1:] != IGNORE_INDEX).sum())


class WarmStart(Callback):
    """`callbacks.warm_start`: the supervised steps at the start of training (not when resuming: the checkpoint
    holds the warmed weights), through the trainer's strategy: under DDP each rank takes its share of every step's
    rows and the gradient is all-reduced once per step; under FSDP2 the sharded policy trains in place. A progress
    bar shows the steps and the loss; MLflow gets `warm_start/loss`."""

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
        from tqdm.auto import tqdm

        shown = trainer.is_global_zero and getattr(trainer, "progress_bar_callback", None) is not None
        bar = tqdm(total=self.steps, desc="Warm start", unit="step", disable=not shown, dynamic_ncols=True)
        logger = trainer.logger if trainer.logger is not None and trainer.is_global_zero else None

        def on_step(step: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}")
            if logger is not None:
                logger.log_metrics({"warm_start/loss": loss}, step)

        try:
            self.losses = warm_start(pl_module.backbone, trainer.datamodule.train, steps=self.steps, lr=self.lr,
                                     batch_size=self.batch_size, thinking=self.thinking,
                                     reasoning_tag=self.reasoning_tag, seed=self.seed,
                                     module=pl_module if trainer.world_size > 1 else None, on_step=on_step)
        finally:
            bar.close()


def warm_start(backbone, samples: list[Sample], *, steps: int, lr: float, batch_size: int, thinking: str,
               reasoning_tag: str, seed: int, module=None,
               on_step: Callable[[int, float], None] | None = None) -> list[float]:
    """`steps` AdamW steps (`lr`, `batch_size` samples drawn with a seeded RNG, the same on every rank) of
    next-token loss on the demonstrations; updates the trainable parameters (the LoRA adapter, or all weights) in
    place. `module`: the GRPOModule in a running trainer, whose data-parallel ranks share each step's rows (a rank
    with fewer pads with zero-weight rows) and whose strategy runs the backward, reducing gradients once per step;
    None: this process alone. Returns the loss of each step; `on_step(step, loss)` after each."""
    if steps == 0:
        return []
    if backbone.is_vlm:
        raise ConfigError("callbacks.warm_start.steps > 0 supports text-only backbones; set it to 0 for a VLM")
    model, tokenizer = backbone.model, backbone.tokenizer
    rank, world = (module.global_rank, module.world_size) if module is not None else (0, 1)
    over_ranks = (lambda v: module.across_ranks(v, "sum")) if module is not None else (lambda v: v)
    strategy = {"backward": module.manual_backward, "sync": module.gradient_sync} if module is not None else {}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.train()
    losses = []
    for step in range(1, steps + 1):
        chosen = rng.sample(samples, min(batch_size, len(samples)))
        mine = chosen[rank::world]
        padding = -(-len(chosen) // world) - len(mine)  # every rank runs as many backwards
        rows = [supervised_batch([s], tokenizer, reasoning_tag, thinking) for s in mine + chosen[:1] * padding]
        counts = [target_tokens(row) for row in rows[:len(mine)]] + [0] * padding
        total = over_ranks(sum(counts))
        # DDP averages the ranks' gradients, hence `world`: the sum is the mean token loss of the whole batch
        weights = [count * world / total for count in counts]
        step_loss = over_ranks(backward_rows(model, rows, weights, device, **strategy)) / world
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        if on_step is not None:
            on_step(step, step_loss)
    model.train(was_training)
    return losses
