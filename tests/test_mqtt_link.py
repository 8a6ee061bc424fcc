"""The reconnecting MQTT link against a real Mosquitto: dead-link detection and recovery."""

from __future__ import annotations

import asyncio
import os
import signal
import time

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
            os.kill(pid, signal.SIGSTOP)  # the TCP connection stays open, but nothing answers
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
