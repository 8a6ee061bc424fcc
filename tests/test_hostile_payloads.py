"""Broken and hostile payloads sent to a running twin over a real broker."""

from __future__ import annotations

import asyncio
import os
import pickle
import time
from collections import Counter
from collections.abc import Callable

import aiomqtt
import numpy as np
import pytest
import safetensors.numpy
from prometheus_client import CollectorRegistry

from monitor.primary.service import Primary
from monitor.topics import Topics
from monitor.twin.service import Twin
from monitor.wire.codec import encode, tensor_checksum
from monitor.wire.envelope import Envelope, Kind
from tests.harness import primary_settings, run_until, twin_settings
from tests.mosquitto import Mosquitto

pytestmark = pytest.mark.broker

MAX_MESSAGE_BYTES = 1_000_000


def _hostile_cases(primary: Primary, last_seq: int) -> list[tuple[str, str, bytes]]:
    """Return (topic leaf, expected reject reason, payload) for every hostile case."""
    state = primary.state
    weights = state.weights

    def envelope(**fields: object) -> Envelope:
        values: dict[str, object] = {
            "model_id": "testlm",
            "session_id": state.session_id,
            "kind": Kind.SNAPSHOT,
            "version": state.version + 1,
            "seq": 10_000,
            "created_ns": time.time_ns(),
            "architecture": state.architecture,
        }
        values.update(fields)
        return Envelope(**values)  # type: ignore[arg-type]

    snapshot = encode(envelope(), weights)
    wrong_shape = dict(weights, **{"output.bias": np.zeros(7, np.float32)})
    with_nan = {name: array.copy() for name, array in weights.items()}
    with_nan["hidden.bias"][3] = np.nan
    with_inf = {name: array.copy() for name, array in weights.items()}
    with_inf["embedding"][0, 0] = np.inf
    tampered = bytearray(snapshot)
    tampered[-1] ^= 0x01
    f64 = safetensors.numpy.save(
        {name: array.astype(np.float64) for name, array in weights.items()},
        metadata={"llm_twin": envelope().model_dump_json(exclude_none=True)},
    )
    contexts = np.zeros((4, 8), np.uint8)
    logprobs = np.full((4, 256), -np.log(256), np.float32)
    outputs_envelope = Envelope(
        model_id="testlm",
        session_id=state.session_id,
        kind=Kind.OUTPUTS,
        version=state.version,
        created_ns=time.time_ns(),
    )

    return [
        ("weights", "bad_header", os.urandom(4096)),
        ("weights", "bad_header", snapshot[: len(snapshot) // 2]),
        ("weights", "bad_header", (2**40).to_bytes(8, "little") + b"{}"),
        ("weights", "bad_header", pickle.dumps({"embedding": weights["embedding"]})),
        ("weights", "bad_dtype", bytes(f64)),
        ("weights", "bad_shape", encode(envelope(), wrong_shape)),
        ("weights", "non_finite", encode(envelope(), with_nan)),
        ("weights", "non_finite", encode(envelope(), with_inf)),
        ("weights", "unknown_model", encode(envelope(model_id="another-model"), weights)),
        ("weights", "stale_version", encode(envelope(version=0, seq=10_001), weights)),
        ("weights", "duplicate", encode(envelope(seq=last_seq), weights)),
        ("weights", "checksum", bytes(tampered)),
        ("weights", "too_large", b"\0" * (MAX_MESSAGE_BYTES + 1)),
        (
            "weights",
            "bad_envelope",
            safetensors.numpy.save({"x": np.zeros(2, np.float32)}, metadata={"llm_twin": "{}"}),
        ),
        ("outputs", "bad_shape", encode(outputs_envelope, {"contexts": contexts[:, :5], "logprobs": logprobs})),
        (
            "outputs",
            "bad_dtype",
            encode(outputs_envelope, {"contexts": contexts.astype(np.int32), "logprobs": logprobs}),
        ),
        ("status", "bad_header", b"offline"),
    ]


def test_twin_rejects_hostile_payloads_and_keeps_weights(mosquitto: Mosquitto) -> None:
    registry = CollectorRegistry()
    primary = Primary(primary_settings(mosquitto.url, max_steps=10), registry)
    twin = Twin(twin_settings(mosquitto.url, "mirror", max_message_bytes=MAX_MESSAGE_BYTES), registry)
    topics = Topics("testlm")
    expected: Counter[str] = Counter()
    held: list[str] = []

    def rejected(reason: str) -> float:
        value = registry.get_sample_value(
            "llm_twin_messages_rejected_total", {"model_id": "testlm", "twin_id": "mirror", "reason": reason}
        )
        return value or 0.0

    async def scenario() -> None:
        stop = asyncio.Event()
        ready: Callable[[], bool] = lambda: twin.replica.version == 5 and primary.steps >= 10  # noqa: E731
        runner = asyncio.create_task(run_until([twin, primary], lambda: stop.is_set(), timeout=90, stop=stop))
        deadline = time.monotonic() + 60
        while not ready():
            assert time.monotonic() < deadline, "twin never reached version 5"
            await asyncio.sleep(0.05)
        assert twin.reference is not None
        held.append(twin.reference.digest)
        batches_before = twin.outputs.batches

        async with aiomqtt.Client("127.0.0.1", mosquitto.port) as attacker:
            for leaf, reason, payload in _hostile_cases(primary, twin.tracker.last_seq):
                expected[reason] += 1
                await attacker.publish(getattr(topics, leaf), payload, qos=1)
            deadline = time.monotonic() + 30
            while any(rejected(reason) < count for reason, count in expected.items()):
                assert time.monotonic() < deadline, {reason: rejected(reason) for reason in expected}
                await asyncio.sleep(0.05)

            # The twin still works: a valid outputs batch is compared after the attack.
            state = primary.state
            envelope = Envelope(
                model_id="testlm",
                session_id=state.session_id,
                kind=Kind.OUTPUTS,
                version=state.version,
                created_ns=time.time_ns(),
            )
            contexts = np.zeros((4, 8), np.uint8)
            logprobs = np.full((4, 256), -np.log(256), np.float32)
            await attacker.publish(topics.outputs, encode(envelope, {"contexts": contexts, "logprobs": logprobs}))
            deadline = time.monotonic() + 10
            while twin.outputs.batches == batches_before:
                assert time.monotonic() < deadline, "twin stopped comparing outputs after the attack"
                await asyncio.sleep(0.05)
        stop.set()
        await runner

    asyncio.run(scenario())

    for reason, count in expected.items():
        assert rejected(reason) == count, reason
    assert twin.reference is not None
    assert twin.reference.digest == held[0]
    assert twin.replica.weights is not None
    assert tensor_checksum(twin.replica.weights) == held[0]
    assert twin.link.connected.is_set() is False  # stopped cleanly at the end


def test_primary_counts_bad_control_requests(mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    primary = Primary(primary_settings(mosquitto.url, max_steps=5), registry)
    bad_requests = [
        b"\x80\x04not json",
        b'{"request": "resync", "twin_id": "edge", "reason": "gap", "priority": 9}',
        b'{"request": "rollback", "twin_id": "edge", "reason": "gap"}',
    ]

    def rejected() -> float:
        labels = {"model_id": "testlm", "twin_id": "", "reason": "bad_control"}
        return registry.get_sample_value("llm_twin_messages_rejected_total", labels) or 0.0

    async def send() -> None:
        await asyncio.sleep(0)
        while not primary.link.connected.is_set():
            await asyncio.sleep(0.02)
        async with aiomqtt.Client("127.0.0.1", mosquitto.port, identifier="bad-control") as client:
            for payload in bad_requests:
                await client.publish(primary.topics.control, payload, qos=1)

    async def scenario() -> None:
        sender = asyncio.create_task(send())
        await run_until([primary], lambda: rejected() == len(bad_requests), timeout=30)
        await sender

    with caplog.at_level("WARNING", logger="monitor.primary.service"):
        asyncio.run(scenario())

    warnings = [record.getMessage() for record in caplog.records if "rejected control message" in record.getMessage()]
    assert len(warnings) == 3
    assert "field priority: Extra inputs are not permitted" in warnings[1]
    assert "field request: String should match pattern" in warnings[2]
    reasons = {
        sample.labels["reason"]
        for family in registry.collect()
        if family.name == "llm_twin_messages_rejected"
        for sample in family.samples
    }
    assert reasons == {"bad_control"}
