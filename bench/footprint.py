"""``python -m bench.footprint [--tasks N]``: Redis memory held per finished task.

Starts a fresh redis-server, runs one worker at default settings with a handler that
returns a small reply (an agent's answer in miniature), pushes N tasks through it and
reports what Redis holds afterwards: ``used_memory`` growth per finished task, the key
count and which keys they are (results live RESULT_TTL; idempotency markers go with
the final outcome). DESIGN asks for at most 600 bytes per finished task.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis
from prometheus_client import CollectorRegistry

from bench.redis_server import RedisServer
from semibot_queue import QueueSettings, TaskConsumer, TaskMessage, TaskPayload, TaskProducer

#: The bound DESIGN.md (invariant 11) and issue 8 set, in bytes per finished task.
BOUND_BYTES = 600

_BATCH = 500


def reply(message: TaskMessage) -> dict[str, str]:
    """A small agent reply."""
    return {"reply": f"ok {message.messages[-1]['content'][:16]}"}


def _payload(n: int) -> TaskPayload:
    return TaskPayload(
        session_id=f"session-{n % 50}",
        agent_id="agent-1",
        org_id="org-1",
        messages=[{"role": "user", "content": f"question {n}"}],
    )


def measure(url: str, tasks: int) -> dict[str, Any]:
    """Run ``tasks`` tasks through one worker; what Redis holds per finished task."""
    client = redis.Redis.from_url(url)
    client.flushall()
    client.memory_purge()  # type: ignore[no-untyped-call]
    before = int(client.info("memory")["used_memory"])
    settings = QueueSettings()
    consumer = TaskConsumer(url, None, reply, None, settings, registry=CollectorRegistry())
    with consumer, TaskProducer(url, None, settings, registry=CollectorRegistry()) as producer:
        for start in range(0, tasks, _BATCH):
            producer.enqueue_many([_payload(n) for n in range(start, min(tasks, start + _BATCH))])
            while producer.get_queue_length() > settings.max_queue_length // 2:
                time.sleep(0.05)
        deadline = time.monotonic() + 120
        prefix = f"{{{producer.keys.queue}}}:result:*"
        while sum(1 for _ in client.scan_iter(match=prefix, count=1000)) < tasks:
            if time.monotonic() > deadline:
                raise RuntimeError("results did not all arrive within 120 s")
            time.sleep(0.1)
    client.memory_purge()  # type: ignore[no-untyped-call]
    after = int(client.info("memory")["used_memory"])
    kinds: collections.Counter[str] = collections.Counter()
    for key in client.scan_iter(count=1000):
        tag, _, rest = key.decode().partition("}:")
        kinds[rest.split(":")[0] if rest else tag] += 1
    client.close()
    return {
        "tasks": tasks,
        "used_memory_growth": after - before,
        "bytes_per_task": (after - before) / tasks,
        "keys": dict(kinds),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Measure and print; exit 1 when over the bound."""
    parser = argparse.ArgumentParser(prog="python -m bench.footprint", description=__doc__)
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks to run (%(default)s)")
    args = parser.parse_args(argv)
    if args.tasks < 1:
        parser.error("--tasks must be at least 1")
    with (
        tempfile.TemporaryDirectory(prefix="semibot-footprint-") as workdir,
        RedisServer(Path(workdir)) as server,
    ):
        figures = measure(server.url, args.tasks)
    print(
        f"{figures['tasks']} finished tasks: used_memory grew {figures['used_memory_growth']}"
        f" bytes, {figures['bytes_per_task']:.0f} bytes per finished task"
        f" (bound {BOUND_BYTES}); keys left: {figures['keys']}"
    )
    return 0 if figures["bytes_per_task"] <= BOUND_BYTES else 1


if __name__ == "__main__":
    sys.exit(main())
