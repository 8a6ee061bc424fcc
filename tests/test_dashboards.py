"""Tests of the generated Grafana dashboards, their provisioning files and their PromQL queries.

Query checks run every dashboard expression through a real Prometheus (Debian's `prometheus` binary). The
fixture starts it on a free loopback port with no scrape targets, so results are empty, but a query that
does not parse gets an error status.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from monitor.grafana import dashboards
from monitor.grafana.dashboards import (
    DATASOURCE,
    DRIFT_DASHBOARD_UID,
    build_dashboards,
    build_drift_dashboard,
    iter_panels,
    panel_queries,
    render,
    substitute_variables,
)
from tests.contract import exported_series_names
from tests.servers_prometheus import running_prometheus

REPO = Path(__file__).resolve().parents[1]
DASHBOARD_DIR = REPO / "dashboards"
PROVISIONING_DIR = DASHBOARD_DIR / "provisioning"
DOCS = REPO / "docs" / "dashboards.md"
RULES_DIR = REPO / "deploy" / "prometheus" / "rules"

HTTP_TIMEOUT_SECONDS = 10.0

# Metric names of the product contract, as exported (counters with _total, histogram series expanded),
# plus the threshold recording rules that the alert rules compare against.
# Series a dashboard may plot: the contract's, the attribution and budget series, and the alert sink's counter.
CONTRACT_METRICS = exported_series_names() | {
    "llm_twin_attributed_kl_divergence",
    "llm_twin_divergence_budget",
    "llm_twin_alerts_received_total",
}
THRESHOLD_RULES = frozenset({"llm_twin:threshold:kl_warning", "llm_twin:threshold:kl_critical"})
KNOWN_SERIES = CONTRACT_METRICS | THRESHOLD_RULES

# Contract metrics that have no panel on the drift dashboard: the alert sink's own counter, and the
# primary's message count (its byte count is plotted).
NOT_PLOTTED = frozenset({"llm_twin_alerts_received_total", "llm_twin_primary_published_messages_total"})

PROMQL_KEYWORDS = frozenset({"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"})
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NUMBER = re.compile(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w:])")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """Return the metric names in `expr`: identifiers that are not functions, keywords or label names."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range and subquery windows
    text = re.sub(r"\boffset\s+\w+", " ", text)
    text = _GROUPING.sub(" ", text)
    text = _NUMBER.sub(" ", text)

    names = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group()
        is_call = re.match(r"\s*\(", text[match.end() :]) is not None
        if not is_call and name not in PROMQL_KEYWORDS:
            names.add(name)
    return names


def _variable_selectors(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """Return (variable name, series selector) of each `label_values(selector, label)` variable query."""
    selectors = []
    for variable in dashboard["templating"]["list"]:
        match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["definition"])
        assert match is not None, f"variable {variable['name']} is not a label_values query"
        selectors.append((variable["name"], substitute_variables(match.group(1))))
    return selectors


DRIFT = build_drift_dashboard()
QUERIES = panel_queries(DRIFT)


# --- Generated JSON -------------------------------------------------------------------------------


def test_dashboards_committed_json_current() -> None:
    stale = dashboards.stale_files(DASHBOARD_DIR)

    assert stale == [], "stale dashboard JSON: run python -m monitor.grafana.dashboards --write"


def test_dashboards_check_detects_stale_file(tmp_path: Path) -> None:
    dashboards.write_dashboards(tmp_path)
    path = tmp_path / dashboards.DRIFT_DASHBOARD_FILE
    path.write_text(path.read_text(encoding="utf-8").replace("LLM twin drift", "Edited by hand"), "utf-8")

    status = dashboards.main(["--check", "--output-dir", str(tmp_path)])

    assert status == 1


def test_dashboards_check_passes_after_write(tmp_path: Path) -> None:
    dashboards.main(["--write", "--output-dir", str(tmp_path)])

    status = dashboards.main(["--check", "--output-dir", str(tmp_path)])

    assert status == 0


def test_dashboards_uids_unique() -> None:
    files = sorted(DASHBOARD_DIR.glob("*.json"))

    uids = [json.loads(path.read_text(encoding="utf-8"))["uid"] for path in files]

    assert len(files) >= 1
    assert len(uids) == len(set(uids)), f"duplicate dashboard uids in {[path.name for path in files]}"


def test_dashboards_drift_uid_fixed() -> None:
    assert DRIFT["uid"] == DRIFT_DASHBOARD_UID == "llm-twin-drift"


def test_dashboards_raw_json_without_import_placeholders() -> None:
    for name, dashboard in build_dashboards().items():
        text = render(dashboard)

        assert "${DS_" not in text, f"{name} contains a ${{DS_...}} import placeholder"
        assert "__inputs" not in dashboard, f"{name} is export-for-sharing JSON, not raw JSON"
        assert dashboard["id"] is None, f"{name} has an instance-specific id"


def test_dashboards_panel_ids_unique() -> None:
    ids = [panel["id"] for panel in iter_panels(DRIFT)]

    assert len(ids) == len(set(ids))


def test_dashboards_every_panel_bound_to_datasource() -> None:
    for panel in iter_panels(DRIFT):
        assert panel.get("datasource") == DATASOURCE, f"panel {panel['title']!r} datasource"


def test_dashboards_every_target_bound_to_datasource() -> None:
    targets = [(panel["title"], target) for panel in iter_panels(DRIFT) for target in panel.get("targets", [])]

    assert len(targets) == len(QUERIES)
    for title, target in targets:
        assert target["datasource"] == {"type": "prometheus", "uid": "prometheus"}, f"target of {title!r}"


def test_dashboards_target_ref_ids_unique_per_panel() -> None:
    for panel in iter_panels(DRIFT):
        ref_ids = [target["refId"] for target in panel.get("targets", [])]

        assert len(ref_ids) == len(set(ref_ids)), f"panel {panel['title']!r} repeats a refId"


def test_dashboards_variables_multi_with_all() -> None:
    variables = {variable["name"]: variable for variable in DRIFT["templating"]["list"]}

    assert set(variables) == {"model_id", "twin_id"}
    for name, variable in variables.items():
        assert variable["type"] == "query", name
        assert variable["multi"] is True, name
        assert variable["includeAll"] is True, name
        assert variable["definition"].startswith("label_values("), name
        assert variable["datasource"] == DATASOURCE, name


def test_dashboards_data_panels_have_unit_and_thresholds() -> None:
    data_panels = [panel for panel in iter_panels(DRIFT) if panel.get("targets")]

    for panel in data_panels:
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults.get("unit"), f"panel {panel['title']!r} has no unit"
        steps = defaults["thresholds"]["steps"]
        assert steps[0]["value"] is None, f"panel {panel['title']!r} thresholds lack a base step"


def test_dashboards_kl_panel_plots_threshold_rules() -> None:
    kl_queries = {expr for title, expr in QUERIES if title == "KL divergence per twin"}

    assert kl_queries >= THRESHOLD_RULES


def test_dashboards_alert_list_panel_present() -> None:
    types = [panel["type"] for panel in iter_panels(DRIFT)]

    assert types.count("alertlist") == 1


def test_dashboards_grid_inside_width_without_overlap() -> None:
    occupied: set[tuple[int, int]] = set()

    for panel in iter_panels(DRIFT):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, f"panel {panel['title']!r} is wider than the grid"
        cells = {(grid["x"] + dx, grid["y"] + dy) for dx in range(grid["w"]) for dy in range(grid["h"])}
        assert not cells & occupied, f"panel {panel['title']!r} overlaps another panel"
        occupied |= cells


def test_dashboards_sync_latency_uses_histogram_quantile() -> None:
    latency = [expr for title, expr in QUERIES if title.startswith("Sync latency")]

    assert len(latency) == 3
    for quantile, expr in zip(("0.5", "0.9", "0.99"), latency, strict=True):
        assert expr.startswith(f"histogram_quantile({quantile}, "), expr
        assert "le)" in expr, expr
        assert "rate(llm_twin_sync_latency_seconds_bucket" in expr, expr


# --- Query text -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('sum by (twin_id, le) (rate(a_bucket{x="y"}[5m]))', {"a_bucket"}),
        ("b / on(model_id) c", {"b", "c"}),
        ('label_replace(d{t=~".*|"}, "t", "(p)", "t", "")', {"d"}),
        ("histogram_quantile(0.99, e) > 1e-3", {"e"}),
        ("llm_twin:threshold:kl_warning", {"llm_twin:threshold:kl_warning"}),
    ],
)
def test_metric_names_parses_expression(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


def test_dashboards_queries_use_known_metrics() -> None:
    used = {name for _, expr in QUERIES for name in metric_names(expr)}
    used |= {name for _, selector in _variable_selectors(DRIFT) for name in metric_names(selector)}

    unknown = used - KNOWN_SERIES

    assert unknown == set(), f"queries use metric names outside the contract: {sorted(unknown)}"


def test_dashboards_plot_every_contract_metric() -> None:
    used = {name for _, expr in QUERIES for name in metric_names(expr)}
    expected = {name for name in CONTRACT_METRICS - NOT_PLOTTED if not name.endswith(("_sum", "_count"))}

    missing = expected - used

    assert missing == set(), f"contract metrics without a panel: {sorted(missing)}"


def test_dashboards_metrics_exported_by_package() -> None:
    from monitor.metrics import family_names

    exported = set(family_names())
    plotted = {name for _, expr in QUERIES for name in metric_names(expr)} - THRESHOLD_RULES

    # A histogram family exports its _bucket, _sum and _count series under the family name.
    families = {re.sub(r"_(bucket|sum|count)$", "", name) for name in plotted}
    missing = {name for name in families if name not in exported and f"{name}_total" not in exported}

    assert missing == set(), f"plotted but not exported by monitor.metrics: {sorted(missing)}"


def _recording_rules() -> dict[str, str]:
    """Return record name -> expression of every recording rule in deploy/prometheus/rules/."""
    records: dict[str, str] = {}
    for path in sorted(RULES_DIR.glob("*.yml")):
        document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        for group in document.get("groups", []):
            records |= {rule["record"]: str(rule["expr"]) for rule in group["rules"] if "record" in rule}
    return records


def test_dashboards_threshold_rules_defined_in_deploy() -> None:
    records = _recording_rules()

    missing = THRESHOLD_RULES - set(records)

    assert missing == set(), f"recording rules missing from {RULES_DIR}: {sorted(missing)}"


@pytest.mark.parametrize(("record", "value"), sorted(dashboards.RULE_THRESHOLDS.items()))
def test_dashboards_static_threshold_matches_rule(record: str, value: float) -> None:
    expr = _recording_rules().get(record, "")

    match = re.fullmatch(r"\s*vector\(\s*([-+0-9.eE]+)\s*\)\s*", expr)

    assert match is not None, f"{record} is not a vector(<number>) rule in {RULES_DIR}: {expr!r}"
    assert float(match.group(1)) == value, f"{record} is {match.group(1)} in the rules, {value} on the dashboard"


def test_panel_queries_substitute_every_variable() -> None:
    leftover = [(title, expr) for title, expr in QUERIES if "$" in expr]

    assert QUERIES, "no queries found"
    assert leftover == []


def test_substitute_variables_rejects_unknown_variable() -> None:
    with pytest.raises(ValueError, match=r"unknown dashboard variable \$pod"):
        substitute_variables('up{pod=~"$pod"}')


def test_substitute_variables_handles_braced_format() -> None:
    assert substitute_variables('x{t=~"${twin_id:regex}"}[$__rate_interval]') == 'x{t=~".*"}[1m]'


# --- Provisioning and docs ------------------------------------------------------------------------


def test_provisioning_datasource_fixed_uid() -> None:
    document = yaml.safe_load((PROVISIONING_DIR / "datasources" / "prometheus.yml").read_text("utf-8"))

    (datasource,) = document["datasources"]

    assert document["apiVersion"] == 1
    assert datasource["uid"] == "prometheus"
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["isDefault"] is True
    assert datasource["editable"] is False


def test_provisioning_alert_list_filters_by_datasource_name() -> None:
    document = yaml.safe_load((PROVISIONING_DIR / "datasources" / "prometheus.yml").read_text("utf-8"))
    (alert_list,) = [panel for panel in iter_panels(DRIFT) if panel["type"] == "alertlist"]

    assert alert_list["options"]["datasource"] == document["datasources"][0]["name"]


def test_provisioning_dashboard_provider_path() -> None:
    document = yaml.safe_load((PROVISIONING_DIR / "dashboards" / "llm-twin.yml").read_text("utf-8"))

    (provider,) = document["providers"]

    assert document["apiVersion"] == 1
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_docs_describe_every_panel() -> None:
    text = DOCS.read_text(encoding="utf-8")
    titles = [panel["title"] for panel in iter_panels(DRIFT) if panel["type"] != "row"]

    missing = [title for title in titles if f"**{title}**" not in text]

    assert missing == [], f"docs/dashboards.md has no line for panels {missing}"


# --- Queries against a real Prometheus ------------------------------------------------------------


@pytest.fixture(scope="module")
def prometheus_url() -> Iterator[str]:
    """A real Prometheus with no scrape targets: queries parse and evaluate, their results are empty."""
    with running_prometheus("global:\n  scrape_interval: 1m\n", extra_args=["--log.level=warn"]) as prometheus:
        yield prometheus.url


def _query(prometheus_url: str, expr: str) -> dict[str, Any]:
    url = f"{prometheus_url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_SECONDS) as response:
            document: dict[str, Any] = json.load(response)
    except urllib.error.HTTPError as exc:
        # Prometheus returns 400 with a JSON error body for a query that does not parse.
        document = json.load(exc)
    return document


def test_prometheus_query_rejects_invalid_expression(prometheus_url: str) -> None:
    document = _query(prometheus_url, "sum by (le (rate(x[1m]))")

    assert document["status"] == "error"


@pytest.mark.parametrize(("title", "expr"), QUERIES, ids=[f"{i}-{title}" for i, (title, _) in enumerate(QUERIES)])
def test_prometheus_accepts_panel_query(prometheus_url: str, title: str, expr: str) -> None:
    document = _query(prometheus_url, expr)

    assert document["status"] == "success", f"{title}: {expr}: {document.get('error')}"


@pytest.mark.parametrize(("name", "selector"), _variable_selectors(DRIFT))
def test_prometheus_accepts_variable_selector(prometheus_url: str, name: str, selector: str) -> None:
    document = _query(prometheus_url, selector)

    assert document["status"] == "success", f"variable {name}: {selector}: {document.get('error')}"
