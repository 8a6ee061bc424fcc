"""Log output: key=value fields in JSON lines, and repeats rate-limited."""

from __future__ import annotations

import json
import logging

import pytest

from monitor.logs import JsonFormatter, RepeatFilter, message_fields


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        ("twin stopped", {}),
        (
            "mqtt connect failed client_id=c1 error='Operation timed out' retry_in=0.13s attempt=1",
            {"client_id": "c1", "error": "Operation timed out", "retry_in": "0.13s", "attempt": "1"},
        ),
        (
            "rejected message twin_id=a bytes=12 error=header claims 9 bytes",
            {"twin_id": "a", "bytes": "12", "error": "header claims 9 bytes"},
        ),
        ("drift detected signal=kl detector={'width': 80.0}", {"signal": "kl", "detector": "{'width': 80.0}"}),
    ],
)
def test_message_fields_parse(message: str, expected: dict[str, str]) -> None:
    assert message_fields(message) == expected


def test_json_line_has_fields_and_milliseconds() -> None:
    record = logging.LogRecord("monitor.twin", logging.WARNING, __file__, 1, "gap twin_id=%s got=%d", ("edge", 7), None)
    record.created = 1_700_000_000.25

    entry = json.loads(JsonFormatter().format(record))

    assert entry["time"] == "2023-11-14T22:13:20.250+00:00"
    assert entry["level"] == "WARNING"
    assert entry["message"] == "gap twin_id=edge got=7"
    assert entry["fields"] == {"twin_id": "edge", "got": "7"}


def test_repeat_filter_suppresses_past_limit() -> None:
    repeats = RepeatFilter(limit=3, window_seconds=60.0)
    records = [logging.LogRecord("x", logging.WARNING, __file__, 1, "same %d", (index,), None) for index in range(10)]

    passed = [repeats.filter(record) for record in records]

    assert passed == [True] * 3 + [False] * 7
