"""Alertmanager webhook receiver: logs and counts every alert that Alertmanager delivers.

Endpoints:

- `POST /alerts`: an Alertmanager webhook payload (version "4"). Each alert is logged on one line, counted
  in `llm_twin_alerts_received_total{alertname, severity, status}` and kept in memory.
- `GET /alerts`: the last alerts received, oldest first, as JSON `{"alerts": [...]}`.
- `GET /metrics`: the sink's counters in the Prometheus text format.
- `GET /healthz`: 200 while the server runs.

A request that cannot be processed gets a 4xx status with a one-line reason and is counted in
`llm_twin_alert_sink_rejected_total{reason}`; the server keeps running. Alertmanager's webhook notifier
retries only 5xx responses (`notify.Retrier` in Alertmanager's source), so an invalid payload is not sent again.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import choose_encoder

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
"""Largest accepted request body. An alert is about 1 KB of JSON, so 1 MiB fits a group of about a thousand."""

HISTORY_SIZE = 200
"""Alerts kept in memory for GET /alerts."""

ALERTNAME_PREFIX = "LlmTwin"
# Alert names outside the prefix that keep their own label value.
KNOWN_ALERTNAMES = frozenset({"Watchdog", "InfoInhibitor", "TargetDown"})
MAX_ALERTNAMES = 64
"""Distinct alertname label values before further new names are counted as `other`."""

SEVERITIES = frozenset({"critical", "warning", "info", "none"})
STATUSES = frozenset({"firing", "resolved"})
OTHER = "other"

REJECT_REASONS = ("body_too_large", "invalid_content_length", "invalid_json", "invalid_payload")

# Bytes of an oversize body read and discarded before the response, so the client receives the response
# instead of a connection reset. Larger bodies are not read at all.
_DRAIN_LIMIT_BYTES = 8 * MAX_BODY_BYTES
_SOCKET_TIMEOUT_SECONDS = 10.0
_LOG_FIELD_LIMIT = 200


class RejectedRequest(ValueError):
    """A request the sink does not process, with its HTTP status and the reason label it is counted under."""

    def __init__(self, status: HTTPStatus, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class ReceivedAlert:
    """One alert of a webhook payload.

    `severity` is the label value it was counted under (`other` outside SEVERITIES); `alertname` is as
    received, and `AlertSink.bounded_alertname` maps it to its label value.
    """

    alertname: str
    severity: str
    status: str
    fingerprint: str
    labels: dict[str, str]
    annotations: dict[str, str]
    starts_at: str
    ends_at: str
    receiver: str
    received_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "alertname": self.alertname,
            "severity": self.severity,
            "status": self.status,
            "fingerprint": self.fingerprint,
            "labels": self.labels,
            "annotations": self.annotations,
            "startsAt": self.starts_at,
            "endsAt": self.ends_at,
            "receiver": self.receiver,
            "receivedAt": self.received_at,
        }


def _printable(value: str) -> str:
    """Return `value` cut to 200 characters with control characters escaped, so one alert is one log line."""
    cut = value[:_LOG_FIELD_LIMIT]
    return cut.encode("unicode_escape").decode("ascii") if not cut.isprintable() else cut


def _string_map(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(key, str) and isinstance(item, str) for key, item in value.items()
    ):
        raise RejectedRequest(
            HTTPStatus.BAD_REQUEST, "invalid_payload", f"invalid {where}: expected an object of string values"
        )
    return dict(value)


def _string_field(alert: Mapping[str, object], key: str, where: str) -> str:
    value = alert.get(key, "")
    if not isinstance(value, str):
        raise RejectedRequest(
            HTTPStatus.BAD_REQUEST,
            "invalid_payload",
            f"invalid {where}.{key}: expected a string, got {value!r}",
        )
    return value


class AlertSink:
    """The webhook receiver: an HTTP server in a background thread, bound on construction.

    Use as a context manager, or call `start` and `stop`. Metrics are registered in `registry`, so each
    sink needs its own registry.
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        *,
        max_body_bytes: int = MAX_BODY_BYTES,
        history_size: int = HISTORY_SIZE,
    ) -> None:
        if max_body_bytes < 1:
            raise ValueError(f"invalid max_body_bytes {max_body_bytes!r}: expected at least 1 byte")
        if history_size < 1:
            raise ValueError(f"invalid history_size {history_size!r}: expected at least 1 alert")

        self.registry = registry
        self.max_body_bytes = max_body_bytes
        self.received_alerts = Counter(
            "llm_twin_alerts_received",
            "Alerts received from Alertmanager, by alert name (LlmTwin* or other), severity and status",
            ("alertname", "severity", "status"),
            registry=registry,
        )
        self.rejected_requests = Counter(
            "llm_twin_alert_sink_rejected",
            "Webhook requests rejected with a 4xx status, by reason",
            ("reason",),
            registry=registry,
        )
        # Export every reason at 0 from the start, so rate() counts the first rejection as an increase.
        for reason in REJECT_REASONS:
            self.rejected_requests.labels(reason)

        self._lock = threading.Lock()
        self._history: collections.deque[ReceivedAlert] = collections.deque(maxlen=history_size)
        self._alertnames: set[str] = set()

        self._server = _SinkServer((host, port), _SinkHandler, self)
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        """The bound port, also when the sink was created with port 0."""
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        """Serve requests from a background thread."""
        # The poll interval bounds how long `stop` waits for the serving loop to notice the shutdown.
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.1,), name="alert-sink", daemon=True)
        self._thread.start()
        logger.info("Alert sink listening on %s (POST /alerts, GET /alerts, /metrics, /healthz)", self.url)

    def stop(self, timeout_seconds: float = 5.0) -> None:
        """Stop serving and close the socket; returns after at most about `timeout_seconds`."""
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout_seconds)
            self._thread = None
        self._server.server_close()
        logger.info("Alert sink on %s stopped", self.url)

    def __enter__(self) -> AlertSink:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def alerts(self) -> list[ReceivedAlert]:
        """Return the alerts kept in memory, oldest first."""
        with self._lock:
            return list(self._history)

    def bounded_alertname(self, alertname: str) -> str:
        """Return the alertname label value: the name itself for LlmTwin* and known names, else `other`.

        At most MAX_ALERTNAMES distinct values are exported, so a sender cannot grow the series count.
        """
        if not (alertname.startswith(ALERTNAME_PREFIX) or alertname in KNOWN_ALERTNAMES):
            return OTHER
        if not alertname.isidentifier():
            return OTHER
        with self._lock:
            if alertname in self._alertnames:
                return alertname
            if len(self._alertnames) >= MAX_ALERTNAMES:
                return OTHER
            self._alertnames.add(alertname)
        return alertname

    def parse_payload(self, payload: object) -> list[ReceivedAlert]:
        """Validate a decoded webhook payload and return its alerts; raises RejectedRequest when invalid."""
        if not isinstance(payload, Mapping):
            raise RejectedRequest(HTTPStatus.BAD_REQUEST, "invalid_payload", "invalid payload: expected a JSON object")
        alerts = payload.get("alerts")
        if not isinstance(alerts, list):
            raise RejectedRequest(HTTPStatus.BAD_REQUEST, "invalid_payload", "invalid payload: missing 'alerts' list")
        group_status = payload.get("status", "")
        receiver = payload.get("receiver", "")
        if not isinstance(receiver, str):
            receiver = ""

        received_at = time.time()
        parsed = []
        for index, alert in enumerate(alerts):
            where = f"alerts[{index}]"
            if not isinstance(alert, Mapping):
                raise RejectedRequest(HTTPStatus.BAD_REQUEST, "invalid_payload", f"invalid {where}: expected an object")
            labels = _string_map(alert.get("labels"), f"{where}.labels")
            # Each alert carries its own status; the group status is firing while any alert fires.
            status = alert.get("status", group_status)
            if not isinstance(status, str) or status not in STATUSES:
                raise RejectedRequest(
                    HTTPStatus.BAD_REQUEST,
                    "invalid_payload",
                    f"invalid {where}.status {status!r}: expected one of {', '.join(sorted(STATUSES))}",
                )
            severity = labels.get("severity", "none")

            parsed.append(
                ReceivedAlert(
                    alertname=labels.get("alertname", ""),
                    severity=severity if severity in SEVERITIES else OTHER,
                    status=status,
                    fingerprint=_string_field(alert, "fingerprint", where),
                    labels=labels,
                    annotations=_string_map(alert.get("annotations"), f"{where}.annotations"),
                    starts_at=_string_field(alert, "startsAt", where),
                    ends_at=_string_field(alert, "endsAt", where),
                    receiver=receiver,
                    received_at=received_at,
                )
            )
        return parsed

    def record(self, alerts: list[ReceivedAlert]) -> None:
        """Log, count and keep each alert."""
        for alert in alerts:
            alertname = self.bounded_alertname(alert.alertname)
            self.received_alerts.labels(alertname, alert.severity, alert.status).inc()
            logger.info(
                "Alert %s: alertname=%s severity=%s fingerprint=%s model_id=%s twin_id=%s signal=%s instance=%s",
                alert.status,
                _printable(alert.alertname),
                alert.severity,
                _printable(alert.fingerprint),
                _printable(alert.labels.get("model_id", "")),
                _printable(alert.labels.get("twin_id", "")),
                _printable(alert.labels.get("signal", "")),
                _printable(alert.labels.get("instance", "")),
            )
        with self._lock:
            self._history.extend(alerts)

    def reject(self, error: RejectedRequest, client: str) -> None:
        self.rejected_requests.labels(error.reason).inc()
        logger.warning("Rejected webhook request from %s (%s): %s", client, error.reason, error)


class _SinkServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: Callable[..., BaseHTTPRequestHandler],
        sink: AlertSink,
    ) -> None:
        # Bind to IPv6 when the host is an IPv6 literal such as ::1.
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.sink = sink
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind also resolves the host's FQDN, a DNS lookup that can stall start-up in a
        # container; the name is only used in CGI environments.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Called for an exception a handler did not catch; the server goes on with the next request.
        logger.exception("Alert sink failed to handle a request from %s", client_address)


class _SinkHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Alertmanager's HTTP client uses it
    timeout = _SOCKET_TIMEOUT_SECONDS  # bounds reads of slow or stalled clients
    server: _SinkServer

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._send(HTTPStatus.OK, b"ok\n", "text/plain; charset=utf-8")
        elif path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            self._send(HTTPStatus.OK, encoder(self.server.sink.registry), content_type)
        elif path == "/alerts":
            alerts = [alert.to_json() for alert in self.server.sink.alerts()]
            self._send_json(HTTPStatus.OK, {"alerts": alerts})
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"not found: {path}; see /alerts, /metrics, /healthz"})

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if path != "/alerts":
            self._send_json(HTTPStatus.NOT_FOUND, {"error": f"not found: POST {path}; post alerts to /alerts"})
            return

        sink = self.server.sink
        try:
            body = self._read_body(sink.max_body_bytes)
            try:
                payload = json.loads(body)
            # RecursionError: JSON nested deeper than the interpreter's recursion limit.
            except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
                raise RejectedRequest(HTTPStatus.BAD_REQUEST, "invalid_json", f"invalid JSON body: {exc}") from exc
            alerts = sink.parse_payload(payload)
        except RejectedRequest as error:
            sink.reject(error, self.address_string())
            self._send_json(error.status, {"error": str(error), "reason": error.reason})
            return

        sink.record(alerts)
        self._send_json(HTTPStatus.OK, {"received": len(alerts)})

    def do_PUT(self) -> None:
        self._method_not_allowed()

    def do_DELETE(self) -> None:
        self._method_not_allowed()

    def _read_body(self, limit: int) -> bytes:
        header = self.headers.get("Content-Length")
        if header is None:
            # Chunked bodies are not decoded by http.server; Alertmanager always sends a Content-Length.
            self.close_connection = True
            raise RejectedRequest(
                HTTPStatus.LENGTH_REQUIRED,
                "invalid_content_length",
                "missing Content-Length header: send the body with its length",
            )
        try:
            length = int(header)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            raise RejectedRequest(
                HTTPStatus.BAD_REQUEST,
                "invalid_content_length",
                f"invalid Content-Length {header!r}: expected a non-negative integer",
            )

        if length > limit:
            self.close_connection = True
            if length <= _DRAIN_LIMIT_BYTES:
                self._discard(length)
            raise RejectedRequest(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                "body_too_large",
                f"request body of {length} bytes exceeds the limit of {limit} bytes",
            )
        return self.rfile.read(length)

    def _discard(self, length: int) -> None:
        remaining = length
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, 65536))
            if not chunk:
                return
            remaining -= len(chunk)

    def _method_not_allowed(self) -> None:
        self.close_connection = True
        body = json.dumps({"error": f"method {self.command} not allowed; use GET or POST"}).encode()
        self.send_response(HTTPStatus.METHOD_NOT_ALLOWED)
        self.send_header("Allow", "GET, POST")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _send_json(self, status: HTTPStatus, document: Mapping[str, object]) -> None:
        self._send(status, json.dumps(document).encode() + b"\n", "application/json")

    def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # Access log at DEBUG through the module logger instead of http.server's writes to stderr.
        logger.debug("%s %s", self.address_string(), format % args)


def run_alert_sink(
    host: str,
    port: int,
    registry: CollectorRegistry,
    stop: threading.Event,
    *,
    on_ready: Callable[[AlertSink], None] | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    history_size: int = HISTORY_SIZE,
) -> None:
    """Serve the webhook receiver on `host`:`port` until `stop` is set.

    Port 0 binds a free port; the bound URL is logged and `on_ready` receives the running sink. Raises
    OSError when the address cannot be bound.
    """
    with AlertSink(host, port, registry, max_body_bytes=max_body_bytes, history_size=history_size) as sink:
        if on_ready is not None:
            on_ready(sink)
        stop.wait()


class SinkAddress(Protocol):
    """Listen address of the sink, as the service settings carry it (`--metrics-host`, `--metrics-port`)."""

    @property
    def metrics_host(self) -> str: ...

    @property
    def metrics_port(self) -> int: ...


async def serve_alert_sink(settings: SinkAddress, registry: CollectorRegistry, stop: asyncio.Event) -> None:
    """Serve the webhook receiver on the settings' metrics address until `stop` is set.

    The sink serves /metrics itself on that port, so the caller must not start another /metrics server on
    the same address. Raises OSError when the address cannot be bound.
    """
    sink = AlertSink(settings.metrics_host, settings.metrics_port, registry)
    sink.start()
    try:
        await stop.wait()
    finally:
        # shutdown() blocks until the serving loop notices, up to the poll interval; keep the event loop free.
        await asyncio.to_thread(sink.stop)
