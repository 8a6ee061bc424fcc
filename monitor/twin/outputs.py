"""Compare the twin's next-token distributions with the primary's and export the result.

Each outputs batch gives one value per signal (the mean over its finite positions). The gauges show the mean
of the last `window` batches; the attributed gauges split that by cause: `same_version` when the replica ran
the version that produced the batch (so any divergence comes from the twin's own numerics: quantization,
blending) and `version_lag` when it ran another one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from monitor.analytics.detectors import DriftDetector, make_detector
from monitor.analytics.divergence import DivergenceBatch
from monitor.analytics.window import RollingWindow
from monitor.metrics import ATTRIBUTION_CAUSES, Families

logger = logging.getLogger(__name__)

DETECTED_SIGNALS = ("kl", "top1_disagreement")


@dataclass(frozen=True)
class BatchSummary:
    """Means of one batch over its finite positions."""

    kl: float
    js: float
    top1: float
    l2: float
    positions: int
    nonfinite: int


def summarize(batch: DivergenceBatch) -> BatchSummary:
    """Return the batch means over positions where every signal is finite."""
    stacked = np.stack([batch.kl, batch.js, batch.top1_agree, batch.l2])
    finite = np.isfinite(stacked).all(axis=0)
    count = int(finite.sum())
    if count == 0:
        return BatchSummary(float("nan"), float("nan"), float("nan"), float("nan"), 0, int(finite.size))
    means = stacked[:, finite].mean(axis=1)
    return BatchSummary(
        float(means[0]), float(means[1]), float(means[2]), float(means[3]), count, int(finite.size - count)
    )


class OutputMonitor:
    """Rolling windows, attribution, change-point detection and the gauges they feed, for one twin."""

    def __init__(
        self, metrics: Families, model_id: str, twin_id: str, *, window: int, detector: str = "page_hinkley"
    ) -> None:
        self.model_id = model_id
        self.twin_id = twin_id
        labels = (model_id, twin_id)
        self._kl = metrics.output_kl.labels(*labels)
        self._js = metrics.output_js.labels(*labels)
        self._top1 = metrics.output_top1.labels(*labels)
        self._l2 = metrics.output_l2.labels(*labels)
        self._position_kl = metrics.output_position_kl.labels(*labels)
        self._samples = metrics.samples_compared.labels(*labels)
        self._nonfinite = metrics.output_nonfinite.labels(*labels)
        self._attributed = {cause: metrics.attributed_kl.labels(*labels, cause) for cause in ATTRIBUTION_CAUSES}
        self._attributed_samples = {
            cause: metrics.attributed_samples.labels(*labels, cause) for cause in ATTRIBUTION_CAUSES
        }
        self._drift = {signal: metrics.drift_detected.labels(*labels, signal) for signal in DETECTED_SIGNALS}
        for counter in self._drift.values():
            counter.inc(0)

        self.windows = {name: RollingWindow(window) for name in ("kl", "js", "top1", "l2")}
        self.cause_windows = {cause: RollingWindow(window) for cause in ATTRIBUTION_CAUSES}
        self.detectors: dict[str, DriftDetector] = {signal: make_detector(detector) for signal in DETECTED_SIGNALS}
        self.batches = 0
        self.last: BatchSummary | None = None

    def record(self, batch: DivergenceBatch, cause: str) -> BatchSummary:
        """Fold one compared batch into the windows, gauges and detectors."""
        summary = summarize(batch)
        self.batches += 1
        self.last = summary
        if summary.nonfinite:
            # A NaN gauge would silently disable every threshold alert on it, so count such positions instead.
            self._nonfinite.inc(summary.nonfinite)
            logger.warning("non-finite divergence twin_id=%s positions=%d", self.twin_id, summary.nonfinite)
        if summary.positions == 0:
            return summary

        for name, value in (("kl", summary.kl), ("js", summary.js), ("top1", summary.top1), ("l2", summary.l2)):
            self.windows[name].append(value)
        self._kl.set(self.windows["kl"].mean())
        self._js.set(self.windows["js"].mean())
        self._top1.set(self.windows["top1"].mean())
        self._l2.set(self.windows["l2"].mean())

        self.cause_windows[cause].append(summary.kl)
        self._attributed[cause].set(self.cause_windows[cause].mean())
        self._attributed_samples[cause].inc(summary.positions)
        self._samples.inc(summary.positions)
        for value in batch.kl[np.isfinite(batch.kl)]:
            self._position_kl.observe(float(value))

        self._detect("kl", summary.kl)
        self._detect("top1_disagreement", 1.0 - summary.top1)
        return summary

    def _detect(self, signal: str, value: float) -> None:
        detector = self.detectors[signal]
        stats = detector.stats()
        if detector.update(value):
            self._drift[signal].inc()
            logger.warning(
                "drift detected model_id=%s twin_id=%s signal=%s value=%.6g window=%s",
                self.model_id,
                self.twin_id,
                signal,
                value,
                {key: round(number, 6) for key, number in stats.items()},
            )
