"""Workload sizes for a full run and for ``--quick``, and the names of the systems."""

from __future__ import annotations

from dataclasses import dataclass

#: Every system the harness knows, in table order. ``floor`` is the bare redis-py loop.
ALL_SYSTEMS: tuple[str, ...] = ("semibot", "dramatiq", "huey", "rq", "floor")

#: The systems whose worker runs as a separate process (everything but the floor).
QUEUE_SYSTEMS: tuple[str, ...] = ("semibot", "dramatiq", "huey", "rq")

#: The queue name every system uses, so keys are easy to recognise in Redis.
QUEUE_NAME = "bench"


@dataclass(frozen=True)
class BenchConfig:
    """How much work each workload does, and how many times the whole set is repeated."""

    noop_tasks: int = 20_000
    batch_size: int = 1_000
    sleep_tasks: int = 2_000
    sleep_seconds: float = 0.010
    latency_samples: int = 200
    wakeups: int = 20
    wakeup_gap_s: float = 2.0
    floor_tasks: int = 20_000
    concurrency: int = 8
    warmup_tasks: int = 5
    runs: int = 3

    @property
    def sleep_ideal_s(self) -> float:
        """The sleep-bound workload's ideal wall time: all slots busy, zero overhead."""
        return self.sleep_tasks * self.sleep_seconds / self.concurrency


#: The full benchmark of issue 5.
FULL = BenchConfig()

#: A smoke run that proves the harness works in a few seconds per system.
QUICK = BenchConfig(
    noop_tasks=300,
    batch_size=100,
    sleep_tasks=100,
    latency_samples=20,
    wakeups=3,
    wakeup_gap_s=0.5,
    floor_tasks=2_000,
    warmup_tasks=2,
    runs=1,
)
