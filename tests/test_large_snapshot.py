"""A snapshot far larger than the broker's packet limit syncs in chunks and is switched in atomically."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from monitor.primary.service import Primary
from monitor.twin.service import Twin
from tests.harness import primary_settings, twin_settings
from tests.mosquitto import Mosquitto

pytestmark = [pytest.mark.broker, pytest.mark.slow, pytest.mark.timeout(900)]

BROKER_PACKET_LIMIT = 2_000_000  # Mosquitto 2.1's default max_packet_size, set explicitly here
# context 64, embedding 300, hidden 4096: 79.8 M float32 parameters, a 304 MiB snapshot.
LARGE_MODEL = {"context": 64, "embedding_dim": 300, "hidden_dim": 4096}


@pytest.fixture
def small_packet_broker(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path, max_packet_size=BROKER_PACKET_LIMIT)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def test_300_mib_snapshot_chunked_and_switched_atomically(small_packet_broker: Mosquitto) -> None:
    url = small_packet_broker.url
    registry = CollectorRegistry()
    limit = BROKER_PACKET_LIMIT - 10_000  # room for the MQTT fixed header and topic
    primary = Primary(
        primary_settings(
            url,
            **LARGE_MODEL,
            max_message_bytes=limit,
            batch_size=4,
            publish_every=1,
            max_steps=2,
            steps_per_second=0.0,
        ),
        registry,
    )
    twin = Twin(twin_settings(url, "mirror", max_message_bytes=limit), registry)
    snapshot_bytes = sum(array.nbytes for array in primary.weights.values())
    assert snapshot_bytes > 300 * 2**20

    async def scenario() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(service.run(stop)) for service in (twin, primary)]
        try:
            deadline = time.monotonic() + 600
            while not (primary.steps >= 2 and twin.replica.version == primary.state.version == 2):
                assert time.monotonic() < deadline, "the large model never synced"
                await asyncio.sleep(0.1)
            # Wait until the twin has compared at least one batch at the same version as the primary.
            while twin.outputs.cause_windows["same_version"].count < 1:
                assert time.monotonic() < deadline, "the twin never compared a batch at the same version"
                await asyncio.sleep(0.1)
        finally:
            stop.set()
            await asyncio.gather(*tasks)

    asyncio.run(scenario())

    chunks = registry.get_sample_value(
        "llm_twin_primary_published_messages_total", {"model_id": "testlm", "kind": "chunk"}
    )
    assert chunks is not None and chunks >= 3 * snapshot_bytes // limit
    history = dict(primary.state.history)
    assert [version for version, _ in twin.applied][-1] == 2
    assert all(history[version] == digest for version, digest in twin.applied)
    # A batch computed on a half-switched replica would show a KL far above zero at the same version.
    same_version = twin.outputs.cause_windows["same_version"]
    assert same_version.count >= 1
    assert float(np.max(same_version.values())) <= 1e-6
    assert twin.replica.weights is not None
    for name, array in primary.state.weights.items():
        assert np.array_equal(twin.replica.weights[name], array), name
