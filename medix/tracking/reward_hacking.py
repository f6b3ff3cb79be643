"""Reward-hacking alarm: one reward component climbs while every other one stalls or falls
(e.g. the format reward saturates while the judge's verdicts do not improve)."""

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Alert:
    component: str
    step: int
    delta: float
    message: str


class RewardHackingMonitor:
    """Per component, compares the mean of its last `window` step means with the mean of the `window` before:
    delta = mean(last window) - mean(previous window). Alerts when one component's delta > `jump` while every
    other component's delta < `stall`. An alert fires once when the pattern starts and re-arms after it ends."""

    def __init__(self, window: int = 10, jump: float = 0.2, stall: float = 0.02):
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int (steps per running mean), got {window!r}")
        if not jump > 0:
            raise ValueError(f"jump must be > 0 (rise of a component's running mean), got {jump!r}")
        if not stall >= 0:
            raise ValueError(f"stall must be >= 0 (largest change that counts as stalled), got {stall!r}")
        self.window, self.jump, self.stall = window, jump, stall
        self._history: dict[str, deque] = {}
        self._alerting: set[str] = set()
        self._last_step: int | None = None

    def deltas(self) -> dict[str, float]:
        """delta per component whose history already spans two full windows."""
        out = {}
        for name, values in self._history.items():
            if len(values) == 2 * self.window:
                previous, latest = list(values)[: self.window], list(values)[self.window :]
                out[name] = sum(latest) / self.window - sum(previous) / self.window
        return out

    def update(self, step: int, component_means: dict[str, float]) -> list[Alert]:
        """Record this step's mean per component (None/NaN = not scored this step, skipped); return new alerts."""
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"step must increase: got {step} after {self._last_step}")
        self._last_step = step
        for name, value in component_means.items():
            if value is None or math.isnan(value):
                continue
            self._history.setdefault(name, deque(maxlen=2 * self.window)).append(float(value))

        deltas = self.deltas()
        alerts = []
        for name, delta in deltas.items():
            others = {o: d for o, d in deltas.items() if o != name}
            hacking = bool(others) and delta > self.jump and all(d < self.stall for d in others.values())
            if not hacking:
                self._alerting.discard(name)
                continue
            if name in self._alerting:
                continue
            self._alerting.add(name)
            others_text = ", ".join(f"{o} {d:+.3f}" for o, d in sorted(others.items()))
            alerts.append(Alert(
                component=name,
                step=step,
                delta=delta,
                message=(
                    f"possible reward hacking at step {step}: '{name}' rose by {delta:+.3f} (> {self.jump}) "
                    f"between the last two {self.window}-step windows while the others stalled or fell "
                    f"(< {self.stall}): {others_text}"
                ),
            ))
        return alerts
