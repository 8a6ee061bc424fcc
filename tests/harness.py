"""Run primaries and twins in one event loop against a real broker, until a condition holds."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Protocol

from monitor.config import PrimarySettings, TwinSettings

SMALL_MODEL = {"context": 8, "embedding_dim": 8, "hidden_dim": 32}


class Service(Protocol):
    async def run(self, stop: asyncio.Event) -> None: ...


def primary_settings(broker: str, **overrides: Any) -> PrimarySettings:
    values: dict[str, Any] = {
        "broker": broker,
        "model_id": "testlm",
        "steps_per_second": 100.0,
        "publish_every": 2,
        "snapshot_every": 1000,
        "batch_size": 16,
        **SMALL_MODEL,
    }
    values.update(overrides)
    return PrimarySettings(**values)


def twin_settings(broker: str, twin_id: str, **overrides: Any) -> TwinSettings:
    values: dict[str, Any] = {"broker": broker, "model_id": "testlm", "twin_id": twin_id, "sync_policy": twin_id}
    values.update(overrides)
    return TwinSettings(**values)


async def run_until(
    services: list[Service], condition: Callable[[], bool], *, timeout: float, stop: asyncio.Event | None = None
) -> float:
    """Run `services` until `condition()` is true; return the seconds it took, or raise TimeoutError."""
    stop = stop or asyncio.Event()
    started = time.monotonic()
    async with asyncio.TaskGroup() as tasks:
        for service in services:
            tasks.create_task(service.run(stop))
        try:
            while not condition():
                if time.monotonic() - started > timeout:
                    raise TimeoutError(f"condition not met within {timeout}s")
                await asyncio.sleep(0.02)
        finally:
            stop.set()
    return time.monotonic() - started
