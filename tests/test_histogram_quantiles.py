"""Percentiles that a real Prometheus computes from the per-position KL histogram track the true ones."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, start_http_server

from monitor.metrics import families
from monitor.twin.outputs import OutputMonitor
from tests.mosquitto import free_port
from tests.servers_prometheus import RunningServer, running_prometheus

pytestmark = pytest.mark.stack

QUANTILES = (0.5, 0.9, 0.99)
# Regimes of per-position KL, in nats: (twin id, median, log-normal sigma).
REGIMES = (("quantized", 1e-4, 1.0), ("ema", 2e-2, 1.0), ("stale", 0.5, 0.8))
# Adjacent buckets are 3x to 3.3x apart, so an estimate interpolated inside the right bucket is within that factor.
MAX_RATIO = 3.4


@pytest.fixture
def scraped() -> Iterator[tuple[RunningServer, dict[str, np.ndarray]]]:
    registry = CollectorRegistry()
    metric = families(registry)
    rng = np.random.default_rng(11)
    samples: dict[str, np.ndarray] = {}
    for twin_id, median, sigma in REGIMES:
        monitor = OutputMonitor(metric, "testlm", twin_id, window=10)
        values = median * np.exp(sigma * rng.standard_normal(20_000))
        samples[twin_id] = values
        for batch in values.reshape(-1, 100):
            monitor.record({"kl": batch, "js": batch, "top1": np.ones_like(batch), "l2": batch}, "same_version")

    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    config = f"""
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: twin
    static_configs:
      - targets: ["127.0.0.1:{port}"]
"""
    try:
        with running_prometheus(config) as prometheus:
            yield prometheus, samples
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_histogram_quantiles_track_true_quantiles(scraped: tuple[RunningServer, dict[str, np.ndarray]]) -> None:
    prometheus, samples = scraped
    deadline = time.monotonic() + 30
    while not prometheus.get_json("/api/v1/query", {"query": "llm_twin_output_position_kl_divergence_count"})["data"][
        "result"
    ]:
        assert time.monotonic() < deadline, "Prometheus never scraped the histogram"
        time.sleep(0.5)

    for twin_id, values in samples.items():
        for q in QUANTILES:
            expr = f'histogram_quantile({q}, llm_twin_output_position_kl_divergence_bucket{{twin_id="{twin_id}"}})'
            result = prometheus.get_json("/api/v1/query", {"query": expr})["data"]["result"]
            estimate = float(result[0]["value"][1])
            true = float(np.quantile(values, q))

            assert true / MAX_RATIO <= estimate <= true * MAX_RATIO, (twin_id, q, estimate, true)
