"""The Prometheus rules in deploy/prometheus/rules/: promtool checks and unit tests, their conventions, the
runbook in docs/alerts.md, and a real Prometheus that scrapes stand-in exporters with the shipped config.

promtool and prometheus are Debian's binaries (apt-get install prometheus); the tests fail, not skip,
when they are missing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tests.compose_file import REPO
from tests.servers_prometheus import RunningServer, free_loopback_port, running_alertmanager, running_prometheus

PROMETHEUS_DIR = REPO / "deploy" / "prometheus"
RULES_DIR = PROMETHEUS_DIR / "rules"
THRESHOLDS_PATH = RULES_DIR / "thresholds.yml"
ALERTS_PATH = RULES_DIR / "alerts.yml"
UNIT_TESTS_DIR = PROMETHEUS_DIR / "tests"
ALERTS_DOC = REPO / "docs" / "alerts.md"
ALERTMANAGER_CONFIG = REPO / "deploy" / "alertmanager" / "alertmanager.yml"

PROMTOOL_TIMEOUT_SECONDS = 60.0
PROMETHEUS_WAIT_SECONDS = 30.0
"""Bound on waiting for scrapes and rule evaluations; the shipped config runs both every 5 seconds."""

SEVERITIES = {"warning", "critical"}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is not installed; run: apt-get install prometheus")
    return path


def _run_promtool(*arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_promtool(), *arguments], capture_output=True, text=True, timeout=PROMTOOL_TIMEOUT_SECONDS, check=False
    )


def _load_rules(path: Path) -> list[dict[str, Any]]:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def _alert_rules() -> list[dict[str, Any]]:
    return [rule for rule in _load_rules(ALERTS_PATH) if "alert" in rule]


def _alert_names() -> list[str]:
    return sorted({rule["alert"] for rule in _alert_rules()})


def _rule_id(rule: dict[str, Any]) -> str:
    return f"{rule['alert']}/{rule['labels'].get('severity')}/{rule['labels'].get('signal', '')}"


def _unit_test_files() -> list[Path]:
    return sorted(UNIT_TESTS_DIR.glob("*.yml"))


# --- promtool ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(RULES_DIR.glob("*.yml")), ids=lambda path: path.name)
def test_promtool_check_rules_passes(path: Path) -> None:
    result = _run_promtool("check", "rules", str(path))

    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("path", _unit_test_files(), ids=lambda path: path.name)
def test_promtool_unit_tests_pass(path: Path) -> None:
    result = _run_promtool("test", "rules", str(path))

    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_exist() -> None:
    files = _unit_test_files()

    assert len(files) >= 3, f"promtool unit tests missing from {UNIT_TESTS_DIR}"


# Each mutation moves one `for:` or `keep_firing_for:` of the shipped rules; the unit tests must notice.
RULE_MUTATIONS = {
    "warning for shorter": (
        "        for: 2m\n        keep_firing_for: 2m\n        labels:\n          severity: warning\n",
        "        for: 1m45s\n        keep_firing_for: 2m\n        labels:\n          severity: warning\n",
    ),
    "critical for longer": (
        "        for: 1m\n        keep_firing_for: 2m\n        labels:\n          severity: critical\n",
        "        for: 1m15s\n        keep_firing_for: 2m\n        labels:\n          severity: critical\n",
    ),
    "no keep_firing_for": ("keep_firing_for: 2m", "keep_firing_for: 0s"),
}


@pytest.mark.parametrize("mutation", sorted(RULE_MUTATIONS))
def test_promtool_unit_tests_catch_mutation(mutation: str, tmp_path: Path) -> None:
    old, new = RULE_MUTATIONS[mutation]
    alerts = ALERTS_PATH.read_text(encoding="utf-8")
    assert old in alerts, f"mutation {mutation!r} no longer applies to {ALERTS_PATH}"

    (tmp_path / "rules").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "rules" / "alerts.yml").write_text(alerts.replace(old, new))
    shutil.copyfile(THRESHOLDS_PATH, tmp_path / "rules" / "thresholds.yml")
    for path in _unit_test_files():
        shutil.copyfile(path, tmp_path / "tests" / path.name)

    result = _run_promtool("test", "rules", *(str(path) for path in sorted((tmp_path / "tests").glob("*.yml"))))

    assert result.returncode != 0, f"unit tests still pass with mutation {mutation!r}"


# --- Conventions of the rules -----------------------------------------------------------------------------


@pytest.mark.parametrize("rule", _alert_rules(), ids=_rule_id)
def test_alert_rule_has_for_and_keep_firing_for(rule: dict[str, Any]) -> None:
    assert "for" in rule
    assert "keep_firing_for" in rule
    assert rule["keep_firing_for"] not in ("0", "0s")


@pytest.mark.parametrize("rule", _alert_rules(), ids=_rule_id)
def test_alert_rule_labels_carry_no_values(rule: dict[str, Any]) -> None:
    labels = rule["labels"]

    assert labels["severity"] in SEVERITIES
    assert not any("{{" in str(value) for value in labels.values()), labels


@pytest.mark.parametrize("rule", _alert_rules(), ids=_rule_id)
def test_alert_rule_has_annotations(rule: dict[str, Any]) -> None:
    annotations = rule["annotations"]

    assert set(annotations) == {"summary", "description", "runbook_url"}
    assert annotations["runbook_url"] == f"docs/alerts.md#{rule['alert'].lower()}"


@pytest.mark.parametrize("name", _alert_names())
def test_alert_name_has_project_prefix(name: str) -> None:
    # The alert sink counts alert names starting with LlmTwin and folds all others into `other`.
    assert re.fullmatch(r"LlmTwin[A-Z][A-Za-z]+", name)


def _numbers_outside_ranges(expr: str) -> list[str]:
    """Return the numeric literals of `expr`, ignoring range and offset durations and `== 0` state checks."""
    without_ranges = re.sub(r"\[[^\]]*\]", "", expr)
    without_state_checks = re.sub(r"==\s*0\b", "", without_ranges)
    return re.findall(r"(?<![\w:.\"])\d+(?:\.\d+)?(?![\w.\"])", without_state_checks)


@pytest.mark.parametrize("rule", _load_rules(ALERTS_PATH), ids=lambda rule: rule.get("alert") or rule["record"])
def test_alert_rules_compare_against_threshold_series(rule: dict[str, Any]) -> None:
    assert _numbers_outside_ranges(rule["expr"]) == []


def test_numbers_outside_ranges_finds_literal_threshold() -> None:
    assert _numbers_outside_ranges('rate(x_total{a="1"}[5m]) > 0.05 unless y == 0') == ["0.05"]


def test_thresholds_file_contains_only_constants() -> None:
    rules = _load_rules(THRESHOLDS_PATH)

    non_constant = [rule["record"] for rule in rules if not re.fullmatch(r"vector\([0-9.eE+-]+\)", rule["expr"])]

    assert rules
    assert non_constant == []


def _documented_thresholds() -> dict[str, float]:
    """Parse the `| `record` | value | ... |` rows of the threshold table in docs/alerts.md."""
    rows = re.findall(
        r"^\|\s*`(llm_twin:threshold:[a-z0-9_]+)`\s*\|\s*([0-9.eE+-]+)\s*\|", ALERTS_DOC.read_text(), re.M
    )
    return {record: float(value) for record, value in rows}


def test_thresholds_match_documentation() -> None:
    shipped = {
        rule["record"]: float(rule["expr"].removeprefix("vector(").removesuffix(")"))
        for rule in _load_rules(THRESHOLDS_PATH)
        if rule["record"].startswith("llm_twin:threshold:")
    }

    assert _documented_thresholds() == shipped


def _github_anchors(markdown: str) -> set[str]:
    """Return the anchors GitHub derives from the headings: lower case, punctuation dropped, spaces to -."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("name", _alert_names())
def test_alert_runbook_anchor_exists(name: str) -> None:
    anchors = _github_anchors(ALERTS_DOC.read_text(encoding="utf-8"))

    assert name.lower() in anchors


def _unit_tested_outcomes() -> dict[str, set[bool]]:
    """Map alert name -> the outcomes its promtool tests expect: True (firing) and/or False (none)."""
    outcomes: dict[str, set[bool]] = {}
    for path in _unit_test_files():
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        for test in document["tests"]:
            for check in test.get("alert_rule_test", []):
                outcomes.setdefault(check["alertname"], set()).add(bool(check.get("exp_alerts")))
    return outcomes


@pytest.mark.parametrize("name", _alert_names())
def test_alert_unit_tested_firing_and_quiet(name: str) -> None:
    outcomes = _unit_tested_outcomes()

    assert outcomes.get(name) == {True, False}


# `up` has no scrape gaps, and the drift alert's 15 minute increase() window spans them.
GAP_FREE_ALERTS = {"LlmTwinTargetDown", "LlmTwinDriftDetected"}


def _alerts_firing_through_gap() -> set[str]:
    """Return the alerts that a promtool test expects to fire after a staleness marker in its input."""
    names: set[str] = set()
    for path in _unit_test_files():
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
        for test in document["tests"]:
            if any("stale" in series["values"].split() for series in test["input_series"]):
                names |= {check["alertname"] for check in test.get("alert_rule_test", []) if check.get("exp_alerts")}
    return names


@pytest.mark.parametrize("name", sorted(set(_alert_names()) - GAP_FREE_ALERTS))
def test_alert_unit_tested_through_scrape_gap(name: str) -> None:
    assert name in _alerts_firing_through_gap()


# --- A real Prometheus with the shipped configuration ------------------------------------------------------

# Stand-in exporters, one per scrape target of docker-compose.yml, serving the metric values below. The
# twins' KL values put mirror above both thresholds, int8 above warning only, ema below both, and frozen
# below the thresholds that its budget of 0.5 nats sets.
TWIN_KL = {"mirror": 0.3, "int8": 0.1, "ema": 0.01, "frozen": 0.3}
TWIN_BUDGET = {"frozen": 0.5}


def _exporter_registry(target: str) -> CollectorRegistry:
    registry = CollectorRegistry()
    host = target.split(":")[0]
    if host.startswith("twin-"):
        twin_id = host.removeprefix("twin-")
        kl = Gauge("llm_twin_output_kl_divergence", "KL", ["model_id", "twin_id"], registry=registry)
        kl.labels("bytelm", twin_id).set(TWIN_KL[twin_id])
        if twin_id in TWIN_BUDGET:
            budget = Gauge("llm_twin_divergence_budget", "budget", ["model_id", "twin_id", "signal"], registry=registry)
            budget.labels("bytelm", twin_id, "kl").set(TWIN_BUDGET[twin_id])
    return registry


@pytest.fixture(scope="module")
def exporters() -> Iterator[dict[str, str]]:
    """Map every scrape target of the shipped config (except Alertmanager) to a stand-in on loopback."""
    document = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    targets = {
        target
        for job in document["scrape_configs"]
        if job["job_name"] != "alertmanager"
        for static in job["static_configs"]
        for target in static["targets"]
    }
    servers = []
    addresses: dict[str, str] = {}
    try:
        for target in sorted(targets):
            server, _thread = start_http_server(0, addr="127.0.0.1", registry=_exporter_registry(target))
            servers.append(server)
            addresses[target] = f"127.0.0.1:{server.server_port}"
        yield addresses
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def _rewrite_targets(node: Any, replace: Callable[[str], str]) -> Any:
    """Return a copy of a parsed Prometheus config with every `targets` entry passed through `replace`."""
    if isinstance(node, dict):
        rewritten = {}
        for key, value in node.items():
            if key == "targets":
                rewritten[key] = [replace(target) for target in value]
            else:
                rewritten[key] = _rewrite_targets(value, replace)
        return rewritten
    if isinstance(node, list):
        return [_rewrite_targets(item, replace) for item in node]
    return node


@pytest.fixture(scope="module")
def alertmanager() -> Iterator[RunningServer]:
    """The shipped Alertmanager config, its webhooks pointed at a closed loopback port.

    The mirror twin's critical alert fires after a minute, and the compose host name alert-sink must not
    be looked up from here.
    """
    closed_port = free_loopback_port()
    config = ALERTMANAGER_CONFIG.read_text(encoding="utf-8").replace(
        "http://alert-sink:9400/alerts", f"http://127.0.0.1:{closed_port}/alerts"
    )
    with running_alertmanager(config) as server:
        yield server


@pytest.fixture(scope="module")
def prometheus(exporters: dict[str, str], alertmanager: RunningServer) -> Iterator[RunningServer]:
    """The shipped prometheus.yml and rules, with every target pointed at loopback."""
    document = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    alertmanager_address = f"127.0.0.1:{alertmanager.port}"

    def replace(target: str) -> str:
        return alertmanager_address if target.startswith("alertmanager:") else exporters[target]

    config = yaml.safe_dump(_rewrite_targets(document, replace), sort_keys=False)
    rule_files = {f"rules/{path.name}": path for path in RULES_DIR.glob("*.yml")}
    with running_prometheus(config, rule_files) as server:
        yield server


def _wait_for(fetch: Callable[[], Any], done: Callable[[Any], bool], condition: str) -> Any:
    """Call `fetch` until `done` accepts its result; raise TimeoutError naming `condition` after the bound."""
    deadline = time.monotonic() + PROMETHEUS_WAIT_SECONDS
    value = fetch()
    while not done(value):
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"timed out after {PROMETHEUS_WAIT_SECONDS} s waiting for {condition}; last response: {value}"
            )
        time.sleep(0.5)
        value = fetch()
    return value


def _query(prometheus: RunningServer, expr: str) -> dict[str, float]:
    """Evaluate `expr` and return twin_id (or "") -> value."""
    answer = prometheus.get_json("/api/v1/query", {"query": expr})
    return {sample["metric"].get("twin_id", ""): float(sample["value"][1]) for sample in answer["data"]["result"]}


def test_prometheus_evaluates_every_rule_group(prometheus: RunningServer) -> None:
    def groups() -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = prometheus.get_json("/api/v1/rules")["data"]["groups"]
        return groups

    loaded = _wait_for(
        groups,
        lambda found: bool(found) and all(rule["health"] == "ok" for group in found for rule in group["rules"]),
        "every rule evaluated with health ok",
    )

    expected = {
        group["name"] for path in RULES_DIR.glob("*.yml") for group in yaml.safe_load(path.read_text())["groups"]
    }
    assert {group["name"] for group in loaded} == expected


def test_prometheus_scrapes_one_job_per_role(prometheus: RunningServer) -> None:
    targets = _wait_for(
        lambda: prometheus.get_json("/api/v1/targets")["data"]["activeTargets"],
        lambda found: bool(found) and all(target["health"] == "up" for target in found),
        "every target scraped",
    )

    jobs = {target["labels"]["job"] for target in targets}

    assert jobs == {"llm-twin-primary", "llm-twin-twin", "llm-twin-alert-sink", "prometheus", "alertmanager"}


def test_prometheus_sends_to_alertmanager(prometheus: RunningServer, alertmanager: RunningServer) -> None:
    active = _wait_for(
        lambda: prometheus.get_json("/api/v1/alertmanagers")["data"]["activeAlertmanagers"],
        bool,
        "an active Alertmanager",
    )

    assert [entry["url"] for entry in active] == [f"http://127.0.0.1:{alertmanager.port}/api/v2/alerts"]


def test_prometheus_per_twin_threshold_follows_budget(prometheus: RunningServer) -> None:
    thresholds = _wait_for(
        lambda: _query(prometheus, "llm_twin:kl_threshold_warning:per_twin"),
        lambda found: set(found) == set(TWIN_KL),
        "a warning threshold for every twin",
    )

    assert thresholds == {"mirror": 0.05, "int8": 0.05, "ema": 0.05, "frozen": 0.5}


def test_prometheus_discrepancy_pending_above_threshold(prometheus: RunningServer) -> None:
    expr = 'ALERTS{alertname="LlmTwinDiscrepancyHigh", alertstate="pending", severity="warning"}'

    pending = _wait_for(lambda: _query(prometheus, expr), lambda found: len(found) >= 2, "two pending warnings")

    assert set(pending) == {"mirror", "int8"}
