"""An MQTT broker inside the demo process (amqtt), so `llm-twin demo` needs no external service.

It listens on loopback only and allows anonymous clients. It is a convenience for trying the product, not a
deployment broker: deployments use Mosquitto, as the compose stack does.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import ItemsView, Iterator
from types import TracebackType
from typing import Any

from amqtt.broker import Broker
from amqtt.session import Session

logger = logging.getLogger(__name__)


class _SnapshotDict(dict[str, Any]):
    """A dict whose iterations walk a copy, so another task may add or remove keys meanwhile.

    amqtt 0.12 loops over its subscription table with awaits inside the loop. A client that subscribes to a new
    topic during such a loop made it raise "dictionary changed size during iteration", and the broker dropped the
    connecting client, which then waited for a SUBACK until its timeout.
    """

    def __iter__(self) -> Iterator[str]:
        return iter(list(dict.keys(self)))

    def items(self) -> ItemsView[str, Any]:  # type: ignore[override]
        return dict.copy(self).items()


class _LoopbackBroker(Broker):  # type: ignore[misc]  # amqtt ships no type information
    """amqtt's broker with its subscription table made safe to change during iteration (see `_SnapshotDict`)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self._subscriptions = _SnapshotDict()

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        # On connect, amqtt 0.12 sends the retained messages of every client's subscriptions to the new client.
        # Send only those of subscriptions this session holds, so no client gets topics it never subscribed to.
        holders = self._subscriptions.get(subscription[0], [])
        if any(holder.client_id == session.client_id for holder, _ in holders):
            await super()._publish_retained_messages_for_subscription(subscription, session)


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free a moment ago on `host`."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class EmbeddedBroker:
    """`async with EmbeddedBroker() as broker:` runs an amqtt broker on `broker.url` until the block ends."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._broker: Broker | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def __aenter__(self) -> EmbeddedBroker:
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        # amqtt logs every packet at INFO; keep the demo's terminal for the summary.
        logging.getLogger("amqtt").setLevel(logging.WARNING)
        self._broker = _LoopbackBroker(config)
        await self._broker.start()
        logger.info("embedded broker started url=%s", self.url)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None
            logger.info("embedded broker stopped url=%s", self.url)
