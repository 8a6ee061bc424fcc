"""The twin's own weights: what it computes with, kept in float32, float16 or int8.

A quantized replica stores the low-precision tensors and computes with their float32 dequantization, so its
outputs differ from the primary's even at zero version lag: that difference is the cost of the precision.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from monitor.config import ReplicaDtype
from monitor.model.base import Weights
from monitor.twin.reference import WeightSet

INT8_LEVELS = 127  # symmetric int8 range [-127, 127]; -128 is unused so that 0 maps to 0 exactly


def quantize(weights: Mapping[str, npt.NDArray[np.float32]], dtype: ReplicaDtype) -> Weights:
    """Return the float32 weights a replica of `dtype` computes with (a round trip through that precision).

    int8 uses one symmetric scale per tensor, max|w| / 127, so the error of each element is at most half a
    step, max|w| / 254.
    """
    if dtype == "float32":
        return dict(weights)
    if dtype == "float16":
        return {name: array.astype(np.float16).astype(np.float32) for name, array in weights.items()}

    result: Weights = {}
    for name, array in weights.items():
        peak = float(np.max(np.abs(array))) if array.size else 0.0
        scale = np.float32(peak / INT8_LEVELS) if peak > 0 else np.float32(1.0)
        levels = np.clip(np.rint(array / scale), -INT8_LEVELS, INT8_LEVELS).astype(np.int8)
        result[name] = levels.astype(np.float32) * scale
    return result


class Replica:
    """Weights the twin computes with, the primary version they came from, and that version's publish time."""

    def __init__(self, dtype: ReplicaDtype) -> None:
        self.dtype: ReplicaDtype = dtype
        self.weights: Weights | None = None
        self.version = -1
        self.session_id = ""
        """Primary session of `version`: versions of different sessions are unrelated."""
        self.created_ns = 0
        self.changes = 0

    @property
    def loaded(self) -> bool:
        return self.weights is not None

    def load(self, source: WeightSet) -> None:
        """Take the weights of `source`, converted to the replica's precision."""
        self._swap(quantize(source.weights, self.dtype), source)

    def blend(self, source: WeightSet, alpha: float) -> None:
        """Move toward `source`: replica <- alpha * source + (1 - alpha) * replica, then requantize."""
        if self.weights is None:
            self.load(source)
            return
        mixed = {
            name: (np.float32(alpha) * source.weights[name] + np.float32(1.0 - alpha) * current).astype(np.float32)
            for name, current in self.weights.items()
        }
        self._swap(quantize(mixed, self.dtype), source)

    def _swap(self, weights: Weights, source: WeightSet) -> None:
        # One assignment replaces the whole dict, so a reader holding the old one keeps a consistent version.
        self.weights = weights
        self.version = source.version
        self.session_id = source.session_id
        self.created_ns = source.created_ns
        self.changes += 1
