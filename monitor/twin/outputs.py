"""Compare the twin's next-token distributions with the primary's and export the result.

Each outputs batch gives one value per signal (the mean over its finite positions). The gauges show the mean
of the last `window` batches. The attributed gauges split the KL by cause. The cause is `same_version` when
the replica ran the version that produced the batch, so any divergence comes from the twin's own numerics
(quantization, blending), and `version_lag` when it ran another version.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt

from monitor.analytics.detectors import DriftDetector, make_detector
from monitor.analytics.divergence import DivergenceBatch, TopKDivergence
from monitor.analytics.window import RollingWindow
from monitor.metrics import ATTRIBUTION_CAUSES, Families, LazyGauge

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

DETECTED_SIGNALS = ("kl", "top1_disagreement")
BUDGET_FLOOR_NATS = 1e-6  # a budget of exactly 0 would make any rounding noise an alert
BUDGET_QUANTILE = 0.99
LEVEL_TIME_CONSTANT_BATCHES = 1000
"""Time constant, in batches, of the level that scales the KL detector's input."""


def full_signals(batch: DivergenceBatch) -> dict[str, FloatArray]:
    """Return the per-position signals of a comparison over full distributions."""
    return {
        "kl": batch.kl,
        "kl_reverse": batch.kl_reverse,
        "js": batch.js,
        "tv": batch.tv,
        "top1": batch.top1_agree,
        "topk_overlap": batch.topk_overlap,
        "l2": batch.l2,
    }


def topk_signals(batch: TopKDivergence, l2: FloatArray) -> dict[str, FloatArray]:
    """Return the signals that a top-k comparison supports: lower bounds of KL and JS, and the KL upper bound."""
    return {"kl": batch.kl, "kl_upper": batch.kl_upper, "js": batch.js, "top1": batch.top1_agree, "l2": l2}


class DivergenceBudget:
    """The KL a twin is expected to show at the primary's own version: fixed, or calibrated.

    The calibrated budget is the 0.99 quantile of the first `warmup` same-version batch means (at least 1e-6
    nats), so an alert can compare a quantized twin against its own baseline instead of against zero.
    """

    # NOTE: calibrated once, at the twin's start. Against a primary that learns from scratch, the first batches
    # misstate the later level: an ema twin's budget comes out 2 to 4 times its settled KL. docs/metrics.md
    # advises --divergence-budget for that case.

    def __init__(self, gauge: LazyGauge, *, fixed: float | None, warmup: int, twin_id: str = "") -> None:
        self._gauge = gauge
        self.twin_id = twin_id
        self.warmup = warmup
        self.value: float | None = None
        self.calibrated_on: tuple[float, ...] = ()
        self._samples: list[float] = []
        if fixed is not None:
            self._set(max(fixed, BUDGET_FLOOR_NATS))

    def observe(self, batch_kl: float) -> None:
        if self.value is not None:
            return
        self._samples.append(batch_kl)
        if len(self._samples) >= self.warmup:
            self.calibrated_on = tuple(self._samples)
            self._samples.clear()
            self._set(max(float(np.quantile(self.calibrated_on, BUDGET_QUANTILE)), BUDGET_FLOOR_NATS))
            logger.info(
                "divergence budget calibrated twin_id=%s kl=%.3g batches=%d",
                self.twin_id,
                self.value,
                len(self.calibrated_on),
            )

    def _set(self, value: float) -> None:
        self.value = value
        self._gauge.set(value)


class SlowLevel:
    """An exponential moving average of the same-version KL, the scale of the KL change-point detector's input.

    Divided by it, the input stays near 1 while the KL drifts slowly (an int8 twin's error grows as a fresh
    primary's weights spread), and moves with a change faster than about `time_constant` batches.
    """

    def __init__(self, start: float, time_constant: int = LEVEL_TIME_CONSTANT_BATCHES) -> None:
        self.value = max(start, BUDGET_FLOOR_NATS)
        self._rate = 1.0 / time_constant

    def update(self, kl: float) -> float:
        """Fold in one batch mean and return the level from before it, so a step is measured against the past."""
        before = self.value
        self.value = max(before + self._rate * (kl - before), BUDGET_FLOOR_NATS)
        return before


class OutputMonitor:
    """Rolling windows, attribution, budget and change-point detection for one twin, and the gauges they feed."""

    def __init__(
        self,
        metrics: Families,
        model_id: str,
        twin_id: str,
        *,
        window: int,
        detector: str = "adwin",
        detector_params: Mapping[str, float] | None = None,
        budget: float | None = None,
        budget_warmup: int = 30,
        on_drift: Callable[[str, float], None] | None = None,
    ) -> None:
        self.model_id = model_id
        self.twin_id = twin_id
        labels = (model_id, twin_id)
        self._gauges = {
            "kl": LazyGauge(metrics.output_kl, *labels),
            "kl_reverse": LazyGauge(metrics.output_kl_reverse, *labels),
            "kl_upper": LazyGauge(metrics.output_kl_upper, *labels),
            "js": LazyGauge(metrics.output_js, *labels),
            "tv": LazyGauge(metrics.output_tv, *labels),
            "top1": LazyGauge(metrics.output_top1, *labels),
            "topk_overlap": LazyGauge(metrics.output_topk_overlap, *labels),
            "l2": LazyGauge(metrics.output_l2, *labels),
        }
        self._position_kl = metrics.output_position_kl.labels(*labels)
        self._samples = metrics.samples_compared.labels(*labels)
        self._nonfinite = metrics.output_nonfinite.labels(*labels)
        self._attributed = {cause: LazyGauge(metrics.attributed_kl, *labels, cause) for cause in ATTRIBUTION_CAUSES}
        self._attributed_samples = {
            cause: metrics.attributed_samples.labels(*labels, cause) for cause in ATTRIBUTION_CAUSES
        }
        self._drift = {signal: metrics.drift_detected.labels(*labels, signal) for signal in DETECTED_SIGNALS}
        for counter in (*self._drift.values(), *self._attributed_samples.values()):
            counter.inc(0)

        self.windows = {name: RollingWindow(window) for name in self._gauges}
        self.cause_windows = {cause: RollingWindow(window) for cause in ATTRIBUTION_CAUSES}
        self.detectors: dict[str, DriftDetector] = {
            signal: make_detector(detector, **(detector_params or {})) for signal in DETECTED_SIGNALS
        }
        budget_gauge = LazyGauge(metrics.divergence_budget, *labels, "kl")
        self.budget = DivergenceBudget(budget_gauge, fixed=budget, warmup=budget_warmup, twin_id=twin_id)
        self.level: SlowLevel | None = None
        self.batches = 0
        self._on_drift = on_drift

    def record(self, signals: Mapping[str, FloatArray], cause: str) -> int:
        """Fold one compared batch into the windows, gauges and detectors; return the positions used."""
        finite = np.logical_and.reduce([np.isfinite(values) for values in signals.values()])
        used = int(finite.sum())
        broken = int(finite.size) - used
        self.batches += 1
        if broken:
            # A NaN gauge would silently disable every threshold alert on it, so count such positions instead.
            self._nonfinite.inc(broken)
            logger.warning("non-finite divergence twin_id=%s positions=%d", self.twin_id, broken)
        if used == 0:
            return 0

        means = {name: float(values[finite].mean()) for name, values in signals.items()}
        for name, value in means.items():
            self.windows[name].append(value)
            self._gauges[name].set(self.windows[name].mean())

        kl = means["kl"]
        self.cause_windows[cause].append(kl)
        self._attributed[cause].set(self.cause_windows[cause].mean())
        self._attributed_samples[cause].inc(used)
        self._samples.inc(used)
        for value in signals["kl"][finite]:
            self._position_kl.observe(float(value))

        if cause != "same_version":
            # Divergence from lag follows the sync policy by design: a periodic twin's sawtooth, an ema twin's
            # trail, a frozen twin's growth. The threshold and staleness alerts judge it, and a change-point
            # test on it would report every sync.
            return used

        # The budget and the detectors describe the twin's own numerics. Calibrating on lag would also fold a
        # primary's fast early learning into the baseline.
        self.budget.observe(kl)
        if self.budget.value is not None:
            if self.level is None:
                calibration = self.budget.calibrated_on
                self.level = SlowLevel(float(np.mean(calibration)) if calibration else self.budget.value)
            # Scaled by the twin's own level, the KL stream sits near 1 for every role, which is the regime where
            # the detector's defaults were measured (docs/detectors.md).
            self._detect("kl", kl / self.level.update(kl), kl)
        self._detect("top1_disagreement", 1.0 - means["top1"], 1.0 - means["top1"])
        return used

    def _detect(self, signal: str, scaled: float, value: float) -> None:
        detector = self.detectors[signal]
        if not detector.update(scaled):
            return
        statistics = {key: round(number, 6) for key, number in detector.stats().items()}
        if _direction(statistics) == "down":
            # The twin got closer to the primary (a resync, a recovered canary): worth a log line, not a page.
            logger.info(
                "divergence fell model_id=%s twin_id=%s signal=%s value=%.6g detector=%s",
                self.model_id,
                self.twin_id,
                signal,
                value,
                statistics,
            )
            return

        self._drift[signal].inc()
        logger.warning(
            "drift detected model_id=%s twin_id=%s signal=%s value=%.6g detector_input=%.6g detector=%s",
            self.model_id,
            self.twin_id,
            signal,
            value,
            scaled,
            statistics,
        )
        if self._on_drift is not None:
            self._on_drift(signal, value)


def _direction(statistics: Mapping[str, float]) -> str:
    """Return "up" or "down" for the change a detector just reported, from its statistics."""
    dropped = statistics.get("dropped_mean", math.nan)
    if math.isfinite(dropped):
        # ADWIN: the mean of the kept, newer window against the mean of the dropped, older part.
        return "up" if statistics["mean"] > dropped else "down"
    # Page-Hinkley: whichever cumulative test crossed its threshold.
    return "up" if statistics.get("up_statistic", 0.0) >= statistics.get("down_statistic", 0.0) else "down"
