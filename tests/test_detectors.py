"""Change-point detectors: one contract for every detector, then per-detector behaviour."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from monitor.analytics.detectors import ADWIN, DETECTOR_NAMES, DriftDetector, PageHinkley, make_detector

STATS_KEYS = {
    "page_hinkley": {"n", "mean", "up_statistic", "down_statistic"},
    "adwin": {"width", "mean", "variance", "dropped_count", "dropped_mean"},
}


def _step_stream(levels: list[float], length: int, noise: float, seed: int) -> npt.NDArray[np.float64]:
    """Gaussian noise around a mean that steps through `levels`, `length` values per level."""
    rng = np.random.default_rng(seed)
    return np.repeat(levels, length) + noise * rng.standard_normal(len(levels) * length)


def _detections(detector: DriftDetector, stream: npt.NDArray[np.float64]) -> list[int]:
    return [index for index, value in enumerate(stream) if detector.update(float(value))]


def _first_detection(detector: DriftDetector, stream: npt.NDArray[np.float64]) -> int:
    """Feed values until the first detection and return its index, leaving the detector at that step."""
    for index, value in enumerate(stream):
        if detector.update(float(value)):
            return index
    raise AssertionError("no change was detected in the stream")


def test_detector_names_cover_contract_table() -> None:
    assert set(DETECTOR_NAMES) == set(STATS_KEYS)


@pytest.mark.parametrize("name", DETECTOR_NAMES)
def test_detector_constant_stream_never_detects(name: str) -> None:
    detector = make_detector(name)

    detections = _detections(detector, np.full(10_000, 0.25))

    assert detections == []
    assert not detector.drift_detected


@pytest.mark.parametrize("name", DETECTOR_NAMES)
def test_detector_detects_clear_mean_shift(name: str) -> None:
    detector = make_detector(name)
    stream = _step_stream([0.0, 1.0], 1000, noise=0.1, seed=1)

    detections = _detections(detector, stream)

    assert detections
    assert 1000 <= detections[0] < 1100


@pytest.mark.parametrize("name", DETECTOR_NAMES)
def test_detector_resets_after_detection(name: str) -> None:
    detector = make_detector(name)
    stream = _step_stream([0.0, 1.0], 1000, noise=0.1, seed=2)
    first = _first_detection(detector, stream)

    after = _detections(detector, stream[first + 1 :])

    assert after == []
    assert not detector.drift_detected


@pytest.mark.parametrize("name", DETECTOR_NAMES)
def test_detector_flag_clears_on_next_update(name: str) -> None:
    detector = make_detector(name)
    stream = _step_stream([0.0, 1.0], 1000, noise=0.1, seed=3)
    first = _first_detection(detector, stream)
    assert detector.drift_detected

    detector.update(float(stream[first + 1]))

    assert not detector.drift_detected


@pytest.mark.parametrize("name", DETECTOR_NAMES)
def test_detector_detects_consecutive_changes(name: str) -> None:
    detector = make_detector(name)
    stream = _step_stream([0.0, 1.0, 2.0], 1000, noise=0.1, seed=4)

    detections = _detections(detector, stream)

    assert len(detections) == 2
    assert 1000 <= detections[0] < 1100
    assert 2000 <= detections[1] < 2100


@pytest.mark.parametrize("name", DETECTOR_NAMES)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_detector_rejects_non_finite_value(name: str, value: float) -> None:
    detector = make_detector(name)
    for x in (0.1, 0.2, 0.3):
        detector.update(x)
    before = detector.stats()

    with pytest.raises(ValueError, match="needs a finite value"):
        detector.update(value)

    assert detector.n_seen == 3
    assert detector.stats() == pytest.approx(before, nan_ok=True)


@pytest.mark.parametrize("name", DETECTOR_NAMES)
def test_detector_stats_keys(name: str) -> None:
    detector = make_detector(name)
    for x in np.linspace(0.0, 1.0, 100):
        detector.update(float(x))

    stats = detector.stats()

    assert set(stats) == STATS_KEYS[name]
    assert all(isinstance(value, float) for value in stats.values())


@pytest.mark.parametrize("name", DETECTOR_NAMES)
def test_detector_n_seen_counts_all_updates(name: str) -> None:
    detector = make_detector(name)
    stream = _step_stream([0.0, 1.0], 1000, noise=0.1, seed=5)

    detections = _detections(detector, stream)

    assert detections
    assert detector.n_seen == 2000


def _golden_stream() -> npt.NDArray[np.float64]:
    """Gamma noise (shape 2, skewed like a KL stream) around a mean of 1, 2, 1, then 1.5."""
    rng = np.random.default_rng(20240601)
    means = np.repeat([1.0, 2.0, 1.0, 1.5], 2000)
    result: npt.NDArray[np.float64] = rng.gamma(2.0, means / 2.0)
    return result


@pytest.mark.parametrize(
    ("name", "params", "expected"),
    [
        # The default threshold of 50 is small for this scale: 2502 and 3686 are false alarms.
        ("page_hinkley", {}, [2049, 2502, 3686, 6136]),
        ("page_hinkley", {"mode": "both"}, [1713, 2058, 2527, 3362, 3652, 4032, 6044]),
        ("adwin", {}, [2047, 4063, 6079]),
    ],
)
def test_detector_golden_indices(name: str, params: dict[str, Any], expected: list[int]) -> None:
    detector = make_detector(name, **params)

    detections = _detections(detector, _golden_stream())

    assert detections == expected


def test_page_hinkley_up_mode_ignores_decrease() -> None:
    detector = PageHinkley(mode="up")

    detections = _detections(detector, _step_stream([1.0, 0.0], 1000, noise=0.1, seed=6))

    assert detections == []


def test_page_hinkley_down_mode_detects_decrease() -> None:
    detector = PageHinkley(mode="down")

    detections = _detections(detector, _step_stream([1.0, 0.0], 1000, noise=0.1, seed=6))

    assert len(detections) == 1
    assert 1000 <= detections[0] < 1100


def test_page_hinkley_waits_for_min_instances() -> None:
    detector = PageHinkley(min_instances=200, threshold=0.5, delta=0.0)
    stream = _step_stream([0.0, 5.0], 50, noise=0.0, seed=0)

    detections = _detections(detector, np.concatenate([stream, np.full(200, 5.0)]))

    assert detections == [199]


def test_page_hinkley_stats_exceed_threshold() -> None:
    detector = PageHinkley(threshold=20.0)
    stream = _step_stream([0.0, 1.0], 500, noise=0.1, seed=7)

    _first_detection(detector, stream)

    assert detector.stats()["up_statistic"] > 20.0


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"min_instances": 0}, "min_instances must be an integer >= 1, got 0"),
        ({"min_instances": True}, "min_instances must be an integer >= 1, got True"),
        ({"min_instances": 2.5}, "min_instances must be an integer >= 1"),
        ({"delta": -0.1}, "delta must be >= 0"),
        ({"delta": math.nan}, "delta must be a finite number"),
        ({"threshold": 0.0}, "threshold must be > 0"),
        ({"alpha": 0.0}, "alpha must be in \\(0, 1\\]"),
        ({"alpha": 1.01}, "alpha must be in \\(0, 1\\]"),
        ({"mode": "sideways"}, "mode must be one of up, down, both, got 'sideways'"),
    ],
)
def test_page_hinkley_rejects_invalid_parameters(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PageHinkley(**params)


def test_page_hinkley_stores_parameters_as_given() -> None:
    detector = PageHinkley(min_instances=10, delta=0.01, threshold=3, alpha=1, mode="both")

    assert (detector.min_instances, detector.delta, detector.threshold, detector.alpha, detector.mode) == (
        10,
        0.01,
        3,
        1,
        "both",
    )


def test_adwin_detects_decrease() -> None:
    detector = ADWIN()

    detections = _detections(detector, _step_stream([1.0, 0.0], 1000, noise=0.1, seed=8))

    assert len(detections) == 1
    assert 1000 <= detections[0] < 1100


def test_adwin_window_statistics_match_numpy() -> None:
    # 20,000 stationary values exercise bucket merges up to rows of 2**11 values.
    values = np.random.default_rng(9).gamma(2.0, 0.5, 20_000)
    detector = ADWIN()

    detections = _detections(detector, values)

    stats = detector.stats()
    assert detections == []
    assert stats["width"] == 20_000
    assert stats["mean"] == pytest.approx(values.mean(), rel=1e-12)
    assert stats["variance"] == pytest.approx(values.var(), rel=1e-9)


def test_adwin_stats_describe_dropped_values() -> None:
    detector = ADWIN()
    stream = _step_stream([0.0, 1.0], 2000, noise=0.1, seed=10)

    _first_detection(detector, stream)

    stats = detector.stats()
    assert stats["dropped_count"] >= 1000
    assert stats["dropped_mean"] == pytest.approx(0.0, abs=0.05)
    assert stats["width"] + stats["dropped_count"] == detector.n_seen


def test_adwin_window_after_drop_matches_numpy() -> None:
    detector = ADWIN()
    stream = _step_stream([0.0, 1.0], 2000, noise=0.1, seed=11)

    end = _first_detection(detector, stream) + 1

    stats = detector.stats()
    width = int(stats["width"])
    assert stats["mean"] == pytest.approx(stream[end - width : end].mean(), rel=1e-9)
    assert stats["variance"] == pytest.approx(stream[end - width : end].var(), rel=1e-6)


def test_adwin_single_bucket_rows_track_window() -> None:
    # With max_buckets=1 every merge empties its row, the case where rows in the middle are empty.
    detector = ADWIN(max_buckets=1)
    stream = _step_stream([0.0, 1.0], 3000, noise=0.1, seed=12)

    detections = _detections(detector, stream)

    assert len(detections) == 1
    assert 3000 <= detections[0] < 3100


def test_adwin_grace_period_delays_first_test() -> None:
    detector = ADWIN(clock=1, grace_period=500)
    stream = _step_stream([0.0, 1.0], 100, noise=0.01, seed=13)

    detections = _detections(detector, np.concatenate([stream, np.ones(500)]))

    assert detections[0] == 499


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"delta": 0.0}, "delta must be in \\(0, 1\\)"),
        ({"delta": 1.0}, "delta must be in \\(0, 1\\)"),
        ({"delta": "0.1"}, "delta must be a finite number"),
        ({"clock": 0}, "clock must be an integer >= 1"),
        ({"max_buckets": 0}, "max_buckets must be an integer >= 1"),
        ({"min_window_length": 0}, "min_window_length must be an integer >= 1"),
        ({"grace_period": 1.5}, "grace_period must be an integer >= 1"),
    ],
)
def test_adwin_rejects_invalid_parameters(params: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ADWIN(**params)


def test_make_detector_passes_parameters() -> None:
    detector = make_detector("adwin", delta=0.01, clock=8)

    assert isinstance(detector, ADWIN)
    assert detector.delta == 0.01
    assert detector.clock == 8


def test_make_detector_rejects_unknown_name() -> None:
    with pytest.raises(ValueError, match="unknown detector 'cusum'; valid names: page_hinkley, adwin"):
        make_detector("cusum")


def test_make_detector_rejects_unknown_parameter() -> None:
    with pytest.raises(ValueError, match="does not accept parameter\\(s\\) lambda_; accepted: min_instances, delta"):
        make_detector("page_hinkley", lambda_=3.0)


def test_make_detector_rejects_invalid_value() -> None:
    with pytest.raises(ValueError, match="threshold must be > 0"):
        make_detector("page_hinkley", threshold=-1.0)
