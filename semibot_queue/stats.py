"""A snapshot of a queue's state for operators: what ``semibot-queue stats`` prints."""

from __future__ import annotations

from typing import Any

from semibot_queue.connection import Client
from semibot_queue.keys import KeySpace
from semibot_queue.settings import QueueSettings


def collect(client: Client, keys: KeySpace, settings: QueueSettings) -> dict[str, Any]:
    """Pending, scheduled, dead letters, and each worker's in-flight count and heartbeat age.

    Workers silent for longer than WORKER_DEAD_AFTER are listed as ``dead``: a live
    worker's watcher will recover their tasks.
    """
    pipe = client.pipeline(transaction=False)
    pipe.time()
    pipe.llen(keys.pending)
    pipe.zcard(keys.scheduled)
    pipe.hlen(keys.dead)
    pipe.zrange(keys.workers, 0, -1, withscores=True)
    (seconds, micros), pending, scheduled, dead, workers = pipe.execute()
    now_ms = seconds * 1000 + micros // 1000
    ids = [raw.decode() for raw, _ in workers]
    lengths = client.pipeline(transaction=False)
    for worker_id in ids:
        lengths.llen(keys.inflight(worker_id))
    counts = lengths.execute() if ids else []
    rows = []
    for worker_id, (_, beat), inflight in zip(ids, workers, counts, strict=True):
        age = max(0.0, (now_ms - beat) / 1000)
        rows.append(
            {
                "worker_id": worker_id,
                "in_flight": inflight,
                "heartbeat_age_s": round(age, 3),
                "state": "dead" if age > settings.worker_dead_after else "alive",
            }
        )
    return {
        "queue": keys.queue,
        "pending": pending,
        "scheduled": scheduled,
        "dead_letters": dead,
        "in_flight": sum(row["in_flight"] for row in rows),
        "workers": rows,
        "dead_workers": sum(row["state"] == "dead" for row in rows),
    }
