"""Persist the twin's copy of the primary's weights, so a restarted twin resumes where it stopped.

A checkpoint is a snapshot message in the wire format, written atomically (temporary file, then rename), and
read back through the same validation as a message from the broker: a damaged file is rejected, never used.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from monitor.twin.reference import WeightSet
from monitor.wire.codec import Message, decode, encode
from monitor.wire.envelope import Architecture, Envelope, Kind
from monitor.wire.errors import WireError

logger = logging.getLogger(__name__)


def save_checkpoint(path: Path, model_id: str, weights: WeightSet, architecture: Architecture, last_seq: int) -> None:
    """Write `weights` to `path`, replacing any older checkpoint only once the new one is complete."""
    envelope = Envelope(
        model_id=model_id,
        session_id=weights.session_id,
        kind=Kind.SNAPSHOT,
        version=weights.version,
        seq=last_seq,
        created_ns=weights.created_ns,
        state_digest=weights.digest,
        architecture=architecture,
    )
    payload = encode(envelope, weights.weights)
    temporary = path.with_name(path.name + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(temporary, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    logger.info("checkpoint saved path=%s version=%d bytes=%d", path, weights.version, len(payload))


def load_checkpoint(path: Path, max_bytes: int) -> Message | None:
    """Return the validated checkpoint at `path`, or None when there is none or it is damaged."""
    if not path.exists():
        return None
    try:
        message = decode(path.read_bytes(), max_bytes=max_bytes)
    except (OSError, WireError) as exc:
        logger.warning("ignoring unreadable checkpoint path=%s error=%s", path, exc)
        return None
    if message.envelope.kind is not Kind.SNAPSHOT or message.envelope.architecture is None:
        logger.warning("ignoring checkpoint path=%s: not a snapshot with an architecture", path)
        return None
    return message
