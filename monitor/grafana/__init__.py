"""Grafana integration: dashboards generated from code, and pushes and annotations over Grafana's HTTP API.

`monitor.grafana.dashboards` builds the dashboard JSON (and is runnable with `python -m`);
`monitor.grafana.client` uploads dashboards and posts annotations. Import from those modules: this package
does not import them eagerly, so `python -m monitor.grafana.dashboards` runs without a double import.
"""
