"""Replica precision and the sync policies that decide when a replica follows the primary."""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest

from monitor.config import ReplicaDtype, SyncPolicyName
from monitor.model.base import Weights
from monitor.twin.policies import Ema, Mirror, Periodic, SyncPolicy, make_policy
from monitor.twin.reference import WeightSet
from monitor.twin.replica import INT8_LEVELS, Replica, quantize

FLOAT32_EPS = float(np.finfo(np.float32).eps)
FLOAT16_UNIT_ROUNDOFF = 2.0**-11
POLICY_NAMES: tuple[SyncPolicyName, ...] = ("mirror", "periodic", "ema", "frozen")


def _weights(seed: int, scale: float = 1.0) -> Weights:
    rng = np.random.default_rng(seed)
    return {
        "embedding": (scale * rng.standard_normal((16, 4))).astype(np.float32),
        "output.bias": (scale * rng.standard_normal(8)).astype(np.float32),
    }


def _version(version: int, seed: int | None = None) -> WeightSet:
    """Return a read-only weight set of primary `version`, published at `version` seconds."""
    weights = _weights(version if seed is None else seed)
    for array in weights.values():
        array.flags.writeable = False
    return WeightSet("0123456789abcdef", version, version * 1_000_000_000, weights, f"{version:032x}")


def _bytes(weights: Weights | None) -> dict[str, bytes]:
    assert weights is not None
    return {name: array.tobytes() for name, array in weights.items()}


# quantize.


def test_quantize_float32_keeps_weights() -> None:
    weights = _weights(0)

    quantized = quantize(weights, "float32")

    assert _bytes(quantized) == _bytes(weights)


def test_quantize_float16_relative_error_bound() -> None:
    # Seed 1 draws magnitudes from 0.008 to 3, inside the normal float16 range where the bound is relative.
    weights = _weights(1)

    quantized = quantize(weights, "float16")

    for name, array in weights.items():
        relative = np.abs(quantized[name].astype(np.float64) - array) / np.abs(array)
        assert float(relative.max()) <= FLOAT16_UNIT_ROUNDOFF, name
        assert quantized[name].dtype == np.float32, name


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e3])
def test_quantize_int8_error_bound(scale: float) -> None:
    weights = _weights(2, scale)

    quantized = quantize(weights, "int8")

    for name, array in weights.items():
        peak = float(np.max(np.abs(array)))
        error = float(np.max(np.abs(quantized[name].astype(np.float64) - array)))
        # Half a step of max|w| / 127, plus the float32 rounding of w / scale and level * scale.
        assert error <= peak / (2 * INT8_LEVELS) + 4 * FLOAT32_EPS * peak, name
        assert quantized[name].dtype == np.float32, name


def test_quantize_int8_uses_at_most_255_levels() -> None:
    weights = _weights(3)

    quantized = quantize(weights, "int8")

    for name, array in quantized.items():
        assert len(np.unique(array)) <= 2 * INT8_LEVELS + 1, name


def test_quantize_int8_keeps_zero_tensor() -> None:
    weights = {"bias": np.zeros(8, np.float32)}

    quantized = quantize(weights, "int8")

    assert not quantized["bias"].any()


# Replica.


def test_replica_load_takes_version_and_time() -> None:
    replica = Replica("float32")
    source = _version(3)

    replica.load(source)

    assert replica.loaded
    assert replica.version == 3
    assert replica.created_ns == 3_000_000_000
    assert replica.changes == 1
    assert _bytes(replica.weights) == _bytes(source.weights)


@pytest.mark.parametrize("dtype", ["float16", "int8"])
def test_replica_load_quantizes(dtype: ReplicaDtype) -> None:
    replica = Replica(dtype)
    source = _version(1)

    replica.load(source)

    assert _bytes(replica.weights) == _bytes(quantize(source.weights, dtype))


def test_replica_load_keeps_previous_dict_for_readers() -> None:
    replica = Replica("float32")
    replica.load(_version(1))
    held = replica.weights
    before = _bytes(held)

    replica.load(_version(2))

    assert replica.weights is not held
    assert _bytes(held) == before


def test_replica_blend_formula() -> None:
    replica = Replica("float32")
    start, source = _version(1), _version(2)
    replica.load(start)
    alpha = 0.9

    replica.blend(source, alpha)

    assert replica.weights is not None
    for name, current in start.weights.items():
        expected = alpha * source.weights[name].astype(np.float64) + (1 - alpha) * current.astype(np.float64)
        scale = float(np.max(np.abs(expected)))
        np.testing.assert_allclose(replica.weights[name], expected, rtol=0, atol=4 * FLOAT32_EPS * scale)
    assert replica.version == 2
    assert replica.created_ns == source.created_ns
    assert replica.changes == 2


def test_replica_blend_requantizes() -> None:
    replica = Replica("int8")
    replica.load(_version(1))

    replica.blend(_version(2), 0.5)

    assert replica.weights is not None
    for name, array in replica.weights.items():
        assert _bytes(quantize({name: array}, "int8")) == _bytes({name: array}), name


def test_replica_blend_loads_when_empty() -> None:
    replica = Replica("float32")
    source = _version(4)

    replica.blend(source, 0.1)

    assert _bytes(replica.weights) == _bytes(source.weights)


# Policies: one contract for every policy, then each policy's own rule.


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_policy_loads_first_version(name: SyncPolicyName) -> None:
    policy = make_policy(name, interval=5.0, alpha=0.5)
    replica = Replica("float32")

    changed = policy.on_update(replica, _version(1), now=0.0)

    assert changed is True
    assert replica.version == 1


@pytest.mark.parametrize("name", POLICY_NAMES)
def test_policy_name_matches_request(name: SyncPolicyName) -> None:
    policy = make_policy(name, interval=5.0, alpha=0.5)

    assert policy.name == name


def test_make_policy_passes_settings() -> None:
    periodic = make_policy("periodic", interval=3.0, alpha=0.5)
    ema = make_policy("ema", interval=2.0, alpha=0.25)

    assert isinstance(periodic, Periodic)
    assert periodic.interval == 3.0
    assert isinstance(ema, Ema)
    assert (ema.interval, ema.alpha) == (2.0, 0.25)


def test_make_policy_rejects_unknown_name() -> None:
    name: Any = "shadow"

    with pytest.raises(
        ValueError, match=re.escape("unknown sync policy 'shadow'; choose mirror, periodic, ema or frozen")
    ):
        make_policy(name, interval=5.0, alpha=0.5)


def test_mirror_loads_every_update() -> None:
    policy, replica = Mirror(), Replica("float32")

    changes = [policy.on_update(replica, _version(version), now=float(version)) for version in range(1, 6)]

    assert changes == [True] * 5
    assert replica.version == 5
    assert replica.changes == 5
    assert _bytes(replica.weights) == _bytes(_version(5).weights)


def test_mirror_tick_changes_nothing() -> None:
    policy, replica = Mirror(), Replica("float32")
    policy.on_update(replica, _version(1), now=0.0)

    changed = policy.on_tick(replica, _version(2), now=100.0)

    assert changed is False
    assert replica.version == 1


def test_periodic_update_after_first_changes_nothing() -> None:
    policy, replica = Periodic(interval=5.0), Replica("float32")
    policy.on_update(replica, _version(1), now=0.0)

    changed = policy.on_update(replica, _version(2), now=1.0)

    assert changed is False
    assert replica.version == 1


def test_periodic_loads_only_after_interval() -> None:
    policy, replica = Periodic(interval=5.0), Replica("float32")
    policy.on_update(replica, _version(1), now=0.0)
    assert policy.on_tick(replica, _version(2), now=10.0) is True

    early = policy.on_tick(replica, _version(3), now=14.9)
    due = policy.on_tick(replica, _version(3), now=15.0)

    assert early is False
    assert due is True
    assert replica.version == 3


def test_periodic_skips_tick_without_new_version() -> None:
    policy, replica = Periodic(interval=5.0), Replica("float32")
    policy.on_update(replica, _version(1), now=0.0)

    changed = policy.on_tick(replica, _version(1), now=100.0)

    assert changed is False
    assert replica.changes == 1


def test_periodic_waits_interval_after_first_load() -> None:
    policy, replica = Periodic(interval=5.0), Replica("float32")
    policy.on_update(replica, _version(1), now=0.0)

    changed = policy.on_tick(replica, _version(2), now=0.25)

    assert changed is False
    assert replica.version == 1


def test_ema_closed_form_after_ticks() -> None:
    alpha, ticks = 0.3, 12
    policy, replica = Ema(alpha=alpha, interval=1.0), Replica("float32")
    start, target = _version(1), _version(2)
    policy.on_update(replica, start, now=0.0)

    for tick in range(ticks):
        policy.on_tick(replica, target, now=float(tick + 1))

    assert replica.weights is not None
    for name, reached in replica.weights.items():
        primary = target.weights[name].astype(np.float64)
        expected = (1 - alpha) ** ticks * (start.weights[name].astype(np.float64) - primary)
        # Each blend rounds once in float32; `ticks` roundings of values below `scale` bound the drift.
        scale = max(float(np.max(np.abs(primary))), float(np.max(np.abs(start.weights[name]))))
        np.testing.assert_allclose(reached - primary, expected, rtol=0, atol=2 * ticks * FLOAT32_EPS * scale)


def test_ema_blends_only_after_interval() -> None:
    policy, replica = Ema(alpha=0.5, interval=5.0), Replica("float32")
    policy.on_update(replica, _version(1), now=0.0)
    assert policy.on_tick(replica, _version(2), now=10.0) is True

    early = policy.on_tick(replica, _version(2), now=14.9)
    due = policy.on_tick(replica, _version(2), now=15.0)

    assert early is False
    assert due is True
    assert replica.changes == 3


def test_ema_update_after_first_changes_nothing() -> None:
    policy, replica = Ema(alpha=0.5, interval=5.0), Replica("float32")
    policy.on_update(replica, _version(1), now=0.0)

    changed = policy.on_update(replica, _version(2), now=1.0)

    assert changed is False
    assert replica.version == 1


def test_frozen_never_moves_after_first_load() -> None:
    policy, replica = SyncPolicy(), Replica("float32")
    policy.on_update(replica, _version(1), now=0.0)
    first = _bytes(replica.weights)

    changes = []
    for version in range(2, 8):
        changes.append(policy.on_update(replica, _version(version), now=float(version)))
        changes.append(policy.on_tick(replica, _version(version), now=1000.0 * version))

    assert changes == [False] * 12
    assert replica.version == 1
    assert replica.changes == 1
    assert _bytes(replica.weights) == first
