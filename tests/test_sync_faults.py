"""Weight sync under real faults: a killed broker, a twin that was away, a late join, a lossy link."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from monitor.primary.service import Primary
from monitor.twin.service import Twin
from tests.harness import primary_settings, twin_settings
from tests.mosquitto import Mosquitto

pytestmark = pytest.mark.broker


async def _wait(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def _in_step(primary: Primary, twin: Twin, min_version: int = 0) -> bool:
    """True when the twin has a version the primary published, with that version's exact digest."""
    reference = twin.reference
    if reference is None or reference.version < min_version:
        return False
    return dict(primary.state.history).get(reference.version) == reference.digest


def _assert_bitwise_equal(primary: Primary, twin: Twin) -> None:
    assert twin.replica.weights is not None
    assert twin.replica.version == primary.state.version
    for name, array in primary.state.weights.items():
        assert twin.replica.weights[name].tobytes() == array.tobytes(), name


def test_broker_sigkill_and_restart(mosquitto: Mosquitto) -> None:
    registry = CollectorRegistry()
    primary = Primary(primary_settings(mosquitto.url, steps_per_second=50.0, max_steps=700), registry)
    mirror = Twin(twin_settings(mosquitto.url, "mirror"), registry)
    connected_samples: list[float] = []

    async def scenario() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(service.run(stop)) for service in (mirror, primary)]
        try:
            await _wait(lambda: _in_step(primary, mirror, min_version=20), 30, "mirror at version 20")
            version_at_kill = primary.state.version

            mosquitto.kill()
            for _ in range(20):
                connected_samples.append(
                    _value(registry, "llm_twin_broker_connected", model_id="testlm", twin_id="mirror")
                )
                await asyncio.sleep(0.1)
            mosquitto.start()

            await _wait(lambda: mirror.link.connected.is_set() and primary.link.connected.is_set(), 60, "reconnection")
            await _wait(primary.training_done.is_set, 60, "the primary to finish training")
            await _wait(lambda: mirror.replica.version == primary.state.version, 30, "mirror at the final version")
            assert primary.state.version > version_at_kill
        finally:
            stop.set()
            await asyncio.gather(*tasks)

    asyncio.run(scenario())

    assert 0.0 in connected_samples
    assert mirror.link.connections >= 2
    assert primary.link.connections >= 2
    _assert_bitwise_equal(primary, mirror)


def test_twin_restart_with_checkpoint_gets_queued_updates(mosquitto: Mosquitto, tmp_path: Path) -> None:
    checkpoint = tmp_path / "mirror.safetensors"
    registry = CollectorRegistry()
    primary = Primary(primary_settings(mosquitto.url, publish_every=1, steps_per_second=100.0), registry)
    first = Twin(twin_settings(mosquitto.url, "mirror", checkpoint=checkpoint), CollectorRegistry())
    second_registry = CollectorRegistry()
    second = Twin(twin_settings(mosquitto.url, "mirror", checkpoint=checkpoint), second_registry)

    async def scenario() -> None:
        stop_primary, stop_first, stop_second = asyncio.Event(), asyncio.Event(), asyncio.Event()
        primary_task = asyncio.create_task(primary.run(stop_primary))
        try:
            first_task = asyncio.create_task(first.run(stop_first))
            await _wait(lambda: _in_step(primary, first, min_version=5), 30, "first twin at version 5")
            stop_first.set()
            await first_task
            stopped_at = first.replica.version

            await _wait(lambda: primary.state.version >= stopped_at + 50, 30, "50 updates while the twin is away")
            second_task = asyncio.create_task(second.run(stop_second))
            await _wait(lambda: _in_step(primary, second, min_version=stopped_at + 50), 30, "restarted twin in step")
            stop_second.set()
            await second_task
        finally:
            stop_primary.set()
            await primary_task

    asyncio.run(scenario())

    applied = [version for version, _ in second.applied]
    history = dict(primary.state.history)
    assert all(history[version] == digest for version, digest in second.applied)
    # The broker queued the deltas for the persistent session and the checkpoint gave their base: no resync.
    assert applied[:3] == [applied[0], applied[0] + 1, applied[0] + 2]
    assert (
        _value(second_registry, "llm_twin_updates_applied_total", model_id="testlm", twin_id="mirror", kind="delta")
        >= 50
    )
    assert _value(second_registry, "llm_twin_resyncs_total", model_id="testlm", twin_id="mirror", reason="startup") == 0


def test_late_join_reaches_current_version(mosquitto: Mosquitto) -> None:
    registry = CollectorRegistry()
    primary = Primary(primary_settings(mosquitto.url, publish_every=1, steps_per_second=100.0), registry)
    late = Twin(twin_settings(mosquitto.url, "late", sync_policy="mirror"), registry)

    async def scenario() -> None:
        stop = asyncio.Event()
        primary_task = asyncio.create_task(primary.run(stop))
        try:
            await _wait(lambda: primary.state.version >= 50, 30, "primary at version 50")
            twin_task = asyncio.create_task(late.run(stop))
            await _wait(lambda: _in_step(primary, late, min_version=50), 30, "late twin in step")
            stop.set()
            await twin_task
        finally:
            stop.set()
            await primary_task

    asyncio.run(scenario())

    assert _value(registry, "llm_twin_resyncs_total", model_id="testlm", twin_id="late", reason="startup") >= 1
    assert late.applied[0][0] >= 50


class LossyWeights:
    """Publisher-side fault injection on the weights topic: drop, duplicate and reorder messages."""

    def __init__(self, primary: Primary, *, seed: int, drop: float, duplicate: float, reorder: float) -> None:
        self.random = random.Random(seed)
        self.drop, self.duplicate, self.reorder = drop, duplicate, reorder
        self.counts = {"dropped": 0, "duplicated": 0, "reordered": 0}
        self._held: tuple[str, bytes, int, bool] | None = None
        self._publish = primary.link.publish
        self._weights_topic = primary.topics.weights
        primary.link.publish = self.publish  # type: ignore[method-assign]

    async def publish(
        self, topic: str, payload: bytes, *, qos: int = 0, retain: bool = False, timeout: float = 30.0
    ) -> bool:
        if topic != self._weights_topic:
            return await self._publish(topic, payload, qos=qos, retain=retain, timeout=timeout)
        roll = self.random.random()
        if roll < self.drop:
            self.counts["dropped"] += 1
            return True
        if roll < self.drop + self.reorder and self._held is None:
            self.counts["reordered"] += 1
            self._held = (topic, payload, qos, retain)
            return True
        sent = await self._publish(topic, payload, qos=qos, retain=retain, timeout=timeout)
        if roll < self.drop + self.reorder + self.duplicate:
            self.counts["duplicated"] += 1
            await self._publish(topic, payload, qos=qos, retain=retain, timeout=timeout)
        if self._held is not None:
            held, self._held = self._held, None
            await self._publish(held[0], held[1], qos=held[2], retain=held[3], timeout=timeout)
        return sent


def test_lossy_link_detected_and_resynced(mosquitto: Mosquitto) -> None:
    registry = CollectorRegistry()
    primary = Primary(primary_settings(mosquitto.url, publish_every=1, steps_per_second=100.0, max_steps=300), registry)
    faults = LossyWeights(primary, seed=5, drop=0.05, duplicate=0.05, reorder=0.05)
    mirror = Twin(twin_settings(mosquitto.url, "mirror"), registry)

    async def scenario() -> None:
        stop = asyncio.Event()
        tasks = [asyncio.create_task(service.run(stop)) for service in (mirror, primary)]
        try:
            await _wait(primary.training_done.is_set, 60, "primary done")
            await _wait(lambda: mirror.replica.version == primary.state.version, 30, "mirror at the final version")
        finally:
            stop.set()
            await asyncio.gather(*tasks)

    asyncio.run(scenario())

    def counted(name: str, **labels: str) -> float:
        return _value(registry, name, model_id="testlm", twin_id="mirror", **labels)

    assert min(faults.counts.values()) > 0, faults.counts
    resyncs = counted("llm_twin_resyncs_total", reason="gap") + counted(
        "llm_twin_resyncs_total", reason="base_mismatch"
    )
    assert resyncs >= 1
    assert counted("llm_twin_messages_rejected_total", reason="duplicate") >= 1
    rejected_late = counted("llm_twin_messages_rejected_total", reason="out_of_order")
    rejected_stale = counted("llm_twin_messages_rejected_total", reason="stale_version")
    assert rejected_late + rejected_stale >= 1
    history = dict(primary.state.history)
    assert all(history[version] == digest for version, digest in mirror.applied)
    _assert_bitwise_equal(primary, mirror)


def test_primary_rejects_outputs_over_message_limit(mosquitto: Mosquitto) -> None:
    settings = primary_settings(mosquitto.url, batch_size=64, max_message_bytes=16_384)

    with pytest.raises(ValueError, match=r"--max-message-bytes 16384") as raised:
        Primary(settings, CollectorRegistry())

    assert "--batch-size 64" in str(raised.value)
    assert np.isfinite(len(str(raised.value)))


def test_frozen_twin_lag_spans_primary_restart(mosquitto: Mosquitto) -> None:
    twin_registry = CollectorRegistry()
    frozen = Twin(twin_settings(mosquitto.url, "frozen", sync_policy="frozen"), twin_registry)
    first = Primary(primary_settings(mosquitto.url, publish_every=1, max_steps=30), CollectorRegistry())
    second = Primary(primary_settings(mosquitto.url, publish_every=1, max_steps=5), CollectorRegistry())
    same_version_batches: list[int] = []

    async def scenario() -> None:
        stop_twin, stop_first, stop_second = asyncio.Event(), asyncio.Event(), asyncio.Event()
        twin_task = asyncio.create_task(frozen.run(stop_twin))
        first_task = asyncio.create_task(first.run(stop_first))
        try:
            await _wait(lambda: frozen.replica.loaded and first.training_done.is_set(), 30, "the first session")
            await _wait(lambda: frozen.announced_version == first.state.version, 10, "the first session's end")
            stop_first.set()
            await first_task
            same_version_batches.append(frozen.outputs.cause_windows["same_version"].count)

            second_task = asyncio.create_task(second.run(stop_second))
            try:
                await _wait(second.training_done.is_set, 30, "the second session")
                await _wait(
                    lambda: (
                        frozen.primary_session == second.state.session_id
                        and frozen.announced_version == second.state.version
                    ),
                    10,
                    "the twin to follow the second session",
                )
                frozen._update_gauges()
            finally:
                stop_second.set()
                await second_task
            same_version_batches.append(frozen.outputs.cause_windows["same_version"].count)
        finally:
            stop_first.set()
            stop_twin.set()
            await asyncio.gather(twin_task, first_task)

    asyncio.run(scenario())

    lag = _value(twin_registry, "llm_twin_version_lag", model_id="testlm", twin_id="frozen")
    assert frozen.replica.session_id == first.state.session_id
    assert frozen.replica.version == 0
    assert lag == second.state.version + 1
    # Batches of the second session at version 0 ran on the first session's version 0: lag, not numerics.
    assert same_version_batches[1] == same_version_batches[0]
