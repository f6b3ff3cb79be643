"""`python -m medix.run`: train a policy with a GRPO-family algorithm and the composite medical reward."""

from __future__ import annotations

import logging
import sys
from contextlib import nullcontext
from pathlib import Path

import hydra
from omegaconf import DictConfig

from medix.errors import JudgeError, MedixError

log = logging.getLogger("medix.run")


def output_dir_of(cfg) -> Path:
    if cfg.paths.output_dir:
        path = Path(cfg.paths.output_dir)
    else:
        from hydra.core.hydra_config import HydraConfig

        path = Path(HydraConfig.get().runtime.output_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def last_logged_step(logger) -> int:
    """The last GRPO step whose metrics the tracker already holds (a resumed run logs only later steps). `lr` is in
    every step's batch of metrics; `loss` too unless it was NaN (NaN values are not logged)."""
    client, run_id = logger.experiment, logger.run_id
    return max((m.step for key in ("lr", "loss") for m in client.get_metric_history(run_id, key)), default=0)


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one training job end to end; returns the last validation metrics (`val/reward/<c>/mean|std`)."""
    import lightning as L

    from medix.data import PromptDataModule, load_report, split_samples
    from medix.data.images import load_image
    from medix.grpo.checkpoint import CHECKPOINT_NAME, load_checkpoint, resolve_checkpoint
    from medix.grpo.module import GRPOModule
    from medix.grpo.warm_start import check_warm_start_config, warm_start
    from medix.judges import build_judge
    from medix.models import load_backbone
    from medix.rewards import build_reward
    from medix.rewards.embedding import build_embedder
    from medix.tracking.mlflow_run import build_mlflow_logger, log_run_config, record_failure
    from medix.tracking.reward_hacking import RewardHackingMonitor

    L.seed_everything(cfg.seed, workers=True)
    resume_state, run_id = None, None
    if cfg.resume:
        checkpoint = resolve_checkpoint(cfg.resume)
        resume_state = load_checkpoint(checkpoint)
        run_id = resume_state["mlflow_run_id"]
        cfg.paths.output_dir = str(checkpoint.parent.parent)  # the resumed run keeps writing into its own folder
    output_dir = output_dir_of(cfg)
    check_warm_start_config(cfg.warm_start)
    data = load_report(cfg.dataset)
    train_samples, val_samples = split_samples(data.samples, cfg.dataset.val_size, cfg.dataset.seed)
    backbone = load_backbone(cfg.backbone, cfg.paths.cache_dir)
    # A component with weight 0 is not computed, so its model is never loaded (an embed-only run starts no judge).
    embedder = build_embedder(cfg.embedder) if cfg.reward.weights.embedding > 0 else None
    judge_context = build_judge(cfg.judge, cfg.paths.cache_dir) if cfg.reward.weights.llm_judge > 0 else nullcontext()
    logger = build_mlflow_logger(cfg, run_id=run_id)
    if resume_state is not None and logger is not None:
        resume_state["last_logged_step"] = last_logged_step(logger)
    with judge_context as judge:
        reward = build_reward(cfg.reward, judge, embedder)
        module = GRPOModule(
            backbone, reward, cfg.algorithm, reasoning_tag=cfg.reasoning_tag, max_steps=cfg.trainer.max_steps,
            refill_pool=train_samples, judge=judge, sample_table_every=cfg.logger.sample_table_every,
            reward_monitor=RewardHackingMonitor(), seed=cfg.seed, val_samples=val_samples,
            val_every=cfg.trainer.val_every, checkpoint_path=output_dir / "checkpoints" / CHECKPOINT_NAME,
            checkpoint_every=cfg.trainer.checkpoint_every, resume_state=resume_state,
            run_id_getter=(lambda: logger.run_id) if logger is not None else None,
            image_loader=lambda p: load_image(p, min_pixels=cfg.dataset.min_pixels, max_pixels=cfg.dataset.max_pixels),
        )
        datamodule = PromptDataModule(train_samples, val_samples, batch_size=cfg.algorithm.prompts_per_step,
                                      num_workers=cfg.trainer.num_workers, seed=cfg.seed)
        trainer = L.Trainer(
            accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices, num_nodes=cfg.trainer.num_nodes,
            strategy=cfg.trainer.strategy, precision=cfg.trainer.precision, max_epochs=cfg.trainer.max_epochs,
            logger=logger if logger is not None else False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
            default_root_dir=str(output_dir), use_distributed_sampler=True,
        )
        if logger is not None and trainer.global_rank == 0 and resume_state is None:  # a resumed run has them
            log_run_config(logger, cfg, output_dir)
            logger.log_metrics({"data/train_rows": len(train_samples), "data/val_rows": len(val_samples),
                                "data/skipped_rows": len(data.skipped)}, step=0)
        try:
            if resume_state is None and cfg.warm_start.steps > 0:  # a resumed checkpoint holds warmed weights
                backbone.model.to(trainer.strategy.root_device)
                warm_start(backbone, train_samples, cfg.warm_start, reasoning_tag=cfg.reasoning_tag, seed=cfg.seed,
                           log_metrics=logger.log_metrics if logger is not None and trainer.global_rank == 0 else None)
            trainer.fit(module, datamodule=datamodule)
        except BaseException as exc:
            if isinstance(exc, JudgeError) and module.grpo_step > 0:
                module.save_checkpoint()  # the last whole step; continue with `resume=<this run's folder>`
                log.error("stopped on a judge error; resume with: python -m medix.run ... resume=%s", output_dir)
            if logger is not None and trainer.global_rank == 0:
                record_failure(logger, exc, output_dir, cfg)
            raise
        if trainer.global_rank == 0:
            adapter_dir = output_dir / "adapter"
            backbone.model.save_pretrained(str(adapter_dir))
            backbone.tokenizer.save_pretrained(str(adapter_dir))
            log.info("adapter saved to %s", adapter_dir)
    if logger is not None:
        log.info("MLflow run %s in %s (start `mlflow ui` in this folder to browse it)", logger.run_id,
                 cfg.logger.tracking_uri)
    return module.val_metrics


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
