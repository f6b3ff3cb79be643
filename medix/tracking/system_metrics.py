"""System metrics (CPU, memory, disk, network; GPU when nvidia-ml-py is installed) sampled into a training run's
MLflow run as `system/*`. Lightning's MLFlowLogger creates runs with MlflowClient, so MLflow's own switch
(`mlflow.start_run(log_system_metrics=True)`) never fires; this starts MLflow's monitor for a run id instead."""

from __future__ import annotations

import importlib.util
import logging
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger(__name__)


def system_metrics_available() -> bool:
    """MLflow's monitor needs psutil (CPU, memory, disk, network); GPU metrics also need nvidia-ml-py (pynvml)."""
    return importlib.util.find_spec("psutil") is not None


@contextmanager
def system_metrics(run_id: str | None, tracking_uri: str | None, *, interval_s: float = 10.0,
                   enabled: bool = True) -> Iterator[object | None]:
    """Sample system metrics every `interval_s` seconds into run `run_id` while the block runs.

    Yields the monitor, or None when off (`enabled` false, no run, or psutil missing). A sample is written at the
    end of each interval, so a block shorter than `interval_s` logs nothing. MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL
    in the environment takes precedence over `interval_s` (MLflow's rule)."""
    if not enabled or run_id is None:
        yield None
        return
    if not system_metrics_available():
        log.warning("system metrics are off: psutil is not installed")
        yield None
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=tracking_uri,
                                   resume_logging=True)
    monitor.start()
    try:
        yield monitor
    finally:
        monitor.finish()
