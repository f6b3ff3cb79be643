"""Reward-hacking alarm: one reward component climbs while every other one stalls or falls (e.g. the format reward
saturates while the judge's verdicts do not improve), the format reward collapses, or degenerate answers take over
(reward/guarded_share)."""

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Alert:
    component: str
    step: int
    delta: float
    message: str


FORMAT = "format"
GUARDED_SHARE = "guarded_share"


class RewardHackingMonitor:
    """Per component, compares the mean of its last `window` step means with the mean of the `window` before:
    delta = mean(last window) - mean(previous window). Alerts when one component's delta > `jump` while every
    other component's delta < `stall`; when the format reward's mean over its last `window` steps (fewer at the
    start) falls below (1 - `format_drop`) x the highest step mean it had (its collapse); and when the share of
    guarded (degenerate) completions, averaged over a full `window`, reaches `max_guarded_share`. None turns either
    of the last two off. An alert fires once when its pattern starts and re-arms after it ends."""

    def __init__(self, window: int = 10, jump: float = 0.2, stall: float = 0.02, format_drop: float | None = None,
                 max_guarded_share: float | None = None):
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int (steps per running mean), got {window!r}")
        if not jump > 0:
            raise ValueError(f"jump must be > 0 (rise of a component's running mean), got {jump!r}")
        if not stall >= 0:
            raise ValueError(f"stall must be >= 0 (largest change that counts as stalled), got {stall!r}")
        if format_drop is not None and not 0 < format_drop <= 1:
            raise ValueError(f"format_drop must lie in (0, 1] (share of the format reward's peak lost), got "
                             f"{format_drop!r}")
        if max_guarded_share is not None and not 0 < max_guarded_share <= 1:
            raise ValueError(f"max_guarded_share must lie in (0, 1], got {max_guarded_share!r}")
        self.window, self.jump, self.stall = window, jump, stall
        self.format_drop, self.max_guarded_share = format_drop, max_guarded_share
        self.format_peak: float | None = None
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

    def update(self, step: int, component_means: dict[str, float], guarded_share: float | None = None) -> list[Alert]:
        """Record this step's mean per component (None/NaN = not scored this step, skipped) and its share of guarded
        completions (None = no guard); return new alerts."""
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"step must increase: got {step} after {self._last_step}")
        self._last_step = step
        for name, value in component_means.items():
            if value is None or math.isnan(value):
                continue
            self._history.setdefault(name, deque(maxlen=2 * self.window)).append(float(value))
        if guarded_share is not None and not math.isnan(guarded_share):
            self._history.setdefault(GUARDED_SHARE, deque(maxlen=2 * self.window)).append(float(guarded_share))
        return [*self.climb_alerts(step), *self.format_alerts(step, component_means.get(FORMAT)),
                *self.guarded_alerts(step)]

    def climb_alerts(self, step: int) -> list[Alert]:
        deltas = {name: d for name, d in self.deltas().items() if name != GUARDED_SHARE}
        alerts = []
        for name, delta in deltas.items():
            others = {o: d for o, d in deltas.items() if o != name}
            hacking = bool(others) and delta > self.jump and all(d < self.stall for d in others.values())
            others_text = ", ".join(f"{o} {d:+.3f}" for o, d in sorted(others.items()))
            alert = self.fire(name, hacking, step, delta, (
                f"possible reward hacking at step {step}: '{name}' rose by {delta:+.3f} (> {self.jump}) "
                f"between the last two {self.window}-step windows while the others stalled or fell "
                f"(< {self.stall}): {others_text}"))
            alerts += alert
        return alerts

    def format_alerts(self, step: int, latest: float | None) -> list[Alert]:
        if self.format_drop is None or FORMAT not in self._history or latest is None or math.isnan(latest):
            return []
        self.format_peak = max(self.format_peak or 0.0, float(latest))
        recent = list(self._history[FORMAT])[-self.window:]
        mean = sum(recent) / len(recent)
        collapsed = self.format_peak > 0 and mean < (1 - self.format_drop) * self.format_peak
        return self.fire("format_collapse", collapsed, step, mean - self.format_peak, (
            f"format reward collapse at step {step}: its mean over the last {len(recent)} steps is {mean:.3f}, "
            f"below (1 - {self.format_drop}) x its peak {self.format_peak:.3f}; the policy is dropping the required "
            "form"))

    def guarded_alerts(self, step: int) -> list[Alert]:
        shares = list(self._history.get(GUARDED_SHARE, []))[-self.window:]
        if self.max_guarded_share is None or len(shares) < self.window:
            return []
        mean = sum(shares) / len(shares)
        return self.fire(GUARDED_SHARE, mean >= self.max_guarded_share, step, mean, (
            f"degenerate answers at step {step}: {mean:.0%} of the completions of the last {self.window} steps were "
            f"guarded (tag soup, echoes, repetition, truncated; >= {self.max_guarded_share:.0%})"))

    def fire(self, name: str, active: bool, step: int, delta: float, message: str) -> list[Alert]:
        """[the alert] when `name`'s pattern starts at this step; [] while it goes on, and once it ends (re-armed)."""
        if not active:
            self._alerting.discard(name)
            return []
        if name in self._alerting:
            return []
        self._alerting.add(name)
        return [Alert(component=name, step=step, delta=delta, message=message)]
