"""A reconnecting MQTT link on aiomqtt.

One `MqttLink` owns one client id for the life of a service. It connects, subscribes, hands every message to
a callback, and when the connection drops it waits with capped, jittered exponential backoff and starts
again. The session is persistent (MQTT 3.1.1 `clean_session=False` with a fixed client id), so QoS 1
messages published while the link was down are delivered when it comes back, within the broker's queue
limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from monitor.transport.broker_url import BrokerAddress

logger = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], Awaitable[None]]
ConnectHook = Callable[[], Awaitable[None]]
StateHook = Callable[[bool], None]

# Nagle's algorithm delays a small packet until the previous one is acknowledged, which with Linux's delayed
# ACKs can add tens of milliseconds per message. The broker must set `set_tcp_nodelay true` as well, or the
# other direction still waits.
_NODELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with full jitter: delay n is uniform in [0, min(cap, base * 2**n)]."""

    base_seconds: float = 0.2
    cap_seconds: float = 10.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0.0, min(self.cap_seconds, self.base_seconds * 2 ** min(attempt, 30)))


class _CountingQueue(asyncio.Queue[Any]):
    """aiomqtt's incoming queue, counting what it drops when full (aiomqtt itself only logs it)."""

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize)
        self.dropped = 0

    def put_nowait(self, item: Any) -> None:
        try:
            super().put_nowait(item)
        except asyncio.QueueFull:
            self.dropped += 1
            raise


# CONNACK codes that mean the credentials were refused: MQTT 3.1.1 (4, 5) and the MQTT 5 reason codes (134, 135)
# that paho reports for both protocol versions.
_AUTH_REFUSED_CODES = {4, 5, 134, 135}


def _hint(exc: aiomqtt.MqttError) -> str:
    """Return what to check for errors whose fix lies with the user, or an empty string."""
    code = getattr(exc, "rc", None)
    value = getattr(code, "value", code)
    if isinstance(exc, MqttConnectError) and value in _AUTH_REFUSED_CODES:
        return "; check --mqtt-username and LLM_TWIN_MQTT_PASSWORD against the broker's password file and ACL"
    if "Disconnected during message iteration" in str(exc):
        return "; the broker closed the connection (restarted, or another client took this client id)"
    return ""


def _mark_disconnect_seen(client: aiomqtt.Client) -> None:
    """Retrieve the error of the client's disconnect future, which aiomqtt 2 leaves unread on a lost connection.

    The link has already reported the loss by raising `MqttError`. Unread, the future makes asyncio log
    "Future exception was never retrieved" when it is collected.
    """
    disconnected: asyncio.Future[None] = client._disconnected
    if disconnected.done() and not disconnected.cancelled():
        disconnected.exception()


class MqttLink:
    """A long-lived MQTT connection that reconnects until `stop` is set."""

    def __init__(
        self,
        address: BrokerAddress,
        client_id: str,
        *,
        subscriptions: list[tuple[str, int]],
        on_message: MessageHandler,
        on_connect: ConnectHook | None = None,
        on_state: StateHook | None = None,
        will: aiomqtt.Will | None = None,
        username: str | None = None,
        password: str | None = None,
        keepalive_seconds: int = 10,
        max_queued_incoming: int = 10_000,
        backoff: Backoff | None = None,
    ) -> None:
        self.address = address
        self.client_id = client_id
        self._subscriptions = subscriptions
        self._on_message = on_message
        self._on_connect = on_connect
        self._on_state = on_state
        self._will = will
        self._username = username
        self._password = password
        self._keepalive = keepalive_seconds
        self._max_queued = max_queued_incoming
        self._backoff = backoff or Backoff()
        self._client: aiomqtt.Client | None = None
        self._queue: _CountingQueue | None = None
        self.connected = asyncio.Event()
        self._subscribed = False
        self.connections = 0
        self.dropped_incoming = 0
        """Messages that arrived while the incoming queue was full and were discarded; callers resync."""

    async def run(self, stop: asyncio.Event) -> None:
        """Connect, serve, and reconnect after failures until `stop` is set."""
        attempt = 0
        while not stop.is_set():
            self._subscribed = False
            try:
                await self._serve_once(stop)
                attempt = 0
            except aiomqtt.MqttError as exc:
                self._set_connected(False)
                if self._subscribed:
                    attempt = 0  # a session that worked: start the backoff over
                delay = self._backoff.delay(attempt)
                attempt += 1
                logger.warning(
                    "mqtt %s client_id=%s broker=%s error=%r retry_in=%.2fs attempt=%d",
                    "connection lost" if self._subscribed else "connect failed",
                    self.client_id,
                    self.address,
                    str(exc) + _hint(exc),
                    delay,
                    attempt,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
        self._set_connected(False)

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False, timeout: float = 30.0
    ) -> bool:
        """Publish if connected. Return False (and log) when the link is down or the publish fails."""
        client = self._client
        if client is None or not self.connected.is_set():
            return False
        try:
            await client.publish(topic, payload, qos=qos, retain=retain, timeout=timeout)
        except aiomqtt.MqttError as exc:
            logger.warning(
                "mqtt publish failed client_id=%s topic=%s bytes=%d error=%r",
                self.client_id,
                topic,
                len(payload),
                str(exc),
            )
            return False
        return True

    async def _serve_once(self, stop: asyncio.Event) -> None:
        client = aiomqtt.Client(
            self.address.host,
            self.address.port,
            identifier=self.client_id,
            username=self._username,
            password=self._password,
            will=self._will,
            clean_session=False,
            keepalive=self._keepalive,
            timeout=10.0,
            queue_type=_CountingQueue,
            max_queued_incoming_messages=self._max_queued,
            socket_options=_NODELAY,
            tls_context=ssl.create_default_context() if self.address.tls else None,
        )
        try:
            async with client:
                self._client = client
                self._queue = client._queue  # type: ignore[assignment]  # aiomqtt keeps the queue private
                self.connections += 1
                logger.info(
                    "mqtt connected client_id=%s broker=%s connection=%d",
                    self.client_id,
                    self.address,
                    self.connections,
                )
                await self._subscribe(client)
                self._subscribed = True
                self._set_connected(True)
                if self._on_connect is not None:
                    await self._on_connect()

                try:
                    await self._consume(client, stop)
                finally:
                    self._client = None
                    self._set_connected(False)
        finally:
            _mark_disconnect_seen(client)

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        """Subscribe to every topic in one request, and raise `MqttError` at once if the connection drops meanwhile."""
        # aiomqtt 2 keeps waiting for a SUBACK after the connection is gone, until its 10 s timeout, so the
        # request races the client's private disconnect future.
        disconnected: asyncio.Future[None] = client._disconnected
        subscribing = asyncio.ensure_future(client.subscribe(self._subscriptions, timeout=10.0))
        waiters: set[asyncio.Future[Any]] = {subscribing, disconnected}
        try:
            done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            subscribing.cancel()
            raise
        if subscribing not in done:
            subscribing.cancel()
            raise aiomqtt.MqttError("connection lost while subscribing")
        subscribing.result()

    async def _consume(self, client: aiomqtt.Client, stop: asyncio.Event) -> None:
        messages = aiter(client.messages)
        stopping = asyncio.ensure_future(stop.wait())
        watchdog = asyncio.ensure_future(self._watch_liveness(client))
        try:
            while True:
                receiving = asyncio.ensure_future(anext(messages))
                done, _ = await asyncio.wait({receiving, stopping, watchdog}, return_when=asyncio.FIRST_COMPLETED)
                if receiving not in done:
                    receiving.cancel()
                    if watchdog in done:
                        raise aiomqtt.MqttError(watchdog.result())
                    return
                message = receiving.result()
                self._note_drops()
                payload = message.payload if isinstance(message.payload, bytes | bytearray) else b""
                await self._on_message(str(message.topic), bytes(payload))
        finally:
            stopping.cancel()
            watchdog.cancel()

    async def _watch_liveness(self, client: aiomqtt.Client) -> str:
        """Return a reason once a ping to the broker has gone unanswered for half a keepalive period.

        paho sends a ping after one silent keepalive period and gives up only after a second one. A live
        broker replies within milliseconds, so an unanswered ping after half a period already means a dead
        link (a frozen broker, a dropped route): it is noticed 1.5 periods after the silence began.
        """
        while True:
            await asyncio.sleep(self._keepalive / 8)
            # paho keeps the monotonic send time of an unanswered ping (0 when none); aiomqtt does not expose it.
            sent = getattr(getattr(client, "_client", None), "_ping_t", 0)
            if isinstance(sent, float) and sent > 0 and time.monotonic() - sent > self._keepalive / 2:
                return f"ping unanswered for {time.monotonic() - sent:.1f}s (keepalive {self._keepalive}s)"

    def _note_drops(self) -> None:
        queue = self._queue
        if queue is not None and queue.dropped:
            self.dropped_incoming += queue.dropped
            logger.warning("mqtt incoming queue overflowed client_id=%s dropped=%d", self.client_id, queue.dropped)
            queue.dropped = 0

    def _set_connected(self, connected: bool) -> None:
        if connected == self.connected.is_set():
            return
        if connected:
            self.connected.set()
        else:
            self.connected.clear()
        if self._on_state is not None:
            self._on_state(connected)

    async def disconnect_cleanly(self, final: list[tuple[str, bytes, int, bool]]) -> None:
        """Publish `final` messages (e.g. the offline status) while still connected.

        A clean DISCONNECT makes the broker discard the Last Will, so a service that stops on purpose must
        publish its death message itself before leaving.
        """
        for topic, payload, qos, retain in final:
            await self.publish(topic, payload, qos=qos, retain=retain, timeout=5.0)
