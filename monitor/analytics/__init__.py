"""Divergence, weight-distance and change-point analytics for comparing a twin with its primary.

Pure numpy: the twin service calls these functions and exports the results as metrics.
"""

from monitor.analytics.detectors import ADWIN, DETECTOR_NAMES, DriftDetector, PageHinkley, make_detector
from monitor.analytics.divergence import (
    DivergenceBatch,
    DivergenceSummary,
    TopKDivergence,
    TopKSummary,
    compare_distributions,
    compare_topk,
    log_softmax,
)
from monitor.analytics.weights import (
    OTHER_GROUP,
    TensorDistance,
    group_distances,
    layer_group,
    relative_distance,
    tensor_distances,
)
from monitor.analytics.window import RollingWindow

__all__ = [
    "ADWIN",
    "DETECTOR_NAMES",
    "OTHER_GROUP",
    "DivergenceBatch",
    "DivergenceSummary",
    "DriftDetector",
    "PageHinkley",
    "RollingWindow",
    "TensorDistance",
    "TopKDivergence",
    "TopKSummary",
    "compare_distributions",
    "compare_topk",
    "group_distances",
    "layer_group",
    "log_softmax",
    "make_detector",
    "relative_distance",
    "tensor_distances",
]
