"""The reconnecting MQTT link against a real Mosquitto: dead-link detection and recovery."""

from __future__ import annotations

import asyncio
import contextlib
import gc
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


class SubscribeCutter:
    """A loopback TCP proxy to a broker that closes the first `cuts` connections when the client sends SUBSCRIBE.

    This is a broker that drops a client between CONNACK and SUBACK, as a broker restart or an overloaded broker
    can. The proxy parses MQTT fixed headers (packet type in the high nibble, then a variable-length size).
    """

    def __init__(self, broker_port: int, cuts: int) -> None:
        self.broker_port = broker_port
        self.cuts_left = cuts
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> SubscribeCutter:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        cut = self.cuts_left > 0
        self.cuts_left -= 1
        broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", self.broker_port)
        downstream = asyncio.create_task(self._pipe(broker_reader, client_writer))
        try:
            while packet := await self._read_packet(client_reader):
                if cut and packet[0] >> 4 == 8:  # SUBSCRIBE
                    break
                broker_writer.write(packet)
                await broker_writer.drain()
        finally:
            downstream.cancel()
            for writer in (client_writer, broker_writer):
                writer.close()

    @staticmethod
    async def _read_packet(reader: asyncio.StreamReader) -> bytes:
        try:
            header = await reader.readexactly(1)
            size_bytes = b""
            size, shift = 0, 0
            while True:
                byte = await reader.readexactly(1)
                size_bytes += byte
                size += (byte[0] & 0x7F) << shift
                shift += 7
                if not byte[0] & 0x80:
                    break
            return header + size_bytes + await reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError):
            return b""

    @staticmethod
    async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(65536):
                writer.write(chunk)
                await writer.drain()


def test_link_reconnects_when_dropped_before_suback(mosquitto: Mosquitto) -> None:
    async def ignore(topic: str, payload: bytes) -> None:
        return None

    unretrieved: list[str] = []

    async def scenario() -> float:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _, context: unretrieved.append(str(context.get("message"))))
        async with SubscribeCutter(mosquitto.port, cuts=2) as proxy:
            link = MqttLink(
                parse_broker_url(f"mqtt://127.0.0.1:{proxy.port}"),
                "subscribe-cut-test",
                subscriptions=[("llm-twin/v1/test/#", 1)],
                on_message=ignore,
                backoff=Backoff(base_seconds=0.05, cap_seconds=0.2),
            )
            stop = asyncio.Event()
            started = time.monotonic()
            task = asyncio.create_task(link.run(stop))
            try:
                await asyncio.wait_for(link.connected.wait(), timeout=30)
                took = time.monotonic() - started
            finally:
                stop.set()
                await task
            assert proxy.connections == 3
            assert link.connections == 3

        # Let the loop collect the dropped clients, so an unread future would be reported now.
        del link
        gc.collect()
        await asyncio.sleep(0.1)
        return took

    took = asyncio.run(scenario())

    # aiomqtt alone would wait for each SUBACK until its 10 s timeout: two cuts would take over 20 s.
    assert took < 5.0
    assert unretrieved == []
