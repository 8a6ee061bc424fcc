"""Logging setup for the services: key=value text or JSON lines, with repeats rate-limited."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from datetime import UTC, datetime

REPEAT_WINDOW_SECONDS = 10.0
REPEATS_PER_WINDOW = 5


class RepeatFilter(logging.Filter):
    """Let at most `limit` records with the same logger, level and format string through per window.

    A flood of identical warnings (a broker that keeps refusing, a twin sending garbage) would otherwise bury
    everything else. The first record after a window reports how many were suppressed.
    """

    def __init__(self, limit: int = REPEATS_PER_WINDOW, window_seconds: float = REPEAT_WINDOW_SECONDS) -> None:
        super().__init__()
        self.limit = limit
        self.window_seconds = window_seconds
        self._seen: dict[tuple[str, int, str], tuple[float, int, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, str(record.msg))
        now = time.monotonic()
        started, count, suppressed = self._seen.get(key, (now, 0, 0))
        if now - started > self.window_seconds:
            if suppressed:
                record.msg = f"{record.msg} (suppressed {suppressed} similar in the last {self.window_seconds:.0f}s)"
            self._seen[key] = (now, 1, 0)
            return True
        if count < self.limit:
            self._seen[key] = (started, count + 1, suppressed)
            return True
        self._seen[key] = (started, count, suppressed + 1)
        return False


# A key=value pair of a log message. The value runs to the next " key=" or the end, so free text such as an
# error message stays whole.
_FIELD = re.compile(r"(?:^|\s)([a-z_][a-z0-9_]*)=(.*?)(?=\s+[a-z_][a-z0-9_]*=|$)", re.DOTALL)


def message_fields(message: str) -> dict[str, str]:
    """Return the key=value pairs of a log message, with the quotes of quoted values removed."""
    fields = {}
    for key, value in _FIELD.findall(message):
        fields[key] = value[1:-1] if value[:1] in ("'", '"') and value[-1:] == value[:1] else value
    return fields


class JsonFormatter(logging.Formatter):
    """One JSON object per record: UTC time in milliseconds, level, logger, message and its key=value fields."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        fields = message_fields(message)
        if fields:
            entry["fields"] = fields
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Send the package's logs to stderr in `fmt` ("text" or "json") at `level`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RepeatFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # paho and amqtt log per packet at INFO/DEBUG; their warnings still come through.
    for noisy in ("amqtt", "transitions", "paho"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
