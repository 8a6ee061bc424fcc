"""Chunking: split a message to fit the broker's packet limit and reassemble it on the twin."""

from __future__ import annotations

import logging
import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitor.wire.chunking import CHUNK_OVERHEAD_BYTES, Reassembler, decode_chunk_data, split
from monitor.wire.codec import Message, decode, encode
from monitor.wire.envelope import Envelope, Kind
from monitor.wire.errors import WireError

MAX_MESSAGE_BYTES = 8 * 1024
MAX_BYTES = 1 << 20


def _envelope(**fields: object) -> Envelope:
    # Ids of the maximum length and the maximum numbers the schema allows, so chunk headers reach their maximum size.
    values: dict[str, object] = {
        "model_id": "m" * 64,
        "session_id": "f" * 64,
        "kind": Kind.SNAPSHOT,
        "version": 2**62 - 1,
        "seq": 2**62 - 1,
        "created_ns": 2**63 - 1,
        "state_digest": "0" * 32,
    }
    values.update(fields)
    return Envelope(**values)


def _whole(size: int = 50_000, seed: int = 0) -> tuple[Envelope, bytes]:
    """Return an envelope and a whole message of about `size` bytes, with random (incompressible) tensor data."""
    envelope = _envelope()
    data = np.random.default_rng(seed).integers(0, 256, size=size, dtype=np.uint8)
    return envelope, encode(envelope, {"w": data})


def _chunks(envelope: Envelope, payload: bytes, max_message_bytes: int = MAX_MESSAGE_BYTES) -> list[Message]:
    return [decode(chunk, max_bytes=max_message_bytes) for chunk in split(payload, envelope, max_message_bytes)]


def _feed(reassembler: Reassembler, message: Message) -> bytes | None:
    return reassembler.add(message.envelope, decode_chunk_data(message.tensors))


def _chunk(seq: int, index: int, count: int, *, total: int, version: int = 1) -> Envelope:
    """Return the envelope of one chunk, for tests that hand-craft chunk sequences."""
    return Envelope(
        model_id="testlm",
        session_id="0123456789abcdef",
        kind=Kind.CHUNK,
        chunk_of=Kind.DELTA,
        version=version,
        seq=seq,
        created_ns=1,
        chunk_index=index,
        chunk_count=count,
        total_bytes=total,
    )


# split.


def test_split_below_limit_returns_payload_unchanged() -> None:
    envelope, payload = _whole(size=1000)

    chunks = split(payload, envelope, MAX_MESSAGE_BYTES)

    assert chunks == [payload]


def test_split_at_limit_returns_payload_unchanged() -> None:
    envelope, payload = _whole(size=1000)

    chunks = split(payload, envelope, len(payload))

    assert chunks == [payload]


def test_split_above_limit_chunks_fit_limit() -> None:
    envelope, payload = _whole()

    chunks = split(payload, envelope, MAX_MESSAGE_BYTES)

    assert len(chunks) == math.ceil(len(payload) / (MAX_MESSAGE_BYTES - CHUNK_OVERHEAD_BYTES))
    for index, chunk in enumerate(chunks):
        assert len(chunk) <= MAX_MESSAGE_BYTES, index


def test_split_chunk_envelopes_describe_whole() -> None:
    envelope, payload = _whole()

    messages = _chunks(envelope, payload)

    for index, message in enumerate(messages):
        chunk = message.envelope
        assert chunk.kind is Kind.CHUNK, index
        assert chunk.chunk_of is Kind.SNAPSHOT, index
        assert chunk.chunk_index == index
        assert chunk.chunk_count == len(messages), index
        assert chunk.total_bytes == len(payload), index
        assert (chunk.session_id, chunk.seq, chunk.version) == (envelope.session_id, envelope.seq, envelope.version)
        assert chunk.state_digest is None, index


def test_split_rejects_limit_without_room_for_data() -> None:
    envelope, payload = _whole()

    with pytest.raises(ValueError, match=f"max_message_bytes {CHUNK_OVERHEAD_BYTES} leaves no room for chunk data"):
        split(payload, envelope, CHUNK_OVERHEAD_BYTES)


# Reassembler.


WHOLE_ENVELOPE, WHOLE_PAYLOAD = _whole()
WHOLE_CHUNKS = _chunks(WHOLE_ENVELOPE, WHOLE_PAYLOAD)


@settings(max_examples=50, deadline=None)
@given(order=st.permutations(range(len(WHOLE_CHUNKS))))
def test_reassembler_any_order_gives_original(order: list[int]) -> None:
    reassembler = Reassembler(max_total_bytes=MAX_BYTES)

    results = [_feed(reassembler, WHOLE_CHUNKS[index]) for index in order]

    assert results[:-1] == [None] * (len(order) - 1)
    assert results[-1] == WHOLE_PAYLOAD
    assert reassembler.pending == 0


def test_reassembler_result_decodes_to_original_message() -> None:
    envelope, payload = _whole()
    reassembler = Reassembler(max_total_bytes=MAX_BYTES)

    for message in _chunks(envelope, payload):
        whole = _feed(reassembler, message)

    assert whole is not None
    decoded = decode(whole, max_bytes=MAX_BYTES)
    assert decoded.envelope == decode(payload, max_bytes=MAX_BYTES).envelope
    assert decoded.tensors["w"].tobytes() == decode(payload, max_bytes=MAX_BYTES).tensors["w"].tobytes()


def test_reassembler_keeps_interleaved_messages_apart() -> None:
    first_envelope, first = _whole(seed=1)
    second_envelope, second = _whole(seed=2)
    second_envelope = second_envelope.model_copy(update={"seq": first_envelope.seq - 1})
    first_chunks = _chunks(first_envelope, first)
    second_chunks = _chunks(second_envelope, second)
    reassembler = Reassembler(max_total_bytes=MAX_BYTES)

    completed = []
    for pair in zip(first_chunks, second_chunks, strict=True):
        for message in pair:
            whole = _feed(reassembler, message)
            if whole is not None:
                completed.append(whole)

    assert completed == [first, second]


def test_reassembler_rejects_duplicate_chunk() -> None:
    reassembler = Reassembler(max_total_bytes=MAX_BYTES)
    reassembler.add(_chunk(7, 1, 3, total=9), b"bbb")

    with pytest.raises(WireError, match="chunk 1 of seq 7 arrived twice") as caught:
        reassembler.add(_chunk(7, 1, 3, total=9), b"bbb")

    assert caught.value.reason == "duplicate"


def test_reassembler_completes_after_duplicate() -> None:
    reassembler = Reassembler(max_total_bytes=MAX_BYTES)
    reassembler.add(_chunk(7, 0, 2, total=6), b"aaa")
    with pytest.raises(WireError):
        reassembler.add(_chunk(7, 0, 2, total=6), b"aaa")

    whole = reassembler.add(_chunk(7, 1, 2, total=6), b"bbb")

    assert whole == b"aaabbb"


@pytest.mark.parametrize(
    "changes", [{"count": 4}, {"total": 10}, {"version": 2}], ids=["chunk_count", "total_bytes", "version"]
)
def test_reassembler_rejects_disagreeing_chunk(changes: dict[str, int]) -> None:
    reassembler = Reassembler(max_total_bytes=MAX_BYTES)
    reassembler.add(_chunk(7, 0, 3, total=9), b"aaa")
    fields = {"count": 3, "total": 9, "version": 1, **changes}

    with pytest.raises(WireError, match="chunk 1 of seq 7 disagrees with its first chunk") as caught:
        reassembler.add(_chunk(7, 1, fields["count"], total=fields["total"], version=fields["version"]), b"bbb")

    assert caught.value.reason == "bad_envelope"
    assert reassembler.pending == 0


def test_reassembler_rejects_total_above_limit() -> None:
    reassembler = Reassembler(max_total_bytes=1000)

    with pytest.raises(WireError, match="chunked message of 1001 bytes exceeds the limit of 1000 bytes") as caught:
        reassembler.add(_chunk(7, 0, 2, total=1001), b"a")

    assert caught.value.reason == "too_large"
    assert reassembler.pending == 0


def test_reassembler_rejects_more_bytes_than_announced() -> None:
    reassembler = Reassembler(max_total_bytes=MAX_BYTES)
    reassembler.add(_chunk(7, 0, 3, total=6), b"aaaa")

    with pytest.raises(WireError, match="chunks of seq 7 carry more than the announced 6 bytes") as caught:
        reassembler.add(_chunk(7, 1, 3, total=6), b"bbbb")

    assert caught.value.reason == "bad_shape"
    assert reassembler.pending == 0


def test_reassembler_rejects_fewer_bytes_than_announced() -> None:
    reassembler = Reassembler(max_total_bytes=MAX_BYTES)
    reassembler.add(_chunk(7, 0, 2, total=6), b"aa")

    with pytest.raises(WireError, match="chunks of seq 7 add up to 4 bytes, announced 6") as caught:
        reassembler.add(_chunk(7, 1, 2, total=6), b"bb")

    assert caught.value.reason == "bad_shape"
    assert reassembler.pending == 0


def test_reassembler_bounds_pending_messages(caplog: pytest.LogCaptureFixture) -> None:
    reassembler = Reassembler(max_total_bytes=MAX_BYTES, max_pending=2)
    caplog.set_level(logging.WARNING, logger="monitor.wire.chunking")

    for seq in (1, 2, 3):
        reassembler.add(_chunk(seq, 0, 2, total=2), b"a")

    assert reassembler.pending == 2
    assert "dropping incomplete chunked message session=0123456789abcdef seq=1: too many pending" in caplog.text


def test_reassembler_drops_oldest_pending_message() -> None:
    reassembler = Reassembler(max_total_bytes=MAX_BYTES, max_pending=2)
    for seq in (1, 2, 3):
        reassembler.add(_chunk(seq, 0, 2, total=2), b"a")

    dropped = reassembler.add(_chunk(1, 1, 2, total=2), b"b")
    completed = reassembler.add(_chunk(3, 1, 2, total=2), b"b")

    assert dropped is None
    assert completed == b"ab"


def test_reassembler_keeps_message_before_timeout() -> None:
    reassembler = Reassembler(max_total_bytes=MAX_BYTES, timeout_seconds=60.0)
    before = time.monotonic()
    reassembler.add(_chunk(7, 0, 2, total=2), b"a")

    expired = reassembler.expire(now=before + 59.9)

    assert expired == 0
    assert reassembler.pending == 1


def test_reassembler_expires_message_after_timeout(caplog: pytest.LogCaptureFixture) -> None:
    reassembler = Reassembler(max_total_bytes=MAX_BYTES, timeout_seconds=60.0)
    caplog.set_level(logging.WARNING, logger="monitor.wire.chunking")
    reassembler.add(_chunk(7, 0, 2, total=2), b"a")
    after = time.monotonic()

    expired = reassembler.expire(now=after + 60.1)

    assert expired == 1
    assert reassembler.pending == 0
    assert "expired chunked message session=0123456789abcdef seq=7 version=1 received=1/2" in caplog.text


def test_reassembler_after_expiry_starts_over() -> None:
    reassembler = Reassembler(max_total_bytes=MAX_BYTES, timeout_seconds=60.0)
    reassembler.add(_chunk(7, 0, 2, total=2), b"a")
    reassembler.expire(now=time.monotonic() + 61)

    whole = reassembler.add(_chunk(7, 1, 2, total=2), b"b")

    assert whole is None
    assert reassembler.pending == 1


def test_reassembler_ignores_chunk_of_completed_message() -> None:
    reassembler = Reassembler(max_total_bytes=MAX_BYTES)
    reassembler.add(_chunk(7, 0, 2, total=2), b"a")
    reassembler.add(_chunk(7, 1, 2, total=2), b"b")

    with pytest.raises(WireError) as caught:
        reassembler.add(_chunk(7, 1, 2, total=2), b"b")

    assert caught.value.reason == "duplicate"
    assert reassembler.pending == 0


# decode_chunk_data.


def test_decode_chunk_data_returns_bytes() -> None:
    data = np.frombuffer(b"payload", dtype=np.uint8)

    assert decode_chunk_data({"data": data}) == b"payload"


@pytest.mark.parametrize(
    "tensors",
    [
        {},
        {"other": np.zeros(4, np.uint8)},
        {"data": np.zeros(4, np.int8)},
        {"data": np.zeros((2, 2), np.uint8)},
        {"data": np.zeros(4, np.uint8), "extra": np.zeros(1, np.uint8)},
    ],
    ids=["empty", "wrong_name", "wrong_dtype", "two_dims", "extra_tensor"],
)
def test_decode_chunk_data_rejects_wrong_tensors(tensors: dict[str, np.ndarray]) -> None:
    with pytest.raises(WireError, match="a chunk must carry exactly one 1-D uint8 tensor named 'data'") as caught:
        decode_chunk_data(tensors)

    assert caught.value.reason == "bad_shape"
