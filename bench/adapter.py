"""The small interface the workloads drive, and how a system's adapter is found.

A system is a module ``bench.system_<name>`` that defines ``SPEC``, a :class:`SystemSpec`.
Its producer side runs in the harness process; its worker runs as ``python -m
bench.worker_<name>``. A peer that is not installed is reported as such, not as a failure.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

from bench.config import BenchConfig

#: What a task does; see :mod:`bench.tasks`.
Op = Literal["noop", "sleep", "stamp"]


class NotInstalledError(Exception):
    """The system's package cannot be imported in this environment."""


@runtime_checkable
class Producer(Protocol):
    """The producer side of one system, as the workloads use it."""

    def enqueue(self, op: Op, total: int) -> object:
        """Enqueue one task running ``op``; return the system's handle for it."""

    def wait_value(self, handle: object, timeout: float) -> float | None:
        """Block up to ``timeout`` s for the task's result; return it, or None on time-out."""

    def close(self) -> None:
        """Release the producer's connections."""


@runtime_checkable
class BatchProducer(Producer, Protocol):
    """A producer that can also enqueue a batch in one call (only semibot_queue here)."""

    def enqueue_batch(self, op: Op, total: int, count: int) -> None:
        """Enqueue ``count`` tasks running ``op`` with one call of the system's batch API."""


@dataclass(frozen=True)
class SystemSpec:
    """What the harness needs to know about one system."""

    name: str
    #: The distribution whose version goes in the results.
    distribution: str
    #: ``python -m`` module that runs this system's worker.
    worker_module: str
    #: How the worker runs, as reported (e.g. "1 process x 8 threads").
    shape: str
    #: How a producer sees a result, as reported.
    result_mechanism: str
    #: ``make_producer(redis_url, config)``.
    make_producer: Callable[[str, BenchConfig], Producer]
    #: Whether its worker takes ``--processes N`` (the system's own way to run N processes).
    processes: bool = False


def load_system(name: str) -> SystemSpec:
    """Import ``bench.system_<name>`` and return its spec.

    Raises:
        NotInstalledError: the system's own package (not the adapter) failed to import.
    """
    try:
        module = importlib.import_module(f"bench.system_{name}")
    except ImportError as exc:
        if exc.name is not None and not exc.name.startswith("bench"):
            raise NotInstalledError(
                f"{name}: not installed ({exc.name} cannot be imported)"
            ) from exc
        raise
    spec = module.SPEC
    if not isinstance(spec, SystemSpec):
        raise TypeError(f"bench.system_{name}.SPEC is not a SystemSpec")
    return spec
