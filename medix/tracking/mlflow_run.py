"""The MLflow side of a training run: the logger (a resumed run never logs a step twice), run name and tags, the
resolved config, and crash records."""

from __future__ import annotations

import math
import fcntl
import subprocess
import traceback
from contextlib import contextmanager
from collections.abc import Mapping
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import OmegaConf

from medix.tracking.params import redact, reward_mix_signature, run_name, run_params, scrub_text

# The MLflow UI opens an experiment with this tag in its model-training view (not under GenAI traces/evaluations).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


class ResumableMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger that creates its experiment as a model-training experiment, leaves NaN values out,
    and, continuing an existing run (`run_id`), drops each metric at the steps that run already holds for it (the
    steps a resumed run recomputes)."""

    def __init__(self, *, experiment_name: str, tracking_uri: str, run_name: str | None = None,
                 tags: dict | None = None, run_id: str | None = None):
        with sqlite_store_lock(tracking_uri):  # sweep jobs starting together would race to create its tables
            super().__init__(experiment_name=experiment_name, tracking_uri=tracking_uri, run_name=run_name, tags=tags,
                             run_id=run_id)
        self._logged_until: dict[str, int] | None = None if run_id else {}

    @property
    def experiment(self):
        if not self._initialized and self._run_id is None:
            from mlflow import MlflowClient

            from mlflow.exceptions import MlflowException

            client = MlflowClient(self._tracking_uri)
            if client.get_experiment_by_name(self._experiment_name) is None:
                try:
                    client.create_experiment(self._experiment_name, tags=dict([EXPERIMENT_KIND]))
                except MlflowException:  # another sweep job created it in the meantime
                    pass
        return super().experiment

    def logged_until(self, key: str) -> int:
        """The last step at which the continued run already holds `key` (-1 when it has none)."""
        if self._logged_until is None:
            run = self.experiment.get_run(self.run_id)
            self._logged_until = {k: max((m.step for m in self.experiment.get_metric_history(self.run_id, k)),
                                         default=-1) for k in run.data.metrics}
        return self._logged_until.get(key, -1)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        fresh = {k: v for k, v in metrics.items()
                 if not (isinstance(v, float) and math.isnan(v)) and (step is None or step > self.logged_until(k))}
        if fresh:
            super().log_metrics(fresh, step)

    @rank_zero_only
    def log_hyperparams(self, params) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:500]) for k, v in dict(params).items()]
        for start in range(0, len(items), 100):
            self.experiment.log_batch(run_id=self.run_id, params=items[start:start + 100])


@contextmanager
def sqlite_store_lock(tracking_uri: str):
    """Hold an exclusive lock beside a `sqlite:///` store while MLflow opens (and perhaps creates) it."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    path = Path(tracking_uri.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


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


def run_identity(cfg) -> dict:
    """The run name and tags of a training run (reward mix, algorithm, backbone, commit, sweep)."""
    weights = OmegaConf.to_container(cfg.reward.weights, resolve=True)
    tags = {"git_commit": git_commit(), "reward_mix": reward_mix_signature(weights),
            "algorithm": cfg.algorithm.name, "backbone": cfg.backbone.name, **sweep_tags()}
    return {"run_name": run_name(cfg), "tags": tags}


def log_run_config(logger, cfg, output_dir: Path) -> None:
    """Params (flattened, redacted) and the resolved, redacted config as an artifact."""
    logger.log_hyperparams(run_params(cfg))
    path = Path(output_dir) / "resolved_config.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(redact(cfg))))
    logger.experiment.log_artifact(logger.run_id, str(path))


def record_failure(logger, exc: BaseException, output_dir: Path, cfg=None) -> None:
    """Mark the run FAILED and keep the exception (secrets scrubbed) as an artifact."""
    path = Path(output_dir) / "exception.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(scrub_text("".join(traceback.format_exception(exc)), cfg if cfg is not None else {}))
    try:
        logger.experiment.log_artifact(logger.run_id, str(path))
    finally:
        logger.experiment.set_terminated(logger.run_id, status="FAILED")
