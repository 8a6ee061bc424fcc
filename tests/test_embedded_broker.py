"""The demo's embedded broker under concurrent clients: every client connects, and receives only what it subscribed to."""

from __future__ import annotations

import asyncio
import logging

import aiomqtt
import pytest

from monitor.transport.embedded_broker import EmbeddedBroker

HOLDERS = 20
JOINERS = 40


async def _subscribe_and_listen(port: int, index: int, listen_seconds: float, strays: list[str]) -> None:
    """Connect as client `index`, subscribe to its own topics, and record any message on another client's topic."""
    async with aiomqtt.Client(
        "127.0.0.1", port, identifier=f"client-{index}", clean_session=False, timeout=5
    ) as client:
        await client.subscribe([(f"test/{index}/{part}", 1) for part in range(3)], timeout=5)
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(listen_seconds):
                async for message in client.messages:
                    if not str(message.topic).startswith(f"test/{index}/"):
                        strays.append(str(message.topic))


def test_concurrent_clients_get_only_own_topics(caplog: pytest.LogCaptureFixture) -> None:
    strays: list[str] = []

    async def scenario() -> list[BaseException | None]:
        async with EmbeddedBroker() as broker:
            async with aiomqtt.Client("127.0.0.1", broker.port, identifier="publisher") as publisher:
                for index in range(HOLDERS):
                    await publisher.publish(f"test/{index}/0", b"retained", qos=1, retain=True)

            # Holders subscribe first, so the broker has retained messages to send for their subscriptions while
            # the joiners connect and add subscriptions of their own.
            holders = [
                asyncio.create_task(_subscribe_and_listen(broker.port, index, 3.0, strays)) for index in range(HOLDERS)
            ]
            await asyncio.sleep(1.0)
            joiners = [_subscribe_and_listen(broker.port, HOLDERS + index, 0.5, strays) for index in range(JOINERS)]
            return await asyncio.gather(*joiners, *holders, return_exceptions=True)

    with caplog.at_level(logging.ERROR):
        results = asyncio.run(scenario())

    assert [result for result in results if result is not None] == []
    assert strays == []
    assert [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR] == []
