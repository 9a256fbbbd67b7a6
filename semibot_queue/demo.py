"""``semibot-queue demo``: a producer and a worker end to end in one process.

Runs on an embedded fakeredis unless a Redis URL is given, so it works on a machine
with nothing else installed.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry

from semibot_queue.connection import Client
from semibot_queue.constants import DEMO_POLL_TIMEOUT
from semibot_queue.consumer import TaskConsumer
from semibot_queue.errors import QueueError
from semibot_queue.models import TaskMessage, TaskPayload
from semibot_queue.producer import TaskProducer
from semibot_queue.settings import QueueSettings

#: Tasks the demo enqueues by default.
DEMO_TASKS = 36

_QUESTIONS = (
    "Summarise the incident report",
    "Draft a reply to the customer",
    "List the open action items",
    "Translate the release notes",
)


class _FlakyOnce:
    """A handler that fails each fourth task's first attempt, to show a retry."""

    def __call__(self, message: TaskMessage) -> dict[str, Any]:
        if message.metadata.get("flaky") and message.retry_count == 0:
            raise RuntimeError("the model endpoint timed out (demo)")
        question = message.messages[-1]["content"]
        return {"agent": message.agent_id, "reply": f"Done: {question.lower()}."}


def _embedded_redis() -> Client:
    try:
        import fakeredis  # noqa: PLC0415 - the demo extra; workers never import it
    except ImportError:
        raise QueueError(
            "the demo's embedded Redis needs fakeredis: pip install 'semibot-queue[demo]',"
            " or give --redis-url"
        ) from None
    client: Client = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    return client


def run(redis_url: str | None, tasks: int, queue: str, out: Any) -> int:
    """Enqueue ``tasks`` agent runs, process them, print each result and a summary.

    Returns 0 when every result came back succeeded, else 1.
    """
    client: Client | None = None
    if redis_url is None:
        client = _embedded_redis()
    # fakeredis cannot cut a blocking pop short: a short poll keeps the demo's stop quick.
    settings = QueueSettings(
        retry_base_delay=0.05, retry_max_delay=0.5, queue_poll_timeout=DEMO_POLL_TIMEOUT
    )
    registry = CollectorRegistry()
    consumer = TaskConsumer(
        redis_url,
        queue,
        _FlakyOnce(),
        8,
        settings,
        client=client,
        registry=registry,
        handle_signals=False,
    )
    worker = threading.Thread(target=consumer.start, name="semibot-queue-demo-worker")
    started = time.perf_counter()
    where = "embedded fakeredis" if client is not None else redis_url
    print(f"semibot-queue demo: {tasks} agent tasks on {where}, queue {queue!r}", file=out)
    worker.start()
    succeeded = 0
    try:
        with TaskProducer(redis_url, queue, settings, client=client, registry=registry) as producer:
            payloads = [
                TaskPayload(
                    session_id=f"session-{n % 6}",
                    agent_id=f"agent-{n % 3}",
                    org_id="demo-org",
                    messages=[{"role": "user", "content": _QUESTIONS[n % len(_QUESTIONS)]}],
                    metadata={"flaky": n % 4 == 0},
                )
                for n in range(tasks)
            ]
            ids = producer.enqueue_many(payloads)
            for n, task_id in enumerate(ids):
                result = producer.wait_for_result(task_id, timeout=30)
                if result is None:
                    print(f"  {n:3d} {task_id}  NO RESULT", file=out)
                    continue
                succeeded += result.status == "succeeded"
                print(
                    f"  {n:3d} {task_id}  {result.status:9s} attempts={result.attempts}"
                    f"  {result.result['reply'] if result.result else result.error}",
                    file=out,
                )
    finally:
        consumer.stop()
        worker.join()
    elapsed = time.perf_counter() - started
    retried = sum(1 for n in range(tasks) if n % 4 == 0)
    print(
        f"summary: {succeeded}/{tasks} succeeded, {retried} needed a retry,"
        f" {elapsed:.2f}s end to end",
        file=out,
    )
    return 0 if succeeded == tasks else 1
