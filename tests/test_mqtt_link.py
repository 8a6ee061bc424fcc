"""The reconnecting MQTT link against a real Mosquitto: dead-link detection and recovery."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import aiomqtt
import pytest

from monitor.transport.broker_url import parse_broker_url
from monitor.transport.mqtt import Backoff, MqttLink
from tests.mosquitto import Mosquitto

pytestmark = pytest.mark.broker

KEEPALIVE_SECONDS = 2


def test_link_notices_frozen_broker_within_keepalive(mosquitto: Mosquitto) -> None:
    async def ignore(topic: str, payload: bytes) -> None:
        return None

    states: list[tuple[float, bool]] = []
    link = MqttLink(
        parse_broker_url(mosquitto.url),
        "keepalive-test",
        subscriptions=[("llm-twin/v1/test/#", 1)],
        on_message=ignore,
        on_state=lambda up: states.append((time.monotonic(), up)),
        keepalive_seconds=KEEPALIVE_SECONDS,
        backoff=Backoff(base_seconds=0.1, cap_seconds=0.5),
    )
    assert mosquitto.process is not None
    pid = mosquitto.process.pid

    async def scenario() -> float:
        stop = asyncio.Event()
        task = asyncio.create_task(link.run(stop))
        try:
            await asyncio.wait_for(link.connected.wait(), timeout=10)
            os.kill(pid, signal.SIGSTOP)  # the TCP connection stays open, but the broker sends nothing
            frozen_at = time.monotonic()
            while link.connected.is_set():
                assert time.monotonic() - frozen_at < 10, "the link never noticed the frozen broker"
                await asyncio.sleep(0.05)
            noticed = time.monotonic() - frozen_at
            os.kill(pid, signal.SIGCONT)
            await asyncio.wait_for(link.connected.wait(), timeout=20)
            return noticed
        finally:
            os.kill(pid, signal.SIGCONT)
            stop.set()
            await task

    noticed = asyncio.run(scenario())

    # Silence starts at most one keepalive before the freeze (the last ping), and the limit is 1.5 periods.
    assert noticed <= 1.5 * KEEPALIVE_SECONDS + 0.75
    assert [up for _, up in states] == [True, False, True, False]
    assert link.connections == 2


def test_link_counts_messages_dropped_by_full_queue(mosquitto: Mosquitto) -> None:
    async def slow(topic: str, payload: bytes) -> None:
        await asyncio.sleep(0.05)  # a consumer far slower than the publisher

    link = MqttLink(
        parse_broker_url(mosquitto.url),
        "overflow-test",
        subscriptions=[("llm-twin/v1/test/#", 0)],
        on_message=slow,
        max_queued_incoming=5,
    )

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(link.run(stop))
        try:
            await asyncio.wait_for(link.connected.wait(), timeout=10)
            async with aiomqtt.Client("127.0.0.1", mosquitto.port) as publisher:
                for index in range(200):
                    await publisher.publish("llm-twin/v1/test/outputs", index.to_bytes(4, "big"))
            deadline = time.monotonic() + 20
            while link.dropped_incoming == 0:
                assert time.monotonic() < deadline, "no drop was counted"
                await asyncio.sleep(0.05)
        finally:
            stop.set()
            await task

    asyncio.run(scenario())

    assert 0 < link.dropped_incoming < 200
