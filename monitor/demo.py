"""`llm-twin demo`: one primary and four twins (mirror, ema, frozen, int8) over an embedded broker.

Everything runs in one process on one event loop and exports to one /metrics endpoint, so the whole product
can be tried with nothing installed but the package.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from typing import TextIO

from prometheus_client import CollectorRegistry

from monitor.config import DemoSettings, PrimarySettings, ReplicaDtype, SyncPolicyName, TwinSettings
from monitor.primary.service import Primary
from monitor.transport.embedded_broker import EmbeddedBroker
from monitor.twin.service import Twin

logger = logging.getLogger(__name__)

# (twin id, sync policy, replica dtype): the three policies of the product contract, plus a quantized mirror
# whose divergence comes from its own precision, not from lag.
DEMO_TWINS: tuple[tuple[str, SyncPolicyName, ReplicaDtype], ...] = (
    ("mirror", "mirror", "float32"),
    ("ema", "ema", "float32"),
    ("frozen", "frozen", "float32"),
    ("int8", "mirror", "int8"),
)


def _twin_settings(
    settings: DemoSettings, broker: str, twin_id: str, policy: SyncPolicyName, dtype: ReplicaDtype
) -> TwinSettings:
    return TwinSettings(
        broker=broker,
        model_id=settings.model_id,
        twin_id=twin_id,
        sync_policy=policy,
        replica_dtype=dtype,
        sync_interval=settings.sync_interval,
        ema_alpha=settings.ema_alpha,
        max_message_bytes=settings.max_message_bytes,
        mqtt_username=settings.mqtt_username,
        mqtt_password=settings.mqtt_password,
    )


def _primary_settings(settings: DemoSettings, broker: str) -> PrimarySettings:
    fields = settings.model_dump(include=set(PrimarySettings.model_fields) - {"broker"})
    return PrimarySettings(broker=broker, **fields)


def format_summary(elapsed: float, primary: Primary, twins: list[Twin]) -> str:
    """Return one line: the primary's loss and version, then lag, KL, top-1 agreement and weight distance per twin."""
    loss = sum(primary.losses) / len(primary.losses) if primary.losses else float("nan")
    parts = [f"[{elapsed:5.0f}s] primary loss {loss:.3f} nats/byte, version {primary.state.version}"]
    for twin in twins:
        windows = twin.outputs.windows
        if not twin.replica.loaded or windows["kl"].count == 0:
            parts.append(f"{twin.settings.twin_id}: waiting for weights")
            continue
        lag = max(0, twin.announced_version - twin.replica.version)
        parts.append(
            f"{twin.settings.twin_id}: lag {lag}, KL {windows['kl'].mean():.2e}, "
            f"top1 {windows['top1'].mean():.2f}, dist {twin.weight_distance:.2e}"
        )
    return " | ".join(parts)


async def run_demo(
    settings: DemoSettings, registry: CollectorRegistry, stop: asyncio.Event, out: TextIO = sys.stdout
) -> None:
    """Run the demo until `stop` is set, printing a summary line every `settings.summary_every` seconds."""
    async with contextlib.AsyncExitStack() as stack:
        broker = settings.broker
        if broker is None:
            embedded = await stack.enter_async_context(EmbeddedBroker())
            broker = embedded.url

        twins = [Twin(_twin_settings(settings, broker, *spec), registry) for spec in DEMO_TWINS]
        primary = Primary(_primary_settings(settings, broker), registry)
        names = ", ".join(twin_id for twin_id, _, _ in DEMO_TWINS)
        print(f"llm-twin demo: broker {broker}, twins {names}; Ctrl-C stops", file=out, flush=True)

        started = time.monotonic()
        async with asyncio.TaskGroup() as tasks:
            for twin in twins:
                tasks.create_task(twin.run(stop))
            tasks.create_task(primary.run(stop))
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=settings.summary_every)
                print(format_summary(time.monotonic() - started, primary, twins), file=out, flush=True)
