"""What machine and which versions a result was measured with."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path

import redis.utils

#: Distributions whose versions go into every result file.
DISTRIBUTIONS = ("semibot-queue", "dramatiq", "huey", "rq", "redis", "hiredis")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def _nproc() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def package_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, or None if it is not installed.

    A package imported from a source tree (not installed) reports its ``__version__``.
    """
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        module = importlib.import_module(distribution.replace("-", "_"))
    except ImportError:
        return None
    version = getattr(module, "__version__", None)
    return f"{version} (source tree)" if version else None


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages: a busy machine makes noisy figures."""
    if not hasattr(os, "getloadavg"):
        return None
    return [round(value, 2) for value in os.getloadavg()]


def machine_info(redis_version: str) -> dict[str, object]:
    """Describe this machine, the Python, the packages and the Redis server."""
    return {
        "nproc": _nproc(),
        "cpu": _cpu_model(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "redis_server": redis_version,
        "hiredis_in_use": bool(redis.utils.HIREDIS_AVAILABLE),
        "packages": {name: package_version(name) for name in DISTRIBUTIONS},
        "load_average_at_end": load_average(),
    }
