"""Process plumbing shared by the services: the /metrics endpoint and clean shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, start_http_server

logger = logging.getLogger(__name__)


@contextmanager
def metrics_server(host: str, port: int, registry: CollectorRegistry) -> Iterator[int]:
    """Serve `registry` at http://host:port/metrics for the duration of the block; yield the bound port."""
    try:
        server, thread = start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        raise OSError(
            f"cannot serve /metrics on {host}:{port}: {exc.strerror or exc}; check --metrics-host (an address of this "
            "machine, such as 127.0.0.1) and --metrics-port (a free port, or 0 to pick one)"
        ) from exc
    bound = int(server.server_port)
    logger.info("metrics listening url=http://%s:%d/metrics", host, bound)
    try:
        yield bound
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


async def run_until_stopped(main: Callable[[asyncio.Event], Awaitable[None]], duration: float | None) -> None:
    """Run `main(stop)`; set `stop` on SIGINT, SIGTERM or after `duration` seconds."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, _request_stop, stop, signal.Signals(signum).name)
    if duration is not None:
        loop.call_later(duration, _request_stop, stop, f"--duration {duration:g}s elapsed")
    try:
        await main(stop)
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)


def _request_stop(stop: asyncio.Event, why: str) -> None:
    if not stop.is_set():
        logger.info("stopping: %s", why)
        stop.set()
