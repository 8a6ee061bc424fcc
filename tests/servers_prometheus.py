"""Real Prometheus and Alertmanager servers for tests, on free loopback ports.

`running_prometheus` and `running_alertmanager` are context managers: each writes the given configuration
and extra files into a fresh temporary directory, starts Debian's binary listening on 127.0.0.1 only,
waits until its /-/ready endpoint responds (bounded by a timeout), yields a `RunningServer`, and always
stops the process and removes the directory, also when the test fails. Wrap them in a pytest fixture:

    @pytest.fixture
    def prometheus() -> Iterator[RunningServer]:
        with running_prometheus(config_text, {"rules/alerts.yml": RULES / "alerts.yml"}) as server:
            yield server
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Debian installs Alertmanager as prometheus-alertmanager; upstream archives call it alertmanager.
PROMETHEUS_BINARIES = ("prometheus",)
ALERTMANAGER_BINARIES = ("prometheus-alertmanager", "alertmanager")

START_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 10.0
HTTP_TIMEOUT_SECONDS = 5.0
START_ATTEMPTS = 3
"""Another process may take the free port between the probe and the server's bind; retry on a new port."""

FileSource = str | bytes | Path
"""Content of an extra file: text, raw bytes, or a path to copy."""


class ServerStartError(RuntimeError):
    """The server exited or did not become ready; the message ends with the tail of its log."""


@dataclass(frozen=True)
class RunningServer:
    """A started server: its base URL, port, working directory and log file."""

    name: str
    url: str
    port: int
    workdir: Path
    log_path: Path
    pid: int

    def get_json(self, path: str, params: Mapping[str, str] | None = None) -> Any:
        """GET `path` (with query `params`) and return the decoded JSON body."""
        url = self.url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_SECONDS) as response:
            return json.loads(response.read())

    def post_json(self, path: str, payload: Any) -> int:
        """POST `payload` as JSON to `path` and return the HTTP status."""
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(payload).encode("utf-8"),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_SECONDS) as response:
            status: int = response.status
            return status


def find_binary(candidates: Sequence[str], package: str) -> str:
    """Return the path of the first installed binary among `candidates`, or raise FileNotFoundError."""
    for name in candidates:
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
        if path:
            return path
    raise FileNotFoundError(f"none of {list(candidates)} is installed; run: apt-get install {package}")


def free_loopback_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def write_files(directory: Path, files: Mapping[str, FileSource]) -> None:
    """Write each file under `directory` at its relative name, creating folders as needed."""
    for relative, source in files.items():
        target = directory / relative
        if not target.resolve().is_relative_to(directory.resolve()):
            raise ValueError(f"file name {relative!r} leaves the server directory; use a relative path inside it")
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(source, Path):
            shutil.copyfile(source, target)
        elif isinstance(source, bytes):
            target.write_bytes(source)
        else:
            target.write_text(source, encoding="utf-8")


def _log_tail(log_path: Path, max_chars: int = 4000) -> str:
    if not log_path.exists():
        return "(no log)"
    return log_path.read_text(encoding="utf-8", errors="replace")[-max_chars:]


def _is_ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _stop(process: subprocess.Popen[bytes], name: str) -> None:
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        logger.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it", name, process.pid, STOP_TIMEOUT_SECONDS)
        process.kill()
        process.wait(timeout=STOP_TIMEOUT_SECONDS)


@contextmanager
def _running(
    name: str, workdir: Path, build_argv: Callable[[int], list[str]], *, startup_timeout: float
) -> Iterator[RunningServer]:
    """Start `build_argv(port)` on a free port, wait for /-/ready, yield, and always stop it."""
    log_path = workdir / f"{name}.log"
    failures: list[str] = []

    for attempt in range(1, START_ATTEMPTS + 1):
        port = free_loopback_port()
        url = f"http://127.0.0.1:{port}"
        with log_path.open("ab") as log:
            process = subprocess.Popen(build_argv(port), stdout=log, stderr=subprocess.STDOUT, cwd=workdir)
        try:
            deadline = time.monotonic() + startup_timeout
            while process.poll() is None and not _is_ready(url + "/-/ready"):
                if time.monotonic() > deadline:
                    raise ServerStartError(
                        f"{name} on {url} not ready after {startup_timeout:.0f} s; log:\n{_log_tail(log_path)}"
                    )
                time.sleep(0.1)

            if process.poll() is not None:
                failures.append(f"attempt {attempt} on port {port}: exit status {process.returncode}")
                if "address already in use" in _log_tail(log_path):
                    logger.info("%s: port %d was taken before it could bind; retrying", name, port)
                    continue
                raise ServerStartError(f"{name} exited with status {process.returncode}; log:\n{_log_tail(log_path)}")

            logger.info("%s ready on %s (pid %d)", name, url, process.pid)
            yield RunningServer(name, url, port, workdir, log_path, process.pid)
            return
        finally:
            _stop(process, name)

    raise ServerStartError(f"{name} could not bind a free port: {'; '.join(failures)}")


@contextmanager
def running_prometheus(
    config: str,
    files: Mapping[str, FileSource] | None = None,
    *,
    extra_args: Sequence[str] = (),
    startup_timeout: float = START_TIMEOUT_SECONDS,
) -> Iterator[RunningServer]:
    """Run Prometheus with `config` as prometheus.yml and `files` beside it (rule files, for example).

    Relative paths in the configuration resolve against that directory, as they do for
    deploy/prometheus/prometheus.yml.
    """
    binary = find_binary(PROMETHEUS_BINARIES, "prometheus")
    workdir = Path(tempfile.mkdtemp(prefix="prometheus-"))
    try:
        write_files(workdir, {"prometheus.yml": config, **(files or {})})

        def argv(port: int) -> list[str]:
            return [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                *extra_args,
            ]

        with _running("prometheus", workdir, argv, startup_timeout=startup_timeout) as server:
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


@contextmanager
def running_alertmanager(
    config: str,
    files: Mapping[str, FileSource] | None = None,
    *,
    extra_args: Sequence[str] = (),
    startup_timeout: float = START_TIMEOUT_SECONDS,
) -> Iterator[RunningServer]:
    """Run Alertmanager with `config` as alertmanager.yml, without clustering (no gossip port)."""
    binary = find_binary(ALERTMANAGER_BINARIES, "prometheus-alertmanager")
    workdir = Path(tempfile.mkdtemp(prefix="alertmanager-"))
    try:
        write_files(workdir, {"alertmanager.yml": config, **(files or {})})

        def argv(port: int) -> list[str]:
            return [
                binary,
                f"--config.file={workdir / 'alertmanager.yml'}",
                f"--storage.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                # An empty address turns the cluster listener off, so nothing binds 0.0.0.0:9094.
                "--cluster.listen-address=",
                *extra_args,
            ]

        with _running("alertmanager", workdir, argv, startup_timeout=startup_timeout) as server:
            yield server
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
