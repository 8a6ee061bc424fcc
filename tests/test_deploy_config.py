"""The compose stack's files: docker-compose.yml, Dockerfile, .dockerignore, the Prometheus scrape
configuration and the Alertmanager configuration, including a real Alertmanager that routes alerts to a
webhook.

docker-compose.yml is validated by check-jsonschema against the Compose Specification schema that the
package ships (no Docker engine or Compose plugin is needed), then its structure is checked against the
product: one Dockerfile for every llm-twin service, healthchecks, ports, mounts, and environment
variables that the settings models of `llm-twin` accept.
"""

from __future__ import annotations

import fnmatch
import http.server
import importlib.util
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from monitor.config import PrimarySettings, ServiceSettings, TwinSettings
from tests.compose_file import COMPOSE_PATH, REPO, llm_twin_services, load_compose, native_invocation
from tests.servers_prometheus import RunningServer, running_alertmanager

PROMETHEUS_CONFIG = REPO / "deploy" / "prometheus" / "prometheus.yml"
ALERTMANAGER_CONFIG = REPO / "deploy" / "alertmanager" / "alertmanager.yml"
TOOL_TIMEOUT_SECONDS = 60.0
DELIVERY_TIMEOUT_SECONDS = 20.0
"""Bound on an Alertmanager notification; the critical route waits 5 seconds before its first one."""

ALERT_SINK_URL = "http://alert-sink:9400/alerts"
METRICS_PORT = "9400"

# What each llm-twin service of the stack must be: its command and the settings that make its role.
EXPECTED_LLM_TWIN_SERVICES: dict[str, tuple[str, dict[str, str]]] = {
    "primary": ("primary", {"LLM_TWIN_MODEL_ID": "bytelm"}),
    "twin-mirror": ("twin", {"LLM_TWIN_TWIN_ID": "mirror", "LLM_TWIN_SYNC_POLICY": "mirror"}),
    "twin-ema": ("twin", {"LLM_TWIN_TWIN_ID": "ema", "LLM_TWIN_SYNC_POLICY": "ema"}),
    "twin-frozen": ("twin", {"LLM_TWIN_TWIN_ID": "frozen", "LLM_TWIN_SYNC_POLICY": "frozen"}),
    "twin-int8": (
        "twin",
        {"LLM_TWIN_TWIN_ID": "int8", "LLM_TWIN_SYNC_POLICY": "mirror", "LLM_TWIN_REPLICA_DTYPE": "int8"},
    ),
    "alert-sink": ("alert-sink", {}),
}

SETTINGS_BY_COMMAND: dict[str, type[ServiceSettings]] = {
    "primary": PrimarySettings,
    "twin": TwinSettings,
    "alert-sink": ServiceSettings,
}

SCRAPE_JOB_BY_COMMAND = {"primary": "llm-twin-primary", "twin": "llm-twin-twin", "alert-sink": "llm-twin-alert-sink"}

STATEFUL_SERVICES = {
    "mosquitto": "/mosquitto/data",
    "prometheus": "/prometheus",
    "alertmanager": "/alertmanager",
    "grafana": "/var/lib/grafana",
}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_SECONDS, check=False)


def _validate_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    if importlib.util.find_spec("check_jsonschema") is None:
        pytest.fail("check-jsonschema is not installed; run: pip install 'check-jsonschema>=0.39'")
    return _run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(path)])


# --- docker-compose.yml -----------------------------------------------------------------------------------


def test_compose_file_matches_compose_spec_schema() -> None:
    result = _validate_compose_schema(COMPOSE_PATH)

    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_rejects_unknown_key(tmp_path: Path) -> None:
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE_PATH.read_text().replace("    restart: unless-stopped\n", "    restarts: always\n", 1))

    result = _validate_compose_schema(broken)

    assert result.returncode != 0
    assert "restarts" in result.stdout


def test_compose_llm_twin_services_are_the_stack(compose: dict[str, Any]) -> None:
    services = llm_twin_services(compose)

    assert set(services) == set(EXPECTED_LLM_TWIN_SERVICES)


@pytest.mark.parametrize("name", sorted(EXPECTED_LLM_TWIN_SERVICES))
def test_compose_service_builds_project_dockerfile(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]

    assert service["build"] == {"context": ".", "dockerfile": "Dockerfile"}
    assert service["image"] == "llm-twin-monitor:latest"


@pytest.mark.parametrize("name", sorted(EXPECTED_LLM_TWIN_SERVICES))
def test_compose_service_command_and_role(compose: dict[str, Any], name: str) -> None:
    command, role = EXPECTED_LLM_TWIN_SERVICES[name]

    argv, env = native_invocation(compose["services"][name])

    assert argv == ["llm-twin", command]
    assert {key: env.get(key) for key in role} == role


@pytest.mark.parametrize("name", sorted(EXPECTED_LLM_TWIN_SERVICES))
def test_compose_environment_accepted_by_settings(
    compose: dict[str, Any], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv, env = native_invocation(compose["services"][name])
    for key in [key for key in os.environ if key.startswith("LLM_TWIN_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    model = SETTINGS_BY_COMMAND[argv[1]]

    settings = model()

    unknown = {key for key in env if key.removeprefix("LLM_TWIN_").lower() not in model.model_fields}
    assert unknown == set(), f"{name} sets variables that `llm-twin {argv[1]}` does not read"
    assert settings.metrics_host == "0.0.0.0"
    assert str(settings.metrics_port) == METRICS_PORT


def test_compose_mqtt_clients_use_broker_service(compose: dict[str, Any]) -> None:
    brokers = {
        name: native_invocation(service)[1].get("LLM_TWIN_BROKER")
        for name, service in llm_twin_services(compose).items()
        if name != "alert-sink"
    }

    assert set(brokers.values()) == {"mqtt://mosquitto:1883"}


@pytest.mark.parametrize("name", sorted(load_compose()["services"]))
def test_compose_service_has_healthcheck(compose: dict[str, Any], name: str) -> None:
    healthcheck = compose["services"][name].get("healthcheck", {})

    assert healthcheck.get("test", [None])[0] == "CMD", "exec-form healthcheck expected"
    assert {"interval", "timeout", "retries", "start_period"} <= set(healthcheck)


@pytest.mark.parametrize("name", sorted(load_compose()["services"]))
def test_compose_dependencies_wait_for_healthy(compose: dict[str, Any], name: str) -> None:
    depends_on = compose["services"][name].get("depends_on", {})

    conditions = {dependency: spec.get("condition") for dependency, spec in depends_on.items()}

    assert set(conditions.values()) <= {"service_healthy"}, conditions
    assert all("healthcheck" in compose["services"][dependency] for dependency in conditions)


def test_compose_start_order_reaches_every_service(compose: dict[str, Any]) -> None:
    # Grafana and the llm-twin processes are the last services to start. Following depends_on from them
    # must reach every service, so none starts before what it needs.
    reached: set[str] = set()
    pending = ["grafana", *EXPECTED_LLM_TWIN_SERVICES]

    while pending:
        name = pending.pop()
        if name not in reached:
            reached.add(name)
            pending.extend(compose["services"][name].get("depends_on", {}))

    assert reached == set(compose["services"])


@pytest.mark.parametrize("name", sorted(load_compose()["services"]))
def test_compose_service_publishes_on_loopback_by_default(compose: dict[str, Any], name: str) -> None:
    ports = compose["services"][name].get("ports", [])

    assert ports, f"{name} publishes no port"
    assert all(str(port).startswith("127.0.0.1:") for port in ports), ports


def test_compose_bind_address_variable_changes_ports() -> None:
    compose = load_compose(environ={"BIND_ADDRESS": "0.0.0.0"})

    ports = [str(port) for service in compose["services"].values() for port in service["ports"]]

    assert all(port.startswith("0.0.0.0:") for port in ports)


def test_compose_host_ports_unique(compose: dict[str, Any]) -> None:
    host_ports = [str(port).split(":")[1] for service in compose["services"].values() for port in service["ports"]]

    assert len(host_ports) == len(set(host_ports)), host_ports


@pytest.mark.parametrize(
    ("name", "port"), [("grafana", "3000"), ("prometheus", "9090"), ("alertmanager", "9093"), ("mosquitto", "1883")]
)
def test_compose_user_interface_port(compose: dict[str, Any], name: str, port: str) -> None:
    assert f"127.0.0.1:{port}:{port}" in compose["services"][name]["ports"]


def _volumes(compose: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Return (service, source, target) of every short-syntax volume."""
    entries = []
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, target, *_ = str(volume).split(":")
            entries.append((name, source, target))
    return entries


def test_compose_bind_mount_sources_exist(compose: dict[str, Any]) -> None:
    missing = [source for _, source, _ in _volumes(compose) if source.startswith("./") and not (REPO / source).exists()]

    assert missing == []


@pytest.mark.parametrize(("name", "target"), sorted(STATEFUL_SERVICES.items()))
def test_compose_stateful_service_keeps_named_volume(compose: dict[str, Any], name: str, target: str) -> None:
    named = {
        source: mount for service, source, mount in _volumes(compose) if service == name and not source.startswith(".")
    }

    assert target in named.values()
    assert set(named) <= set(compose["volumes"])


def test_compose_grafana_provisioning_mounts(compose: dict[str, Any]) -> None:
    mounts = {(source, target) for name, source, target in _volumes(compose) if name == "grafana"}

    assert ("./dashboards/provisioning", "/etc/grafana/provisioning") in mounts
    assert ("./dashboards", "/var/lib/grafana/dashboards") in mounts


def test_compose_grafana_home_is_drift_dashboard(compose: dict[str, Any]) -> None:
    path = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]

    local = REPO / "dashboards" / Path(path).relative_to("/var/lib/grafana/dashboards")
    dashboard = json.loads(local.read_text(encoding="utf-8"))

    assert dashboard["uid"] == "llm-twin-drift"


def test_compose_grafana_anonymous_viewer(compose: dict[str, Any]) -> None:
    environment = compose["services"]["grafana"]["environment"]

    assert environment["GF_AUTH_ANONYMOUS_ENABLED"] == "true"
    assert environment["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def test_compose_grafana_admin_password_from_environment() -> None:
    default = load_compose()["services"]["grafana"]["environment"]["GF_SECURITY_ADMIN_PASSWORD"]
    chosen = load_compose(environ={"GRAFANA_ADMIN_PASSWORD": "s3cret"})["services"]["grafana"]["environment"]

    assert default == "admin"
    assert chosen["GF_SECURITY_ADMIN_PASSWORD"] == "s3cret"


def test_compose_external_images_pinned(compose: dict[str, Any]) -> None:
    images = [service["image"] for service in compose["services"].values() if "build" not in service]

    unpinned = [image for image in images if ":" not in image or image.endswith(":latest")]

    assert unpinned == []


# --- Dockerfile and .dockerignore ---------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = (REPO / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_dockerfile_builds_from_python_slim() -> None:
    instructions = _dockerfile_instructions()

    assert instructions[0] == ("FROM", "python:3.11-slim")


def test_dockerfile_entrypoint_is_project_script() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]

    entrypoints = [json.loads(argument) for name, argument in _dockerfile_instructions() if name == "ENTRYPOINT"]

    assert entrypoints == [["llm-twin"]]
    assert "llm-twin" in scripts


def test_dockerfile_installs_project_with_pip() -> None:
    runs = [argument for name, argument in _dockerfile_instructions() if name == "RUN"]

    assert any(re.search(r"\bpip install \.(\s|$)", run) for run in runs), runs


def test_dockerignore_keeps_copied_files() -> None:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied = [
        source for name, argument in _dockerfile_instructions() if name == "COPY" for source in argument.split()[:-1]
    ]

    excluded = [source for source in copied if any(fnmatch.fnmatch(source, pattern) for pattern in patterns)]

    assert copied
    assert excluded == []


# --- Prometheus scrape configuration --------------------------------------------------------------------


def test_prometheus_config_passes_promtool() -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not installed; run: apt-get install prometheus")

    result = _run([promtool, "check", "config", str(PROMETHEUS_CONFIG)])

    assert result.returncode == 0, result.stdout + result.stderr


def _scrape_targets() -> dict[str, str]:
    """Return target -> job name of the shipped scrape configuration."""
    document = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    return {
        target: job["job_name"]
        for job in document["scrape_configs"]
        for static in job["static_configs"]
        for target in static["targets"]
    }


@pytest.mark.parametrize("name", sorted(EXPECTED_LLM_TWIN_SERVICES))
def test_prometheus_scrapes_llm_twin_service_by_role(compose: dict[str, Any], name: str) -> None:
    argv, env = native_invocation(compose["services"][name])

    job = _scrape_targets().get(f"{name}:{env['LLM_TWIN_METRICS_PORT']}")

    assert job == SCRAPE_JOB_BY_COMMAND[argv[1]]


def test_prometheus_scrapes_only_compose_services(compose: dict[str, Any]) -> None:
    hosts = {target.split(":")[0] for target in _scrape_targets()} - {"localhost"}

    assert hosts <= set(compose["services"])


# --- Alertmanager configuration -------------------------------------------------------------------------


def _amtool(*arguments: str) -> subprocess.CompletedProcess[str]:
    amtool = shutil.which("amtool")
    if amtool is None:
        pytest.fail("amtool is not installed; run: apt-get install prometheus-alertmanager")
    return _run([amtool, *arguments])


def test_alertmanager_config_passes_amtool() -> None:
    result = _amtool("check-config", str(ALERTMANAGER_CONFIG))

    assert result.returncode == 0, result.stdout + result.stderr


def uncomment_examples(text: str) -> str:
    """Uncomment the indented `# key: ...` and `# - ...` lines, the commented-out examples of the config.

    Prose comments start with a capital letter and top-level comments are not indented, so both stay.
    """
    return re.sub(r"^( {2,})# (\s*(?:[a-z_]+:|- ))", r"\1\2", text, flags=re.M)


def test_alertmanager_examples_valid_when_uncommented(tmp_path: Path) -> None:
    original = ALERTMANAGER_CONFIG.read_text(encoding="utf-8")
    uncommented = uncomment_examples(original)
    path = tmp_path / "alertmanager.yml"
    path.write_text(uncommented)

    result = _amtool("check-config", str(path))

    assert uncommented.count("slack_configs:\n") == 1
    assert uncommented.count("email_configs:\n") == 1
    assert uncommented.count("https://hooks.example.org/llm-twin") == 1
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["severity=critical", "alertname=LlmTwinDiscrepancyHigh"], "critical"),
        (["severity=warning", "alertname=LlmTwinStale"], "warning"),
        (["alertname=SomethingElse"], "alert-sink"),
    ],
)
def test_alertmanager_routes_by_severity(labels: list[str], receiver: str) -> None:
    result = _amtool("config", "routes", "test", f"--config.file={ALERTMANAGER_CONFIG}", *labels)

    assert result.stdout.strip() == receiver, result.stdout + result.stderr


def test_alertmanager_receivers_post_to_alert_sink() -> None:
    receivers = yaml.safe_load(ALERTMANAGER_CONFIG.read_text(encoding="utf-8"))["receivers"]

    webhooks = {receiver["name"]: receiver["webhook_configs"] for receiver in receivers}

    assert set(webhooks) == {"alert-sink", "critical", "warning"}
    assert all(hooks == [{"url": ALERT_SINK_URL, "send_resolved": True}] for hooks in webhooks.values()), webhooks


class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    """Queue the path and JSON body of every POST and reply 200."""

    received: queue.Queue[tuple[str, Any]]

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        self.received.put((self.path, json.loads(self.rfile.read(length))))
        self.send_response(200)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output clean; the queue records every request."""


@pytest.fixture
def webhook() -> Iterator[tuple[str, queue.Queue[tuple[str, Any]]]]:
    """A webhook receiver on a free loopback port that records notifications.

    It replaces the alert sink so that these tests depend on the Alertmanager configuration only;
    tests/test_alert_sink.py covers the sink itself.
    """
    received: queue.Queue[tuple[str, Any]] = queue.Queue()
    handler = type("Handler", (_RecordingHandler,), {"received": received})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/alerts", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture
def alertmanager(webhook: tuple[str, queue.Queue[tuple[str, Any]]]) -> Iterator[RunningServer]:
    """The shipped Alertmanager configuration with its webhooks pointed at the recording receiver."""
    url, _ = webhook
    config = ALERTMANAGER_CONFIG.read_text(encoding="utf-8").replace(ALERT_SINK_URL, url)
    with running_alertmanager(config) as server:
        yield server


def _alert(alertname: str, severity: str, twin_id: str) -> dict[str, Any]:
    return {
        "labels": {"alertname": alertname, "severity": severity, "model_id": "bytelm", "twin_id": twin_id},
        "annotations": {"summary": f"{alertname} for twin {twin_id}"},
    }


def test_alertmanager_delivers_critical_to_webhook(
    alertmanager: RunningServer, webhook: tuple[str, queue.Queue[tuple[str, Any]]]
) -> None:
    _, received = webhook

    alertmanager.post_json("/api/v2/alerts", [_alert("LlmTwinDiscrepancyHigh", "critical", "mirror")])
    path, payload = received.get(timeout=DELIVERY_TIMEOUT_SECONDS)

    assert path == "/alerts"
    assert payload["version"] == "4"
    assert payload["receiver"] == "critical"
    assert payload["status"] == "firing"
    assert [alert["labels"]["twin_id"] for alert in payload["alerts"]] == ["mirror"]


def test_alertmanager_inhibits_warning_while_critical_fires(alertmanager: RunningServer) -> None:
    alertmanager.post_json(
        "/api/v2/alerts",
        [
            _alert("LlmTwinDiscrepancyHigh", "critical", "mirror"),
            _alert("LlmTwinDiscrepancyHigh", "warning", "mirror"),
            _alert("LlmTwinDiscrepancyHigh", "warning", "ema"),
        ],
    )

    deadline = time.monotonic() + DELIVERY_TIMEOUT_SECONDS
    alerts: list[dict[str, Any]] = alertmanager.get_json("/api/v2/alerts")
    while len(alerts) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
        alerts = alertmanager.get_json("/api/v2/alerts")
    states = {(a["labels"]["severity"], a["labels"]["twin_id"]): a["status"]["state"] for a in alerts}

    assert states == {
        ("critical", "mirror"): "active",
        ("warning", "mirror"): "suppressed",
        ("warning", "ema"): "active",
    }
