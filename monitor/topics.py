"""MQTT topic names: `llm-twin/v1/<model_id>/<leaf>`, ASCII, no leading slash."""

from __future__ import annotations

import re

TOPIC_ROOT = "llm-twin/v1"

MODEL_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""Model and twin ids: safe inside a topic level and as a Prometheus label value (no `/`, `+`, `#`)."""

_MODEL_ID_RE = re.compile(MODEL_ID_PATTERN)


def check_id(value: str, what: str) -> str:
    """Return `value` if it is a valid model or twin id, else raise ValueError naming it."""
    if not _MODEL_ID_RE.fullmatch(value):
        raise ValueError(
            f"invalid {what} {value!r}: use 1-64 ASCII letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return value


class Topics:
    """The topics of one model."""

    def __init__(self, model_id: str) -> None:
        check_id(model_id, "model id")
        base = f"{TOPIC_ROOT}/{model_id}"
        self.status = f"{base}/status"
        self.weights = f"{base}/weights"
        self.outputs = f"{base}/outputs"
        self.control = f"{base}/control"
