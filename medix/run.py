"""`python -m medix.run`: train a policy with a GRPO-family algorithm and the composite medical reward."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from medix.config import register_configs
from medix.console import quiet_third_party_logs
from medix.errors import JudgeError, MedixError
from medix.instantiate import build

log = logging.getLogger("medix.run")
register_configs()


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training job end to end; returns the last logged metrics (`val/reward/<c>/mean|std` included)."""
    import lightning as L

    from medix.grpo.callbacks import resolve_checkpoint
    from medix.tracking.mlflow_run import log_run_config

    quiet_third_party_logs(cfg.verbose)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    checkpoint = resolve_checkpoint(cfg.resume) if cfg.resume else None
    if checkpoint is not None:  # the resumed run keeps writing into its own folder and MLflow run
        cfg.paths.output_dir = str(checkpoint.parent.parent)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    datamodule = build(cfg.dataset)
    datamodule.setup("fit")  # a bad row stops the run here, before any model is loaded
    job = build_job(cfg, checkpoint)
    logger = job.logger
    with recorded(logger, cfg, output_dir, *job.resources()):
        module = build_module(cfg, job)
        trainer = build_trainer(cfg, logger)
        if logger is not None and trainer.is_global_zero and checkpoint is None:  # a resumed run has them
            log_run_config(logger, cfg, output_dir)
            report = datamodule.report
            logger.log_metrics({"data/train_rows": len(datamodule.train), "data/val_rows": len(datamodule.val),
                                "data/skipped_rows": len(report.skipped)}, step=0)
        # weights_only=False: a medix checkpoint also holds RNG states (numpy's are not plain tensors)
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(checkpoint) if checkpoint else None,
                    weights_only=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@dataclass
class Job:
    """What a training run builds before its policy: the rewards, the rollout engine, the logger."""

    reward: Any
    val_reward: Any
    engine: Any
    logger: Any

    def resources(self) -> list:
        """What must be closed however the run ends (judge servers, the rollout engine's server)."""
        return [self.reward, self.engine, *([self.val_reward] if self.val_reward is not None else [])]


def build_job(cfg: DictConfig, checkpoint: Path | None = None) -> Job:
    from medix.tracking.mlflow_run import run_identity

    logger = build(cfg.logger, run_id=checkpoint_run_id(checkpoint), **run_identity(cfg)) if cfg.logger else None
    return Job(reward=build(cfg.reward),  # only the components with a positive weight (embed_only starts no judge)
               val_reward=build(cfg.val_reward) if cfg.val_reward else None,
               engine=build(cfg.rollout), logger=logger)


def build_module(cfg: DictConfig, job: Job):
    """The policy (`backbone`) and the GRPOModule around it (`module`, with the algorithm's optimizer and sampling)."""
    return build(cfg.module, backbone=build(cfg.backbone), engine=job.engine, reward=job.reward,
                 val_reward=job.val_reward)


def build_trainer(cfg: DictConfig, logger):
    """Lightning's Trainer (`trainer`) with every callback of `callbacks`."""
    return build(cfg.trainer, callbacks=[build(c) for c in cfg.callbacks.values()], logger=logger)


@contextmanager
def recorded(logger, cfg, output_dir: Path, *resources):
    """The task wrapper: a crash marks the MLflow run FAILED with the exception (secrets scrubbed) as an artifact;
    the judge, its server and the rollout engine are closed however the run ends."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from medix.tracking.mlflow_run import record_failure

    try:
        yield
    except BaseException as exc:
        if logger is not None and rank_zero_only.rank == 0:
            record_failure(logger, exc, output_dir, cfg)
        if isinstance(exc, JudgeError):
            log.error("stopped on a judge error; continue with: python -m medix.run <same overrides> resume=%s",
                      output_dir)
        raise
    finally:
        for resource in resources:
            resource.close()


def checkpoint_run_id(checkpoint: Path | None) -> str | None:
    """The MLflow run a checkpoint belongs to."""
    from medix.grpo.callbacks import checkpoint_state

    return None if checkpoint is None else checkpoint_state(checkpoint).get("mlflow_run_id")


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN"


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Train; returns `cfg.optimize_metric` of the last validation (the objective of an Optuna sweep)."""
    try:
        metrics = train(cfg)
    except Exception as exc:
        if in_multirun():  # the run is already marked FAILED in MLflow; the sweep goes on with the next job
            log.error("job failed: %s: %s", exc.__class__.__name__, exc)
            return float("nan")
        if isinstance(exc, MedixError):  # a problem the user can fix: one line, no traceback
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        raise
    return metrics.get(cfg.optimize_metric) if cfg.optimize_metric else None


if __name__ == "__main__":
    main()
