"""Metric names of the product contract: dashboards, alert rules and users depend on them."""

from __future__ import annotations

# As exported: counters end in _total; the histogram is named by its base name.
CONTRACT_METRICS = (
    "llm_twin_output_kl_divergence",
    "llm_twin_output_js_divergence",
    "llm_twin_output_top1_agreement_ratio",
    "llm_twin_output_l2_distance",
    "llm_twin_weight_relative_distance",
    "llm_twin_version_lag",
    "llm_twin_staleness_seconds",
    "llm_twin_sync_latency_seconds",
    "llm_twin_updates_applied_total",
    "llm_twin_samples_compared_total",
    "llm_twin_messages_rejected_total",
    "llm_twin_resyncs_total",
    "llm_twin_broker_connected",
    "llm_twin_primary_online",
    "llm_twin_drift_detected_total",
    "llm_twin_primary_training_loss",
    "llm_twin_primary_model_version",
    "llm_twin_primary_published_bytes_total",
    "llm_twin_primary_published_messages_total",
)
HISTOGRAMS = ("llm_twin_sync_latency_seconds",)


def exported_series_names() -> frozenset[str]:
    """Return the contract names with each histogram expanded to its _bucket, _sum and _count series."""
    names = set(CONTRACT_METRICS) - set(HISTOGRAMS)
    for histogram in HISTOGRAMS:
        names |= {f"{histogram}_bucket", f"{histogram}_sum", f"{histogram}_count"}
    return frozenset(names)
