"""A twin posts Grafana annotations for resyncs, against a stand-in for Grafana's HTTP API.

Grafana's server cannot run on the test machines, so the stand-in from test_grafana_client records the
requests instead; the broker and the primary are real.
"""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from monitor.primary.service import Primary
from monitor.twin.service import Twin
from tests.harness import primary_settings, run_until, twin_settings
from tests.mosquitto import Mosquitto
from tests.test_grafana_client import TOKEN, FakeGrafana, grafana

__all__ = ["grafana"]  # the fixture, imported so pytest finds it here


@pytest.mark.broker
def test_twin_annotates_startup_resync(mosquitto: Mosquitto, grafana: FakeGrafana) -> None:
    registry = CollectorRegistry()
    primary = Primary(primary_settings(mosquitto.url), registry)
    twin = Twin(twin_settings(mosquitto.url, "mirror", grafana_url=grafana.url, grafana_token=TOKEN), registry)

    asyncio.run(run_until([twin, primary], lambda: bool(grafana.requests_to("POST", "/api/annotations")), timeout=30))

    request = grafana.requests_to("POST", "/api/annotations")[0]
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"
    assert request.body["dashboardUID"] == "llm-twin-drift"
    assert request.body["tags"] == ["llm-twin", "testlm", "mirror", "resync", "startup"]
    assert "resync requested (startup)" in request.body["text"]
    assert 10**12 < request.body["time"] < 10**14  # epoch milliseconds
