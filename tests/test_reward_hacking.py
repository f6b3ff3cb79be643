"""Reward-hacking monitor on synthetic reward curves."""

import random

import pytest

from medix.tracking.reward_hacking import Alert, RewardHackingMonitor


def ramp(t, start=20, stop=40, low=0.2, high=1.0):
    """low until `start`, linear to `high` at `stop`, flat after: slope (1.0 - 0.2) / 20 = 0.04 per step."""
    if t <= start:
        return low
    if t >= stop:
        return high
    return low + (high - low) * (t - start) / (stop - start)


def run(monitor, curves, steps):
    alerts = []
    for t in steps:
        alerts += monitor.update(t, {name: curve(t) for name, curve in curves.items()})
    return alerts


def test_format_collapse_alerts_once_at_the_hand_computed_step():
    monitor = RewardHackingMonitor(window=10, jump=0.2, stall=0.02)
    curves = {
        "format": ramp,
        "llm_judge": lambda t: 0.5 - 0.005 * max(0, t - 20),  # falls while format climbs
        "embedding": lambda t: 0.4,
    }
    alerts = run(monitor, curves, range(60))
    # step 29: last window t=20..29 has mean 0.2 + 0.04 * 4.5 = 0.38 vs 0.2 before -> delta 0.18 (no alert)
    # step 30: last window t=21..30 has mean 0.2 + 0.04 * 5.5 = 0.42 vs 0.2 before -> delta 0.22 > 0.2: alert
    # the pattern holds until step 49 (delta 1.0 - 0.78 = 0.22) and ends at 50 (1.0 - 0.82 = 0.18): one alert
    assert len(alerts) == 1
    alert = alerts[0]
    assert isinstance(alert, Alert)
    assert (alert.component, alert.step) == ("format", 30)
    assert alert.delta == pytest.approx(0.22)
    assert "format" in alert.message and "step 30" in alert.message and "llm_judge" in alert.message


def test_joint_improvement_does_not_alert():
    monitor = RewardHackingMonitor(window=10, jump=0.2, stall=0.02)
    curves = {
        "format": ramp,
        # judge climbs 0.02 per step too: at step 30 its delta is 0.02 * 5.5 = 0.11 > stall
        "llm_judge": lambda t: 0.5 + 0.02 * max(0, min(t, 40) - 20),
        "embedding": lambda t: 0.4,
    }
    assert run(monitor, curves, range(80)) == []
    assert monitor.deltas()["llm_judge"] == pytest.approx(0.0)


def test_noise_around_flat_curves_does_not_alert():
    rng = random.Random(0)
    monitor = RewardHackingMonitor(window=10, jump=0.2, stall=0.02)
    alerts = []
    for t in range(300):
        alerts += monitor.update(t, {c: 0.5 + rng.uniform(-0.1, 0.1) for c in ("format", "llm_judge", "embedding")})
    assert alerts == []


def test_rearms_after_the_pattern_ends():
    monitor = RewardHackingMonitor(window=5, jump=0.2, stall=0.05)
    # two separate climbs of the modality reward, each 0.1 per step for 5 steps, with a plateau between
    def modality(t):
        return min(0.5, 0.1 * max(0, t - 10)) + min(0.5, 0.1 * max(0, t - 40))

    alerts = run(monitor, {"modality": modality, "llm_judge": lambda t: 0.3}, range(70))
    assert [a.component for a in alerts] == ["modality", "modality"]
    assert alerts[0].step < 25 < 40 < alerts[1].step


def test_needs_another_component_and_full_windows():
    monitor = RewardHackingMonitor(window=3, jump=0.1, stall=0.01)
    # a lone component has nothing to be compared with
    assert run(monitor, {"format": lambda t: 0.1 * t}, range(20)) == []
    assert monitor.deltas()["format"] == pytest.approx(0.3)  # 3 steps of 0.1 between window means


def test_unscored_steps_are_skipped():
    monitor = RewardHackingMonitor(window=2, jump=0.2, stall=0.02)
    assert monitor.update(0, {"format": 0.0, "llm_judge": None}) == []
    assert monitor.update(1, {"format": 0.0, "llm_judge": float("nan")}) == []
    assert "llm_judge" not in monitor.deltas()
    alerts = []
    for t, (f, j) in enumerate([(0.0, 0.5), (1.0, 0.5), (1.0, 0.5), (1.0, 0.5)], start=2):
        alerts += monitor.update(t, {"format": f, "llm_judge": j})
    # llm_judge reaches two full windows (4 values, flat) only at t=5; then format's last 4 values are
    # [0, 1, 1, 1]: windows [1, 1] vs [0, 1] -> delta 1.0 - 0.5 = 0.5, judge delta 0 -> one alert at t=5
    assert [(a.component, a.step) for a in alerts] == [("format", 5)]
    assert alerts[0].delta == pytest.approx(0.5)


def test_errors():
    with pytest.raises(ValueError, match="window"):
        RewardHackingMonitor(window=0)
    with pytest.raises(ValueError, match="jump"):
        RewardHackingMonitor(jump=0.0)
    with pytest.raises(ValueError, match="stall"):
        RewardHackingMonitor(stall=-1.0)
    monitor = RewardHackingMonitor()
    monitor.update(5, {"format": 0.1})
    with pytest.raises(ValueError, match="step must increase: got 5 after 5"):
        monitor.update(5, {"format": 0.1})


# The composite run of experiments/reward_ablation/README.md (2026-12-02, 16 steps, the monitor over 6-step
# windows): format 0.375 at step 1 and 0 from step 3 (step 2 is not in the README; 0.125 here), the training judge
# 0.125 -> 0.625, the degenerate share 0.53 over steps 1-8 and 0.62 over steps 9-16 (used here as
# reward/guarded_share), while the composite validation fell 0.206 -> 0.102. Embedding and modality are not in the
# README; flat here.
COLLAPSE = {step: {"format": 0.375 if step == 1 else 0.125 if step == 2 else 0.0,
                   "llm_judge": 0.125 + 0.5 * (step - 1) / 15,
                   "embedding": 0.3, "modality": 0.5,
                   "guarded_share": 0.53 if step <= 8 else 0.62} for step in range(1, 17)}


def study_monitor(**overrides):
    from medix.config import RewardHackingCallback

    defaults = RewardHackingCallback()  # the thresholds a run gets
    settings = {"window": 6, "jump": defaults.jump, "stall": defaults.stall, "format_drop": defaults.format_drop,
                "max_guarded_share": defaults.max_guarded_share, **overrides}
    return RewardHackingMonitor(**settings)


def replay(monitor, series):
    alerts = []
    for step, row in series.items():
        means = {k: v for k, v in row.items() if k != "guarded_share"}
        alerts += monitor.update(step, means, row.get("guarded_share"))
    return alerts


def test_the_recorded_collapse_raises_the_format_and_degenerate_alerts_early():
    alerts = replay(study_monitor(), COLLAPSE)
    by_kind = {a.component: a for a in alerts}
    # format: the mean of steps 1-3 is 0.167 < 0.5 x 0.375; the degenerate share needs a full 6-step window
    assert by_kind["format_collapse"].step == 3 and "format reward collapse at step 3" in \
        by_kind["format_collapse"].message
    assert by_kind["guarded_share"].step == 6 and by_kind["guarded_share"].delta == pytest.approx(0.53)
    assert [a.component for a in alerts].count("format_collapse") == 1  # once while the collapse lasts


def test_a_healthy_run_and_a_run_without_guard_raise_neither():
    rng = random.Random(1)
    healthy = {step: {"format": 0.75 + rng.uniform(-0.25, 0.25), "llm_judge": 0.4 + rng.uniform(-0.1, 0.1),
                      "guarded_share": rng.uniform(0.0, 0.2)} for step in range(1, 41)}
    assert replay(study_monitor(), healthy) == []
    no_guard = {step: {k: v for k, v in row.items() if k != "guarded_share"} for step, row in COLLAPSE.items()}
    assert [a.component for a in replay(study_monitor(format_drop=None), no_guard)] == []


def test_format_and_guard_thresholds_are_checked():
    with pytest.raises(ValueError, match="format_drop"):
        RewardHackingMonitor(format_drop=1.5)
    with pytest.raises(ValueError, match="max_guarded_share"):
        RewardHackingMonitor(max_guarded_share=0.0)


def test_the_callback_feeds_the_logged_guarded_share_and_format_and_keeps_them_over_a_resume(caplog):
    from types import SimpleNamespace

    from medix.tracking.callbacks import RewardHackingAlerts

    def feed(callback, steps):
        for step in steps:
            row = COLLAPSE[step]
            metrics = {"reward/overall/mean": 0.3, "reward/guarded_share": row["guarded_share"],
                       **{f"reward/{k}/mean": v for k, v in row.items() if k != "guarded_share"}}
            callback.on_train_batch_end(SimpleNamespace(logger=None), SimpleNamespace(grpo_step=step),
                                        {"metrics": metrics}, None, 0)

    first = RewardHackingAlerts(window=6, format_drop=0.5, max_guarded_share=0.3)
    feed(first, range(1, 3))
    resumed = RewardHackingAlerts(window=6, format_drop=0.5, max_guarded_share=0.3)
    resumed.load_state_dict(first.state_dict())
    feed(resumed, range(3, 7))
    warnings = [r.getMessage() for r in caplog.records if "reward hacking?" in r.getMessage()]
    # the peak of steps 1-2 (0.375) survived the resume: the collapse is seen at step 3, the degenerate share at 6
    assert any("format reward collapse at step 3" in w and "peak 0.375" in w for w in warnings)
    assert any("degenerate answers at step 6" in w for w in warnings)
