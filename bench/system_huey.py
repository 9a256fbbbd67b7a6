"""Huey: ``RedisHuey`` with its defaults (blocking BRPOP, results on, ``store_none=False``).

The worker is one consumer process with 8 worker threads (``worker_type="thread"``). A
no-op returns None, so Huey stores no result for it (its default). The producer reads a
result with ``result.get(blocking=True)``, which polls the result hash with Huey's default
back-off (it starts at 0.1 s); Huey's optional ``notify_result=True`` is not enabled.
Huey's dequeue is a plain BRPOP: a task taken by a worker that dies is lost (at-most-once).
"""

from __future__ import annotations

from dataclasses import dataclass

from huey import RedisHuey
from huey.api import Result, TaskWrapper
from huey.exceptions import ResultTimeout

from bench import tasks
from bench.adapter import Op, SystemSpec
from bench.config import QUEUE_NAME, BenchConfig


@dataclass(frozen=True)
class HueyApp:
    """The Huey instance and its three tasks, built the same in both processes."""

    huey: RedisHuey
    tasks: dict[str, TaskWrapper]


def build(redis_url: str) -> HueyApp:
    """Build a ``RedisHuey`` on ``redis_url`` and register the three task bodies."""
    huey = RedisHuey(QUEUE_NAME, url=redis_url)
    wrapped = {
        "noop": huey.task(name="bench_noop")(tasks.noop),
        "sleep": huey.task(name="bench_sleep")(tasks.sleep),
        "stamp": huey.task(name="bench_stamp")(tasks.stamp),
    }
    return HueyApp(huey=huey, tasks=wrapped)


class HueyProducer:
    """Enqueues by calling the task wrapper; waits with ``Result.get(blocking=True)``."""

    def __init__(self, redis_url: str, config: BenchConfig) -> None:
        """Build the app against ``redis_url``."""
        self.app = build(redis_url)
        self.sleep_seconds = config.sleep_seconds

    def enqueue(self, op: Op, total: int) -> object:
        """Call the task wrapper for ``op``, which enqueues it."""
        task = self.app.tasks[op]
        if op == "noop":
            return task(total)
        if op == "sleep":
            return task(total, self.sleep_seconds)
        return task()

    def wait_value(self, handle: object, timeout: float) -> float | None:
        """Poll Huey's result store until the result is there."""
        if not isinstance(handle, Result):
            raise TypeError(f"not a huey result: {handle!r}")
        try:
            value = handle.get(blocking=True, timeout=timeout)
        except ResultTimeout:
            return None
        return float(value)

    def close(self) -> None:
        """Disconnect Huey's connection pool."""
        self.app.huey.storage.pool.disconnect()


SPEC = SystemSpec(
    name="huey",
    distribution="huey",
    worker_module="bench.worker_huey",
    shape="1 process x 8 threads (consumer, worker_type=thread)",
    result_mechanism="result store, Result.get(blocking=True) (polls with back-off)",
    make_producer=HueyProducer,
)
