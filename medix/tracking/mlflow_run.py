"""The MLflow side of a training run: logger, params, tags, the resolved config, and crash records."""

from __future__ import annotations

import subprocess
import traceback
from pathlib import Path

from omegaconf import OmegaConf

from medix.tracking.params import redact, reward_mix_signature, run_name, run_params, scrub_text


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def sweep_tags() -> dict[str, str]:
    """Hydra's sweep folder and job number when this run is part of a multirun."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
    except (ImportError, ValueError):
        return {}
    if str(hc.mode) != "RunMode.MULTIRUN":
        return {}
    return {"sweep_id": str(hc.sweep.dir), "job_number": str(hc.job.num)}


def build_mlflow_logger(cfg, run_id: str | None = None):
    """Lightning's MLflow logger with medix's run name and tags; None when `logger=none`."""
    if cfg.logger.kind == "none":
        return None
    from lightning.pytorch.loggers import MLFlowLogger

    weights = OmegaConf.to_container(cfg.reward.weights, resolve=True)
    tags = {
        "git_commit": git_commit(),
        "reward_mix": reward_mix_signature(weights),
        "algorithm": cfg.algorithm.name,
        "backbone": cfg.backbone.name,
        **sweep_tags(),
    }
    return MLFlowLogger(
        experiment_name=cfg.logger.experiment_name,
        tracking_uri=cfg.logger.tracking_uri,
        run_name=run_name(cfg),
        tags=tags,
        run_id=run_id,
    )


def log_run_config(logger, cfg, output_dir: Path) -> None:
    """Params (flattened, redacted) and the resolved, redacted config as an artifact."""
    logger.log_hyperparams(run_params(cfg))
    path = output_dir / "resolved_config.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(redact(cfg))))
    logger.experiment.log_artifact(logger.run_id, str(path))


def record_failure(logger, exc: BaseException, output_dir: Path, cfg=None) -> None:
    """Mark the run FAILED and keep the exception (secrets scrubbed) as an artifact."""
    path = output_dir / "exception.txt"
    path.write_text(scrub_text("".join(traceback.format_exception(exc)), cfg if cfg is not None else {}))
    try:
        logger.experiment.log_artifact(logger.run_id, str(path))
    finally:
        logger.experiment.set_terminated(logger.run_id, status="FAILED")
