"""Alert delivery: the webhook receiver that Alertmanager sends alerts to."""

from monitor.alerting.sink import AlertSink, ReceivedAlert, RejectedRequest, run_alert_sink, serve_alert_sink

__all__ = ["AlertSink", "ReceivedAlert", "RejectedRequest", "run_alert_sink", "serve_alert_sink"]
