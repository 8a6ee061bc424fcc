"""Change-point detectors for a scalar stream, such as the KL divergence of a twin over time.

Each detector stores its parameters as given, validates them in `__init__`, builds its state in
`_reset()`, and does one step per `update(x)`. `update` returns True when a change is detected at that
step. Until the next update, `stats()` describes the state that triggered the detection. The next update
then starts from a fresh state, so that the detector can detect the next change and does not report the
same change twice.
"""

from __future__ import annotations

import abc
import inspect
import math
import numbers
from typing import Any, Final

__all__ = ["ADWIN", "DETECTOR_NAMES", "DriftDetector", "PageHinkley", "make_detector"]

PAGE_HINKLEY_MODES: Final = ("up", "down", "both")


class DriftDetector(abc.ABC):
    """Base class of the detectors: one step per `update`, results read from properties."""

    def __init__(self) -> None:
        self._n_seen = 0
        self._drift_detected = False
        self._reset()

    @property
    def drift_detected(self) -> bool:
        """Whether the last call to `update` detected a change."""
        return self._drift_detected

    @property
    def n_seen(self) -> int:
        """Number of values accepted by `update` since the detector was created, detections included."""
        return self._n_seen

    def update(self, x: float) -> bool:
        """Add one value and return whether a change is detected at this step.

        Raises:
            ValueError: x is NaN or infinite. The state is unchanged, so the caller can count the value
                and skip it.
        """
        value = float(x)
        if not math.isfinite(value):
            raise ValueError(
                f"{type(self).__name__}.update needs a finite value, got {x!r}; skip NaN and infinite values"
            )

        if self._drift_detected:
            self._reset()
        self._drift_detected = self._step(value)
        self._n_seen += 1
        return self._drift_detected

    @abc.abstractmethod
    def stats(self) -> dict[str, float]:
        """Return the statistics of the current state, to log on a detection.

        After a detection they describe the state that triggered it, until the next `update`.
        """

    @abc.abstractmethod
    def _reset(self) -> None:
        """Build the initial state."""

    @abc.abstractmethod
    def _step(self, x: float) -> bool:
        """Add one finite value and return whether a change is detected."""


class PageHinkley(DriftDetector):
    """Page-Hinkley test for a change in the mean of a stream.

    For an increase, the detector accumulates m_t = alpha * m_(t-1) + (x_t - mean_t - delta), where
    mean_t is the mean of the values since the last reset, and signals a change when m_t - min(m_s, s <= t)
    exceeds `threshold`. A decrease uses the same statistic with (mean_t - x_t - delta). `delta` is the
    magnitude of change that is tolerated per value and `threshold` the evidence needed, both in the
    units of the stream, so they must be chosen for its scale. `alpha` < 1 discounts old deviations
    geometrically. No change is signalled before `min_instances` values since the last reset.

    Args:
        min_instances: values needed after a reset before a change can be signalled (>= 1).
        delta: tolerated deviation per value (>= 0, stream units).
        threshold: detection threshold (> 0, stream units).
        alpha: fading factor of the cumulative sums, in (0, 1].
        mode: "up" detects increases, "down" decreases, "both" either.
    """

    def __init__(
        self,
        min_instances: int = 30,
        delta: float = 0.005,
        threshold: float = 50.0,
        alpha: float = 0.9999,
        mode: str = "up",
    ) -> None:
        _check_integer("min_instances", min_instances, minimum=1)
        _check_real("delta", delta)
        if delta < 0:
            raise ValueError(f"delta must be >= 0, got {delta!r}")
        _check_real("threshold", threshold)
        if threshold <= 0:
            raise ValueError(f"threshold must be > 0, got {threshold!r}")
        _check_real("alpha", alpha)
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
        if mode not in PAGE_HINKLEY_MODES:
            raise ValueError(f"mode must be one of {', '.join(PAGE_HINKLEY_MODES)}, got {mode!r}")

        self.min_instances = min_instances
        self.delta = delta
        self.threshold = threshold
        self.alpha = alpha
        self.mode = mode
        super().__init__()

    def stats(self) -> dict[str, float]:
        """Return n (values since the reset), their mean, and the up and down test statistics."""
        return {
            "n": float(self._n),
            "mean": self._mean,
            "up_statistic": self._sum_up - self._min_up,
            "down_statistic": self._sum_down - self._min_down,
        }

    def _reset(self) -> None:
        self._n = 0
        self._mean = 0.0
        # Cumulative sums m_t and their running minima, for increases and decreases.
        self._sum_up = 0.0
        self._min_up = 0.0
        self._sum_down = 0.0
        self._min_down = 0.0

    def _step(self, x: float) -> bool:
        self._n += 1
        self._mean += (x - self._mean) / self._n
        deviation = x - self._mean

        self._sum_up = self.alpha * self._sum_up + deviation - self.delta
        self._min_up = min(self._min_up, self._sum_up)
        self._sum_down = self.alpha * self._sum_down - deviation - self.delta
        self._min_down = min(self._min_down, self._sum_down)

        if self._n < self.min_instances:
            return False
        increase = self.mode != "down" and self._sum_up - self._min_up > self.threshold
        decrease = self.mode != "up" and self._sum_down - self._min_down > self.threshold
        return increase or decrease


class ADWIN(DriftDetector):
    """Adaptive windowing (ADWIN) after Bifet and Gavaldà (2007), with an exponential histogram.

    The window contains every value since the last reset, compressed into buckets: row i contains up to
    `max_buckets` buckets of 2**i values, each storing the sum of its values and the sum of squared
    deviations from its mean. Every `clock` updates, the window is split at each bucket boundary into an
    older part W0 (n0 values) and a newer part W1 (n1 values), both at least `min_window_length` long. A
    change is detected when their means differ by more than

        eps = sqrt(2 * var * L / m) + 2 * L / (3 * m),  m = 1 / (1/n0 + 1/n1),  L = ln(2 * ln(n) / delta),

    where var is the variance of the whole window of n values. This is a Bernstein-type bound for a
    false alarm probability of `delta`, spread over the O(log n) boundaries tested. Both increases and
    decreases of the mean are detected. The second term assumes values in [0, 1], so on streams of larger
    values the test raises more false alarms and on streams of smaller values it detects later
    (docs/detectors.md measures both).

    NOTE: this threshold is the variance-based form that common ADWIN implementations use. It has not
    been checked line by line against the 2007 paper.

    On a detection, the oldest bucket is dropped until no boundary shows a change, so that `stats()`
    reports the mean of the dropped values (before the change) and of the rest. The rest starts near
    the change but can still include earlier values. The original algorithm keeps the rest as its new
    window. Here the window restarts empty at the next update instead, because the earlier values in
    the rest would otherwise trigger a second detection of the same change.

    Args:
        delta: confidence parameter in (0, 1); smaller values raise fewer false alarms.
        clock: number of updates between two tests (>= 1).
        max_buckets: buckets per row before the two oldest merge (>= 1).
        min_window_length: minimum length of W0 and W1 (>= 1).
        grace_period: no test while the window contains fewer values than this (>= 1).
    """

    def __init__(
        self,
        delta: float = 0.002,
        clock: int = 32,
        max_buckets: int = 5,
        min_window_length: int = 5,
        grace_period: int = 10,
    ) -> None:
        _check_real("delta", delta)
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        _check_integer("clock", clock, minimum=1)
        _check_integer("max_buckets", max_buckets, minimum=1)
        _check_integer("min_window_length", min_window_length, minimum=1)
        _check_integer("grace_period", grace_period, minimum=1)

        self.delta = delta
        self.clock = clock
        self.max_buckets = max_buckets
        self.min_window_length = min_window_length
        self.grace_period = grace_period
        super().__init__()

    @property
    def width(self) -> int:
        """Number of values in the window."""
        return self._width

    @property
    def estimation(self) -> float:
        """Mean of the values in the window (0.0 when it is empty)."""
        return self._total / self._width if self._width else 0.0

    def stats(self) -> dict[str, float]:
        """Return the window's width, mean and variance, and what the last detection dropped.

        `dropped_count` and `dropped_mean` describe the values removed at this step's detection. They
        are 0 and NaN at steps without a detection.
        """
        return {
            "width": float(self._width),
            "mean": self.estimation,
            "variance": self._squares / self._width if self._width else 0.0,
            "dropped_count": float(self._dropped_count),
            "dropped_mean": self._dropped_total / self._dropped_count if self._dropped_count else math.nan,
        }

    def _reset(self) -> None:
        # _totals[i] and _squares_by_row[i] contain the buckets of row i, oldest first. Row i + 1 is older
        # than row i, so the whole window reads from the last row to row 0.
        self._totals: list[list[float]] = [[]]
        self._squares_by_row: list[list[float]] = [[]]
        self._width = 0
        self._total = 0.0
        self._squares = 0.0  # sum of squared deviations from the window mean
        self._ticks = 0
        # Values dropped by the test at the current step, reported by stats().
        self._dropped_count = 0
        self._dropped_total = 0.0

    def _step(self, x: float) -> bool:
        self._insert(x)
        self._ticks += 1
        if self._ticks % self.clock != 0 or self._width < self.grace_period:
            return False

        detected = False
        while self._width >= 2 * self.min_window_length and self._has_cut():
            self._drop_oldest_bucket()
            detected = True
        return detected

    def _insert(self, x: float) -> None:
        # Adding x to n values of mean mu increases the sum of squared deviations by n / (n + 1) * (x - mu)^2.
        if self._width:
            deviation = x - self._total / self._width
            self._squares += self._width * deviation * deviation / (self._width + 1)
        self._width += 1
        self._total += x
        self._totals[0].append(x)
        self._squares_by_row[0].append(0.0)
        self._compress()

    def _compress(self) -> None:
        """Merge the two oldest buckets of every row that contains more than `max_buckets`."""
        row = 0
        while len(self._totals[row]) > self.max_buckets:
            if row + 1 == len(self._totals):
                self._totals.append([])
                self._squares_by_row.append([])
            size = float(2**row)
            first_total = self._totals[row].pop(0)
            second_total = self._totals[row].pop(0)
            first_squares = self._squares_by_row[row].pop(0)
            second_squares = self._squares_by_row[row].pop(0)

            # Two parts of n values each combine with an extra n / 2 * (mean1 - mean2)^2.
            mean_difference = (first_total - second_total) / size
            merged_squares = first_squares + second_squares + size / 2.0 * mean_difference * mean_difference
            self._totals[row + 1].append(first_total + second_total)
            self._squares_by_row[row + 1].append(merged_squares)
            row += 1

    def _has_cut(self) -> bool:
        """Test every bucket boundary for a difference of means larger than eps."""
        variance = self._squares / self._width
        log_term = math.log(2.0 * math.log(self._width) / self.delta)

        older_count = 0
        older_total = 0.0
        for row in range(len(self._totals) - 1, -1, -1):
            size = 2**row
            for bucket_total in self._totals[row]:
                older_count += size
                older_total += bucket_total
                newer_count = self._width - older_count
                if older_count < self.min_window_length:
                    continue
                if newer_count < self.min_window_length:
                    return False

                newer_total = self._total - older_total
                harmonic = 1.0 / (1.0 / older_count + 1.0 / newer_count)
                epsilon = math.sqrt(2.0 * variance * log_term / harmonic) + 2.0 * log_term / (3.0 * harmonic)
                if abs(older_total / older_count - newer_total / newer_count) > epsilon:
                    return True
        return False

    def _drop_oldest_bucket(self) -> None:
        # Rows below the last can be empty when max_buckets is 1, because a merge then empties its row.
        row = len(self._totals) - 1
        while not self._totals[row]:
            row -= 1
        size = 2**row
        bucket_total = self._totals[row].pop(0)
        bucket_squares = self._squares_by_row[row].pop(0)
        while len(self._totals) > 1 and not self._totals[-1]:
            self._totals.pop()
            self._squares_by_row.pop()

        # Removing a part A from the window W leaves the part B with
        # S_B = S_W - S_A - nA * nB / nW * (mean_A - mean_B)^2.
        remaining = self._width - size
        if remaining == 0:
            self._squares = 0.0
        else:
            remaining_total = self._total - bucket_total
            mean_difference = bucket_total / size - remaining_total / remaining
            cross = size * remaining / self._width * mean_difference * mean_difference
            # Rounding can push the result slightly below 0 after many removals.
            self._squares = max(self._squares - bucket_squares - cross, 0.0)
        self._width = remaining
        self._total -= bucket_total
        self._dropped_count += size
        self._dropped_total += bucket_total


_DETECTORS: Final[dict[str, type[DriftDetector]]] = {"page_hinkley": PageHinkley, "adwin": ADWIN}

DETECTOR_NAMES: Final = tuple(_DETECTORS)
"""Names accepted by `make_detector`."""


def make_detector(name: str, **params: Any) -> DriftDetector:
    """Create a detector by name ("page_hinkley" or "adwin") with the given constructor parameters.

    Raises:
        ValueError: the name is unknown, a parameter is not accepted by that detector, or a value is
            invalid. The message lists the valid names or parameters.
    """
    try:
        detector_class = _DETECTORS[name]
    except KeyError:
        raise ValueError(f"unknown detector {name!r}; valid names: {', '.join(DETECTOR_NAMES)}") from None

    accepted = list(inspect.signature(detector_class).parameters)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(
            f"detector {name!r} does not accept parameter(s) {', '.join(unknown)}; accepted: {', '.join(accepted)}"
        )
    return detector_class(**params)


def _check_integer(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_real(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
