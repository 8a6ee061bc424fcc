"""Sync policies: when and how a twin's replica follows the primary.

| policy   | on a new primary version | on each tick                                      |
|----------|--------------------------|---------------------------------------------------|
| mirror   | copy it                  | -                                                 |
| periodic | -                        | copy the latest version every `interval` seconds  |
| ema      | -                        | blend toward it every `interval` seconds          |
| frozen   | -                        | -                                                 |

Every policy loads the first version it receives, so a twin always has something to compute with.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from monitor.config import SyncPolicyName
from monitor.twin.reference import WeightSet
from monitor.twin.replica import Replica


@dataclass
class SyncPolicy:
    """Base policy: load the first version, then do nothing (the frozen twin)."""

    name: str = "frozen"

    def on_update(self, replica: Replica, reference: WeightSet, now: float) -> bool:
        """React to a new primary version at monotonic time `now`; return True when the replica changed."""
        if not replica.loaded:
            replica.load(reference)
            return True
        return False

    def on_tick(self, replica: Replica, reference: WeightSet, now: float) -> bool:
        """Run the time-driven part of the policy; return True when the replica changed."""
        return False


@dataclass
class Mirror(SyncPolicy):
    name: str = "mirror"

    def on_update(self, replica: Replica, reference: WeightSet, now: float) -> bool:
        replica.load(reference)
        return True


@dataclass
class Periodic(SyncPolicy):
    name: str = "periodic"
    interval: float = 5.0
    _last: float = field(default=float("-inf"), repr=False)

    def on_update(self, replica: Replica, reference: WeightSet, now: float) -> bool:
        # The first load starts the clock, so the next copy comes one interval later.
        loaded = super().on_update(replica, reference, now)
        if loaded:
            self._last = now
        return loaded

    def on_tick(self, replica: Replica, reference: WeightSet, now: float) -> bool:
        if now - self._last < self.interval or reference.version == replica.version:
            return False
        self._last = now
        replica.load(reference)
        return True


@dataclass
class Ema(SyncPolicy):
    """Exponential moving average: after k ticks on a fixed primary W, replica = W + (1-alpha)^k (R0 - W)."""

    name: str = "ema"
    alpha: float = 0.9
    interval: float = 5.0
    _last: float = field(default=float("-inf"), repr=False)

    def on_update(self, replica: Replica, reference: WeightSet, now: float) -> bool:
        loaded = super().on_update(replica, reference, now)
        if loaded:
            self._last = now
        return loaded

    def on_tick(self, replica: Replica, reference: WeightSet, now: float) -> bool:
        if now - self._last < self.interval:
            return False
        self._last = now
        replica.blend(reference, self.alpha)
        return True


def make_policy(name: SyncPolicyName, *, interval: float, alpha: float) -> SyncPolicy:
    """Return the policy called `name`; raise ValueError listing the valid names otherwise."""
    if name == "mirror":
        return Mirror()
    if name == "periodic":
        return Periodic(interval=interval)
    if name == "ema":
        return Ema(alpha=alpha, interval=interval)
    if name == "frozen":
        return SyncPolicy()
    raise ValueError(f"unknown sync policy {name!r}; choose mirror, periodic, ema or frozen")
