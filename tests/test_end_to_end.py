"""Primary and twins over a real Mosquitto, on real text (the Python standard library source)."""

from __future__ import annotations

import asyncio
import itertools

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from monitor.analytics.weights import relative_distance
from monitor.primary.service import Primary
from monitor.twin.service import Twin
from tests.harness import primary_settings, run_until, twin_settings
from tests.mosquitto import Mosquitto

pytestmark = pytest.mark.broker


def test_mirror_bitwise_equal_at_every_version(mosquitto: Mosquitto) -> None:
    registry = CollectorRegistry()
    primary = Primary(primary_settings(mosquitto.url), registry)
    mirror = Twin(twin_settings(mosquitto.url, "mirror"), registry)

    asyncio.run(
        run_until([mirror, primary], lambda: len(mirror.applied) >= 40 and mirror.outputs.batches >= 40, timeout=60)
    )

    published = dict(primary.state.history)
    assert len(mirror.applied) >= 40
    for version, digest in mirror.applied:
        assert published[version] == digest, f"version {version} differs from the primary's"
    assert mirror.reference is not None
    final = mirror.reference.version
    assert final >= 20
    same_version = mirror.outputs.cause_windows["same_version"]
    assert same_version.count > 0
    assert float(np.max(same_version.values())) <= 1e-6


def test_mirror_replica_equals_published_weights(mosquitto: Mosquitto) -> None:
    registry = CollectorRegistry()
    primary = Primary(primary_settings(mosquitto.url, max_steps=30), registry)
    mirror = Twin(twin_settings(mosquitto.url, "mirror"), registry)

    asyncio.run(run_until([mirror, primary], lambda: mirror.replica.version == 15, timeout=60))

    assert primary.state.version == 15
    assert mirror.replica.weights is not None
    for name, array in primary.state.weights.items():
        assert np.array_equal(mirror.replica.weights[name], array), name
        assert mirror.replica.weights[name].tobytes() == array.tobytes(), name


def test_ema_distance_follows_closed_form(mosquitto: Mosquitto) -> None:
    alpha = 0.5
    registry = CollectorRegistry()
    primary = Primary(primary_settings(mosquitto.url, max_steps=40), registry)
    ema = Twin(twin_settings(mosquitto.url, "ema", sync_interval=0.3, ema_alpha=alpha), registry)
    distances: list[float] = []
    seen_changes = [0]

    def record() -> bool:
        reference, replica = ema.reference, ema.replica
        if reference is None or replica.weights is None:
            return False
        final = primary.state.version == 20 and reference.version == 20
        if final and replica.changes != seen_changes[0]:
            seen_changes[0] = replica.changes
            distances.append(relative_distance(reference.weights, replica.weights))
        return len(distances) >= 6

    asyncio.run(run_until([ema, primary], record, timeout=60))

    # On a primary that stopped changing, every blend multiplies the distance by (1 - alpha).
    ratios = [later / earlier for earlier, later in itertools.pairwise(distances) if earlier > 1e-5]
    assert len(ratios) >= 3
    for ratio in ratios:
        assert ratio == pytest.approx(1 - alpha, abs=1e-3)


def test_frozen_twin_diverges_while_primary_learns(mosquitto: Mosquitto) -> None:
    registry = CollectorRegistry()
    primary = Primary(
        primary_settings(mosquitto.url, steps_per_second=100.0, outputs_every=5, publish_every=5), registry
    )
    frozen = Twin(twin_settings(mosquitto.url, "frozen", window=5), registry)
    early: list[float] = []

    def enough() -> bool:
        if not early and frozen.outputs.batches >= 5:
            early.append(frozen.outputs.windows["kl"].mean())
        return primary.steps >= 600 and frozen.outputs.batches >= 60

    asyncio.run(run_until([frozen, primary], enough, timeout=120))

    late = frozen.outputs.windows["kl"].mean()
    assert frozen.replica.version == 0
    assert late > 5 * early[0]
    assert late > 0.05
    losses = list(primary.losses)
    assert np.mean(losses[-20:]) < 4.0  # ln(256) = 5.55 nats per byte for a uniform guess
