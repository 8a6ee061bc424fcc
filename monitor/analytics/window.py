"""A fixed-length window of the most recent values of a scalar stream."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt


class RollingWindow:
    """The last `size` finite floats appended, in a preallocated float64 ring buffer.

    Statistics are computed over the stored values on each call, so they carry no rounding drift from
    a running sum.
    """

    def __init__(self, size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an integer >= 1, got {size!r}")
        self._size = size
        self._buffer = np.zeros(size, dtype=np.float64)
        self._next = 0  # index that the next value is written to
        self._count = 0

    @property
    def size(self) -> int:
        """Maximum number of values kept."""
        return self._size

    @property
    def count(self) -> int:
        """Number of values currently kept, at most `size`."""
        return self._count

    @property
    def full(self) -> bool:
        """Whether the window contains `size` values, so that each append drops the oldest."""
        return self._count == self._size

    def __len__(self) -> int:
        return self._count

    def append(self, value: float) -> None:
        """Add a value, dropping the oldest one when the window is full.

        Raises:
            ValueError: the value is NaN or infinite. The caller decides whether to count and skip it.
        """
        number = float(value)
        if not math.isfinite(number):
            raise ValueError(f"value must be finite, got {value!r}")

        self._buffer[self._next] = number
        self._next = (self._next + 1) % self._size
        self._count = min(self._count + 1, self._size)

    def clear(self) -> None:
        """Remove every value."""
        self._next = 0
        self._count = 0

    def values(self) -> npt.NDArray[np.float64]:
        """Return a copy of the kept values, oldest first."""
        if not self.full:
            return self._buffer[: self._count].copy()
        return np.concatenate((self._buffer[self._next :], self._buffer[: self._next]))

    def mean(self) -> float:
        """Return the arithmetic mean of the kept values.

        Raises:
            ValueError: the window is empty.
        """
        return float(np.mean(self._stored("mean")))

    def quantile(self, q: float) -> float:
        """Return the q-quantile of the kept values, interpolating linearly between order statistics.

        Raises:
            ValueError: q is not in [0, 1], or the window is empty.
        """
        level = float(q)
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"q must be in [0, 1], got {q!r}")
        return float(np.quantile(self._stored("quantile"), level))

    def _stored(self, statistic: str) -> npt.NDArray[np.float64]:
        """Return a view of the kept values in storage order, which does not matter for statistics."""
        if self._count == 0:
            raise ValueError(f"cannot compute the {statistic} of an empty window; append a value first")
        return self._buffer[: self._count]
