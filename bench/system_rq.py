"""RQ: ``Queue.enqueue`` and one ``SimpleWorker`` process (RQ has no threads).

``SimpleWorker`` runs each job in the worker process itself instead of forking a work horse
per job, so the worker is one process running one job at a time: concurrency 1, reported
as such. Defaults otherwise (pickle serializer, results kept 500 s). The producer reads a
result with ``job.latest_result(timeout=...)``, which blocks on the result stream (XREAD).
"""

from __future__ import annotations

import redis
from rq import Queue
from rq.job import Job

from bench import tasks
from bench.adapter import Op, SystemSpec
from bench.config import QUEUE_NAME, BenchConfig


def make_queue(redis_url: str) -> Queue:
    """The benchmark's RQ queue on ``redis_url``."""
    return Queue(QUEUE_NAME, connection=redis.Redis.from_url(redis_url))


class RqProducer:
    """Enqueues with ``Queue.enqueue``; waits with ``Job.latest_result(timeout=...)``."""

    def __init__(self, redis_url: str, config: BenchConfig) -> None:
        """Open the queue on ``redis_url``."""
        self.queue = make_queue(redis_url)
        self.sleep_seconds = config.sleep_seconds

    def enqueue(self, op: Op, total: int) -> object:
        """Enqueue the task body for ``op`` by reference."""
        if op == "noop":
            return self.queue.enqueue(tasks.noop, total)
        if op == "sleep":
            return self.queue.enqueue(tasks.sleep, total, self.sleep_seconds)
        return self.queue.enqueue(tasks.stamp)

    def wait_value(self, handle: object, timeout: float) -> float | None:
        """Block on the job's result stream."""
        if not isinstance(handle, Job):
            raise TypeError(f"not an rq job: {handle!r}")
        result = handle.latest_result(timeout=max(1, round(timeout)))
        if result is None or result.return_value is None:
            return None
        return float(result.return_value)

    def close(self) -> None:
        """Close the queue's connection."""
        self.queue.connection.close()


SPEC = SystemSpec(
    name="rq",
    distribution="rq",
    worker_module="bench.worker_rq",
    shape="1 process x 1 job at a time (SimpleWorker; RQ has no threads)",
    result_mechanism="job.latest_result(timeout=...) (XREAD BLOCK on the result stream)",
    make_producer=RqProducer,
)
