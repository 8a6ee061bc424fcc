"""Logging setup for the services: key=value text or JSON lines, with repeats rate-limited."""

from __future__ import annotations

import json
import logging
import sys
import time

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


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
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
