"""Twin intake against a raw MQTT subscriber on the same Mosquitto, in the same run.

For each repeat, a publisher process sends the same stream of real outputs messages (contexts and
log-probabilities of the reference model, about 17 KB each) twice: once to a bare aiomqtt subscriber that
only counts what arrives (the baseline), once to a twin that decodes, validates, runs its replica and computes
every divergence. Reported: messages per second and one-way latency percentiles of both, and their ratio.

Usage, from the repository root: python -m benchmarks.twin_intake [--messages 3000] [--rate 200] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import platform
import statistics
import tempfile
import time
from pathlib import Path

import aiomqtt
import numpy as np
from prometheus_client import CollectorRegistry

from monitor.analytics.divergence import log_softmax
from monitor.config import TwinSettings
from monitor.model.bytelm import ByteMLP, ByteMLPConfig
from monitor.primary.updates import PublishedState
from monitor.topics import Topics
from monitor.twin.service import Twin
from monitor.wire.envelope import Architecture
from tests.mosquitto import Mosquitto

MODEL_ID = "bench"
BATCH = 16


def _publisher(port: int, messages: int, rate: float, ready: multiprocessing.synchronize.Event) -> None:
    """Publish a snapshot, then `messages` outputs batches at `rate` per second (0 = as fast as possible)."""
    config = ByteMLPConfig()
    model = ByteMLP(config)
    weights = model.init_weights(0)
    architecture = Architecture(
        context_size=config.context_size, embedding_dim=config.embedding_dim, hidden_dim=config.hidden_dim
    )
    state = PublishedState(MODEL_ID, architecture, model.specs(), weights)
    topics = Topics(MODEL_ID)
    rng = np.random.default_rng(0)
    contexts = [rng.integers(0, 256, (BATCH, config.context_size), dtype=np.uint8) for _ in range(64)]
    logprobs = [log_softmax(model.forward(weights, batch)) for batch in contexts]

    async def run() -> None:
        async with aiomqtt.Client("127.0.0.1", port, socket_options=[(6, 1, 1)]) as client:
            await client.publish(topics.status, state.status_message(online=True), qos=1, retain=True)
            for payload in state.snapshot(64 * 2**20):
                await client.publish(topics.weights, payload, qos=1, retain=False)
            ready.wait(30)
            await asyncio.sleep(0.5)
            period = 1.0 / rate if rate else 0.0
            start = time.monotonic()
            for index in range(messages):
                # A fresh envelope per message, so its created_ns is the send time.
                payload = state.outputs_message(contexts[index % 64], logprobs[index % 64])
                await client.publish(topics.outputs, payload, qos=0)
                if period:
                    await asyncio.sleep(max(0.0, start + (index + 1) * period - time.monotonic()))

    asyncio.run(run())


def _created_ns(payload: bytes) -> int:
    length = int.from_bytes(payload[:8], "little")
    header = json.loads(payload[8 : 8 + length])
    return int(json.loads(header["__metadata__"]["llm_twin"])["created_ns"])


async def _raw_subscriber(
    port: int, messages: int, started: multiprocessing.synchronize.Event
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    first = last = 0.0
    async with aiomqtt.Client("127.0.0.1", port, socket_options=[(6, 1, 1)]) as client:
        await client.subscribe(Topics(MODEL_ID).outputs)
        started.set()
        async for message in client.messages:
            now = time.time_ns()
            payload = bytes(message.payload) if isinstance(message.payload, bytes | bytearray) else b""
            latencies.append((now - _created_ns(payload)) / 1e9)
            first = first or time.monotonic()
            last = time.monotonic()
            if len(latencies) >= messages:
                break
    return len(latencies) / max(last - first, 1e-9), latencies


async def _twin(url: str, messages: int, started: multiprocessing.synchronize.Event) -> tuple[float, list[float]]:
    twin = Twin(TwinSettings(broker=url, model_id=MODEL_ID, twin_id="bench", window=100), CollectorRegistry())
    latencies: list[float] = []
    marks: list[float] = []
    record = twin.outputs.record

    def timed_record(signals, cause):  # type: ignore[no-untyped-def]
        used = record(signals, cause)
        marks.append(time.monotonic())
        latencies.append((time.time_ns() - timed_record.created_ns) / 1e9)  # type: ignore[attr-defined]
        return used

    on_outputs = twin._on_outputs

    async def tracked(payload: bytes) -> None:
        timed_record.created_ns = _created_ns(payload)  # type: ignore[attr-defined]
        await on_outputs(payload)

    twin.outputs.record = timed_record  # type: ignore[method-assign]
    twin._on_outputs = tracked  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(twin.run(stop))
    while twin.replica.weights is None:
        await asyncio.sleep(0.01)
    started.set()
    deadline = time.monotonic() + 120
    while len(marks) < messages and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        if marks and time.monotonic() - marks[-1] > 3:
            break  # the stream ended with losses
    stop.set()
    await task
    return len(marks) / max(marks[-1] - marks[0], 1e-9), latencies


def _measure(kind: str, port: int, url: str, messages: int, rate: float) -> tuple[float, list[float]]:
    started = multiprocessing.Event()
    publisher = multiprocessing.Process(target=_publisher, args=(port, messages, rate, started))
    publisher.start()
    try:
        if kind == "raw":
            return asyncio.run(asyncio.wait_for(_raw_subscriber(port, messages, started), 180))
        return asyncio.run(_twin(url, messages, started))
    finally:
        publisher.join(60)
        if publisher.is_alive():
            publisher.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--rate", type=float, default=0.0, help="messages per second; 0 = as fast as possible")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        broker = Mosquitto(Path(folder), persistence=False)
        broker.start()
        try:
            results: dict[str, list[tuple[float, float, float]]] = {"raw": [], "twin": []}
            for repeat in range(args.repeats):
                for kind in ("raw", "twin"):
                    rate, latencies = _measure(kind, broker.port, broker.url, args.messages, args.rate)
                    p50, p99 = np.quantile(latencies, [0.5, 0.99])
                    results[kind].append((rate, p50 * 1e3, p99 * 1e3))
                    print(
                        f"repeat {repeat} {kind:4s}: {rate:8.0f} msg/s, p50 {p50 * 1e3:6.2f} ms, p99 {p99 * 1e3:6.2f} ms, received {len(latencies)}"
                    )
        finally:
            broker.stop()

    print(
        f"\nmachine: {platform.processor() or platform.machine()}, {multiprocessing.cpu_count()} cores, Python {platform.python_version()}, numpy {np.__version__}"
    )
    print(
        f"{args.messages} outputs messages of {BATCH} positions per repeat, publish rate {args.rate or 'unthrottled'}, {args.repeats} repeats, medians:"
    )
    medians = {kind: [statistics.median(row[i] for row in rows) for i in range(3)] for kind, rows in results.items()}
    for kind, (rate, p50, p99) in medians.items():
        print(f"  {kind:4s}: {rate:8.0f} msg/s, p50 {p50:6.2f} ms, p99 {p99:6.2f} ms")
    raw, twin = medians["raw"], medians["twin"]
    print(
        f"  twin / raw: throughput {twin[0] / raw[0]:.2f}x, p50 latency {twin[1] / raw[1]:.2f}x, p99 latency {twin[2] / raw[2]:.2f}x"
    )


if __name__ == "__main__":
    main()
