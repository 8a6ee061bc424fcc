"""Read docker-compose.yml the way Docker Compose interpolates it, for tests that run its services natively.

Compose replaces `${VAR}`, `$VAR`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?message}` and
`${VAR?message}` in every string value and turns `$$` into a literal `$`. `load_compose` applies the same
rules with an explicit environment (empty by default, so tests see the documented defaults and not the
caller's shell), and `native_invocation` turns one llm-twin service into the argv and environment that
run it outside a container.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE_PATH = REPO / "docker-compose.yml"
DOCKERFILE = "Dockerfile"

ENTRYPOINT = "llm-twin"
"""The image's ENTRYPOINT: a service's `command` is the argument list after it."""

_REFERENCE = re.compile(
    r"""
    \$(?:
        (?P<escaped>\$)
      | \{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<operator>:?[-?])(?P<argument>[^}]*))?\}
      | (?P<bare>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<invalid>)
    )
    """,
    re.VERBOSE,
)


class InterpolationError(ValueError):
    """A `${VAR:?message}` reference to a missing variable, or a `$` that Compose cannot parse."""


def interpolate(text: str, environ: Mapping[str, str]) -> str:
    """Return `text` with every Compose variable reference replaced from `environ`."""

    def replace(match: re.Match[str]) -> str:
        if match.group("escaped") is not None:
            return "$"
        if match.group("invalid") is not None:
            raise InterpolationError(
                f"invalid interpolation in {text!r} at offset {match.start()}: write $$ for a literal $"
            )

        name = match.group("braced") or match.group("bare")
        operator = match.group("operator")
        argument = match.group("argument") or ""
        value = environ.get(name)

        # `:-` and `:?` treat an empty value like a missing one; `-` and `?` only a missing one.
        missing = value is None or (operator is not None and operator.startswith(":") and value == "")
        if not missing:
            return value or ""
        if operator in (":-", "-"):
            return argument
        if operator in (":?", "?"):
            raise InterpolationError(f"required variable {name} is not set: {argument}")
        return ""

    return _REFERENCE.sub(replace, text)


def _interpolate_tree(node: Any, environ: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, environ)
    if isinstance(node, Mapping):
        return {key: _interpolate_tree(value, environ) for key, value in node.items()}
    if isinstance(node, list):
        return [_interpolate_tree(item, environ) for item in node]
    return node


def load_compose(path: Path = COMPOSE_PATH, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Parse a compose file, resolve YAML anchors and interpolate every string value from `environ`."""
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(document, dict) or not isinstance(document.get("services"), dict):
        raise ValueError(f"{path} has no `services` mapping; it is not a compose file")
    result: dict[str, Any] = _interpolate_tree(document, environ or {})
    return result


def llm_twin_services(compose: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Return the services that are built from the project's Dockerfile, by name."""
    return {name: service for name, service in compose["services"].items() if "build" in service}


def native_invocation(service: Mapping[str, Any]) -> tuple[list[str], dict[str, str]]:
    """Return the argv and the LLM_TWIN_* environment that run an llm-twin service outside Docker.

    Host names of the compose network (mosquitto, alertmanager, ...) stay as they are: the caller
    rewrites LLM_TWIN_BROKER and the metrics address for loopback.
    """
    command = service.get("command")
    if not isinstance(command, list) or not all(isinstance(part, str) for part in command):
        raise ValueError(f"service command {command!r} is not an exec-form list of strings")

    environment = service.get("environment", {})
    if not isinstance(environment, Mapping):
        raise ValueError(f"service environment {environment!r} is not a mapping; write it as KEY: value")

    env = {str(key): str(value) for key, value in environment.items()}
    return [ENTRYPOINT, *command], env
