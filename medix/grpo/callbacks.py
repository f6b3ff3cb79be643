"""Lightning callbacks of the GRPO loop: the step limit, resumable checkpoints, the trained policy at the end, and
the progress bar. A GRPO step is one training batch (one rollout and its several optimizer steps), so these count
`pl_module.grpo_step`, not Lightning's `global_step` (optimizer steps)."""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch.callbacks import Callback, TQDMProgressBar

from medix.errors import JudgeError

log = logging.getLogger(__name__)
CHECKPOINT_NAME = "last.ckpt"


class StopAfterSteps(Callback):
    """Stop training once `max_steps` GRPO steps are done (Lightning then runs the last validation)."""

    def __init__(self, max_steps: int):
        self.max_steps = max_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if pl_module.grpo_step >= self.max_steps:
            trainer.should_stop = True

    def on_train_start(self, trainer, pl_module):
        if pl_module.grpo_step >= self.max_steps:  # resumed from a checkpoint of a finished run
            trainer.should_stop = True


def max_grpo_steps(trainer) -> int | None:
    return next((c.max_steps for c in trainer.callbacks if isinstance(c, StopAfterSteps)), None)


class GRPOCheckpoint(Callback):
    """`<dirpath>/last.ckpt`, Lightning's full checkpoint (trainable weights, optimizer, scheduler, loops, the data
    position, callback states and the module's GRPO state), every `every_n_steps` GRPO steps and at the end of
    training; and, on one process, after a judge error stopped a step, the state before that step (`resume=`
    redoes it). Lightning's ModelCheckpoint counts optimizer steps, several per GRPO step, hence this callback."""

    def __init__(self, dirpath: str, every_n_steps: int = 0):
        if every_n_steps < 0:
            raise ValueError(f"callbacks.checkpoint.every_n_steps={every_n_steps} must be >= 0")
        self.path = Path(dirpath) / CHECKPOINT_NAME
        self.every_n_steps = every_n_steps
        self._saved_at: int | None = None

    def save(self, trainer, pl_module) -> None:
        if self._saved_at == pl_module.grpo_step:
            return
        trainer.save_checkpoint(str(self.path))
        self._saved_at = pl_module.grpo_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.every_n_steps and pl_module.grpo_step % self.every_n_steps == 0:
            self.save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self.save(trainer, pl_module)

    def on_exception(self, trainer, pl_module, exception):
        if isinstance(exception, JudgeError) and pl_module.grpo_step > 0 and trainer.world_size == 1:
            self.save(trainer, pl_module)
            log.error("stopped on a judge error; checkpoint of the last whole step (%d) at %s", pl_module.grpo_step,
                      self.path)


def resolve_checkpoint(resume: str | Path) -> Path:
    """`resume=` takes a checkpoint (a .ckpt file, or under FSDP a .ckpt folder of shards) or a run folder (its
    checkpoints/last.ckpt)."""
    from medix.errors import ConfigError

    path = Path(resume).expanduser()
    if path.is_dir() and not (path / "meta.pt").is_file():  # a run folder, not a sharded checkpoint
        path = path / "checkpoints" / CHECKPOINT_NAME
    if not path.exists():
        raise ConfigError(f"resume={str(resume)!r}: no checkpoint at {path} (expected a .ckpt file or folder, or a "
                          f"run folder holding checkpoints/{CHECKPOINT_NAME})")
    return path


def checkpoint_state(path: Path) -> dict:
    """What the GRPO module saved in a checkpoint (`grpo`: step, RNG, MLflow run id), read without its tensors."""
    import torch

    file = path / "meta.pt" if path.is_dir() else path  # a sharded checkpoint keeps the non-tensor state there
    return torch.load(file, map_location="cpu", weights_only=False, mmap=not path.is_dir()).get("grpo", {})


class SaveTrainedPolicy(Callback):
    """At the end of training: `<dirpath>/adapter/` (LoRA) or `<dirpath>/model/` (full fine-tune), loadable with
    `backbone.adapter=<folder>` (and by medix.evaluate's model.adapter)."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)
        self.saved: Path | None = None

    def on_train_end(self, trainer, pl_module):
        self.saved = pl_module.save_trained(self.dirpath)
        if trainer.is_global_zero:
            log.info("trained policy saved to %s", self.saved)


class GRPOProgressBar(TQDMProgressBar):
    """One bar for the whole run: GRPO steps done of the run's `trainer.max_steps`, with the step's reward and time
    (Lightning's own bar counts batches and starts again at every epoch)."""

    @property
    def train_description(self) -> str:
        return "GRPO"

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        total = max_grpo_steps(self.trainer)
        if total is not None:
            bar.total = total
            bar.n = bar.last_print_n = self.trainer.lightning_module.grpo_step
        return bar

    def on_train_epoch_start(self, trainer, *args):
        if max_grpo_steps(trainer) is None:  # no step limit: Lightning's per-epoch bar
            super().on_train_epoch_start(trainer, *args)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if max_grpo_steps(trainer) is None:
            return super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.train_progress_bar.n = pl_module.grpo_step
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))
        self.train_progress_bar.refresh()

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if "step" in metrics:
            metrics["step"] = int(float(metrics["step"]))
        return metrics
