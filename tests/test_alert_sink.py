"""Tests of the Alertmanager webhook receiver: real HTTP requests to a sink on a free loopback port."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from monitor.alerting.sink import MAX_ALERTNAMES, AlertSink, run_alert_sink, serve_alert_sink

HTTP_TIMEOUT_SECONDS = 5.0


def _alert(alertname: str, status: str, severity: str = "warning", twin_id: str = "mirror") -> dict[str, Any]:
    return {
        "status": status,
        "labels": {"alertname": alertname, "severity": severity, "model_id": "bytelm", "twin_id": twin_id},
        "annotations": {"summary": f"{alertname} on {twin_id}"},
        "startsAt": "2024-05-01T10:00:00Z",
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2024-05-01T10:05:00Z",
        "generatorURL": "http://prometheus:9090/graph",
        "fingerprint": f"{alertname}-{twin_id}".encode().hex()[:16],
    }


def _payload(*alerts: dict[str, Any], status: str = "firing") -> dict[str, Any]:
    """Return a webhook body shaped like Alertmanager's (version 4)."""
    return {
        "version": "4",
        "groupKey": '{}:{alertname="LlmTwinDiscrepancyHigh"}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "alert-sink",
        "groupLabels": {"alertname": "LlmTwinDiscrepancyHigh"},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": list(alerts),
    }


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def sink(registry: CollectorRegistry) -> Iterator[AlertSink]:
    alert_sink = AlertSink("127.0.0.1", 0, registry, history_size=5)
    alert_sink.start()
    try:
        yield alert_sink
    finally:
        alert_sink.stop()


def _request(
    sink: AlertSink,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(sink.host, sink.port, timeout=HTTP_TIMEOUT_SECONDS)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def _post_json(sink: AlertSink, document: object) -> tuple[int, bytes]:
    return _request(sink, "POST", "/alerts", json.dumps(document).encode(), {"Content-Type": "application/json"})


def _received(registry: CollectorRegistry, alertname: str, severity: str, status: str) -> float | None:
    labels = {"alertname": alertname, "severity": severity, "status": status}
    return registry.get_sample_value("llm_twin_alerts_received_total", labels)


def _rejected(registry: CollectorRegistry, reason: str) -> float | None:
    return registry.get_sample_value("llm_twin_alert_sink_rejected_total", {"reason": reason})


def test_sink_counts_firing_alert(sink: AlertSink, registry: CollectorRegistry) -> None:
    payload = _payload(_alert("LlmTwinDiscrepancyHigh", "firing", "critical"))

    status, body = _post_json(sink, payload)

    assert status == 200
    assert json.loads(body) == {"received": 1}
    assert _received(registry, "LlmTwinDiscrepancyHigh", "critical", "firing") == 1.0


def test_sink_counts_resolved_alert(sink: AlertSink, registry: CollectorRegistry) -> None:
    _post_json(sink, _payload(_alert("LlmTwinStale", "firing")))

    status, _ = _post_json(sink, _payload(_alert("LlmTwinStale", "resolved"), status="resolved"))

    assert status == 200
    assert _received(registry, "LlmTwinStale", "warning", "firing") == 1.0
    assert _received(registry, "LlmTwinStale", "warning", "resolved") == 1.0


def test_sink_counts_each_alert_of_group(sink: AlertSink, registry: CollectorRegistry) -> None:
    # A group is firing while any alert fires; each alert carries its own status.
    payload = _payload(
        _alert("LlmTwinDiscrepancyHigh", "firing", twin_id="ema"),
        _alert("LlmTwinDiscrepancyHigh", "firing", twin_id="int8"),
        _alert("LlmTwinDiscrepancyHigh", "resolved", twin_id="frozen"),
    )

    status, body = _post_json(sink, payload)

    assert status == 200
    assert json.loads(body) == {"received": 3}
    assert _received(registry, "LlmTwinDiscrepancyHigh", "warning", "firing") == 2.0
    assert _received(registry, "LlmTwinDiscrepancyHigh", "warning", "resolved") == 1.0


def test_sink_folds_foreign_alertname_into_other(sink: AlertSink, registry: CollectorRegistry) -> None:
    payload = _payload(_alert("KubePodCrashLooping", "firing", "page"))

    _post_json(sink, payload)

    assert _received(registry, "other", "other", "firing") == 1.0
    assert _received(registry, "KubePodCrashLooping", "page", "firing") is None


def test_sink_bounds_distinct_alertnames(registry: CollectorRegistry) -> None:
    names = [f"LlmTwinGenerated{index}" for index in range(MAX_ALERTNAMES + 3)]
    with AlertSink("127.0.0.1", 0, registry) as sink:
        for name in names:
            _post_json(sink, _payload(_alert(name, "firing")))

    counted = [name for name in names if _received(registry, name, "warning", "firing") is not None]

    assert len(counted) == MAX_ALERTNAMES
    assert _received(registry, "other", "warning", "firing") == 3.0


def test_sink_logs_one_line_per_alert(sink: AlertSink, caplog: pytest.LogCaptureFixture) -> None:
    payload = _payload(_alert("LlmTwinDriftDetected", "firing", twin_id="ema"), _alert("LlmTwinStale", "firing"))

    with caplog.at_level(logging.INFO, logger="monitor.alerting.sink"):
        _post_json(sink, payload)

    lines = [record.getMessage() for record in caplog.records if record.getMessage().startswith("Alert ")]
    assert len(lines) == 2
    assert "alertname=LlmTwinDriftDetected" in lines[0]
    assert "severity=warning" in lines[0]
    assert "model_id=bytelm" in lines[0]
    assert "twin_id=ema" in lines[0]
    assert f"fingerprint={payload['alerts'][0]['fingerprint']}" in lines[0]


def test_sink_rejects_invalid_json(sink: AlertSink, registry: CollectorRegistry) -> None:
    status, body = _request(sink, "POST", "/alerts", b'{"alerts": [', {"Content-Type": "application/json"})

    assert status == 400
    assert json.loads(body)["reason"] == "invalid_json"
    assert "invalid JSON body" in json.loads(body)["error"]
    assert _rejected(registry, "invalid_json") == 1.0


def test_sink_rejects_non_string_status(sink: AlertSink, registry: CollectorRegistry) -> None:
    alert = _alert("LlmTwinStale", "firing")
    alert["status"] = ["firing"]

    status, body = _post_json(sink, _payload(alert))

    assert status == 400
    assert "alerts[0].status ['firing']" in json.loads(body)["error"]
    assert _rejected(registry, "invalid_payload") == 1.0


def test_sink_rejects_payload_without_alerts(sink: AlertSink, registry: CollectorRegistry) -> None:
    status, body = _post_json(sink, {"version": "4", "status": "firing"})

    assert status == 400
    assert "missing 'alerts' list" in json.loads(body)["error"]
    assert _rejected(registry, "invalid_payload") == 1.0


def test_sink_rejects_unknown_status(sink: AlertSink, registry: CollectorRegistry) -> None:
    status, body = _post_json(sink, _payload(_alert("LlmTwinStale", "exploded")))

    assert status == 400
    assert "alerts[0].status 'exploded'" in json.loads(body)["error"]
    assert _rejected(registry, "invalid_payload") == 1.0


def test_sink_rejects_oversize_body(sink: AlertSink, registry: CollectorRegistry) -> None:
    body = b" " * (sink.max_body_bytes + 1)

    status, response = _request(sink, "POST", "/alerts", body, {"Content-Type": "application/json"})

    assert status == 413
    assert f"exceeds the limit of {sink.max_body_bytes} bytes" in json.loads(response)["error"]
    assert _rejected(registry, "body_too_large") == 1.0


def test_sink_rejects_invalid_content_length(sink: AlertSink, registry: CollectorRegistry) -> None:
    connection = http.client.HTTPConnection(sink.host, sink.port, timeout=HTTP_TIMEOUT_SECONDS)
    try:
        connection.putrequest("POST", "/alerts")
        connection.putheader("Content-Length", "-5")
        connection.endheaders()
        status = connection.getresponse().status
    finally:
        connection.close()

    assert status == 400
    assert _rejected(registry, "invalid_content_length") == 1.0


def test_sink_survives_rejected_requests(sink: AlertSink, registry: CollectorRegistry) -> None:
    _request(sink, "POST", "/alerts", b"\xff\xfe not json")
    _request(sink, "POST", "/alerts", b"[" * 100_000)

    status, _ = _post_json(sink, _payload(_alert("LlmTwinTargetDown", "firing", "critical")))

    assert status == 200
    assert _rejected(registry, "invalid_json") == 2.0
    assert _received(registry, "LlmTwinTargetDown", "critical", "firing") == 1.0


def test_sink_lists_received_alerts(sink: AlertSink) -> None:
    _post_json(sink, _payload(_alert("LlmTwinStale", "firing", twin_id="ema")))
    _post_json(sink, _payload(_alert("LlmTwinStale", "resolved", twin_id="ema"), status="resolved"))

    status, body = _request(sink, "GET", "/alerts")

    alerts = json.loads(body)["alerts"]
    assert status == 200
    assert [(alert["alertname"], alert["status"]) for alert in alerts] == [
        ("LlmTwinStale", "firing"),
        ("LlmTwinStale", "resolved"),
    ]
    assert alerts[0]["labels"]["twin_id"] == "ema"
    assert alerts[0]["annotations"]["summary"] == "LlmTwinStale on ema"
    assert alerts[0]["receiver"] == "alert-sink"
    assert alerts[1]["endsAt"] == "2024-05-01T10:05:00Z"


def test_sink_keeps_last_alerts_only(sink: AlertSink) -> None:
    for index in range(8):
        _post_json(sink, _payload(_alert("LlmTwinStale", "firing", twin_id=f"twin{index}")))

    _, body = _request(sink, "GET", "/alerts")

    twin_ids = [alert["labels"]["twin_id"] for alert in json.loads(body)["alerts"]]
    assert twin_ids == [f"twin{index}" for index in range(3, 8)]


def test_sink_serves_metrics(sink: AlertSink) -> None:
    _post_json(sink, _payload(_alert("LlmTwinPrimaryOffline", "firing", "critical")))

    status, body = _request(sink, "GET", "/metrics")

    text = body.decode()
    assert status == 200
    labels = 'alertname="LlmTwinPrimaryOffline",severity="critical",status="firing"'
    assert f"llm_twin_alerts_received_total{{{labels}}} 1.0" in text
    assert 'llm_twin_alert_sink_rejected_total{reason="invalid_json"} 0.0' in text


def test_sink_healthz_ok(sink: AlertSink) -> None:
    status, body = _request(sink, "GET", "/healthz")

    assert status == 200
    assert body == b"ok\n"


def test_sink_unknown_path_not_found(sink: AlertSink) -> None:
    status, _ = _request(sink, "GET", "/api/v2/alerts")

    assert status == 404


def test_run_alert_sink_stops_on_event(registry: CollectorRegistry) -> None:
    stop = threading.Event()
    ready = threading.Event()
    started: list[AlertSink] = []

    def on_ready(sink: AlertSink) -> None:
        started.append(sink)
        ready.set()

    thread = threading.Thread(
        target=run_alert_sink, args=("127.0.0.1", 0, registry, stop), kwargs={"on_ready": on_ready}
    )
    thread.start()
    try:
        assert ready.wait(HTTP_TIMEOUT_SECONDS), "sink did not start"
        status, _ = _request(started[0], "GET", "/healthz")
    finally:
        stop.set()
        thread.join(HTTP_TIMEOUT_SECONDS)

    assert status == 200
    assert not thread.is_alive()


@dataclass(frozen=True)
class _Address:
    metrics_host: str
    metrics_port: int


def _get_status(host: str, port: int, path: str) -> int:
    connection = http.client.HTTPConnection(host, port, timeout=HTTP_TIMEOUT_SECONDS)
    try:
        connection.request("GET", path)
        return connection.getresponse().status
    finally:
        connection.close()


def test_serve_alert_sink_stops_on_asyncio_event(registry: CollectorRegistry) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = int(probe.getsockname()[1])

    async def scenario() -> tuple[int, bool]:
        stop = asyncio.Event()
        task = asyncio.create_task(serve_alert_sink(_Address("127.0.0.1", port), registry, stop))
        await asyncio.sleep(0)  # let the task bind before the first request
        status = await asyncio.to_thread(_get_status, "127.0.0.1", port, "/healthz")
        stop.set()
        await asyncio.wait_for(task, HTTP_TIMEOUT_SECONDS)
        return status, task.done()

    status, done = asyncio.run(scenario())

    assert status == 200
    assert done
    with pytest.raises(OSError):
        _get_status("127.0.0.1", port, "/healthz")
