"""Run the chosen systems through every workload, ``config.runs`` times, on one Redis."""

from __future__ import annotations

import datetime
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import redis

from bench.adapter import NotInstalledError, SystemSpec, load_system
from bench.config import BenchConfig
from bench.floor import measure_floor
from bench.machine import load_average, machine_info, package_version
from bench.redis_server import RedisServer
from bench.stats import summarise
from bench.workloads import WORKLOADS, Context

FLOOR_SHAPE = "1 thread in the harness process: LPUSH; BLMOVE + INCR + LREM"

Progress = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def load_specs(systems: Sequence[str]) -> tuple[dict[str, SystemSpec], dict[str, str]]:
    """Load each queue system's adapter; return (specs, {name: reason}) for the missing."""
    specs: dict[str, SystemSpec] = {}
    missing: dict[str, str] = {}
    for name in systems:
        if name == "floor":
            continue
        try:
            specs[name] = load_system(name)
        except NotInstalledError as exc:
            missing[name] = str(exc)
    return specs, missing


def _run_system(
    ctx: Context, spec: SystemSpec, run: int, progress: Progress
) -> tuple[dict[str, float], list[str]]:
    """All workloads for one system, once; a failed workload is recorded, not fatal."""
    figures: dict[str, float] = {}
    errors: list[str] = []
    for workload, measure in WORKLOADS.items():
        started = time.monotonic()
        try:
            result = measure(ctx, spec)
        except Exception as exc:  # noqa: BLE001 - a broken workload must not hide the other figures
            errors.append(f"run {run}, {workload}: {type(exc).__name__}: {exc}")
            progress(f"  {spec.name:<9} {workload:<12} FAILED: {exc}")
            continue
        progress(f"  {spec.name:<9} {workload:<12} {time.monotonic() - started:6.1f} s")
        rss = result.pop("rss_mib", None)
        if rss is not None:
            figures["rss_mib"] = max(rss, figures.get("rss_mib", 0.0))
        figures.update(result)
    return figures, errors


def run_benchmark(
    config: BenchConfig,
    systems: Sequence[str],
    workdir: Path,
    progress: Progress = _stderr,
) -> dict[str, Any]:
    """Start Redis, run every system ``config.runs`` times, and return the results document."""
    specs, missing = load_specs(systems)
    load_at_start = load_average()
    samples: dict[str, dict[str, list[float]]] = {name: {} for name in systems}
    errors: dict[str, list[str]] = {name: [] for name in systems}
    with RedisServer(workdir) as server:
        admin = redis.Redis.from_url(server.url)
        try:
            redis_version = str(admin.info("server")["redis_version"])
            ctx = Context(redis_url=server.url, admin=admin, config=config, log_dir=workdir)
            for run in range(1, config.runs + 1):
                progress(f"run {run}/{config.runs} on {server.url}")
                for name in systems:
                    if name == "floor":
                        started = time.monotonic()
                        figures, run_errors = measure_floor(server.url, config), list[str]()
                        progress(
                            f"  {'floor':<9} {'loops':<12} {time.monotonic() - started:6.1f} s"
                        )
                    elif name in specs:
                        figures, run_errors = _run_system(ctx, specs[name], run, progress)
                    else:
                        continue
                    errors[name].extend(run_errors)
                    for metric, value in figures.items():
                        samples[name].setdefault(metric, []).append(value)
        finally:
            admin.close()
    finished = datetime.datetime.now(datetime.timezone.utc)
    return {
        "date": finished.date().isoformat(),
        "finished_at": finished.isoformat(timespec="seconds"),
        "config": asdict(config),
        "machine": {**machine_info(redis_version), "load_average_at_start": load_at_start},
        "systems": {
            name: _system_entry(specs.get(name), missing.get(name), samples[name], errors[name])
            for name in systems
        },
    }


def _system_entry(
    spec: SystemSpec | None,
    missing: str | None,
    samples: dict[str, list[float]],
    errors: list[str],
) -> dict[str, object]:
    """One system's part of the results document."""
    if missing is not None:
        return {"status": "not installed", "detail": missing, "metrics": {}}
    status = "failed" if errors and not samples else ("partial" if errors else "ok")
    entry: dict[str, object] = {
        "status": status,
        "metrics": {metric: summarise(values) for metric, values in samples.items()},
        "errors": errors,
    }
    if spec is None:
        entry.update(shape=FLOOR_SHAPE, version=package_version("redis"))
    else:
        entry.update(
            shape=spec.shape,
            result_mechanism=spec.result_mechanism,
            version=package_version(spec.distribution),
        )
    return entry
