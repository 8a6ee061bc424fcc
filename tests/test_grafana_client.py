"""Tests of the Grafana push and annotation client against a stand-in for Grafana's HTTP API.

Grafana's server cannot run on this machine, so `FakeGrafana` (http.server in a thread, on a free loopback
port) implements the few endpoints the client calls: GET/POST /api/folders, POST /api/dashboards/db and
POST /api/annotations. It records each request, so the tests check paths, JSON bodies and headers. The
response shapes follow Grafana's HTTP API documentation.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from monitor.grafana.client import (
    Annotator,
    GrafanaPushError,
    grafana_push,
    grafana_push_main,
    push_dashboards,
)
from monitor.grafana.dashboards import build_drift_dashboard

TOKEN = "glsa_test-token-0123456789"
WAIT_SECONDS = 5.0
SUB_PATH = "/grafana"


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass
class FakeGrafanaState:
    requests: list[RecordedRequest] = field(default_factory=list)
    folders: list[dict[str, Any]] = field(default_factory=list)
    reject_token: bool = False
    # Set to hold annotation requests until the test releases them.
    annotation_gate: threading.Event | None = None
    annotation_arrived: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _FakeGrafanaHandler(BaseHTTPRequestHandler):
    server: _FakeGrafanaServer

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        state = self.server.state
        length = int(self.headers.get("Content-Length", "0"))
        raw = self.rfile.read(length) if length else b""
        request = RecordedRequest(self.command, self.path, dict(self.headers), json.loads(raw) if raw else None)
        with state.lock:
            state.requests.append(request)

        # Grafana served under a sub-path, as behind a reverse proxy, routes the same endpoints.
        route = (self.command, self.path.removeprefix(SUB_PATH))
        if state.reject_token or self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self._reply(401, {"message": "Invalid API key"})
        elif route == ("GET", "/api/folders"):
            self._reply(200, state.folders)
        elif route == ("POST", "/api/folders"):
            folder = {"id": 7, "uid": "folder-uid-1", "title": request.body["title"]}
            state.folders.append(folder)
            self._reply(200, folder)
        elif route == ("POST", "/api/dashboards/db"):
            uid = request.body["dashboard"]["uid"]
            self._reply(200, {"id": 3, "uid": uid, "url": f"/d/{uid}/slug", "status": "success", "version": 4})
        elif route == ("POST", "/api/annotations"):
            state.annotation_arrived.set()
            if state.annotation_gate is not None:
                state.annotation_gate.wait(WAIT_SECONDS)
            self._reply(200, {"id": 11, "message": "Annotation added"})
        else:
            self._reply(404, {"message": "Not found"})

    def _reply(self, status: int, document: object) -> None:
        body = json.dumps(document).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _FakeGrafanaServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, state: FakeGrafanaState) -> None:
        self.state = state
        super().__init__(("127.0.0.1", 0), _FakeGrafanaHandler)


@dataclass
class FakeGrafana:
    url: str
    state: FakeGrafanaState

    def requests_to(self, method: str, path: str) -> list[RecordedRequest]:
        with self.state.lock:
            return [request for request in self.state.requests if (request.method, request.path) == (method, path)]


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    state = FakeGrafanaState()
    server = _FakeGrafanaServer(state)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield FakeGrafana(f"http://127.0.0.1:{server.server_address[1]}", state)
    finally:
        if state.annotation_gate is not None:
            state.annotation_gate.set()
        server.shutdown()
        server.server_close()
        thread.join(WAIT_SECONDS)


@pytest.fixture
def closed_port_url() -> str:
    """Return a loopback URL where nothing listens: the port was bound once, then released."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --- push_dashboards ------------------------------------------------------------------------------


def test_push_uploads_generated_dashboard(grafana: FakeGrafana) -> None:
    pushed = push_dashboards(grafana.url, TOKEN)

    (request,) = grafana.requests_to("POST", "/api/dashboards/db")
    expected = build_drift_dashboard()
    assert request.body["overwrite"] is True
    assert request.body["dashboard"]["uid"] == "llm-twin-drift"
    assert request.body["dashboard"]["panels"] == expected["panels"]
    assert "folderUid" not in request.body
    assert [dashboard.uid for dashboard in pushed] == ["llm-twin-drift"]
    assert pushed[0].version == 4
    assert pushed[0].url == "/d/llm-twin-drift/slug"


def test_push_sends_bearer_token(grafana: FakeGrafana) -> None:
    push_dashboards(grafana.url, TOKEN)

    (request,) = grafana.requests_to("POST", "/api/dashboards/db")
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"


def test_push_reads_dashboard_files(grafana: FakeGrafana, tmp_path: Path) -> None:
    path = tmp_path / "custom.json"
    path.write_text(json.dumps({"id": 42, "uid": "custom-uid", "title": "Custom", "panels": []}), "utf-8")

    pushed = push_dashboards(grafana.url, TOKEN, paths=[path])

    (request,) = grafana.requests_to("POST", "/api/dashboards/db")
    assert request.body["dashboard"]["uid"] == "custom-uid"
    assert request.body["dashboard"]["id"] is None
    assert pushed[0].title == "Custom"


def test_push_keeps_url_sub_path(grafana: FakeGrafana) -> None:
    push_dashboards(f"{grafana.url}{SUB_PATH}", TOKEN)

    paths = [request.path for request in grafana.state.requests]
    assert paths == [f"{SUB_PATH}/api/dashboards/db"]


def test_push_creates_missing_folder(grafana: FakeGrafana) -> None:
    push_dashboards(grafana.url, TOKEN, folder="LLM twin")

    (create,) = grafana.requests_to("POST", "/api/folders")
    (upload,) = grafana.requests_to("POST", "/api/dashboards/db")
    assert create.body == {"title": "LLM twin"}
    assert upload.body["folderUid"] == "folder-uid-1"


def test_push_reuses_existing_folder(grafana: FakeGrafana) -> None:
    grafana.state.folders.append({"id": 2, "uid": "existing-uid", "title": "LLM twin"})

    push_dashboards(grafana.url, TOKEN, folder="LLM twin")

    (upload,) = grafana.requests_to("POST", "/api/dashboards/db")
    assert grafana.requests_to("POST", "/api/folders") == []
    assert upload.body["folderUid"] == "existing-uid"


def test_push_rejected_token_names_url_not_token(grafana: FakeGrafana) -> None:
    grafana.state.reject_token = True

    with pytest.raises(GrafanaPushError) as raised:
        push_dashboards(grafana.url, TOKEN)

    message = str(raised.value)
    assert "rejected the token (HTTP 401)" in message
    assert grafana.url in message
    assert TOKEN not in message


def test_push_unreachable_names_url_not_token(closed_port_url: str) -> None:
    with pytest.raises(GrafanaPushError) as raised:
        push_dashboards(closed_port_url, TOKEN, timeout_seconds=2.0)

    message = str(raised.value)
    assert "unreachable" in message
    assert closed_port_url in message
    assert TOKEN not in message


def test_push_missing_token_raises() -> None:
    with pytest.raises(ValueError, match="missing Grafana token: set LLM_TWIN_GRAFANA_TOKEN"):
        push_dashboards("http://127.0.0.1:3000", "")


def test_push_invalid_url_raises() -> None:
    with pytest.raises(ValueError, match="invalid Grafana URL 'ftp://grafana'"):
        push_dashboards("ftp://grafana", TOKEN)


def test_push_invalid_dashboard_file_raises(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("{not json", "utf-8")

    with pytest.raises(ValueError, match=r"invalid dashboard file .*broken\.json: not JSON"):
        push_dashboards("http://127.0.0.1:3000", TOKEN, paths=[path])


def test_push_main_reads_token_from_environment(
    grafana: FakeGrafana, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLM_TWIN_GRAFANA_TOKEN", TOKEN)

    status = grafana_push_main(["--grafana-url", grafana.url])

    assert status == 0
    assert "pushed llm-twin-drift" in capsys.readouterr().out
    assert len(grafana.requests_to("POST", "/api/dashboards/db")) == 1


def test_push_main_missing_token_exits_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("LLM_TWIN_GRAFANA_TOKEN", raising=False)

    status = grafana_push_main(["--grafana-url", "http://127.0.0.1:3000"])

    assert status == 2
    assert "LLM_TWIN_GRAFANA_TOKEN" in capsys.readouterr().err


def test_push_main_rejected_token_exits_1(
    grafana: FakeGrafana, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LLM_TWIN_GRAFANA_TOKEN", TOKEN)
    grafana.state.reject_token = True

    status = grafana_push_main(["--grafana-url", grafana.url])

    assert status == 1
    assert TOKEN not in capsys.readouterr().err


def test_grafana_push_folder_by_title(grafana: FakeGrafana, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_TWIN_GRAFANA_TOKEN", TOKEN)

    status = grafana_push(grafana.url, folder="LLM twin")

    (upload,) = grafana.requests_to("POST", "/api/dashboards/db")
    assert status == 0
    assert upload.body["folderUid"] == "folder-uid-1"


def test_grafana_push_unreachable_exits_1(closed_port_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLM_TWIN_GRAFANA_TOKEN", TOKEN)

    status = grafana_push(closed_port_url, timeout_seconds=2.0)

    assert status == 1


# --- Annotator ------------------------------------------------------------------------------------


def test_annotator_posts_millisecond_time(grafana: FakeGrafana) -> None:
    time_ns = 1_714_557_600_123_456_789

    with Annotator(grafana.url, TOKEN) as annotator:
        queued = annotator.annotate("drift detected on kl", ["drift", "ema"], time_ns)
        assert annotator.flush(WAIT_SECONDS)

    (request,) = grafana.requests_to("POST", "/api/annotations")
    assert queued is True
    assert request.body["time"] == 1_714_557_600_123
    assert request.body["dashboardUID"] == "llm-twin-drift"
    assert request.body["tags"] == ["drift", "ema"]
    assert request.body["text"] == "drift detected on kl"
    assert request.headers["Authorization"] == f"Bearer {TOKEN}"


def test_annotator_uses_given_dashboard_uid(grafana: FakeGrafana) -> None:
    with Annotator(grafana.url, TOKEN, dashboard_uid="other-dashboard") as annotator:
        annotator.annotate("resync", [], 1_000_000)
        assert annotator.flush(WAIT_SECONDS)

    (request,) = grafana.requests_to("POST", "/api/annotations")
    assert request.body["dashboardUID"] == "other-dashboard"
    assert request.body["time"] == 1


def test_annotator_unreachable_does_not_raise(closed_port_url: str) -> None:
    annotator = Annotator(closed_port_url, TOKEN, timeout_seconds=1.0)

    try:
        annotator.annotate("first", [], time.time_ns())
        annotator.annotate("second", [], time.time_ns())
        flushed = annotator.flush(WAIT_SECONDS)
    finally:
        annotator.close()

    assert flushed
    assert annotator.failed == 2
    assert annotator.sent == 0


def test_annotator_rate_limits_failure_logs(grafana: FakeGrafana, caplog: pytest.LogCaptureFixture) -> None:
    grafana.state.reject_token = True

    with (
        caplog.at_level(logging.WARNING, logger="monitor.grafana.client"),
        Annotator(grafana.url, TOKEN, log_interval_seconds=60.0) as annotator,
    ):
        for index in range(3):
            annotator.annotate(f"event {index}", [], time.time_ns())
        assert annotator.flush(WAIT_SECONDS)

    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert annotator.failed == 3
    assert len(warnings) == 1
    assert "rejected the token (HTTP 401)" in warnings[0]
    assert TOKEN not in warnings[0]


def test_annotator_drops_when_queue_full(grafana: FakeGrafana) -> None:
    grafana.state.annotation_gate = threading.Event()

    with Annotator(grafana.url, TOKEN, max_pending=1) as annotator:
        annotator.annotate("in flight", [], time.time_ns())
        assert grafana.state.annotation_arrived.wait(WAIT_SECONDS)
        queued = annotator.annotate("queued", [], time.time_ns())
        dropped = annotator.annotate("dropped", [], time.time_ns())
        grafana.state.annotation_gate.set()
        assert annotator.flush(WAIT_SECONDS)

    texts = [request.body["text"] for request in grafana.requests_to("POST", "/api/annotations")]
    assert queued is True
    assert dropped is False
    assert annotator.dropped == 1
    assert texts == ["in flight", "queued"]


def test_annotator_rejects_negative_time(grafana: FakeGrafana) -> None:
    with (
        Annotator(grafana.url, TOKEN) as annotator,
        pytest.raises(ValueError, match="invalid annotation time -1 ns"),
    ):
        annotator.annotate("event", [], -1)
