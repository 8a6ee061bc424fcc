"""Persist the twin's copy of the primary's weights, so a restarted twin resumes where it stopped.

A checkpoint is a snapshot message in the wire format, written atomically (temporary file, then rename), and
read back through the same validation as a message from the broker: a damaged file is rejected, never used.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from monitor.twin.reference import WeightSet
from monitor.wire.codec import DEFAULT_MAX_HEADER_BYTES, HEADER_LENGTH_BYTES, Message, decode, encode, peek_envelope
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
    with open(temporary, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    logger.info("checkpoint saved path=%s version=%d bytes=%d", path, weights.version, len(payload))


def check_checkpoint(path: Path, model_id: str) -> None:
    """Raise ValueError when `path` cannot be this twin's checkpoint: a directory, no such directory, or another model's file.

    A file that cannot be read as a checkpoint passes: `load_checkpoint` reports it and the next save replaces it.
    """
    if path.is_dir():
        raise ValueError(f"checkpoint path '{path}' is a directory; give a file path such as '{path / 'twin.ckpt'}'")
    if not path.parent.is_dir():
        raise ValueError(
            f"checkpoint directory '{path.parent}' not found; create it or choose another --checkpoint path"
        )
    if not path.is_file():
        return

    try:
        with open(path, "rb") as handle:
            head = handle.read(HEADER_LENGTH_BYTES)
            head += handle.read(min(int.from_bytes(head, "little"), DEFAULT_MAX_HEADER_BYTES))
        envelope = peek_envelope(head)
    except (OSError, WireError):
        return

    if envelope.model_id != model_id:
        raise ValueError(
            f"checkpoint '{path}' contains model '{envelope.model_id}', not --model-id '{model_id}'; "
            "choose another --checkpoint file or remove this one"
        )


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
