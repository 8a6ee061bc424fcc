"""Prometheus metric families of llm-twin-monitor.

Families are created once per `CollectorRegistry` (`families(registry)`), because the demo runs a primary and
several twins in one process against one registry. Each service then binds the children for its own labels.
Every label value comes from a small fixed set or from configuration (model and twin ids).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, fields

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

TWIN = ("model_id", "twin_id")
PRIMARY = ("model_id",)

UPDATE_KINDS = ("snapshot", "delta")
RESYNC_REASONS = ("startup", "gap", "base_mismatch", "checksum", "new_session", "queue_overflow", "chunk_expired")
ATTRIBUTION_CAUSES = ("same_version", "version_lag")
PUBLISHED_KINDS = ("snapshot", "delta", "chunk", "outputs", "status")

# Sync latency spans sub-millisecond loopback hops to minutes behind a slow link; buckets in seconds.
SYNC_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
# Per-position KL is ~0 for a mirror, 1e-4..1e-2 for a quantized replica, 0.1..5 nats for a stale or frozen one.
POSITION_KL_BUCKETS = (1e-6, 1e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)


@dataclass(frozen=True)
class Families:
    # Twin side: output divergence over the last window.
    output_kl: Gauge
    output_js: Gauge
    output_top1: Gauge
    output_l2: Gauge
    output_kl_reverse: Gauge
    output_tv: Gauge
    output_topk_overlap: Gauge
    output_kl_upper: Gauge
    output_position_kl: Histogram
    attributed_kl: Gauge
    attributed_samples: Counter
    divergence_budget: Gauge
    samples_compared: Counter
    output_nonfinite: Counter
    drift_detected: Counter
    # Twin side: weights and sync.
    weight_relative_distance: Gauge
    weight_group_relative_distance: Gauge
    weight_group_cosine: Gauge
    weight_group_max_abs: Gauge
    twin_info: Gauge
    version_lag: Gauge
    applied_version: Gauge
    staleness: Gauge
    sync_latency: Histogram
    updates_applied: Counter
    resyncs: Counter
    chunks_expired: Counter
    primary_online: Gauge
    # Both sides: transport health.
    broker_connected: Gauge
    messages_rejected: Counter
    incoming_dropped: Counter
    # Primary side.
    training_loss: Gauge
    model_version: Gauge
    published_bytes: Counter
    published_messages: Counter
    training_steps: Counter
    unpublished_distance: Gauge
    resync_requests: Counter


_lock = threading.Lock()
_by_registry: dict[int, tuple[CollectorRegistry, Families]] = {}


def families(registry: CollectorRegistry) -> Families:
    """Return the metric families registered in `registry`, creating them on first use."""
    with _lock:
        cached = _by_registry.get(id(registry))
        if cached is not None and cached[0] is registry:
            return cached[1]
        created = _create(registry)
        _by_registry[id(registry)] = (registry, created)
        return created


def _create(r: CollectorRegistry) -> Families:
    return Families(
        output_kl=Gauge(
            "llm_twin_output_kl_divergence",
            "Mean KL(primary || twin) of next-token distributions over the last window, nats",
            TWIN,
            registry=r,
        ),
        output_js=Gauge(
            "llm_twin_output_js_divergence",
            "Mean Jensen-Shannon divergence over the last window, nats",
            TWIN,
            registry=r,
        ),
        output_top1=Gauge(
            "llm_twin_output_top1_agreement_ratio",
            "Share of positions where primary and twin pick the same top token, 0-1",
            TWIN,
            registry=r,
        ),
        output_l2=Gauge(
            "llm_twin_output_l2_distance",
            "Mean L2 norm of the difference of output probability vectors over the last window",
            TWIN,
            registry=r,
        ),
        output_kl_reverse=Gauge(
            "llm_twin_output_reverse_kl_divergence",
            "Mean KL(twin || primary) over the last window, nats (full distributions only)",
            TWIN,
            registry=r,
        ),
        output_tv=Gauge(
            "llm_twin_output_total_variation_distance",
            "Mean total variation distance over the last window, 0-1 (full distributions only)",
            TWIN,
            registry=r,
        ),
        output_topk_overlap=Gauge(
            "llm_twin_output_topk_overlap_ratio",
            "Mean share of the primary's top-5 tokens that are also in the twin's top 5, 0-1 (full distributions only)",
            TWIN,
            registry=r,
        ),
        output_kl_upper=Gauge(
            "llm_twin_output_kl_divergence_upper_bound",
            "Mean upper bound of KL(primary || twin) when the primary publishes only top-k log-probabilities, nats",
            TWIN,
            registry=r,
        ),
        output_position_kl=Histogram(
            "llm_twin_output_position_kl_divergence",
            "KL(primary || twin) of single positions, nats",
            TWIN,
            buckets=POSITION_KL_BUCKETS,
            registry=r,
        ),
        attributed_kl=Gauge(
            "llm_twin_attributed_kl_divergence",
            "Mean KL over the last window of batches of one cause: same_version (numerics) or version_lag (stale weights), nats",
            (*TWIN, "cause"),
            registry=r,
        ),
        attributed_samples=Counter(
            "llm_twin_attributed_samples", "Positions compared, by cause of divergence", (*TWIN, "cause"), registry=r
        ),
        divergence_budget=Gauge(
            "llm_twin_divergence_budget",
            "Expected divergence of this twin's role, calibrated on a warm-up window",
            (*TWIN, "signal"),
            registry=r,
        ),
        samples_compared=Counter(
            "llm_twin_samples_compared", "Positions compared between primary and twin", TWIN, registry=r
        ),
        output_nonfinite=Counter(
            "llm_twin_output_nonfinite",
            "Positions whose divergence was NaN or Inf, left out of the gauges",
            TWIN,
            registry=r,
        ),
        drift_detected=Counter(
            "llm_twin_drift_detected", "Change points found on a discrepancy stream", (*TWIN, "signal"), registry=r
        ),
        weight_relative_distance=Gauge(
            "llm_twin_weight_relative_distance",
            "||W_primary - W_twin|| / ||W_primary|| over all tensors",
            TWIN,
            registry=r,
        ),
        weight_group_relative_distance=Gauge(
            "llm_twin_weight_group_relative_distance",
            "||W_primary - W_twin|| / ||W_primary|| over the tensors of one layer group",
            (*TWIN, "group"),
            registry=r,
        ),
        weight_group_cosine=Gauge(
            "llm_twin_weight_group_cosine_similarity",
            "Cosine similarity of primary and twin weights over one layer group",
            (*TWIN, "group"),
            registry=r,
        ),
        weight_group_max_abs=Gauge(
            "llm_twin_weight_group_max_abs_difference",
            "Largest absolute difference of one weight between primary and twin in a layer group",
            (*TWIN, "group"),
            registry=r,
        ),
        twin_info=Gauge(
            "llm_twin_twin_info",
            "Configuration of a twin, value 1",
            (*TWIN, "role", "sync_policy", "replica_dtype"),
            registry=r,
        ),
        version_lag=Gauge(
            "llm_twin_version_lag",
            "Primary's latest announced version minus the twin's applied version",
            TWIN,
            registry=r,
        ),
        applied_version=Gauge("llm_twin_applied_version", "Primary version the twin's replica runs", TWIN, registry=r),
        staleness=Gauge(
            "llm_twin_staleness_seconds",
            "Now minus the publish time of the primary version the twin runs",
            TWIN,
            registry=r,
        ),
        sync_latency=Histogram(
            "llm_twin_sync_latency_seconds",
            "Time from the publish of an update to its application on the twin",
            TWIN,
            buckets=SYNC_LATENCY_BUCKETS,
            registry=r,
        ),
        updates_applied=Counter(
            "llm_twin_updates_applied",
            "Weight updates applied to the twin's copy of the primary",
            (*TWIN, "kind"),
            registry=r,
        ),
        resyncs=Counter("llm_twin_resyncs", "Full resyncs requested from the primary", (*TWIN, "reason"), registry=r),
        chunks_expired=Counter(
            "llm_twin_chunks_expired",
            "Chunked messages dropped because their chunks did not all arrive in time",
            TWIN,
            registry=r,
        ),
        primary_online=Gauge(
            "llm_twin_primary_online", "1 while the primary's retained status is online", TWIN, registry=r
        ),
        broker_connected=Gauge(
            "llm_twin_broker_connected",
            "1 while connected to the MQTT broker (twin_id is empty on the primary)",
            TWIN,
            registry=r,
        ),
        messages_rejected=Counter(
            "llm_twin_messages_rejected", "Messages rejected on arrival, by reason", (*TWIN, "reason"), registry=r
        ),
        incoming_dropped=Counter(
            "llm_twin_incoming_dropped",
            "Messages the MQTT client discarded because its queue was full",
            TWIN,
            registry=r,
        ),
        training_loss=Gauge(
            "llm_twin_primary_training_loss",
            "Training loss of the primary, mean over recent steps, nats per byte",
            PRIMARY,
            registry=r,
        ),
        model_version=Gauge(
            "llm_twin_primary_model_version", "Latest weight version the primary published", PRIMARY, registry=r
        ),
        published_bytes=Counter(
            "llm_twin_primary_published_bytes", "Payload bytes the primary published", (*PRIMARY, "kind"), registry=r
        ),
        published_messages=Counter(
            "llm_twin_primary_published_messages", "Messages the primary published", (*PRIMARY, "kind"), registry=r
        ),
        unpublished_distance=Gauge(
            "llm_twin_primary_unpublished_relative_distance",
            "||W_trained - W_published|| / ||W_trained|| after the latest update: what a lossy delta codec left for later",
            PRIMARY,
            registry=r,
        ),
        training_steps=Counter(
            "llm_twin_primary_training_steps", "Training steps the primary ran", PRIMARY, registry=r
        ),
        resync_requests=Counter(
            "llm_twin_primary_resync_requests", "Resync requests the primary received from twins", PRIMARY, registry=r
        ),
    )


def family_names() -> list[str]:
    """Return the exported name of every family (counters with `_total`), for docs and tests."""
    registry = CollectorRegistry()
    created = families(registry)
    names = []
    for field in fields(created):
        metric = getattr(created, field.name)
        suffix = "_total" if isinstance(metric, Counter) else ""
        names.append(metric._name + suffix)
    return names


class LazyGauge:
    """One labelled gauge series, created on the first finite value.

    A gauge child exports 0 from the moment it exists, which would claim a KL or a distance of 0 before
    anything was measured. This series appears only once it has a real value.
    """

    def __init__(self, family: Gauge, *labels: str) -> None:
        self._family = family
        self._labels = labels
        self._child: Gauge | None = None

    def set(self, value: float) -> bool:
        """Set the series unless `value` is NaN or infinite; return whether it was set."""
        if not math.isfinite(value):
            return False
        if self._child is None:
            self._child = self._family.labels(*self._labels)
        self._child.set(value)
        return True
