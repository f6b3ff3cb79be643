"""Lightning callbacks that record a training run: sample tables, reward-hacking alerts, judge statistics and the
closing summary. They read what `GRPOModule.training_step` returns (`scored`: the trained completions and their
rewards; `metrics`: the step's reward statistics over every rank)."""

from __future__ import annotations

import logging
import math

import torch
from lightning.pytorch.callbacks import Callback

from medix.tracking.reward_hacking import RewardHackingMonitor

log = logging.getLogger("medix.run")
SUMMED = ("judge/requests", "judge/items", "judge/cache_hits", "judge/failures")


class SampleTables(Callback):
    """An MLflow table of this rank-0 step's completions with every reward component, whether sampling hit the token
    cap and why the degenerate guard stopped it, at the first step and every `every_n_steps` after
    (`samples/step_<n>.json`)."""

    def __init__(self, every_n_steps: int = 5):
        self.every_n_steps = every_n_steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step, every = pl_module.grpo_step, self.every_n_steps
        logger = trainer.logger
        if not every or step % every != 1 % every or not trainer.is_global_zero or logger is None \
                or not hasattr(logger, "run_id"):
            return
        scored = outputs["scored"]
        samples = [s for s in scored.prompts.samples for _ in range(scored.group_size)]
        table = {"step": [step] * len(samples), "id": [s.id for s in samples],
                 "solution": [s.solution for s in samples], "completion": scored.rollout.texts,
                 "truncated": scored.rollout.truncated.tolist(),
                 "overall": list(scored.rewards.overall), **{k: list(v) for k, v in scored.rewards.components.items()}}
        if scored.rewards.guarded is not None:
            table["guarded"] = list(scored.rewards.guarded)  # why the degenerate guard gave llm_judge 0 (None: not)
        logger.experiment.log_table(logger.run_id, data=table, artifact_file=f"samples/step_{step:05d}.json")


class RewardHackingAlerts(Callback):
    """Warns, tags the MLflow run (`reward_hacking`) and logs `reward_hacking/alert` when one reward component
    climbs while every other one stalls, the format reward collapses or degenerate answers take over
    (`RewardHackingMonitor`); its history survives a resume."""

    def __init__(self, window: int = 10, jump: float = 0.2, stall: float = 0.02, format_drop: float | None = 0.5,
                 max_guarded_share: float | None = 0.3):
        self.monitor = RewardHackingMonitor(window=window, jump=jump, stall=stall, format_drop=format_drop,
                                            max_guarded_share=max_guarded_share)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        means = {k.split("/")[1]: v for k, v in outputs["metrics"].items()
                 if k.startswith("reward/") and k.endswith("/mean") and k != "reward/overall/mean"}
        guarded_share = outputs["metrics"].get("reward/guarded_share")
        for alert in self.monitor.update(pl_module.grpo_step, means, guarded_share):
            log.warning("reward hacking? %s", alert.message)
            logger = trainer.logger
            if logger is not None and trainer.is_global_zero and hasattr(logger, "run_id"):
                logger.experiment.set_tag(logger.run_id, "reward_hacking", alert.message[:5000])
                logger.log_metrics({"reward_hacking/alert": 1.0}, step=pl_module.grpo_step)

    def state_dict(self):
        return {"history": {k: list(v) for k, v in self.monitor._history.items()},
                "alerting": sorted(self.monitor._alerting), "last_step": self.monitor._last_step,
                "format_peak": self.monitor.format_peak}

    def load_state_dict(self, state):
        from collections import deque

        self.monitor._history = {k: deque(v, maxlen=2 * self.monitor.window) for k, v in state["history"].items()}
        self.monitor._alerting = set(state["alerting"])
        self.monitor._last_step = state["last_step"]
        self.monitor.format_peak = state.get("format_peak")  # absent in checkpoints from before it was kept


class JudgeStats(Callback):
    """The judge's cumulative counters (`judge/requests`, `judge/items`, `judge/cache_hits`, `judge/failures`,
    summed over ranks; `judge/latency_s`, the mean over ranks; `judge/cache_hit_rate`), logged once per GRPO step as
    they stand after that step and its validation, so every call is counted at the step that made it. The counts
    continue across a resume."""

    def __init__(self):
        self.pending: tuple[int, dict[str, float]] | None = None  # (GRPO step, this rank's counters after it)
        self.offset: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.pending = (pl_module.grpo_step, pl_module.judge_stats())

    def on_validation_epoch_end(self, trainer, pl_module):
        if self.pending is not None:
            self.pending = (self.pending[0], pl_module.judge_stats())

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.flush(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self.flush(trainer, pl_module)

    def flush(self, trainer, pl_module) -> None:
        """Log the pending counters (every rank takes part: the counts are summed over ranks)."""
        if self.pending is None:
            return
        (step, stats), self.pending = self.pending, None
        if not stats:
            return
        keys = sorted(stats)
        values = torch.tensor([float(stats[k]) for k in keys], dtype=torch.float64, device=pl_module.device)
        if trainer.world_size > 1:
            values = trainer.strategy.reduce(values, reduce_op="sum")
        reduced = {k: float(v) if k in SUMMED else float(v) / trainer.world_size for k, v in zip(keys, values.tolist())}
        reduced = {k: v + self.offset.get(k, 0.0) if k in SUMMED else v for k, v in reduced.items()}
        if reduced.get("judge/items"):
            reduced["judge/cache_hit_rate"] = reduced.get("judge/cache_hits", 0.0) / reduced["judge/items"]
        self.last = reduced
        if trainer.logger is not None:
            trainer.logger.log_metrics(reduced, step=step)

    def state_dict(self):
        return {"counts": {k: v for k, v in self.last.items() if k in SUMMED}}

    def load_state_dict(self, state):
        self.offset = dict(state.get("counts", {}))


class RunSummary(Callback):
    """At the end (rank 0): where the run folder, the trained policy and the MLflow run are, the first and last
    value of each reward component, and with asynchronous rollouts how much they overlapped (this rank's)."""

    def __init__(self):
        self.first: dict[str, float] = {}
        self.last: dict[str, float] = {}
        self.lag: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        means = {k: v for k, v in outputs["metrics"].items() if k.startswith("reward/") and k.endswith("/mean")}
        for key, value in means.items():
            self.first.setdefault(key, value)
        self.last.update(means)
        if outputs.get("async"):
            self.lag.append(outputs["async"])

    def on_train_end(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        lines = [f"run folder: {trainer.default_root_dir}"]
        saved = next((c.saved for c in trainer.callbacks if getattr(c, "saved", None) is not None), None)
        if saved is not None:
            lines.append(f"trained policy: {saved}")
        logger = trainer.logger
        if logger is not None and hasattr(logger, "run_id"):
            lines.append(f"MLflow run {logger.run_id} in {logger._tracking_uri}: start `mlflow ui` in the folder you "
                         f"ran from, then open http://127.0.0.1:5000/#/experiments/{logger.experiment_id}/runs/"
                         f"{logger.run_id}?workflowType=machine_learning")
        for key in sorted(self.last):
            name = key.split("/")[1]
            lines.append(f"{name:>12}: {fmt(self.first[key])} -> {fmt(self.last[key])}  (first -> last GRPO step)")
        val = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val/reward/") and k.endswith("/mean")}
        for key in sorted(val):
            lines.append(f"{key:>28}: {fmt(float(val[key]))}  (last validation)")
        if self.lag:
            lines.append(async_line(self.lag))
        log.info("summary after %d GRPO steps:\n  %s", pl_module.grpo_step, "\n  ".join(lines))


def async_line(steps: list[dict[str, float]]) -> str:
    """One line on the asynchronous rollouts of the steps of this run (`GRPOModule.training_step`'s `async`)."""
    def mean(key):
        return sum(s[key] for s in steps) / len(steps)

    most = max(s["rollout/staleness/max"] for s in steps)
    dropped = sum(s["rollout/stale_dropped"] for s in steps)
    return (f"async rollouts: trainer waited {mean('time/wait_for_rollout_s'):.2f} s/step for them, engine idle "
            f"{mean('time/engine_idle_s'):.2f} s/step, staleness max {most:.0f}, {dropped:.0f} stale rows dropped "
            f"({len(steps)} steps)")


def fmt(value: float) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.3f}"
