"""`trainer=<choice>` (conf/trainer): Lightning's Trainer set up for GRPO steps."""

from __future__ import annotations

import lightning as L

from medix.errors import ConfigError
from medix.grpo.callbacks import StopAfterSteps


def grpo_trainer(*, max_steps: int | None, max_epochs: int | None, val_check_interval: int | None, callbacks=None,
                 logger=None, **trainer_kwargs) -> L.Trainer:
    """A Lightning Trainer that runs `max_steps` GRPO steps (one training batch each; None: until `max_epochs`
    ends) and validates every `val_check_interval` of them (None: never) and after the last one. Every other keyword
    is Lightning's (accelerator, devices, strategy, precision, num_nodes, default_root_dir, ...)."""
    unbounded = max_epochs is None or max_epochs < 0
    if max_steps is None and unbounded:
        raise ConfigError(f"trainer.max_steps=null runs until trainer.max_epochs ends, but trainer.max_epochs="
                          f"{max_epochs}; set trainer.max_steps or a finite trainer.max_epochs")
    if max_steps is not None and max_steps < 1:
        raise ConfigError(f"trainer.max_steps={max_steps}; expected a positive number of GRPO steps or null")
    if val_check_interval is not None and val_check_interval < 1:
        raise ConfigError(f"trainer.val_check_interval={val_check_interval}; expected >= 1 or null (never)")
    callbacks = list(callbacks or [])
    if max_steps is not None:
        callbacks.append(StopAfterSteps(max_steps))
    return L.Trainer(
        max_epochs=max_epochs, max_steps=-1, callbacks=callbacks, logger=logger if logger is not None else False,
        val_check_interval=val_check_interval or 1, check_val_every_n_epoch=None,  # counts batches across epochs
        limit_val_batches=0 if val_check_interval is None else None,
        log_every_n_steps=1, num_sanity_val_steps=0, enable_checkpointing=False, enable_model_summary=False,
        use_distributed_sampler=False,  # PromptDataModule shards the prompts itself (and resumes mid-epoch)
        **trainer_kwargs,
    )
