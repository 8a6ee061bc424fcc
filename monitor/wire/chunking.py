"""Split a large message into chunks that fit the broker's packet limit, and put them back together.

A chunk is itself a safetensors message: one uint8 tensor `data` with a slice of the full payload, and an
envelope of kind `chunk` naming the kind, version and sequence number of the whole. The receiver only
decodes the reassembled payload once every chunk arrived, so a twin never applies half of an update.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from monitor.wire.codec import decode, encode
from monitor.wire.envelope import Envelope, Kind
from monitor.wire.errors import WireError

logger = logging.getLogger(__name__)

# Room for the safetensors header and envelope JSON of one chunk.
CHUNK_OVERHEAD_BYTES = 2048
COMPLETED_KEYS = 64


def split(payload: bytes, envelope: Envelope, max_message_bytes: int) -> list[bytes]:
    """Return `payload` unchanged when it fits, else as chunk messages of at most `max_message_bytes`."""
    if len(payload) <= max_message_bytes:
        return [payload]
    if max_message_bytes <= CHUNK_OVERHEAD_BYTES:
        raise ValueError(
            f"max_message_bytes {max_message_bytes} leaves no room for chunk data; use more than {CHUNK_OVERHEAD_BYTES}"
        )

    chunk_data = max_message_bytes - CHUNK_OVERHEAD_BYTES
    count = -(-len(payload) // chunk_data)
    view = np.frombuffer(payload, dtype=np.uint8)
    chunks = []
    for index in range(count):
        header = envelope.model_copy(
            update={
                "kind": Kind.CHUNK,
                "chunk_of": envelope.kind,
                "chunk_index": index,
                "chunk_count": count,
                "total_bytes": len(payload),
                "state_digest": None,
                "architecture": None,
                "manifest": None,
            }
        )
        chunks.append(encode(header, {"data": view[index * chunk_data : (index + 1) * chunk_data]}))
    return chunks


@dataclass
class _Partial:
    first: Envelope
    parts: dict[int, bytes] = field(default_factory=dict)
    received_bytes: int = 0
    started: float = field(default_factory=time.monotonic)


class Reassembler:
    """Collect chunks by (session, sequence number) and return the whole payload when it is complete.

    At most `max_pending` messages are assembled at once and `max_total_bytes` bounds each of them, so a
    flood of bogus chunks cannot exhaust memory. Incomplete messages expire after `timeout_seconds`.
    """

    def __init__(self, *, max_total_bytes: int, timeout_seconds: float = 60.0, max_pending: int = 4) -> None:
        self.max_total_bytes = max_total_bytes
        self.timeout_seconds = timeout_seconds
        self.max_pending = max_pending
        self._pending: dict[tuple[str, int], _Partial] = {}
        # Messages completed lately: a QoS 1 redelivery of one of their chunks must not start a new message.
        self._completed: deque[tuple[str, int]] = deque(maxlen=COMPLETED_KEYS)

    def add(self, chunk: Envelope, data: bytes) -> bytes | None:
        """Store one chunk; return the reassembled payload when this chunk completes it."""
        total = chunk.total_bytes or 0
        if total > self.max_total_bytes:
            raise WireError(
                "too_large", f"chunked message of {total} bytes exceeds the limit of {self.max_total_bytes} bytes"
            )

        key = (chunk.session_id, chunk.seq)
        if key in self._completed:
            raise WireError("duplicate", f"chunk {chunk.chunk_index} of seq {chunk.seq} belongs to a completed message")
        partial = self._pending.get(key)
        if partial is None:
            if len(self._pending) >= self.max_pending:
                oldest = min(self._pending, key=lambda k: self._pending[k].started)
                logger.warning("dropping incomplete chunked message session=%s seq=%d: too many pending", *oldest)
                del self._pending[oldest]
            partial = self._pending[key] = _Partial(first=chunk)
        elif (partial.first.chunk_count, partial.first.total_bytes, partial.first.version) != (
            chunk.chunk_count,
            chunk.total_bytes,
            chunk.version,
        ):
            del self._pending[key]
            raise WireError(
                "bad_envelope", f"chunk {chunk.chunk_index} of seq {chunk.seq} disagrees with its first chunk"
            )

        if chunk.chunk_index in partial.parts:
            raise WireError("duplicate", f"chunk {chunk.chunk_index} of seq {chunk.seq} arrived twice")
        partial.parts[chunk.chunk_index] = data
        partial.received_bytes += len(data)
        if partial.received_bytes > total:
            del self._pending[key]
            raise WireError("bad_shape", f"chunks of seq {chunk.seq} carry more than the announced {total} bytes")

        if len(partial.parts) < chunk.chunk_count:
            return None
        del self._pending[key]
        self._completed.append(key)
        payload = b"".join(partial.parts[index] for index in range(chunk.chunk_count))
        if len(payload) != total:
            raise WireError("bad_shape", f"chunks of seq {chunk.seq} add up to {len(payload)} bytes, announced {total}")
        return payload

    def expire(self, now: float | None = None) -> int:
        """Drop messages whose chunks did not all arrive in time; return how many were dropped."""
        now = time.monotonic() if now is None else now
        stale = [key for key, partial in self._pending.items() if now - partial.started > self.timeout_seconds]
        for key in stale:
            partial = self._pending.pop(key)
            logger.warning(
                "expired chunked message session=%s seq=%d version=%d received=%d/%d",
                key[0],
                key[1],
                partial.first.version,
                len(partial.parts),
                partial.first.chunk_count,
            )
        return len(stale)

    @property
    def pending(self) -> int:
        return len(self._pending)


def decode_chunk_data(tensors: dict[str, np.ndarray]) -> bytes:
    """Return the bytes of a chunk message's `data` tensor, or raise WireError."""
    data = tensors.get("data")
    if data is None or len(tensors) != 1 or data.dtype != np.uint8 or data.ndim != 1:
        raise WireError("bad_shape", "a chunk must carry exactly one 1-D uint8 tensor named 'data'")
    return data.tobytes()


__all__ = ["Reassembler", "decode", "decode_chunk_data", "split"]
