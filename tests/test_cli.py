"""The `llm-twin` command line as a user runs it: real processes, real exit codes."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable

import aiomqtt
import pytest

from monitor.metrics import family_names
from monitor.wire.codec import decode
from monitor.wire.envelope import Envelope
from tests.contract import CONTRACT_METRICS
from tests.mosquitto import Mosquitto, free_port


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "monitor", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["twin", "--sync-policy", "sometimes"], {}, "invalid --sync-policy 'sometimes'"),
        (["twin", "--ema-alpha", "1.5"], {}, "invalid --ema-alpha '1.5'"),
        (["twin", "--replica-dtype", "int4"], {}, "invalid --replica-dtype 'int4'"),
        (["twin"], {"LLM_TWIN_METRICS_PORT": "http"}, "invalid LLM_TWIN_METRICS_PORT 'http'"),
        (["primary", "--broker", "tcp://127.0.0.1:1883"], {}, "invalid --broker"),
        (["primary", "--corpus", "/no/such/corpus"], {}, "'/no/such/corpus' not found"),
        (["twin", "--twin-id", "a/b"], {}, "invalid --twin-id 'a/b'"),
        (["twin", "--checkpoint", "/no/such/dir/twin.ckpt"], {}, "checkpoint directory '/no/such/dir' not found"),
        (["twin", "--broker", "mqtt://user:secret@127.0.0.1"], {}, "invalid --broker 'mqtt://***@127.0.0.1'"),
        (["twin"], {"LLM_TWIN_MQTT_PASSWORD": "secret"}, "LLM_TWIN_MQTT_PASSWORD is set but --mqtt-username is not"),
        (["twin"], {"LLM_TWIN_DETECTOR_PARAMS": "[1, 2]"}, "invalid LLM_TWIN_DETECTOR_PARAMS [1, 2]"),
    ],
)
def test_cli_invalid_option_exits_2(args: list[str], env: dict[str, str], expected: str) -> None:
    result = _run(*args, env=env)

    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "secret" not in result.stderr


def test_contract_metrics_all_defined() -> None:
    defined = set(family_names())

    missing = [name for name in CONTRACT_METRICS if name not in defined]

    assert missing == []


def _missing_metrics(exposition: str) -> list[str]:
    exported = {
        line.split("{")[0].split(" ")[0].removesuffix("_bucket")
        for line in exposition.splitlines()
        if not line.startswith("#")
    }
    return [name for name in CONTRACT_METRICS if name not in exported]


def _scrape_until_complete(port: int, deadline: float) -> str:
    """Scrape the demo's /metrics until every contract metric is there or the deadline passes; return the last body."""
    exposition = ""
    while time.monotonic() < deadline:
        time.sleep(1.0)
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
                exposition = response.read().decode()
            if not _missing_metrics(exposition):
                break
    return exposition


def test_demo_runs_and_exports_every_contract_metric() -> None:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "monitor",
            "demo",
            "--duration",
            "20",
            "--metrics-port",
            str(port),
            "--summary-every",
            "4",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        exposition = _scrape_until_complete(port, deadline=time.monotonic() + 18)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)

    assert process.returncode == 0, stderr[-3000:]
    assert _missing_metrics(exposition) == []
    summaries = [line for line in stdout.splitlines() if "primary loss" in line]
    assert len(summaries) >= 3
    assert "mirror: lag" in summaries[-1]
    assert 'llm_twin_samples_compared_total{model_id="bytelm",twin_id="frozen"}' in exposition


def test_grafana_push_without_token_exits_2() -> None:
    environment = {key: value for key, value in os.environ.items() if key != "LLM_TWIN_GRAFANA_TOKEN"}

    result = subprocess.run(
        [sys.executable, "-m", "monitor", "grafana", "push", "--grafana-url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
    )

    assert result.returncode == 2
    assert "LLM_TWIN_GRAFANA_TOKEN" in result.stderr


@pytest.mark.broker
def test_primary_sigterm_publishes_offline_status(mosquitto: Mosquitto) -> None:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "monitor",
            "primary",
            "--broker",
            mosquitto.url,
            "--metrics-port",
            "0",
            "--hidden-dim",
            "32",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        status = _retained_status(mosquitto, lambda envelope: envelope.status == "online")
        assert status.manifest is not None
        assert all(entry.digest for entry in status.manifest)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)

    assert process.returncode == 0, stderr[-2000:]
    offline = _retained_status(mosquitto, lambda envelope: True)
    assert offline.status == "offline"
    assert offline.session_id == status.session_id


def _retained_status(mosquitto: Mosquitto, accept: Callable[[Envelope], bool]) -> Envelope:
    """Read the retained status of model `bytelm` until `accept` takes it."""

    async def read() -> Envelope:
        deadline = time.monotonic() + 30
        while True:
            async with aiomqtt.Client("127.0.0.1", mosquitto.port) as client:
                await client.subscribe("llm-twin/v1/bytelm/status", qos=1)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        async for message in client.messages:
                            envelope = decode(bytes(message.payload), max_bytes=1 << 20).envelope  # type: ignore[arg-type]
                            if accept(envelope):
                                return envelope
            assert time.monotonic() < deadline, "no matching retained status"

    return asyncio.run(read())


def test_unknown_environment_variable_logged() -> None:
    result = _run(
        "primary",
        "--duration",
        "0.5",
        "--metrics-port",
        "0",
        "--broker",
        f"mqtt://127.0.0.1:{free_port()}",
        env={"LLM_TWIN_BOGUS_OPTION": "1"},
    )

    assert result.returncode == 0, result.stderr[-2000:]
    ignored = [line for line in result.stderr.splitlines() if "ignored environment variables" in line]
    assert len(ignored) == 1
    assert "'LLM_TWIN_BOGUS_OPTION'" in ignored[0]
    assert "not options of llm-twin primary" in ignored[0]


def test_alert_sink_help_lists_only_its_options() -> None:
    result = _run("alert-sink", "--help")

    assert result.returncode == 0
    assert "--metrics-port" in result.stdout
    assert "--broker" not in result.stdout
    assert "--mqtt-username" not in result.stdout
