"""An MQTT broker inside the demo process (amqtt), so `llm-twin demo` needs no external service.

It listens on loopback only and allows anonymous clients. It is a convenience for trying the product, not a
deployment broker: deployments use Mosquitto, as the compose stack does.
"""

from __future__ import annotations

import logging
import socket
from types import TracebackType

from amqtt.broker import Broker

logger = logging.getLogger(__name__)


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
        self._broker = Broker(config)
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
