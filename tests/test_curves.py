"""Mean and spread over seeds of a logged metric (medix.tracking.curves.seed_band): pure, no MLflow."""

import pytest

from medix.tracking.curves import seed_band


def test_seed_band_is_the_mean_and_range_over_the_steps_every_seed_logged():
    histories = [([1, 2, 3], [0.0, 1.0, 0.5]), ([1, 2, 3, 4], [1.0, 0.0, 0.5, 1.0]), ([2, 3], [0.5, 0.2])]
    steps, mean, low, high = seed_band(histories)
    assert steps == [2, 3]
    assert mean == pytest.approx([0.5, 0.4])
    assert low == pytest.approx([0.0, 0.2]) and high == pytest.approx([1.0, 0.5])


def test_seed_band_smooths_each_seed_before_averaging():
    steps, mean, low, high = seed_band([([1, 2], [0.0, 1.0]), ([1, 2], [1.0, 1.0])], window=2)
    assert steps == [1, 2]
    assert mean == pytest.approx([0.5, 0.75])  # seed 1 smoothed to [0, 0.5], seed 2 stays [1, 1]
    assert low == pytest.approx([0.0, 0.5]) and high == pytest.approx([1.0, 1.0])


def test_seed_band_of_nothing_logged_is_empty():
    assert seed_band([([], []), ([], [])]) == ([], [], [], [])
