"""Benchmark the change-point detectors on synthetic streams shaped like a twin's KL divergence.

Each value is gamma-distributed with shape 2 (positive, right-skewed, coefficient of variation 0.71)
around a mean level. Change-free streams measure false alarms. Change streams keep the level for
`--pre` values, then multiply it by 2 or by 1.2 for `--post` values and measure the detection delay.
Detector parameters that are in the units of the stream (Page-Hinkley's delta and threshold) are given
as multiples of the base level, so one setting means the same at every scale.

Run from the repository root, with the package installed (`pip install -e .`):

    python3 benchmarks/detectors.py

It prints the machine, a Markdown table and the elapsed time. With the default options it took 75 s on
one core of a 2-core AMD EPYC virtual machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from monitor.analytics.detectors import ADWIN, DriftDetector, PageHinkley

GAMMA_SHAPE = 2.0
SECONDS_PER_HOUR = 3600


@dataclass(frozen=True)
class Setting:
    """A detector configuration. `build` receives the base level of the stream."""

    label: str
    build: Callable[[float], DriftDetector]


@dataclass(frozen=True)
class ChangeResult:
    median_delay: float
    p90_delay: float
    missed: int
    early_alarms: int


SETTINGS = [
    Setting("PageHinkley delta=0.005 threshold=50 (defaults)", lambda level: PageHinkley()),
    Setting(
        "PageHinkley delta=0.1L threshold=10L",
        lambda level: PageHinkley(delta=0.1 * level, threshold=10.0 * level),
    ),
    Setting(
        "PageHinkley delta=0.1L threshold=25L",
        lambda level: PageHinkley(delta=0.1 * level, threshold=25.0 * level),
    ),
    Setting(
        "PageHinkley delta=0.1L threshold=50L",
        lambda level: PageHinkley(delta=0.1 * level, threshold=50.0 * level),
    ),
    Setting("ADWIN delta=0.02", lambda level: ADWIN(delta=0.02)),
    Setting("ADWIN delta=0.002 (defaults)", lambda level: ADWIN()),
    Setting("ADWIN delta=0.0002", lambda level: ADWIN(delta=0.0002)),
]


def gamma_stream(rng: np.random.Generator, means: npt.NDArray[np.float64]) -> list[float]:
    """Draw one gamma value (shape `GAMMA_SHAPE`) around each mean."""
    values: list[float] = rng.gamma(GAMMA_SHAPE, means / GAMMA_SHAPE).tolist()
    return values


def count_detections(detector: DriftDetector, values: list[float]) -> int:
    return sum(detector.update(value) for value in values)


def false_alarms(setting: Setting, level: float, streams: int, length: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    total = 0
    for _ in range(streams):
        values = gamma_stream(rng, np.full(length, level))
        total += count_detections(setting.build(level), values)
    return total


def change_delays(
    setting: Setting, level: float, factor: float, streams: int, pre: int, post: int, seed: int
) -> ChangeResult:
    """Measure the delay from the change to the first detection after it, over several streams."""
    rng = np.random.default_rng(seed)
    means = np.concatenate([np.full(pre, level), np.full(post, level * factor)])
    delays: list[int] = []
    missed = 0
    early_alarms = 0

    for _ in range(streams):
        detector = setting.build(level)
        delay = None
        for index, value in enumerate(gamma_stream(rng, means)):
            if not detector.update(value):
                continue
            if index < pre:
                early_alarms += 1
                continue
            delay = index - pre
            break
        if delay is None:
            missed += 1
        else:
            delays.append(delay)

    median = float(np.median(delays)) if delays else float("nan")
    p90 = float(np.quantile(delays, 0.9)) if delays else float("nan")
    return ChangeResult(median_delay=median, p90_delay=p90, missed=missed, early_alarms=early_alarms)


def describe_machine() -> list[str]:
    cpu_model = "unknown"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return [
        f"nproc: {os.cpu_count()}",
        f"CPU: {cpu_model}",
        f"Python {platform.python_version()}, numpy {np.__version__}",
    ]


def format_delay(result: ChangeResult) -> str:
    return f"{result.median_delay:.0f} / {result.p90_delay:.0f} / {result.missed}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seed",
        type=int,
        default=20240601,
        help="base seed: change-free streams use it, the x2 and x1.2 streams seed + 1 and seed + 2 (default 20240601)",
    )
    parser.add_argument(
        "--levels",
        type=float,
        nargs="+",
        default=[0.01, 0.05, 1.0, 5.0],
        help="base levels of the streams, in nats (default 0.01 0.05 1 5)",
    )
    parser.add_argument("--null-streams", type=int, default=40, help="change-free streams per setting (default 40)")
    parser.add_argument("--null-length", type=int, default=50_000, help="values per change-free stream (default 50000)")
    parser.add_argument("--change-streams", type=int, default=200, help="streams per change size (default 200)")
    parser.add_argument("--pre", type=int, default=3000, help="values before the change (default 3000)")
    parser.add_argument("--post", type=int, default=5000, help="values after the change (default 5000)")
    args = parser.parse_args()

    started = time.perf_counter()
    for line in describe_machine():
        print(line)
    print(
        f"streams: gamma shape {GAMMA_SHAPE}; false alarms over {args.null_streams} x {args.null_length} "
        f"values; delays over {args.change_streams} streams with the change after {args.pre} values, "
        f"a miss being no detection within {args.post} values; L is the base level"
    )
    print()
    print(
        "| level L | detector | false alarms / 10k | false alarms / hour at 1 Hz "
        "| x2: median / p90 delay / missed | x1.2: median / p90 delay / missed | alarms before the change |"
    )
    print("|---|---|---|---|---|---|---|")

    for level in args.levels:
        for setting in SETTINGS:
            alarms = false_alarms(setting, level, args.null_streams, args.null_length, args.seed)
            samples = args.null_streams * args.null_length
            per_10k = alarms * 10_000 / samples
            per_hour = alarms * SECONDS_PER_HOUR / samples
            double = change_delays(setting, level, 2.0, args.change_streams, args.pre, args.post, args.seed + 1)
            small = change_delays(setting, level, 1.2, args.change_streams, args.pre, args.post, args.seed + 2)
            early = double.early_alarms + small.early_alarms
            print(
                f"| {level:g} | {setting.label} | {per_10k:.2f} | {per_hour:.2f} "
                f"| {format_delay(double)} | {format_delay(small)} | {early} |",
                flush=True,
            )

    print()
    print(f"elapsed: {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
