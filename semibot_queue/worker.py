"""The ``semibot-queue worker`` process: a consumer, its metrics endpoint, its exit status."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from prometheus_client import REGISTRY, start_http_server

from semibot_queue.consumer import TaskConsumer
from semibot_queue.errors import QueueConnectionError
from semibot_queue.settings import QueueSettings

log = logging.getLogger("semibot_queue.worker")

#: Exit status of a worker that lost Redis for good, so a supervisor restarts it.
EXIT_UNREACHABLE = 3


def run_worker(
    *,
    handler: Callable[..., Any],
    redis_url: str,
    queue: str | None,
    settings: QueueSettings,
    concurrency: int | None,
    metrics: tuple[str, int] | None,
) -> int:
    """Run a worker in this process until SIGTERM/SIGINT; its exit status.

    Handles the signals itself (the first stops taking tasks and waits up to
    SHUTDOWN_TIMEOUT, a second skips the wait). Tasks still running at the end were
    given back to pending, and the process exits without waiting for their threads.
    """
    consumer = TaskConsumer(redis_url, queue, handler, concurrency, settings, registry=REGISTRY)
    server = None
    if metrics is not None:
        host, port = metrics
        server, _ = start_http_server(port, addr=host, registry=REGISTRY)
        log.info("metrics on http://%s:%d/metrics", host, port)
    status = 0
    try:
        consumer.start()
    except QueueConnectionError as exc:
        log.error("queue %s: worker giving up: %s", consumer.keys.queue, exc)
        status = EXIT_UNREACHABLE
    finally:
        if server is not None:
            server.shutdown()
        consumer.disconnect()
    if consumer.unfinished:  # pragma: no cover - os._exit skips coverage's exit hook
        # Their threads are still running handlers whose tasks were given back:
        # do not wait for them at interpreter exit. (Tested through a subprocess.)
        logging.shutdown()
        sys.stdout.flush()
        os._exit(status)
    return status
