"""RollingWindow: ring-buffer order, statistics and validation."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from monitor.analytics.window import RollingWindow


def test_window_keeps_values_in_order_before_full() -> None:
    window = RollingWindow(5)

    for value in (1.0, 2.0, 3.0):
        window.append(value)

    np.testing.assert_array_equal(window.values(), [1.0, 2.0, 3.0])
    assert window.count == 3
    assert len(window) == 3
    assert not window.full


def test_window_drops_oldest_when_full() -> None:
    window = RollingWindow(4)

    for value in range(1, 8):
        window.append(float(value))

    np.testing.assert_array_equal(window.values(), [4.0, 5.0, 6.0, 7.0])
    assert window.count == 4
    assert window.full


def test_window_values_are_a_copy() -> None:
    window = RollingWindow(3)
    window.append(1.0)

    window.values()[0] = 99.0

    assert window.values()[0] == 1.0


def test_window_mean_after_wraparound() -> None:
    window = RollingWindow(3)

    for value in (10.0, 20.0, 30.0, 40.0, 50.0):
        window.append(value)

    assert window.mean() == pytest.approx(40.0)


@pytest.mark.parametrize("q", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_window_quantile_matches_numpy(q: float) -> None:
    values = np.random.default_rng(0).gamma(2.0, 1.0, 250)
    window = RollingWindow(100)
    for value in values:
        window.append(float(value))

    result = window.quantile(q)

    assert result == pytest.approx(np.quantile(values[-100:], q), rel=1e-12)


def test_window_clear_empties_window() -> None:
    window = RollingWindow(3)
    for value in (1.0, 2.0, 3.0, 4.0):
        window.append(value)

    window.clear()
    window.append(7.0)

    np.testing.assert_array_equal(window.values(), [7.0])
    assert window.mean() == 7.0


@pytest.mark.parametrize("statistic", ["mean", "quantile"])
def test_window_empty_statistics_raise(statistic: str) -> None:
    window = RollingWindow(3)

    with pytest.raises(ValueError, match=f"cannot compute the {statistic} of an empty window"):
        window.mean() if statistic == "mean" else window.quantile(0.5)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_window_rejects_non_finite_value(value: float) -> None:
    window = RollingWindow(3)
    window.append(1.0)

    with pytest.raises(ValueError, match="value must be finite"):
        window.append(value)

    assert window.count == 1


@pytest.mark.parametrize("q", [-0.1, 1.5, math.nan])
def test_window_rejects_quantile_outside_unit_interval(q: float) -> None:
    window = RollingWindow(3)
    window.append(1.0)

    with pytest.raises(ValueError, match="q must be in \\[0, 1\\]"):
        window.quantile(q)


@pytest.mark.parametrize("size", [0, -3, True, 2.5])
def test_window_rejects_invalid_size(size: Any) -> None:
    with pytest.raises(ValueError, match="size must be an integer >= 1"):
        RollingWindow(size)
