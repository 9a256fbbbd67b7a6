"""The ``semibot-queue worker`` process: a consumer, its metrics endpoint, its exit status."""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client import REGISTRY, start_http_server

from semibot_queue.constants import SUPERVISOR_CHECK_INTERVAL, SUPERVISOR_PID_ENV
from semibot_queue.consumer import TaskConsumer
from semibot_queue.errors import QueueConfigurationError, QueueConnectionError, QueueError
from semibot_queue.settings import QueueSettings
from semibot_queue.signals import signals_to_main_thread

log = logging.getLogger("semibot_queue.worker")

#: Exit status of a worker that lost Redis for good, so a supervisor restarts it.
EXIT_UNREACHABLE = 3

#: Exit status of a worker that cannot go on for another reason (its tasks are recovered).
EXIT_FAILED = 1

#: Exit status of a worker given an option it cannot use (a metrics port taken).
EXIT_USAGE = 2

#: Exit status of a worker whose MODULE:FUNCTION cannot be imported or called.
EXIT_INVALID = 5

#: Exit status of a worker refused by Redis: wrong password, ACL, certificate.
EXIT_CONFIGURATION = 9


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
        try:
            with signals_to_main_thread():  # its thread must leave them to the worker
                server, _ = start_http_server(port, addr=host, registry=REGISTRY)
        except OSError as exc:  # taken since the command line checked it
            log.error("metrics endpoint %s:%d cannot be opened: %s", host, port, exc)
            return EXIT_USAGE
        log.info("metrics on http://%s:%d/metrics", host, port)
    status = 0
    ended = threading.Event()
    supervisor = os.environ.get(SUPERVISOR_PID_ENV, "")
    if supervisor.isdigit():
        with signals_to_main_thread():  # its thread must leave them to the worker
            threading.Thread(
                target=_stop_when_orphaned,
                args=(int(supervisor), consumer, ended),
                name="semibot-queue-supervisor-check",
                daemon=True,
            ).start()
    try:
        consumer.start()
    except QueueConfigurationError as exc:
        log.error("queue %s: worker refused by Redis: %s", consumer.keys.queue, exc)
        status = EXIT_CONFIGURATION
    except QueueConnectionError as exc:
        log.error("queue %s: worker giving up: %s", consumer.keys.queue, exc)
        status = EXIT_UNREACHABLE
    except QueueError as exc:
        log.error("queue %s: worker cannot go on: %s", consumer.keys.queue, exc)
        status = EXIT_FAILED
    finally:
        ended.set()
        if server is not None:
            server.shutdown()
        consumer.disconnect()
    if consumer.unfinished or status == EXIT_FAILED:  # pragma: no cover - os._exit, no coverage
        # Their threads are still running handlers whose tasks were given back:
        # do not wait for them at interpreter exit. (Tested through a subprocess.)
        logging.shutdown()
        sys.stdout.flush()
        os._exit(status)
    return status


def _stop_when_orphaned(supervisor: int, consumer: TaskConsumer, ended: threading.Event) -> None:
    """Stop ``consumer`` (a graceful drain) once this process's parent is no longer the
    ``supervisor`` pid: a supervisor killed by SIGKILL cannot stop its workers itself."""
    while not ended.wait(SUPERVISOR_CHECK_INTERVAL):
        if os.getppid() != supervisor:
            log.error(
                "queue %s: supervisor (pid %d) is gone; this worker stops",
                consumer.keys.queue,
                supervisor,
                extra={"queue": consumer.keys.queue, "worker_id": consumer.worker_id},
            )
            consumer.stop()
            return
