"""The broker configuration of the compose stack, run by Debian's Mosquitto on a free loopback port.

Each test starts `mosquitto -c` on a temporary copy of deploy/mosquitto/mosquitto.conf. The copy rewrites
only the listener (127.0.0.1 and a free port), the persistence folder, the log destination and the user to
run as. The password and ACL files are the repository's own, found through the compose mounts.
Clients are Debian's mosquitto_pub and mosquitto_sub, with the credentials that docker-compose.yml passes
to each service. Retained messages make every delivery check independent of subscription timing.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from monitor.transport.broker_url import parse_broker_url
from monitor.transport.mqtt import Backoff, MqttLink
from tests.compose_file import REPO, load_compose
from tests.servers_prometheus import free_loopback_port

MOSQUITTO_DIR = REPO / "deploy" / "mosquitto"
START_TIMEOUT_SECONDS = 10.0
CLIENT_TIMEOUT_SECONDS = 10.0
SUBSCRIBE_WAIT_SECONDS = 3
"""mosquitto_sub -W: how long a subscriber waits for a message that should arrive (retained: at once)."""

ABSENT_WAIT_SECONDS = 1
"""mosquitto_sub -W for a message that must not exist; retained messages arrive within milliseconds."""

SUB_TIMED_OUT = 27
"""mosquitto_sub exit status when -W expires without a message (Mosquitto 2.0)."""

TOPIC = "llm-twin/v1/bytelm"


@dataclass(frozen=True)
class Broker:
    """A running broker: its port, log file and the password of each MQTT user."""

    port: int
    log_path: Path
    passwords: Mapping[str, str]


def _compose_mosquitto() -> dict[str, Any]:
    service: dict[str, Any] = load_compose()["services"]["mosquitto"]
    return service


def _container_mounts() -> dict[str, Path]:
    """Map container paths of the mosquitto service's bind mounts to repository files."""
    mounts: dict[str, Path] = {}
    for volume in _compose_mosquitto()["volumes"]:
        source, target, *_ = str(volume).split(":")
        if source.startswith("./"):
            mounts[target] = REPO / source
    return mounts


def _compose_passwords() -> dict[str, str]:
    """Return user -> password as docker-compose.yml passes them with no variables set."""
    services = load_compose()["services"]
    passwords: dict[str, str] = {}
    for service in services.values():
        environment = service.get("environment", {})
        if "LLM_TWIN_MQTT_USERNAME" in environment:
            passwords[environment["LLM_TWIN_MQTT_USERNAME"]] = environment["LLM_TWIN_MQTT_PASSWORD"]

    healthcheck = _compose_mosquitto()["healthcheck"]["test"]
    passwords[healthcheck[healthcheck.index("-u") + 1]] = healthcheck[healthcheck.index("-P") + 1]
    return passwords


def native_config(text: str, *, port: int, data_dir: Path, log_path: Path, mounts: Mapping[str, Path]) -> str:
    """Rewrite the container configuration for a loopback broker; every other line stays as shipped."""
    lines: list[str] = []
    for line in text.splitlines():
        words = line.split()
        directive = words[0] if words and not line.startswith("#") else ""
        if directive == "listener":
            line = f"listener {port} 127.0.0.1"
        elif directive == "persistence_location":
            line = f"persistence_location {data_dir}/"
        elif directive in ("password_file", "acl_file"):
            if words[1] not in mounts:
                raise ValueError(
                    f"{directive} {words[1]} is not mounted by the mosquitto service in docker-compose.yml"
                )
            line = f"{directive} {mounts[words[1]]}"
        elif directive == "log_dest":
            line = f"log_dest file {log_path}"
        lines.append(line)

    # Running as the current user keeps Mosquitto from switching to the `mosquitto` account, which could
    # not write the temporary persistence folder.
    lines.append(f"user {getpass.getuser()}")
    return "\n".join(lines) + "\n"


def _wait_for_port(port: int, process: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log = log_path.read_text(errors="replace") if log_path.exists() else "(no log)"
            raise RuntimeError(f"mosquitto exited with status {process.returncode}; log:\n{log}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"mosquitto did not listen on 127.0.0.1:{port} within {START_TIMEOUT_SECONDS} s")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    """The shipped broker configuration on a free loopback port, stopped after the test in any case."""
    binary = shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin")
    if binary is None:
        pytest.fail("mosquitto is not installed; run: apt-get install mosquitto mosquitto-clients")

    port = free_loopback_port()
    log_path = tmp_path / "mosquitto.log"
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    config_path = tmp_path / "mosquitto.conf"
    shipped = (MOSQUITTO_DIR / "mosquitto.conf").read_text(encoding="utf-8")
    config_path.write_text(
        native_config(shipped, port=port, data_dir=data_dir, log_path=log_path, mounts=_container_mounts())
    )

    process = subprocess.Popen([binary, "-c", str(config_path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_for_port(port, process, log_path)
        yield Broker(port, log_path, _compose_passwords())
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _client(
    broker: Broker,
    tool: str,
    user: str | None,
    *arguments: str,
    stdin: bytes | None = None,
    protocol: str = "5",
) -> subprocess.CompletedProcess[bytes]:
    credentials = ["-u", user, "-P", broker.passwords[user]] if user else []
    argv = [tool, "-h", "127.0.0.1", "-p", str(broker.port), "-V", protocol, *credentials, *arguments]
    return subprocess.run(argv, capture_output=True, input=stdin, timeout=CLIENT_TIMEOUT_SECONDS, check=False)


def publish_retained(broker: Broker, user: str, topic: str, payload: bytes) -> subprocess.CompletedProcess[bytes]:
    """Publish a retained QoS 1 message; MQTT 5 makes the broker report a denial in the PUBACK."""
    return _client(broker, "mosquitto_pub", user, "-t", topic, "-q", "1", "-r", "-s", stdin=payload)


def read_retained(
    broker: Broker, user: str, topic: str, wait: int = SUBSCRIBE_WAIT_SECONDS
) -> subprocess.CompletedProcess[bytes]:
    """Subscribe, print the first message's payload and exit; exit status 27 when none came within `wait`."""
    return _client(broker, "mosquitto_sub", user, "-t", topic, "-q", "1", "-C", "1", "-W", str(wait), "-N")


def test_mosquitto_compose_healthcheck_passes(broker: Broker) -> None:
    healthcheck = list(_compose_mosquitto()["healthcheck"]["test"])
    assert healthcheck[0] == "CMD"
    argv = healthcheck[1:]
    argv[argv.index("-p") + 1] = str(broker.port)

    result = subprocess.run(argv, capture_output=True, timeout=CLIENT_TIMEOUT_SECONDS, check=False)

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert re.fullmatch(rb"\d+ seconds\n", result.stdout), result.stdout


def test_mosquitto_twin_receives_primary_weights(broker: Broker) -> None:
    publish_retained(broker, "primary", f"{TOPIC}/weights", b"snapshot-1")

    result = read_retained(broker, "twin", f"{TOPIC}/weights")

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == b"snapshot-1"


@pytest.mark.parametrize("leaf", ["outputs", "status", "weights/chunks"])
def test_mosquitto_twin_receives_primary_topic(broker: Broker, leaf: str) -> None:
    publish_retained(broker, "primary", f"{TOPIC}/{leaf}", leaf.encode())

    result = read_retained(broker, "twin", f"{TOPIC}/{leaf}")

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == leaf.encode()


def test_mosquitto_primary_receives_twin_control(broker: Broker) -> None:
    publish_retained(broker, "twin", f"{TOPIC}/control", b"resync")

    result = read_retained(broker, "primary", f"{TOPIC}/control")

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == b"resync"


def test_mosquitto_monitor_reads_all_topics(broker: Broker) -> None:
    publish_retained(broker, "primary", f"{TOPIC}/status", b"online")

    result = read_retained(broker, "monitor", "llm-twin/#")

    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == b"online"


@pytest.mark.parametrize(
    ("user", "leaf"),
    [
        ("twin", "weights"),
        ("twin", "outputs"),
        ("twin", "status"),
        ("primary", "control"),
        ("monitor", "weights"),
        ("monitor", "control"),
    ],
)
def test_mosquitto_acl_rejects_publish(broker: Broker, user: str, leaf: str) -> None:
    topic = f"{TOPIC}/{leaf}"

    published = publish_retained(broker, user, topic, b"forged")
    delivered = read_retained(broker, "monitor", topic, wait=ABSENT_WAIT_SECONDS)

    assert b"Not authorized" in published.stderr, published.stderr
    assert delivered.returncode == SUB_TIMED_OUT, delivered.stdout


def test_mosquitto_acl_hides_weights_from_primary(broker: Broker) -> None:
    publish_retained(broker, "primary", f"{TOPIC}/weights", b"snapshot-1")

    result = read_retained(broker, "primary", f"{TOPIC}/weights", wait=ABSENT_WAIT_SECONDS)

    assert result.returncode == SUB_TIMED_OUT, result.stdout


def test_mosquitto_rejects_anonymous_client(broker: Broker) -> None:
    result = _client(broker, "mosquitto_pub", None, "-t", f"{TOPIC}/control", "-m", "x")

    assert result.returncode != 0
    assert b"not authori" in result.stderr.lower(), result.stderr


def test_mosquitto_rejects_wrong_password(broker: Broker) -> None:
    wrong = Broker(broker.port, broker.log_path, {"twin": "not-the-password"})

    result = _client(wrong, "mosquitto_pub", "twin", "-t", f"{TOPIC}/control", "-m", "x")

    assert result.returncode != 0
    assert b"not authori" in result.stderr.lower(), result.stderr


def test_mosquitto_accepts_message_at_primary_limit(broker: Broker) -> None:
    limit = int(load_compose()["services"]["primary"]["environment"]["LLM_TWIN_MAX_MESSAGE_BYTES"])
    payload = b"w" * limit

    published = publish_retained(broker, "primary", f"{TOPIC}/weights", payload)
    received = _client(broker, "mosquitto_sub", "twin", "-t", f"{TOPIC}/weights", "-C", "1", "-W", "5", "-N")

    assert published.returncode == 0, published.stderr
    assert len(received.stdout) == limit


def test_mosquitto_disconnects_client_over_max_packet_size(broker: Broker) -> None:
    max_packet_size = int(_directives()["max_packet_size"])
    payload = b"w" * (max_packet_size + 1)

    # MQTT 3.1.1, because an MQTT 5 client learns the limit from CONNACK and drops the message itself,
    # which would not exercise the broker.
    published = _client(
        broker,
        "mosquitto_pub",
        "primary",
        "-t",
        f"{TOPIC}/weights",
        "-q",
        "1",
        "-r",
        "-s",
        stdin=payload,
        protocol="311",
    )
    received = read_retained(broker, "twin", f"{TOPIC}/weights", wait=ABSENT_WAIT_SECONDS)

    assert published.returncode != 0, published.stderr
    assert "disconnected due to oversize packet" in broker.log_path.read_text(errors="replace")
    assert received.returncode == SUB_TIMED_OUT, len(received.stdout)


def _directives() -> dict[str, str]:
    """Return directive -> value of the shipped mosquitto.conf (each directive appears once there)."""
    directives: dict[str, str] = {}
    for line in (MOSQUITTO_DIR / "mosquitto.conf").read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition(" ")
            directives[name] = value.strip()
    return directives


def test_mosquitto_packet_limit_fits_primary_chunks() -> None:
    limit = int(load_compose()["services"]["primary"]["environment"]["LLM_TWIN_MAX_MESSAGE_BYTES"])

    max_packet_size = int(_directives()["max_packet_size"])

    # Room for the fixed header, the topic and MQTT 5 properties on top of the payload.
    assert max_packet_size >= limit + 64 * 1024


@pytest.mark.parametrize(
    ("directive", "expected"),
    [("allow_anonymous", "false"), ("set_tcp_nodelay", "true"), ("persistence", "true")],
)
def test_mosquitto_config_sets_directive(directive: str, expected: str) -> None:
    directives = _directives()

    assert directives.get(directive) == expected


def test_mosquitto_config_raises_queue_limit() -> None:
    directives = _directives()

    # Mosquitto's default is 1000 messages, which drops QoS 1 updates to a twin that falls behind.
    assert int(directives["max_queued_messages"]) > 1000
    assert int(directives["max_queued_bytes"]) > 0


def test_mosquitto_password_file_matches_compose_users() -> None:
    lines = (MOSQUITTO_DIR / "passwd").read_text(encoding="utf-8").splitlines()

    users = {line.split(":", 1)[0] for line in lines if line}

    assert users == set(_compose_passwords())


def test_mosquitto_password_file_contains_only_hashes() -> None:
    lines = [line for line in (MOSQUITTO_DIR / "passwd").read_text(encoding="utf-8").splitlines() if line]

    # $7$ is the PBKDF2-SHA512 format that mosquitto_passwd 2.0 writes.
    unhashed = [line.split(":", 1)[0] for line in lines if not re.fullmatch(r"[^:]+:\$7\$\d+\$[^$]+\$[^$]+", line)]

    assert lines
    assert unhashed == []


def test_link_names_credentials_when_refused(broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    async def ignore(topic: str, payload: bytes) -> None:
        return None

    link = MqttLink(
        parse_broker_url(f"mqtt://127.0.0.1:{broker.port}"),
        "refused-test",
        subscriptions=[(f"{TOPIC}/weights", 1)],
        on_message=ignore,
        username="twin",
        password="not-the-password",
        backoff=Backoff(base_seconds=0.05, cap_seconds=0.1),
    )

    async def scenario() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(link.run(stop))
        await asyncio.sleep(1.0)
        stop.set()
        await task

    with caplog.at_level(logging.WARNING, logger="monitor.transport.mqtt"):
        asyncio.run(scenario())

    failures = [record.getMessage() for record in caplog.records if "connect failed" in record.getMessage()]
    assert failures
    assert "not authori" in failures[0].lower()
    assert "check --mqtt-username and LLM_TWIN_MQTT_PASSWORD" in failures[0]
    assert "not-the-password" not in caplog.text
    assert link.connections == 0
