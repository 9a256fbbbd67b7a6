"""``TaskConsumer``: the worker. A blocking pop loop feeding a bounded thread pool.

The loop takes tasks only while one of ``max_concurrent`` slots is free, moving each
from the pending list into this worker's own in-flight list in the same command
(several at once through ``fetch.lua`` when several slots are free, else BLMOVE).
A :class:`~semibot_queue.runner.TaskRunner` runs each task on the pool and records its
outcome; a :class:`~semibot_queue.watcher.Watcher` keeps the worker registered.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import FrameType
from typing import cast

import redis
from prometheus_client import CollectorRegistry

from semibot_queue.acker import Acker
from semibot_queue.backoff import Random
from semibot_queue.codec import Codec, task_id_of
from semibot_queue.connection import TRANSIENT, Client, Reconnector, as_bytes, make_client
from semibot_queue.errors import QueueConnectionError, QueueError
from semibot_queue.keys import KeySpace
from semibot_queue.metrics import Metrics
from semibot_queue.models import TaskResult
from semibot_queue.producer import default_redis_url
from semibot_queue.runner import Delivery, Handler, Success, TaskRunner
from semibot_queue.scripts import Scripts
from semibot_queue.settings import QueueSettings
from semibot_queue.slots import Slots
from semibot_queue.watcher import Watcher

log = logging.getLogger("semibot_queue.consumer")


def _putter(ready: queue.SimpleQueue[bytes | None]) -> Callable[[list[bytes]], None]:
    def dispatch(batch: list[bytes]) -> None:
        for stored in batch:
            ready.put(stored)

    return dispatch


def new_worker_id() -> str:
    """A unique, key-safe worker id: ``host-pid-random``."""
    host = "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in socket.gethostname())
    return f"{host[:64]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class TaskConsumer:
    """Runs ``handler(message)`` for each task of one queue, ``max_concurrent`` at a time.

    Constructing it starts nothing. ``start()`` blocks until ``stop()`` (or SIGTERM /
    SIGINT when started in the main thread with ``handle_signals``), then lets in-flight
    tasks finish for up to SHUTDOWN_TIMEOUT and gives back the rest.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        queue_name: str | None = None,
        handler: Handler | None = None,
        max_concurrent: int | None = None,
        settings: QueueSettings | None = None,
        *,
        client: Client | None = None,
        registry: CollectorRegistry | None = None,
        worker_id: str | None = None,
        handle_signals: bool = True,
        rand: Random = random.random,
    ) -> None:
        if handler is None or not callable(handler):
            raise QueueError(f"handler must be a callable, got {handler!r}")
        self.settings = settings or QueueSettings()
        self.redis_url = redis_url or default_redis_url()
        self.keys = KeySpace.of(queue_name, self.settings)
        self.max_concurrent = max_concurrent or self.settings.max_concurrent_tasks
        if self.max_concurrent < 1:
            raise QueueError(f"max_concurrent must be >= 1, got {self.max_concurrent}")
        self.worker_id = worker_id or new_worker_id()
        self.inflight = self.keys.inflight(self.worker_id)
        self.handler = handler
        self.metrics = Metrics(self.keys.queue, registry)
        self._given_client = client
        self._client: Client | None = None
        self._handle_signals = handle_signals
        self._rand = rand
        self._codec = Codec(self.settings.max_payload_bytes)
        self._stopping = threading.Event()
        self._hurry = threading.Event()
        self._give_up = threading.Event()
        self._redis_lost = threading.Event()
        #: Set when tasks may sit in our in-flight list that no thread runs (a lost reply).
        self._resync = threading.Event()
        self._finished = threading.Event()
        self._finished.set()
        self._grace = self.settings.shutdown_timeout
        self._slots = Slots(self.max_concurrent)
        self._last_busy_warning = 0.0
        self._reconnect = Reconnector(
            self.redis_url,
            self.keys.queue,
            self.settings,
            stop=self._stopping,
            rand=rand,
            on_retry=self.metrics.reconnects.inc,
        )
        self._runner: TaskRunner | None = None
        #: Task ids still running when the worker stopped (given back to pending).
        self.unfinished: list[str] = []

    # --- connection -------------------------------------------------------------

    def connect(self) -> None:
        """Open the connection, check it, and prepare the runner."""
        if self._client is not None:
            return
        client = self._given_client or make_client(self.redis_url, self.settings)
        self._reconnect.call("connect", client.ping)
        self._client = client
        self._runner = TaskRunner(
            handler=self.handler,
            worker_id=self.worker_id,
            keys=self.keys,
            settings=self.settings,
            scripts=Scripts(client, self.keys),
            codec=self._codec,
            metrics=self.metrics,
            reconnect=self._reconnect,
            give_up=self._give_up,
            redis_lost=self._redis_lost,
            rand=self._rand,
        )
        self._warn_if_evicting(client)

    def disconnect(self) -> None:
        """Close the connection (a given client is left to its owner)."""
        if self._runner is not None:
            self._runner.scripts.close()
        if self._client is not None and self._given_client is None:
            self._client.close()
        self._client = None
        self._runner = None

    def _warn_if_evicting(self, client: Client) -> None:
        try:
            policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
        except (redis.ResponseError, *TRANSIENT):
            return  # CONFIG is often disabled on managed Redis; a lost link shows elsewhere
        if policy not in (None, "noeviction", b"noeviction"):
            log.warning(
                "queue %s: Redis maxmemory-policy is %r, not noeviction: Redis may drop tasks",
                self.keys.queue,
                policy,
                extra={"queue": self.keys.queue, "worker_id": self.worker_id},
            )

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Run until stopped. Raises QueueConnectionError if Redis stays unreachable."""
        self.connect()
        if self._client is None or self._runner is None:  # pragma: no cover - set by connect
            raise QueueError("consumer failed to connect")
        self._hurry.clear()
        self._give_up.clear()
        self._redis_lost.clear()
        self._finished.clear()
        self.unfinished = []
        self._install_signal_handlers()
        runner, client = self._runner, self._client
        self._slots = Slots(self.max_concurrent)
        ready: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        executor = ThreadPoolExecutor(self.max_concurrent, f"semibot-queue-{self.worker_id}")
        for _ in range(self.max_concurrent):
            executor.submit(self._work, runner, ready)
        acker = Acker(runner, self._slots, _putter(ready), self._stopping, self._resync)
        self._acker = acker
        watcher = Watcher(
            worker_id=self.worker_id,
            client=client,
            keys=self.keys,
            settings=self.settings,
            scripts=runner.scripts,
            codec=self._codec,
            metrics=self.metrics,
            trim_dead_letters=runner.trim_dead_letters,
        )
        try:
            self._reconnect.call("register", lambda: runner.scripts.heartbeat(self.worker_id))
            watcher.start()
            acker.start()
            log.info(
                "queue %s: worker %s started, %d slots",
                self.keys.queue,
                self.worker_id,
                self.max_concurrent,
                extra={"queue": self.keys.queue, "worker_id": self.worker_id},
            )
            self._loop(client, runner, _putter(ready))
        finally:
            try:
                self._shutdown(runner, watcher)
            finally:
                acker.stop()
                watcher.stop()
                for _ in range(self.max_concurrent):
                    ready.put(None)  # each pool thread ends after its current task
                executor.shutdown(wait=False)
                self._stopping.clear()
                self._finished.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking tasks; in-flight ones get ``timeout`` seconds (SHUTDOWN_TIMEOUT).

        Waits until ``start()`` has returned, unless called from one of the worker's
        own threads (a handler), where waiting would never end.
        """
        if timeout is not None:
            self._grace = timeout
        self._stopping.set()
        if not threading.current_thread().name.startswith("semibot-queue-"):
            self._finished.wait()

    def _install_signal_handlers(self) -> None:
        if not self._handle_signals or threading.current_thread() is not threading.main_thread():
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        # Only set events: the loop and the shutdown wait act on them.
        if self._stopping.is_set():
            self._hurry.set()
        self._stopping.set()

    # --- the fetch loop -------------------------------------------------------------

    def _loop(
        self, client: Client, runner: TaskRunner, dispatch: Callable[[list[bytes]], None]
    ) -> None:
        failures = 0
        while not self._stopping.is_set():
            if self._redis_lost.is_set():
                raise QueueConnectionError(
                    f"Redis at {self._reconnect.url} unreachable after"
                    f" {self.settings.max_reconnect_attempts} attempts (recording outcomes)"
                )
            free = self._slots.reserve()
            if free == 0:
                self._wait_for_slot()
                continue
            batch: list[bytes] = []
            try:
                if self._resync.is_set():
                    batch = self._orphans(client, free)
                else:
                    batch = self._take(client, runner.scripts, free)
            except TRANSIENT as exc:
                failures += 1
                self._resync.set()  # a move whose reply was lost leaves an orphan
                self._reconnect.wait_after(exc, "fetch", failures)
                continue
            finally:
                self._slots.fill(free, batch)
            failures = 0
            dispatch(batch)

    def _take(self, client: Client, scripts: Scripts, free: int) -> list[bytes]:
        batch = scripts.fetch(self.inflight, free)
        if batch:
            return batch
        # BLMOVE takes a float timeout (Redis 6+); redis-py's signature says int.
        timeout = cast("int", self.settings.blocking_timeout)
        one = client.blmove(self.keys.pending, self.inflight, timeout, "RIGHT", "LEFT")
        return [] if one is None else [as_bytes(one)]

    def _orphans(self, client: Client, free: int) -> list[bytes]:
        """Up to ``free`` tasks of our in-flight list that no thread runs: taken by a call
        whose reply was lost. Clears the resync flag once none are left over."""
        if not self._slots.taking.acquire(timeout=self.settings.blocking_timeout):
            return []  # the acker is mid-call; look again on the next turn
        try:
            present = cast("list[bytes]", client.lrange(self.inflight, 0, -1))
            missing = self._slots.missing(present)
        finally:
            self._slots.taking.release()
        if len(missing) <= free:
            self._resync.clear()
        return missing[:free]

    def _wait_for_slot(self) -> None:
        if self._slots.wait_free(self.settings.blocking_timeout):
            return
        now = time.monotonic()
        if now - self._last_busy_warning < self.settings.busy_warning_interval:
            return
        self._last_busy_warning = now
        log.warning(
            "queue %s: worker %s has all %d slots busy; not taking more tasks",
            self.keys.queue,
            self.worker_id,
            self.max_concurrent,
            extra={"queue": self.keys.queue, "worker_id": self.worker_id},
        )

    def _work(self, runner: TaskRunner, ready: queue.SimpleQueue[bytes | None]) -> None:
        # One long-lived loop per pool thread: a task handed over costs a queue put, not
        # a Future (the acker hands over several per round trip).
        while (stored := ready.get()) is not None:
            self._run(runner, stored)

    def _run(self, runner: TaskRunner, stored: bytes) -> None:
        try:
            success = self._process_task(runner, stored)
        except BaseException:
            self._slots.finish(stored)
            raise
        if success is not None and self._acker.submit(*success):
            return  # the acker frees the slot once the success is recorded
        if success is not None:
            # Finished after shutdown: ack alone. If the task was given back, nothing is
            # recorded; if giving it back failed, this records its result after all.
            runner.ack_batch([success], 0, self._resync.set)
        self._slots.finish(stored)

    def _process_task(self, runner: TaskRunner, stored: bytes) -> Success | None:
        """Run one task as taken from Redis; its success, to ack, or None if recorded."""
        return runner.run(stored)

    def _publish_result(self, delivery: Delivery, result: TaskResult) -> None:
        """Ack ``delivery`` with ``result``: stored, published, out of the in-flight list."""
        if self._runner is None:
            raise QueueError("consumer is not connected")
        encoded = self._codec.encode_result(result)
        self._runner.ack_batch([(delivery, encoded)], 0, self._resync.set)

    # --- shutdown ---------------------------------------------------------------------

    def _shutdown(self, runner: TaskRunner, watcher: Watcher) -> None:
        deadline = time.monotonic() + self._grace
        unfinished = self._slots.wait_idle(deadline, self._hurry, self.settings.blocking_timeout)
        self._give_up.set()
        watcher.stop()  # its next heartbeat would register the worker again after release
        self.unfinished = [task_id_of(stored) for stored in unfinished]
        for task_id in self.unfinished:
            log.warning(
                "queue %s: task %s still running at shutdown; given back to pending",
                self.keys.queue,
                task_id,
                extra={"queue": self.keys.queue, "task_id": task_id, "worker_id": self.worker_id},
            )
        try:
            left = runner.scripts.release(self.worker_id, self.settings.max_queue_length)
        except TRANSIENT as exc:
            log.error(
                "queue %s: worker %s could not deregister (%s); its tasks will be recovered",
                self.keys.queue,
                self.worker_id,
                exc,
                extra={"queue": self.keys.queue, "worker_id": self.worker_id},
            )
            return
        if left:
            log.error(
                "queue %s: %d task(s) of worker %s did not fit on pending; recovery will move them",
                self.keys.queue,
                left,
                self.worker_id,
                extra={"queue": self.keys.queue, "worker_id": self.worker_id},
            )
