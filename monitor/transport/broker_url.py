"""Parse `--broker` URLs: `mqtt://host:port` or `mqtts://host:port`."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    def __str__(self) -> str:
        scheme = "mqtts" if self.tls else "mqtt"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Return the address in `url`, or raise ValueError saying which form is accepted."""
    accepted = "expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"
    parts = urlsplit(url)
    if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not a broker URL; {accepted}")
    if parts.username or parts.password:
        # Credentials in a URL end up in logs and process lists.
        raise ValueError(
            f"remove the credentials from the URL and set --mqtt-username and LLM_TWIN_MQTT_PASSWORD; {accepted}"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"a broker URL has no path or query; {accepted}")
    try:
        port = parts.port or DEFAULT_PORTS[parts.scheme]
    except ValueError as exc:
        raise ValueError(f"invalid port; {accepted}") from exc
    return BrokerAddress(host=parts.hostname, port=port, tls=parts.scheme == "mqtts")
