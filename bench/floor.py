"""The floor: a bare redis-py loop doing the minimal at-least-once round trips per task.

One thread in the harness process, no framework. Per task: LPUSH onto ``pending``; then
BLMOVE ``pending`` -> ``inflight`` (the reliable pop), the task's own INCR (the same
completion count every system's no-op does), and LREM from ``inflight`` (the ack). The same
drain without the INCR is also reported, and so is one LPUSH of a whole batch (the floor of
a batched enqueue). Payloads are built before the clock starts: only round trips are timed.
"""

from __future__ import annotations

import json
import time
import uuid

import redis

from bench.config import BenchConfig
from bench.tasks import COUNT_KEY

PENDING_KEY = "bench:floor:pending"
INFLIGHT_KEY = "bench:floor:inflight"

#: BLMOVE's timeout: well under redis-py's 5 s socket timeout.
_POP_TIMEOUT_S = 1


def make_payloads(count: int) -> list[bytes]:
    """``count`` distinct JSON payloads shaped like a small agent task."""
    return [
        json.dumps(
            {
                "task_id": str(uuid.uuid4()),
                "session_id": "bench-session",
                "agent_id": "bench-agent",
                "org_id": "bench-org",
                "messages": [{"role": "user", "content": "benchmark task: noop"}],
                "config": {"op": "noop"},
                "metadata": {},
                "enqueued_at": time.time(),
            }
        ).encode()
        for _ in range(count)
    ]


def _drain(client: redis.Redis[bytes], count: int, *, incr: bool) -> float:
    """Take ``count`` tasks one at a time; return tasks/s."""
    started = time.perf_counter()
    for _ in range(count):
        item = client.blmove(PENDING_KEY, INFLIGHT_KEY, _POP_TIMEOUT_S, "RIGHT", "LEFT")
        if item is None:
            raise RuntimeError("floor: pending list ran dry before the count was reached")
        if incr:
            client.incr(COUNT_KEY)
        client.lrem(INFLIGHT_KEY, 1, item)
    return count / (time.perf_counter() - started)


def measure_floor(redis_url: str, config: BenchConfig) -> dict[str, float]:
    """Run the floor loops over ``config.floor_tasks`` tasks and return their rates."""
    count = config.floor_tasks
    payloads = make_payloads(count)
    client = redis.Redis.from_url(redis_url)
    try:
        client.flushall()
        started = time.perf_counter()
        for payload in payloads:
            client.lpush(PENDING_KEY, payload)
        enqueue_per_s = count / (time.perf_counter() - started)
        noop_per_s = _drain(client, count, incr=True)

        client.flushall()
        started = time.perf_counter()
        for offset in range(0, count, config.batch_size):
            client.lpush(PENDING_KEY, *payloads[offset : offset + config.batch_size])
        batch_per_s = count / (time.perf_counter() - started)
        bare_per_s = _drain(client, count, incr=False)
    finally:
        client.flushall()
        client.close()
    return {
        "enqueue_per_s": enqueue_per_s,
        "enqueue_many_per_s": batch_per_s,
        "noop_per_s": noop_per_s,
        "noop_bare_per_s": bare_per_s,
    }
