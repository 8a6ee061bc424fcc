"""Grafana HTTP API integration: push dashboards into a running Grafana and post annotations.

Both use grafana-client with a service account token sent as `Authorization: Bearer <token>`. The token
never appears in a log line or an error message. Endpoints used (Grafana HTTP API):

- `GET /api/folders`, `POST /api/folders`: find or create the target folder of a push;
- `POST /api/dashboards/db`: create or overwrite a dashboard;
- `POST /api/annotations`: add a point annotation to the drift dashboard.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from grafana_client.api import GrafanaApi
from grafana_client.client import (
    GrafanaClientError,
    GrafanaException,
    GrafanaTimeoutError,
    GrafanaUnauthorizedError,
)
from niquests.exceptions import RequestException

from monitor.grafana.dashboards import DRIFT_DASHBOARD_UID, build_dashboards

logger = logging.getLogger(__name__)

TOKEN_ENV = "LLM_TWIN_GRAFANA_TOKEN"
URL_ENV = "LLM_TWIN_GRAFANA_URL"
FOLDER_ENV = "LLM_TWIN_GRAFANA_FOLDER"

DEFAULT_URL = "http://localhost:3000"
PUSH_TIMEOUT_SECONDS = 10.0
ANNOTATE_TIMEOUT_SECONDS = 2.0


class GrafanaPushError(RuntimeError):
    """A dashboard push failed: Grafana unreachable, token rejected, or a dashboard refused."""


@dataclass(frozen=True)
class PushedDashboard:
    """A dashboard that Grafana stored, as its API reported it."""

    uid: str
    title: str
    url: str
    version: int


def _display_url(url: str) -> str:
    """Return `url` without user info and query, so a credential embedded in it never reaches a message."""
    parts = urlsplit(url)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _validate_url(url: str) -> str:
    """Return `url` ready for grafana-client; raises ValueError unless it is an http(s) URL with a host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"invalid Grafana URL {_display_url(url)!r}: expected http://host:port or https://host:port, "
            "e.g. http://localhost:3000"
        )
    try:
        _ = parts.port  # raises ValueError for a port that is not a number from 0 to 65535
    except ValueError as exc:
        raise ValueError(f"invalid Grafana URL {_display_url(url)!r}: {exc}; expected a port from 1 to 65535") from exc
    if parts.username or parts.password:
        raise ValueError(
            f"invalid Grafana URL {_display_url(url)!r}: remove the user info from the URL and pass a "
            f"service account token in {TOKEN_ENV}"
        )
    # grafana-client appends "api/..." to the URL path as is, so a sub-path (Grafana behind a reverse proxy at
    # /grafana) needs its trailing slash.
    if parts.path and not parts.path.endswith("/"):
        return urlunsplit((parts.scheme, parts.netloc, parts.path + "/", parts.query, ""))
    return url


def _connect(url: str, token: str, timeout_seconds: float) -> GrafanaApi:
    if not token:
        raise ValueError(f"missing Grafana token: set {TOKEN_ENV} to a service account token of {_display_url(url)}")
    if timeout_seconds <= 0:
        raise ValueError(f"invalid timeout {timeout_seconds!r} s: expected a positive number of seconds")

    # grafana-client is untyped; from_url only parses the URL here, it does not open a connection.
    api: GrafanaApi = GrafanaApi.from_url(url=url, credential=token, timeout=timeout_seconds)
    return api


def _describe_failure(url: str, exc: BaseException, timeout_seconds: float) -> str:
    """Return a one-line reason for a failed Grafana call, naming the URL and never the token."""
    where = _display_url(url)
    if isinstance(exc, GrafanaUnauthorizedError):
        return f"Grafana at {where} rejected the token (HTTP 401): check {TOKEN_ENV}"
    if isinstance(exc, GrafanaClientError) and exc.status_code == 403:
        return (
            f"Grafana at {where} denied the request (HTTP 403): the token's service account needs the "
            "Editor role or write permission on dashboards"
        )
    if isinstance(exc, GrafanaTimeoutError):
        return f"Grafana at {where} did not answer within {timeout_seconds:g} s"
    if isinstance(exc, GrafanaException):
        return f"Grafana at {where} returned an error: {exc.message}"
    return f"Grafana at {where} is unreachable ({type(exc).__name__}: {exc}): check the URL and that Grafana is running"


def load_dashboard(path: Path) -> dict[str, Any]:
    """Read a raw dashboard JSON file; raises ValueError when it is not a JSON object with a uid."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"cannot read dashboard file {path}: {exc.strerror}") from exc
    try:
        dashboard = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid dashboard file {path}: not JSON ({exc})") from exc

    if not isinstance(dashboard, dict) or not isinstance(dashboard.get("uid"), str) or not dashboard["uid"]:
        raise ValueError(f"invalid dashboard file {path}: expected a dashboard JSON object with a non-empty 'uid'")
    return dashboard


def _find_or_create_folder(api: GrafanaApi, title: str) -> str:
    """Return the uid of the folder titled `title`, creating it when no folder has that title."""
    folders = api.folder.get_all_folders()  # type: ignore[no-untyped-call]
    if not isinstance(folders, list):
        raise GrafanaPushError(f"unexpected response to GET /api/folders: {folders!r:.200}")
    for folder in folders:
        if isinstance(folder, dict) and folder.get("title") == title:
            return str(folder["uid"])

    created = _json_object(api.folder.create_folder(title), "POST /api/folders")  # type: ignore[no-untyped-call]
    uid = created.get("uid")
    if not isinstance(uid, str) or not uid:
        raise GrafanaPushError(f"unexpected response to POST /api/folders: no folder uid in {created!r:.200}")
    logger.info("Created Grafana folder %r (uid %s)", title, uid)
    return uid


def _json_object(response: object, request: str) -> dict[str, Any]:
    """Return `response` if it is a JSON object; raises GrafanaPushError for any other response shape."""
    if not isinstance(response, dict) or not all(isinstance(key, str) for key in response):
        raise GrafanaPushError(f"unexpected response to {request}: expected a JSON object, got {response!r:.200}")
    return response


def push_dashboards(
    url: str,
    token: str,
    folder: str | None = None,
    paths: Sequence[Path] | None = None,
    *,
    timeout_seconds: float = PUSH_TIMEOUT_SECONDS,
) -> list[PushedDashboard]:
    """Upload dashboards into a running Grafana, overwriting dashboards with the same uid.

    Args:
        url: Grafana's base URL, e.g. http://localhost:3000.
        token: a service account token with permission to write dashboards.
        folder: title of the target folder, created when missing; None puts dashboards in the General folder.
        paths: raw dashboard JSON files; None pushes the dashboards built by `monitor.grafana.dashboards`,
            which match the committed files under dashboards/.
        timeout_seconds: limit for each HTTP request.

    Returns:
        What Grafana stored, in push order.

    Raises:
        ValueError: invalid URL, missing token or invalid dashboard file.
        GrafanaPushError: Grafana unreachable, token rejected, or a dashboard refused.
    """
    base_url = _validate_url(url)
    # Built from code, so an installed package has them too; a test keeps them equal to the committed files.
    dashboards = list(build_dashboards().values()) if paths is None else [load_dashboard(path) for path in paths]
    api = _connect(base_url, token, timeout_seconds)

    pushed: list[PushedDashboard] = []
    try:
        folder_uid = _find_or_create_folder(api, folder) if folder else None

        for dashboard in dashboards:
            # The API assigns ids per instance; sending the file's id would target an unrelated dashboard.
            body: dict[str, Any] = {
                "dashboard": {**dashboard, "id": None},
                "overwrite": True,
                "message": "Pushed by llm-twin grafana push",
            }
            if folder_uid is not None:
                body["folderUid"] = folder_uid
            response = _json_object(
                api.dashboard.update_dashboard(body),  # type: ignore[no-untyped-call]
                "POST /api/dashboards/db",
            )

            stored = PushedDashboard(
                uid=str(response.get("uid", dashboard["uid"])),
                title=str(dashboard.get("title", "")),
                url=str(response.get("url", "")),
                version=int(response.get("version", 0)),
            )
            logger.info(
                "Pushed dashboard %s (%s) to %s, version %d",
                stored.uid,
                stored.title,
                _display_url(base_url),
                stored.version,
            )
            pushed.append(stored)
    except (GrafanaException, RequestException) as exc:
        raise GrafanaPushError(_describe_failure(base_url, exc, timeout_seconds)) from exc

    return pushed


@dataclass(frozen=True)
class _Annotation:
    text: str
    tags: tuple[str, ...]
    time_ms: int


class Annotator:
    """Posts annotations to a Grafana dashboard from a background thread.

    `annotate` only appends to a bounded queue and does no network I/O, so a caller on an event loop does
    not wait on Grafana. A failed post is dropped and logged, at most once per `log_interval_seconds` with a
    count of the failures in between, and the caller keeps running whether Grafana is up or not. Call
    `close` (or use it as a context manager) to send what is queued and stop the thread.
    """

    def __init__(
        self,
        url: str,
        token: str,
        dashboard_uid: str = DRIFT_DASHBOARD_UID,
        *,
        timeout_seconds: float = ANNOTATE_TIMEOUT_SECONDS,
        max_pending: int = 100,
        log_interval_seconds: float = 60.0,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"invalid max_pending {max_pending!r}: expected at least 1")
        if not dashboard_uid:
            raise ValueError(
                "missing dashboard_uid: expected the uid of the dashboard to annotate, e.g. llm-twin-drift"
            )

        self.url = _validate_url(url)
        self.dashboard_uid = dashboard_uid
        self.timeout_seconds = timeout_seconds
        self.max_pending = max_pending
        self.log_interval_seconds = log_interval_seconds
        self._api = _connect(self.url, token, timeout_seconds)

        self._condition = threading.Condition()
        self._pending: collections.deque[_Annotation] = collections.deque()
        self._in_flight = 0
        self._closing = False
        # Counters, readable from any thread.
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        # Failure log rate limit: time of the last failure log line and failures since then.
        self._last_failure_log = float("-inf")
        self._failures_since_log = 0

        self._thread = threading.Thread(target=self._run, name="grafana-annotator", daemon=True)
        self._thread.start()

    def annotate(self, text: str, tags: Sequence[str], time_ns: int) -> bool:
        """Queue a point annotation at `time_ns` (Unix epoch, nanoseconds) on the dashboard.

        Returns False when the annotation was dropped because `max_pending` annotations are already queued
        or the annotator is closed. Raises ValueError only for invalid arguments, never for Grafana failures.
        """
        if not text:
            raise ValueError("missing annotation text: expected a non-empty string")
        if time_ns < 0:
            raise ValueError(f"invalid annotation time {time_ns!r} ns: expected nanoseconds since the Unix epoch")

        # Grafana stores annotation times in epoch milliseconds.
        annotation = _Annotation(text=text, tags=tuple(tags), time_ms=time_ns // 1_000_000)
        with self._condition:
            if self._closing or len(self._pending) >= self.max_pending:
                self.dropped += 1
                logger.debug(
                    "Dropped Grafana annotation %r: %d pending, closing=%s",
                    text,
                    len(self._pending),
                    self._closing,
                )
                return False
            self._pending.append(annotation)
            self._condition.notify_all()
        return True

    def flush(self, timeout_seconds: float) -> bool:
        """Wait until every queued annotation was posted or failed; returns False on timeout."""
        deadline = time.monotonic() + timeout_seconds
        with self._condition:
            while self._pending or self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._condition.wait(remaining)
        return True

    def close(self, timeout_seconds: float = 5.0) -> None:
        """Send what is queued, for at most `timeout_seconds`, then stop the background thread."""
        self.flush(timeout_seconds)
        with self._condition:
            self._closing = True
            self.dropped += len(self._pending)
            self._pending.clear()
            self._condition.notify_all()
        # The thread may be inside one HTTP request, bounded by the request timeout.
        self._thread.join(self.timeout_seconds + 1.0)

    def __enter__(self) -> Annotator:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._pending and not self._closing:
                    self._condition.wait()
                if self._closing and not self._pending:
                    return
                annotation = self._pending.popleft()
                self._in_flight += 1

            try:
                self._post(annotation)
            finally:
                with self._condition:
                    self._in_flight -= 1
                    self._condition.notify_all()

    def _post(self, annotation: _Annotation) -> None:
        try:
            self._api.annotations.add_annotation(  # type: ignore[no-untyped-call]
                dashboard_uid=self.dashboard_uid,
                time_from=annotation.time_ms,
                tags=list(annotation.tags),
                text=annotation.text,
            )
        # The thread must survive anything the HTTP stack raises, or later annotations would pile up unsent.
        except Exception as exc:
            self.failed += 1
            self._log_failure(exc)
            return

        self.sent += 1
        if self._failures_since_log:
            logger.info(
                "Grafana annotations to %s work again after %d failed posts",
                _display_url(self.url),
                self._failures_since_log,
            )
            self._failures_since_log = 0
            self._last_failure_log = float("-inf")

    def _log_failure(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._last_failure_log < self.log_interval_seconds:
            self._failures_since_log += 1
            return

        logger.warning(
            "Failed to post a Grafana annotation to dashboard %s (%d earlier failures not logged): %s",
            self.dashboard_uid,
            self._failures_since_log,
            _describe_failure(self.url, exc, self.timeout_seconds),
        )
        self._last_failure_log = now
        self._failures_since_log = 0


def grafana_push_main(argv: Sequence[str]) -> int:
    """Run `llm-twin grafana push`; `argv` are the arguments after `push`. Returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="llm-twin grafana push",
        description=f"Upload the dashboards into a running Grafana. The token is read from {TOKEN_ENV} only.",
    )
    parser.add_argument(
        "--grafana-url",
        default=os.environ.get(URL_ENV, DEFAULT_URL),
        help=f"Grafana base URL (env {URL_ENV}, default {DEFAULT_URL})",
    )
    parser.add_argument(
        "--folder",
        default=os.environ.get(FOLDER_ENV) or None,
        help=f"title of the folder to push into, created when missing (env {FOLDER_ENV}, default: General)",
    )
    parser.add_argument(
        "--dashboard",
        dest="paths",
        action="append",
        type=Path,
        help="dashboard JSON file to push, repeatable (default: the built-in dashboards)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=PUSH_TIMEOUT_SECONDS,
        help=f"timeout of each HTTP request in seconds (default {PUSH_TIMEOUT_SECONDS:g})",
    )
    args = parser.parse_args(list(argv))

    return grafana_push(args.grafana_url, args.folder, args.paths, timeout_seconds=args.timeout)


def grafana_push(
    grafana_url: str,
    folder: str | None = None,
    paths: Sequence[Path] | None = None,
    *,
    timeout_seconds: float = PUSH_TIMEOUT_SECONDS,
) -> int:
    """Push dashboards with the token from LLM_TWIN_GRAFANA_TOKEN and print the outcome; returns the exit status.

    Exit status 0 on success, 1 when Grafana is unreachable or refuses, 2 for an invalid URL, a missing token
    or an invalid dashboard file. Messages go to stderr and name the URL, never the token.
    """
    token = os.environ.get(TOKEN_ENV, "")
    try:
        pushed = push_dashboards(grafana_url, token, folder, paths, timeout_seconds=timeout_seconds)
    except ValueError as exc:
        print(f"llm-twin grafana push: {exc}", file=sys.stderr)
        return 2
    except GrafanaPushError as exc:
        print(f"llm-twin grafana push: {exc}", file=sys.stderr)
        return 1

    for dashboard in pushed:
        print(f"pushed {dashboard.uid} ({dashboard.title}) version {dashboard.version}: {dashboard.url}")
    return 0
