"""`python -m medix.evaluate`: evaluate a model on the paper's benchmarks, or compare finished eval runs."""

from __future__ import annotations

import logging
import signal
import sys

import hydra
from omegaconf import DictConfig, ListConfig

from medix.config import register_configs
from medix.errors import ConfigError, MedixError

register_configs()  # the typed schemas of conf/ (eval.yaml's: EvalConfig), before @hydra.main composes


def compare(cfg: DictConfig) -> str:
    from medix.eval.tracking import compare_markdown

    uri = cfg.logger.get("tracking_uri")
    if not uri:
        raise ConfigError("compare needs logger.tracking_uri (logger=mlflow)")
    if isinstance(cfg.compare, ListConfig):
        return compare_markdown(uri, run_ids=[str(r) for r in cfg.compare])
    if isinstance(cfg.compare, DictConfig) and cfg.compare.get("experiment"):
        return compare_markdown(uri, experiment=cfg.compare.experiment)
    raise ConfigError("compare: expected a list of run ids (compare=[id1,id2]) or +compare.experiment=<name>")


def evaluate(cfg: DictConfig):
    """One evaluation (medix.eval.runner) and, with a tracking logger, its MLflow run (params flattened and redacted,
    the metrics, each task's items and the results table)."""
    from medix.eval.runner import run_evaluation
    from medix.eval.tracking import log_eval_run
    from medix.tracking.params import run_params

    outcome = run_evaluation(cfg)
    uri = cfg.logger.get("tracking_uri") if cfg.get("logger") else None
    if uri:
        outcome.run_id = log_eval_run(uri, cfg.eval.experiment, cfg.eval.run_name, run_params(cfg), outcome.metrics,
                                      outcome.item_files, outcome.output_dir / "results.md")
    return outcome


def main(cfg: DictConfig) -> None:
    for name in ("httpx", "httpx2"):  # one INFO line per HTTP request drowns the progress lines
        logging.getLogger(name).setLevel(logging.WARNING)
    # SIGTERM unwinds like an error, so a started local judge server is stopped (finished items are already saved).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        if cfg.get("compare") is not None:
            print(compare(cfg))
            return
        outcome = evaluate(cfg)
        print(outcome.markdown)
        print(f"results: {outcome.output_dir / 'results.md'}" + (f"  mlflow run: {outcome.run_id}" if outcome.run_id else ""))
    except MedixError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


@hydra.main(config_path="../conf", config_name="eval", version_base="1.3")
def cli(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    cli()
