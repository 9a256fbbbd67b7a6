"""How a stopping worker leaves: it waits for its running tasks, then gives back the rest.

Called once by ``TaskConsumer.start()`` after the fetch loop ends. A worker that cannot go
on (a fatal error) leaves everything in flight instead: recovery counts those deliveries,
so a task that keeps stopping workers ends as poison instead of looping.
"""

from __future__ import annotations

import logging
import threading
import time

from semibot_queue.codec import task_id_of
from semibot_queue.connection import REDIS_ERRORS
from semibot_queue.errors import QueueError
from semibot_queue.recorder import Fatal
from semibot_queue.scripts import Scripts
from semibot_queue.settings import QueueSettings
from semibot_queue.slots import Slots
from semibot_queue.watcher import Watcher

log = logging.getLogger("semibot_queue.consumer")


def depart(
    *,
    scripts: Scripts,
    watcher: Watcher,
    slots: Slots,
    fatal: Fatal,
    give_up: threading.Event,
    hurry: threading.Event,
    grace: float,
    settings: QueueSettings,
    extra: dict[str, str | None],
) -> list[str]:
    """Leave as the module says; the ids of the tasks still running at the deadline (or
    when ``hurry`` was set), given back to pending. ``extra`` names the queue and worker."""
    queue, worker_id = extra["queue"], str(extra["worker_id"])
    if fatal.is_set():
        give_up.set()
        watcher.stop()
        log.error(
            "queue %s: worker %s cannot go on; its tasks stay in flight for recovery",
            queue,
            worker_id,
            extra=extra,
        )
        return []
    deadline = time.monotonic() + grace
    unfinished = [
        task_id_of(stored) for stored in slots.wait_idle(deadline, hurry, settings.stop_poll_slice)
    ]
    give_up.set()
    watcher.stop()  # its next heartbeat would register the worker again after release
    for task_id in unfinished:
        log.warning(
            "queue %s: task %s still running at shutdown; given back to pending",
            queue,
            task_id,
            extra={**extra, "task_id": task_id},
        )
    try:
        left = scripts.release(worker_id, settings.max_queue_length, settings.max_payload_bytes)
    except (*REDIS_ERRORS, QueueError) as exc:
        log.error(
            "queue %s: worker %s could not deregister (%s); its tasks will be recovered",
            queue,
            worker_id,
            exc,
            extra=extra,
        )
        return unfinished
    if left:
        log.error(
            "queue %s: %d task(s) of worker %s did not fit on pending; recovery will move them",
            queue,
            left,
            worker_id,
            extra=extra,
        )
    return unfinished
