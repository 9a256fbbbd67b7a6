"""semibot_queue: ``TaskProducer`` and one ``TaskConsumer(max_concurrent=8)`` process.

The operation rides in ``TaskPayload.config`` (``{"op": ..., "total": ..., "seconds": ...}``);
the worker's handler dispatches on it. The producer reads a result with
``TaskProducer.wait_for_result(task_id, timeout=...)``. Both sides use the same
:func:`bench_settings`: defaults, except that the queue-length cap is raised so that
20,000 tasks can wait before the worker starts (the default cap is 10,000).
"""

from __future__ import annotations

import uuid
from typing import Any

import attrs

from bench import tasks
from bench.adapter import Op, SystemSpec
from bench.config import QUEUE_NAME, BenchConfig
from semibot_queue import QueueSettings, TaskMessage, TaskPayload, TaskProducer

#: Pending-length cap for the benchmark: above any workload's size.
BENCH_QUEUE_CAPACITY = 1_000_000


def bench_settings() -> QueueSettings:
    """Default settings with the length cap (and its warning threshold) above any workload."""
    return attrs.evolve(
        QueueSettings(),
        max_queue_length=BENCH_QUEUE_CAPACITY,
        queue_length_warning_threshold=BENCH_QUEUE_CAPACITY,
    )


def make_payload(session_id: str, op: Op, total: int, seconds: float) -> TaskPayload:
    """A small, realistic payload carrying the operation in ``config``."""
    return TaskPayload(
        session_id=session_id,
        agent_id="bench-agent",
        org_id="bench-org",
        messages=[{"role": "user", "content": f"benchmark task: {op}"}],
        config={"op": op, "total": total, "seconds": seconds},
        metadata={},
    )


def handle(message: TaskMessage) -> Any:
    """The worker's handler: run the operation named in ``message.config``."""
    config = message.config
    op = config["op"]
    if op == "stamp":
        return tasks.stamp()
    if op == "sleep":
        tasks.sleep(int(config["total"]), float(config["seconds"]))
        return None
    tasks.noop(int(config["total"]))
    return None


class SemibotProducer:
    """Enqueues with ``enqueue``/``enqueue_many``; waits with ``wait_for_result``."""

    def __init__(self, redis_url: str, config: BenchConfig) -> None:
        """Connect a ``TaskProducer`` on the benchmark queue."""
        self.producer = TaskProducer(
            redis_url=redis_url, queue_name=QUEUE_NAME, settings=bench_settings()
        )
        self.producer.connect()
        self.sleep_seconds = config.sleep_seconds
        self.session_id = f"bench-{uuid.uuid4()}"

    def enqueue(self, op: Op, total: int) -> object:
        """Build one payload and enqueue it; the handle is the task id."""
        return self.producer.enqueue(make_payload(self.session_id, op, total, self.sleep_seconds))

    def enqueue_batch(self, op: Op, total: int, count: int) -> None:
        """Build ``count`` payloads and enqueue them with one ``enqueue_many`` call."""
        payloads = [
            make_payload(self.session_id, op, total, self.sleep_seconds) for _ in range(count)
        ]
        self.producer.enqueue_many(payloads)

    def wait_value(self, handle: object, timeout: float) -> float | None:
        """Wait for the task's ``TaskResult`` and return its ``result``."""
        if not isinstance(handle, str):
            raise TypeError(f"not a task id: {handle!r}")
        result = self.producer.wait_for_result(handle, timeout=timeout)
        if result is None:
            return None
        if result.status != "succeeded":
            raise RuntimeError(f"task {handle} failed: {result.error}")
        return float(result.result)

    def close(self) -> None:
        """Disconnect the producer."""
        self.producer.disconnect()


SPEC = SystemSpec(
    name="semibot",
    distribution="semibot-queue",
    worker_module="bench.worker_semibot",
    shape="1 process x 8 threads (TaskConsumer, max_concurrent=8)",
    result_mechanism="TaskProducer.wait_for_result (pub/sub + stored result)",
    make_producer=SemibotProducer,
    processes=True,
)
