"""Grafana dashboards of llm-twin-monitor, built from code.

The committed JSON under `dashboards/` is generated here, so a panel change is a reviewable code change and a
test catches a committed file that no longer matches the code:

    python -m monitor.grafana.dashboards --write    # regenerate dashboards/*.json
    python -m monitor.grafana.dashboards --check    # exit 1 when a committed file is stale

Every panel and query is bound to the provisioned Prometheus datasource by its fixed uid `prometheus`, so the
JSON is raw dashboard JSON (no `${DS_...}` import placeholders) that file provisioning and the HTTP API both
accept as is.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Json = dict[str, Any]

DATASOURCE: Json = {"type": "prometheus", "uid": "prometheus"}
"""Reference to the Prometheus datasource of `dashboards/provisioning/datasources/prometheus.yml`."""

DATASOURCE_NAME = "Prometheus"
"""Display name of that datasource; the alert list panel filters rule sources by name, not by uid."""

DRIFT_DASHBOARD_UID = "llm-twin-drift"
DRIFT_DASHBOARD_FILE = "llm-twin-drift.json"

KL_WARNING_RULE = "llm_twin:threshold:kl_warning"
KL_CRITICAL_RULE = "llm_twin:threshold:kl_critical"

# Values of recording rules in deploy/prometheus/rules/thresholds.yml that panels draw as static thresholds,
# because only the two KL thresholds are plotted as series. tests/test_dashboards.py fails when a value here
# differs from the rule.
RULE_THRESHOLDS: dict[str, float] = {
    "llm_twin:threshold:kl_budget_warning_factor": 1.0,
    "llm_twin:threshold:kl_budget_critical_factor": 2.0,
    "llm_twin:threshold:version_lag_warning": 10.0,
    "llm_twin:threshold:staleness_seconds_warning": 300.0,
    "llm_twin:threshold:messages_rejected_per_second": 0.05,
}

JS_MAX_NATS = math.log(2)
"""Upper bound of the Jensen-Shannon divergence in nats."""

# Grafana 10.x/11.x dashboard JSON schema version; newer Grafana migrates older schemas on load.
SCHEMA_VERSION = 39

GRID_WIDTH = 24
"""Grafana lays panels out on a grid 24 columns wide."""

# Variable values that make every dashboard query a valid PromQL expression outside Grafana. `.*` matches
# every label value, including the empty twin_id that the primary exports.
QUERY_SUBSTITUTIONS: dict[str, str] = {
    "model_id": ".*",
    "twin_id": ".*",
    "__rate_interval": "1m",
    "__interval": "1m",
    "__range": "1h",
}

_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)")

# Selectors shared by the twin-side queries. The `|` alternative keeps the primary (twin_id="") in panels
# that the primary exports too, whatever twins are selected.
TWIN_SELECTOR = 'model_id=~"$model_id", twin_id=~"$twin_id"'
TWIN_OR_PRIMARY_SELECTOR = 'model_id=~"$model_id", twin_id=~"$twin_id|"'
PRIMARY_SELECTOR = 'model_id=~"$model_id"'


@dataclass(frozen=True)
class Query:
    """One PromQL target of a panel."""

    expr: str
    legend: str


@dataclass
class Panel:
    """A panel before layout: its grid size is given, its position is assigned by `_layout`."""

    title: str
    description: str
    width: int
    height: int
    body: Json
    queries: list[Query] = field(default_factory=list)


@dataclass
class Row:
    """A titled row of panels."""

    title: str
    panels: list[Panel]


def _thresholds(*steps: tuple[float, str], base: str = "green") -> Json:
    """Return absolute threshold steps: `base` below the first step, then each colour from its value up."""
    return {
        "mode": "absolute",
        "steps": [
            {"color": base, "value": None},
            *({"color": color, "value": value} for value, color in steps),
        ],
    }


def _timeseries(
    title: str,
    description: str,
    queries: list[Query],
    *,
    unit: str,
    thresholds: Json,
    width: int = 12,
    height: int = 8,
    minimum: float | None = 0,
    maximum: float | None = None,
    decimals: int | None = None,
    threshold_style: str = "off",
    stacked: bool = False,
    bars: bool = False,
    overrides: list[Json] | None = None,
) -> Panel:
    if bars:
        fill_opacity = 60
    elif stacked:
        fill_opacity = 25
    else:
        fill_opacity = 10

    defaults: Json = {
        "unit": unit,
        "color": {"mode": "palette-classic"},
        "thresholds": thresholds,
        "custom": {
            "drawStyle": "bars" if bars else "line",
            "lineWidth": 1,
            "fillOpacity": fill_opacity,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if stacked else "none", "group": "A"},
            "thresholdsStyle": {"mode": threshold_style},
        },
    }
    if minimum is not None:
        defaults["min"] = minimum
    if maximum is not None:
        defaults["max"] = maximum
    if decimals is not None:
        defaults["decimals"] = decimals

    body: Json = {
        "type": "timeseries",
        "fieldConfig": {"defaults": defaults, "overrides": overrides or []},
        "options": {
            "legend": {
                "displayMode": "table",
                "placement": "bottom",
                "showLegend": True,
                "calcs": ["lastNotNull", "max"],
            },
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
    }
    return Panel(title, description, width, height, body, queries)


def _state_timeline(title: str, description: str, query: Query, *, off_text: str, on_text: str) -> Panel:
    """Return a panel that draws a 0/1 gauge as red/green bands, one band per series."""
    body: Json = {
        "type": "state-timeline",
        "fieldConfig": {
            "defaults": {
                "unit": "none",
                "min": 0,
                "max": 1,
                "thresholds": _thresholds((1, "green"), base="red"),
                "color": {"mode": "thresholds"},
                "mappings": [
                    {
                        "type": "value",
                        "options": {
                            "0": {"text": off_text, "color": "red", "index": 0},
                            "1": {"text": on_text, "color": "green", "index": 1},
                        },
                    }
                ],
                "custom": {"fillOpacity": 80, "lineWidth": 0},
            },
            "overrides": [],
        },
        "options": {
            "showValue": "never",
            "mergeValues": True,
            "rowHeight": 0.9,
            "alignValue": "left",
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "single", "sort": "none"},
        },
    }
    return Panel(title, description, 12, 7, body, [query])


def _alert_list(title: str, description: str) -> Panel:
    body: Json = {
        "type": "alertlist",
        "options": {
            "viewMode": "list",
            "groupMode": "default",
            "groupBy": [],
            "maxItems": 20,
            "sortOrder": 3,  # importance: firing first, then pending
            "dashboardAlerts": False,
            "alertName": "",
            "alertInstanceLabelFilter": "",
            # Lists the Prometheus alert rules (read through the datasource's rules API), not Grafana's own.
            "datasource": DATASOURCE_NAME,
            "showInactiveAlerts": False,
            "stateFilter": {
                "firing": True,
                "pending": True,
                "recovering": True,
                "noData": False,
                "normal": False,
                "error": True,
            },
        },
    }
    return Panel(title, description, GRID_WIDTH, 7, body)


def _dashed_line(ref_id: str, color: str) -> Json:
    """Return a field override that draws the series of query `ref_id` as a dashed line of one colour."""
    return {
        "matcher": {"id": "byFrameRefID", "options": ref_id},
        "properties": [
            {"id": "color", "value": {"mode": "fixed", "fixedColor": color}},
            {"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
            {"id": "custom.fillOpacity", "value": 0},
            {"id": "custom.lineWidth", "value": 2},
        ],
    }


def _name_primary(expr: str) -> str:
    """Wrap `expr` so the primary's series (twin_id="") show as twin_id="(primary)" in legends."""
    return f'label_replace({expr}, "twin_id", "(primary)", "twin_id", "")'


def _rows() -> list[Row]:
    """Return the drift dashboard's rows, top to bottom."""
    kl = f"llm_twin_output_kl_divergence{{{TWIN_SELECTOR}}}"
    rate_window = "[$__rate_interval]"

    alerts = Row(
        "Alerts",
        [
            _alert_list(
                "Firing and pending alerts",
                "Prometheus alert rules of the stack that are firing or pending, most important first.",
            )
        ],
    )

    divergence = Row(
        "Output divergence",
        [
            _timeseries(
                "KL divergence per twin",
                "Mean KL(primary || twin) of next-token distributions over the last window, in nats. "
                "Dashed lines are the fixed warning and critical alert thresholds. A twin that exports a "
                "divergence budget alerts at the larger of these and its budget times a factor.",
                [
                    Query(kl, "{{twin_id}}"),
                    Query(KL_WARNING_RULE, "warning threshold"),
                    Query(KL_CRITICAL_RULE, "critical threshold"),
                ],
                unit="suffix: nats",
                thresholds=_thresholds(),
                overrides=[_dashed_line("B", "orange"), _dashed_line("C", "red")],
            ),
            _timeseries(
                "JS divergence per twin",
                "Mean Jensen-Shannon divergence of next-token distributions over the last window, in nats. "
                "Symmetric and bounded: the dashed line is its maximum ln 2, reached when the two "
                "distributions share no support. No alert rule reads JS.",
                [Query(f"llm_twin_output_js_divergence{{{TWIN_SELECTOR}}}", "{{twin_id}}")],
                unit="suffix: nats",
                thresholds=_thresholds((JS_MAX_NATS, "red")),
                threshold_style="dashed",
            ),
            _timeseries(
                "KL attributed by cause",
                "KL split by why the twin differs: same_version is the twin's own numerics (quantization, "
                "blending) at the primary's version, version_lag is divergence while it runs an older "
                "version.",
                [
                    Query(
                        f"llm_twin_attributed_kl_divergence{{{TWIN_SELECTOR}}}",
                        "{{twin_id}} {{cause}}",
                    )
                ],
                unit="suffix: nats",
                thresholds=_thresholds(),
                stacked=True,
            ),
            _timeseries(
                "Divergence budget used",
                "KL as a share of the twin's divergence budget (the divergence expected of its role); "
                "shown only for twins that export a budget. The discrepancy alert fires at the warning "
                "and critical factors drawn here, unless KL is still below the fixed KL thresholds.",
                [
                    Query(
                        f'{kl} / on(model_id, twin_id) llm_twin_divergence_budget{{{TWIN_SELECTOR}, signal="kl"}}',
                        "{{twin_id}}",
                    )
                ],
                unit="percentunit",
                thresholds=_thresholds(
                    (RULE_THRESHOLDS["llm_twin:threshold:kl_budget_warning_factor"], "orange"),
                    (RULE_THRESHOLDS["llm_twin:threshold:kl_budget_critical_factor"], "red"),
                ),
                threshold_style="dashed",
            ),
            _timeseries(
                "Top-1 agreement",
                "Share of compared positions where primary and twin pick the same most likely next token.",
                [Query(f"llm_twin_output_top1_agreement_ratio{{{TWIN_SELECTOR}}}", "{{twin_id}}")],
                unit="percentunit",
                thresholds=_thresholds((0.9, "orange"), (0.99, "green"), base="red"),
                maximum=1,
                width=8,
            ),
            _timeseries(
                "Output L2 distance",
                "Mean L2 norm of the difference between the primary's and the twin's next-token probability "
                "vectors; 0 for identical outputs, at most sqrt(2).",
                [Query(f"llm_twin_output_l2_distance{{{TWIN_SELECTOR}}}", "{{twin_id}}")],
                unit="none",
                thresholds=_thresholds(),
                width=8,
            ),
            _timeseries(
                "Drift detections",
                "Change points found on the twins' discrepancy streams per rate interval, by signal.",
                [
                    Query(
                        "sum by (twin_id, signal) "
                        f"(increase(llm_twin_drift_detected_total{{{TWIN_SELECTOR}}}{rate_window}))",
                        "{{twin_id}} {{signal}}",
                    )
                ],
                unit="short",
                thresholds=_thresholds((1, "orange")),
                bars=True,
                width=8,
            ),
        ],
    )

    sync = Row(
        "Weights and sync",
        [
            _timeseries(
                "Weight relative distance",
                "||W_primary - W_twin|| / ||W_primary|| over all tensors; 0 for a bitwise copy.",
                [Query(f"llm_twin_weight_relative_distance{{{TWIN_SELECTOR}}}", "{{twin_id}}")],
                unit="percentunit",
                thresholds=_thresholds((0.01, "orange"), (0.1, "red")),
                width=8,
            ),
            _timeseries(
                "Version lag",
                "Primary's latest announced version minus the version the twin has applied. The line is "
                "the stale-twin alert threshold; the frozen twin is exempt from that alert.",
                [Query(f"llm_twin_version_lag{{{TWIN_SELECTOR}}}", "{{twin_id}}")],
                unit="none",
                decimals=0,
                thresholds=_thresholds((RULE_THRESHOLDS["llm_twin:threshold:version_lag_warning"], "orange")),
                threshold_style="dashed",
                width=8,
            ),
            _timeseries(
                "Staleness",
                "Time since the primary published the version the twin runs. The line is the stale-twin "
                "alert threshold; the frozen twin is exempt from that alert.",
                [Query(f"llm_twin_staleness_seconds{{{TWIN_SELECTOR}}}", "{{twin_id}}")],
                unit="s",
                thresholds=_thresholds((RULE_THRESHOLDS["llm_twin:threshold:staleness_seconds_warning"], "orange")),
                threshold_style="dashed",
                width=8,
            ),
            _timeseries(
                "Sync latency p50 / p90 / p99",
                "Time from the primary publishing an update to the twin applying it, as quantiles estimated "
                "from the histogram buckets over the rate interval.",
                [
                    Query(
                        f"histogram_quantile({quantile}, sum by (twin_id, le) "
                        f"(rate(llm_twin_sync_latency_seconds_bucket{{{TWIN_SELECTOR}}}{rate_window})))",
                        f"{{{{twin_id}}}} p{label}",
                    )
                    for quantile, label in ((0.5, "50"), (0.9, "90"), (0.99, "99"))
                ],
                unit="s",
                thresholds=_thresholds((1, "orange"), (10, "red")),
                width=8,
            ),
            _timeseries(
                "Updates applied by kind",
                "Weight updates applied per second, by kind (snapshot or delta).",
                [
                    Query(
                        "sum by (twin_id, kind) "
                        f"(rate(llm_twin_updates_applied_total{{{TWIN_SELECTOR}}}{rate_window}))",
                        "{{twin_id}} {{kind}}",
                    )
                ],
                unit="suffix: /s",
                thresholds=_thresholds(),
                width=8,
            ),
            _timeseries(
                "Samples compared",
                "Output positions compared between primary and twin per second.",
                [
                    Query(
                        f"sum by (twin_id) (rate(llm_twin_samples_compared_total{{{TWIN_SELECTOR}}}{rate_window}))",
                        "{{twin_id}}",
                    )
                ],
                unit="suffix: /s",
                thresholds=_thresholds(),
                width=8,
            ),
        ],
    )

    transport = Row(
        "Transport health",
        [
            _state_timeline(
                "Broker connection",
                "1 (green) while the process is connected to the MQTT broker; the primary's row is labelled (primary).",
                Query(_name_primary(f"llm_twin_broker_connected{{{TWIN_OR_PRIMARY_SELECTOR}}}"), "{{twin_id}}"),
                off_text="disconnected",
                on_text="connected",
            ),
            _state_timeline(
                "Primary online, as seen by each twin",
                "1 (green) while the primary's retained status message says online.",
                Query(f"llm_twin_primary_online{{{TWIN_SELECTOR}}}", "{{twin_id}}"),
                off_text="offline",
                on_text="online",
            ),
            _timeseries(
                "Messages rejected by reason",
                "Incoming messages rejected per second, by reason. A sustained rate means broken or "
                "hostile payloads reach the process; the line is the alert threshold.",
                [
                    Query(
                        _name_primary(
                            "sum by (twin_id, reason) "
                            f"(rate(llm_twin_messages_rejected_total{{{TWIN_OR_PRIMARY_SELECTOR}}}{rate_window}))"
                        ),
                        "{{twin_id}} {{reason}}",
                    )
                ],
                unit="suffix: /s",
                thresholds=_thresholds((RULE_THRESHOLDS["llm_twin:threshold:messages_rejected_per_second"], "orange")),
                threshold_style="dashed",
                width=8,
            ),
            _timeseries(
                "Resyncs by reason",
                "Full resyncs the twins requested per rate interval, by reason.",
                [
                    Query(
                        f"sum by (twin_id, reason) (increase(llm_twin_resyncs_total{{{TWIN_SELECTOR}}}{rate_window}))",
                        "{{twin_id}} {{reason}}",
                    )
                ],
                unit="short",
                thresholds=_thresholds((1, "orange")),
                bars=True,
                width=8,
            ),
            _timeseries(
                "Primary publish rate",
                "Payload bytes the primary publishes per second, by message kind.",
                [
                    Query(
                        "sum by (kind) "
                        f"(rate(llm_twin_primary_published_bytes_total{{{PRIMARY_SELECTOR}}}{rate_window}))",
                        "{{kind}}",
                    )
                ],
                unit="Bps",
                thresholds=_thresholds(),
                width=8,
            ),
        ],
    )

    primary = Row(
        "Primary",
        [
            _timeseries(
                "Primary training loss",
                "Mean training loss of the primary over recent steps, in nats per byte; ln 256 (5.55) is a "
                "uniform guess over bytes.",
                [Query(f"llm_twin_primary_training_loss{{{PRIMARY_SELECTOR}}}", "{{model_id}}")],
                unit="suffix: nats/byte",
                thresholds=_thresholds((5.545, "red")),
                minimum=None,
            ),
            _timeseries(
                "Primary model version",
                "Latest weight version the primary published; a flat line means training or publishing stopped.",
                [Query(f"llm_twin_primary_model_version{{{PRIMARY_SELECTOR}}}", "{{model_id}}")],
                unit="none",
                decimals=0,
                thresholds=_thresholds(),
            ),
        ],
    )

    return [alerts, divergence, sync, transport, primary]


def _layout(rows: list[Row]) -> list[Json]:
    """Assign ids and grid positions, filling each row left to right and wrapping at the grid width."""
    panels: list[Json] = []
    next_id = 1
    y = 0

    for row in rows:
        panels.append(
            {
                "type": "row",
                "id": next_id,
                "title": row.title,
                "collapsed": False,
                "datasource": DATASOURCE,
                "gridPos": {"h": 1, "w": GRID_WIDTH, "x": 0, "y": y},
                "panels": [],
            }
        )
        next_id += 1
        y += 1

        x = 0
        line_height = 0
        for panel in row.panels:
            if x + panel.width > GRID_WIDTH:
                y += line_height
                x = 0
                line_height = 0
            panels.append(_panel_json(panel, next_id, x, y))
            next_id += 1
            x += panel.width
            line_height = max(line_height, panel.height)
        y += line_height

    return panels


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> Json:
    rendered: Json = {
        "id": panel_id,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        **panel.body,
    }
    if panel.queries:
        rendered["targets"] = [
            {
                "datasource": DATASOURCE,
                "refId": chr(ord("A") + index),
                "expr": query.expr,
                "legendFormat": query.legend,
                "range": True,
                "instant": False,
                "editorMode": "code",
            }
            for index, query in enumerate(panel.queries)
        ]
    return rendered


def _query_variable(name: str, label: str, definition: str) -> Json:
    """Return a multi-value template variable filled from a `label_values(...)` query, All = `.*`."""
    return {
        "type": "query",
        "name": name,
        "label": label,
        "datasource": DATASOURCE,
        "definition": definition,
        "query": {"qryType": 1, "query": definition, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "refresh": 2,  # on time range change, so new twins appear without a reload
        "sort": 1,
        "multi": True,
        "includeAll": True,
        # `.*` rather than Grafana's default alternation of the known values, so All also matches series
        # that appeared after the dashboard loaded.
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "hide": 0,
        "regex": "",
        "skipUrlSync": False,
    }


def build_drift_dashboard() -> Json:
    """Build the drift dashboard: per-twin divergence, sync and transport health, the primary, alerts."""
    variables = [
        _query_variable("model_id", "Model", "label_values(llm_twin_broker_connected, model_id)"),
        _query_variable(
            "twin_id",
            "Twin",
            'label_values(llm_twin_output_kl_divergence{model_id=~"$model_id"}, twin_id)',
        ),
    ]

    return {
        "id": None,
        "uid": DRIFT_DASHBOARD_UID,
        "title": "LLM twin drift",
        "description": "Divergence between a primary model and its twins, their sync and the transport.",
        "tags": ["llm-twin"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,  # shared crosshair: one time cursor across panels
        "fiscalYearStartMonth": 0,
        "liveNow": False,
        "refresh": "10s",
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "time": {"from": "now-30m", "to": "now"},
        "timepicker": {},
        "links": [],
        "annotations": {
            "list": [
                {
                    # Built-in query for annotations stored in Grafana for this dashboard, which is where
                    # `monitor.grafana.client.Annotator` posts drift and resync events.
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "templating": {"list": variables},
        "panels": _layout(_rows()),
    }


def build_dashboards() -> dict[str, Json]:
    """Return every generated dashboard keyed by its file name under `dashboards/`."""
    return {DRIFT_DASHBOARD_FILE: build_drift_dashboard()}


def render(dashboard: Json) -> str:
    """Return the dashboard as the exact text committed to the repository (2-space JSON, final newline)."""
    return json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"


def iter_panels(dashboard: Json) -> Iterator[Json]:
    """Yield every panel, including panels nested in collapsed rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def substitute_variables(expr: str) -> str:
    """Replace Grafana variables (`$name`, `${name}`, `${name:format}`) by QUERY_SUBSTITUTIONS values.

    Raises ValueError for a variable with no substitution, so a new variable cannot slip past query checks.
    """

    def replace(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        if name not in QUERY_SUBSTITUTIONS:
            raise ValueError(
                f"unknown dashboard variable ${name} in {expr!r}: add it to QUERY_SUBSTITUTIONS "
                f"(known: {', '.join(sorted(QUERY_SUBSTITUTIONS))})"
            )
        return QUERY_SUBSTITUTIONS[name]

    return _VARIABLE.sub(replace, expr)


def panel_queries(dashboard: Json) -> list[tuple[str, str]]:
    """Return (panel title, PromQL expression) for every query target, variables substituted.

    Substitutions come from QUERY_SUBSTITUTIONS (`.*` for label variables, `1m` for rate windows), so each
    expression can be sent as is to Prometheus's /api/v1/query.
    """
    queries: list[tuple[str, str]] = []
    for panel in iter_panels(dashboard):
        for target in panel.get("targets", []):
            queries.append((str(panel["title"]), substitute_variables(str(target["expr"]))))
    return queries


def default_output_dir() -> Path:
    """Return `dashboards/` of the source checkout this module was loaded from."""
    return Path(__file__).resolve().parents[2] / "dashboards"


def stale_files(output_dir: Path) -> list[Path]:
    """Return the dashboard files under `output_dir` that are missing or differ from the generated JSON."""
    stale = []
    for name, dashboard in build_dashboards().items():
        path = output_dir / name
        if not path.is_file() or path.read_text(encoding="utf-8") != render(dashboard):
            stale.append(path)
    return stale


def write_dashboards(output_dir: Path) -> list[Path]:
    """Write every generated dashboard into `output_dir` and return the paths written."""
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, dashboard in build_dashboards().items():
        path = output_dir / name
        path.write_text(render(dashboard), encoding="utf-8")
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Run the generator command line; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m monitor.grafana.dashboards",
        description="Generate the Grafana dashboards of llm-twin-monitor, or check the committed JSON.",
    )
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--check", action="store_true", help="exit 1 when a committed dashboard file is stale")
    action.add_argument("--write", action="store_true", help="rewrite the dashboard files from the code")
    parser.add_argument(
        "--output-dir",
        type=Path,
        default=default_output_dir(),
        help="folder of the dashboard JSON files (default: dashboards/ of this checkout)",
    )
    args = parser.parse_args(argv)

    if args.write:
        for path in write_dashboards(args.output_dir):
            print(f"wrote {path}")
        return 0

    stale = stale_files(args.output_dir)
    for path in stale:
        print(
            f"stale dashboard: {path} differs from the generated JSON; "
            "run python -m monitor.grafana.dashboards --write",
            file=sys.stderr,
        )
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
