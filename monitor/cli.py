"""The `llm-twin` command line.

Options are generated from the settings models, so every option also reads `LLM_TWIN_<OPTION>` and is
validated by the same code. An invalid value exits with status 2 and one line naming it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Literal, NoReturn, get_args, get_origin
from urllib.parse import urlsplit, urlunsplit

from prometheus_client import CollectorRegistry, disable_created_metrics
from pydantic import ValidationError
from pydantic_core import PydanticUndefined
from pydantic_settings import BaseSettings

from monitor import __version__
from monitor.config import DemoSettings, PrimarySettings, ServiceSettings, TwinSettings
from monitor.logs import configure_logging
from monitor.serving import metrics_server, run_until_stopped

logger = logging.getLogger("monitor.cli")

SECRET_FIELDS = {"mqtt_password", "grafana_token"}  # environment only: command lines are visible to every local user


def _add_options(parser: argparse.ArgumentParser, model: type[BaseSettings]) -> None:
    for name, field in model.model_fields.items():
        if name in SECRET_FIELDS:
            continue
        flag = "--" + name.replace("_", "-")
        env = "LLM_TWIN_" + name.upper()
        default = "" if field.default in (None, PydanticUndefined) else f" (default: {field.default})"
        choices = _choices(field.annotation)
        accepted = f"; one of {', '.join(choices)}" if choices else ""
        help_text = f"{field.description or name}{accepted}{default} [env {env}]"
        if get_origin(field.annotation) is list or name == "corpus":
            parser.add_argument(
                flag, dest=name, action="append", default=argparse.SUPPRESS, help=help_text, metavar="PATH"
            )
        else:
            parser.add_argument(flag, dest=name, default=argparse.SUPPRESS, help=help_text, metavar=name.upper())


def _choices(annotation: Any) -> list[str]:
    """Return the accepted values of a Literal field (also inside `X | None`), else an empty list."""
    if get_origin(annotation) is Literal:
        return [str(value) for value in get_args(annotation)]
    for member in get_args(annotation):
        if get_origin(member) is Literal:
            return [str(value) for value in get_args(member)]
    return []


def _fail(prog: str, message: str) -> NoReturn:
    print(f"{prog}: {message}", file=sys.stderr)
    raise SystemExit(2)


def _load(model: type[BaseSettings], given: dict[str, Any], prog: str) -> Any:
    try:
        return model(**given)
    except ValidationError as exc:
        error = exc.errors()[0]
        message = error["msg"].removeprefix("Value error, ")
        if not error["loc"]:
            _fail(prog, f"invalid options: {message}")  # a check across several options
        name = str(error["loc"][0])
        source = "--" + name.replace("_", "-") if name in given else "LLM_TWIN_" + name.upper()
        value = error.get("input")
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            shown = ", ".join(repr(item) for item in value)  # a repeated option such as --corpus
        else:
            shown = repr(_without_credentials(value))
        _fail(prog, f"invalid {source} {shown}: {message}")


def _warn_unknown_variables(model: type[BaseSettings], prog: str) -> None:
    """Log the LLM_TWIN_* variables that are not options of this command, most often a typo or another command's option."""
    known = {"LLM_TWIN_" + name.upper() for name in model.model_fields}
    unknown = sorted(name for name in os.environ if name.startswith("LLM_TWIN_") and name not in known)
    if unknown:
        logger.warning("ignored environment variables %s: not options of %s (see its --help)", unknown, prog)


def _without_credentials(value: Any) -> Any:
    """Return `value`, with the user name and password of a URL replaced by '***' so no error message shows them."""
    if not isinstance(value, str):
        return value
    parts = urlsplit(value)
    if "@" not in parts.netloc:
        return value
    return urlunsplit(parts._replace(netloc="***@" + parts.netloc.rsplit("@", 1)[1]))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-twin", description="Keep an LLM twin in step with its primary and measure the gap."
    )
    parser.add_argument("--version", action="version", version=f"llm-twin-monitor {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    primary = commands.add_parser("primary", help="train the reference model on text and publish weights and outputs")
    _add_options(primary, PrimarySettings)
    twin = commands.add_parser("twin", help="follow a primary under a sync policy, compare, serve /metrics")
    _add_options(twin, TwinSettings)
    demo = commands.add_parser("demo", help="embedded broker, one primary and four twins (mirror, ema, frozen, int8)")
    _add_options(demo, DemoSettings)
    sink = commands.add_parser("alert-sink", help="receive Alertmanager webhooks, log and count them")
    _add_options(sink, ServiceSettings)

    grafana = commands.add_parser("grafana", help="Grafana helpers")
    grafana_commands = grafana.add_subparsers(dest="grafana_command", required=True, metavar="ACTION")
    push = grafana_commands.add_parser(
        "push", help="upload the dashboards to an existing Grafana (token from LLM_TWIN_GRAFANA_TOKEN)"
    )
    push.add_argument("--grafana-url", required=True, help="base URL of Grafana, e.g. http://127.0.0.1:3000")
    push.add_argument(
        "--folder", default=None, help="title of the Grafana folder for the dashboards (created if missing)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    command = args.pop("command")
    prog = f"llm-twin {command}"

    if command == "grafana":
        from monitor.grafana.client import grafana_push

        return grafana_push(args["grafana_url"], folder=args["folder"])

    models: dict[str, type[ServiceSettings]] = {
        "primary": PrimarySettings,
        "twin": TwinSettings,
        "demo": DemoSettings,
        "alert-sink": ServiceSettings,
    }
    model = models[command]
    settings = _load(model, args, prog)
    configure_logging(settings.log_level, settings.log_format)
    _warn_unknown_variables(model, prog)
    registry = CollectorRegistry()
    try:
        main = _service(command, settings, registry)
    except ValueError as exc:
        _fail(prog, str(exc))

    # prometheus_client adds a `_created` series per counter and histogram; Prometheus does not need them.
    disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client
    if command == "alert-sink":
        # The sink serves /metrics itself, next to its webhook endpoint.
        try:
            asyncio.run(run_until_stopped(main, settings.duration))
        except OSError as exc:
            _fail(
                prog,
                f"cannot serve on {settings.metrics_host}:{settings.metrics_port}: {exc.strerror or exc}; check "
                "--metrics-host (an address of this machine, such as 127.0.0.1) and --metrics-port (a free port)",
            )
        return 0
    try:
        with metrics_server(settings.metrics_host, settings.metrics_port, registry):
            asyncio.run(run_until_stopped(main, settings.duration))
    except OSError as exc:
        _fail(prog, str(exc))
    return 0


def _service(command: str, settings: Any, registry: CollectorRegistry) -> Callable[[asyncio.Event], Awaitable[None]]:
    """Build the service now, so that invalid settings fail before anything starts."""
    if command == "primary":
        from monitor.primary.service import Primary

        return Primary(settings, registry).run
    if command == "twin":
        from monitor.twin.service import Twin

        return Twin(settings, registry).run
    if command == "demo":
        from monitor.demo import run_demo

        return lambda stop: run_demo(settings, registry, stop)

    from monitor.alerting.sink import serve_alert_sink

    return lambda stop: serve_alert_sink(settings, registry, stop)


if __name__ == "__main__":
    raise SystemExit(main())
