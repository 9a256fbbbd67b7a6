"""``TaskConsumer``: the worker. A blocking pop loop feeding a bounded thread pool.

Follow one task top-down: the fetch loop here takes it (``fetch.lua`` for several at
once, else a blocking BLMOVE into this worker's in-flight list) only while one of
``max_concurrent`` slots is free; a pool thread runs it through
:mod:`semibot_queue.outcomes`, which decides its outcome without touching Redis; the
:mod:`semibot_queue.recorder` thread records that outcome and takes the next tasks in
the same round trip; the :mod:`semibot_queue.watcher` keeps the worker registered and
recovers the tasks of dead ones.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from types import FrameType, TracebackType

from prometheus_client import CollectorRegistry

from semibot_queue.backoff import Random
from semibot_queue.clients import given_client
from semibot_queue.codec import Codec
from semibot_queue.connection import (
    Client,
    Reconnector,
)
from semibot_queue.departure import depart
from semibot_queue.errors import QueueError
from semibot_queue.fetcher import Fetcher
from semibot_queue.keys import KeySpace
from semibot_queue.limits import TimeLimiter
from semibot_queue.metrics import Metrics
from semibot_queue.models import TaskResult
from semibot_queue.outcomes import Decider, Delivery, Handler, Outcome
from semibot_queue.producer import default_redis_url
from semibot_queue.recorder import Fatal, Recorder
from semibot_queue.scripts import Scripts
from semibot_queue.settings import QueueSettings
from semibot_queue.signals import install_handlers, restore_handlers, signals_to_main_thread
from semibot_queue.slots import Slots
from semibot_queue.watcher import Watcher
from semibot_queue.worker_links import Links, close_links, open_links

log = logging.getLogger("semibot_queue.consumer")


def new_worker_id() -> str:
    """A unique, key-safe worker id: ``host-pid-random``."""
    host = "".join(ch if ch.isalnum() or ch in "-." else "-" for ch in socket.gethostname())
    return f"{host[:64]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


class TaskConsumer:
    """Runs ``handler(message)`` for each task of one queue, ``max_concurrent`` at a time.

    Constructing it starts nothing. ``start()`` blocks until ``stop()`` (or SIGTERM /
    SIGINT when started in the main thread with ``handle_signals``), then lets in-flight
    tasks finish for up to SHUTDOWN_TIMEOUT and gives back the rest. As a context
    manager it runs in a background thread and is stopped and joined on exit.
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
        if max_concurrent is None:
            max_concurrent = self.settings.max_concurrent_tasks
        if isinstance(max_concurrent, bool) or not isinstance(max_concurrent, int):
            raise QueueError(f"max_concurrent must be a whole number, got {max_concurrent!r}")
        if max_concurrent < 1:
            raise QueueError(f"max_concurrent must be >= 1, got {max_concurrent}")
        self.max_concurrent = max_concurrent
        self.worker_id = worker_id or new_worker_id()
        self.inflight = self.keys.inflight(self.worker_id)
        self.handler = handler
        self.metrics = Metrics(self.keys.queue, registry)
        self._given_client: Client | None = None
        #: Whether the given client is one of ours (built on a given cluster or Sentinel
        #: client's nodes), to close with the consumer.
        self._owns_given = False
        if client is not None:
            self._given_client, self._owns_given = given_client(
                client, self.settings, self.keys.queue
            )
        self._links: Links | None = None
        self._handle_signals = handle_signals
        self._rand = rand
        self._codec = Codec(self.settings.max_payload_bytes)
        self._stopping = threading.Event()
        self._hurry = threading.Event()
        self._give_up = threading.Event()
        self._fatal = Fatal()
        #: Set when tasks may sit in our in-flight list that no thread runs (a lost reply).
        self._resync = threading.Event()
        self._finished = threading.Event()
        self._finished.set()
        #: Set while start() runs (by it, or by a with block), under _start_lock.
        self._running = False
        self._start_lock = threading.Lock()
        self._grace = self.settings.shutdown_timeout
        self._slots = Slots(self.max_concurrent)
        self._last_busy_warning = 0.0
        self._loops: list[Future[None]] = []
        self._recorder: Recorder | None = None
        self._decider: Decider | None = None
        self._background: threading.Thread | None = None
        self._reconnect = Reconnector(
            self.redis_url,
            self.keys.queue,
            self.settings,
            stop=self._stopping,
            rand=rand,
            on_retry=self.metrics.reconnects.inc,
        )
        #: Task ids still running when the worker stopped (given back to pending).
        self.unfinished: list[str] = []

    # --- connection -------------------------------------------------------------

    def connect(self) -> None:
        """Open the connections and check that Redis answers."""
        self._connected()

    def _connected(self) -> Links:
        if self._links is None:
            self._links = open_links(
                self.redis_url,
                self.keys,
                self.inflight,
                self.settings,
                given=self._given_client,
                reconnect=self._reconnect,
                stopping=self._stopping,
                extra=self._extra(),
            )
        return self._links

    def disconnect(self) -> None:
        """Close the connections (a given client is left to its owner)."""
        links, self._links = self._links, None
        if links is not None:
            close_links(links, close_clients=self._given_client is None or self._owns_given)

    def _extra(self, task_id: str | None = None) -> dict[str, str | None]:
        return {"queue": self.keys.queue, "worker_id": self.worker_id, "task_id": task_id}

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> None:
        """Run until stopped. Raises QueueConnectionError if Redis stays unreachable, and
        QueueError when the worker cannot go on (its tasks are then recovered), or when
        this consumer already runs (one ``start()`` at a time)."""
        self._claim()
        try:
            self._serve()
        finally:
            self._running = False

    def _claim(self) -> None:
        with self._start_lock:
            if self._running:
                raise QueueError(
                    f"worker {self.worker_id} is already running: start() (or a with block)"
                    " was called while it runs; stop() and join() it first"
                )
            self._running = True

    def _serve(self) -> None:
        self.connect()
        links = self._connected()
        client, scripts = links.client, links.scripts
        self._hurry.clear()
        self._give_up.clear()
        self._fatal = Fatal()
        self._finished.clear()
        self.unfinished = []
        previous = install_handlers(self._on_signal) if self._handle_signals else {}
        self._slots = Slots(self.max_concurrent)
        ready: queue.SimpleQueue[Delivery | None] = queue.SimpleQueue()

        def dispatch(batch: list[Delivery]) -> None:
            for delivery in batch:
                ready.put(delivery)

        limiter = TimeLimiter(
            f"semibot-queue-limits-{self.worker_id}",
            stuck_after=self.settings.shutdown_timeout,
            on_stuck=self._stuck,
        )
        decider = Decider(
            self.handler,
            self.worker_id,
            self.keys,
            self.settings,
            self._codec,
            self.metrics,
            self._rand,
            limiter,
        )
        self._decider = decider
        recorder = Recorder(
            scripts=scripts,
            keys=self.keys,
            settings=self.settings,
            worker_id=self.worker_id,
            decider=decider,
            metrics=self.metrics,
            reconnect=self._reconnect,
            slots=self._slots,
            dispatch=dispatch,
            stopping=self._stopping,
            resync=self._resync,
            give_up=self._give_up,
            fatal=self._fatal,
        )
        self._recorder = recorder
        executor = ThreadPoolExecutor(self.max_concurrent, f"semibot-queue-{self.worker_id}")
        with signals_to_main_thread(bool(previous)):
            self._loops = [
                executor.submit(self._work, ready, recorder) for _ in range(self.max_concurrent)
            ]
        watcher = Watcher(
            worker_id=self.worker_id,
            client=client,
            keys=self.keys,
            settings=self.settings,
            scripts=scripts,
            codec=self._codec,
            metrics=self.metrics,
            stopping=self._stopping,
            fatal=self._fatal,
            check_health=self._check_health,
            interrupt_pop=self._interrupt_pop,
            running=decider.running_now,
        )
        try:
            self._reconnect.call("register", watcher.beat, oom_is_outage=True)
            with signals_to_main_thread(bool(previous)):
                recorder.start()  # before the watcher, which checks that it runs
                limiter.start()
                watcher.start()
            log.info(
                "queue %s: worker %s started, %d slots",
                self.keys.queue,
                self.worker_id,
                self.max_concurrent,
                extra=self._extra(),
            )
            Fetcher(
                client=client,
                scripts=scripts,
                pop=links.pop,
                inflight=self.inflight,
                redis_url=self.redis_url,
                settings=self.settings,
                slots=self._slots,
                reconnect=self._reconnect,
                stopping=self._stopping,
                resync=self._resync,
                fatal=self._fatal,
                wait_for_slot=self._wait_for_slot,
                dispatch=dispatch,
            ).run()
        finally:
            try:
                self._shutdown(scripts, watcher)
            finally:
                try:
                    recorder.stop()
                    watcher.stop()
                    limiter.stop()
                finally:
                    # whatever failed above, no pool thread is left waiting (it would keep
                    # the interpreter from exiting)
                    for _ in range(self.max_concurrent):
                        ready.put(None)  # each pool thread ends after its current task
                    executor.shutdown(wait=False)
                    restore_handlers(previous)
                    self._stopping.clear()
                    self._running = False  # before join() returns: start() may follow
                    self._finished.set()
                    log.info(
                        "queue %s: worker %s stopped",
                        self.keys.queue,
                        self.worker_id,
                        extra=self._extra(),
                    )

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking tasks; in-flight ones get ``timeout`` seconds (SHUTDOWN_TIMEOUT).

        Never blocks: safe from any thread, a handler or a signal handler. ``join()``
        waits for the worker to have stopped.
        """
        if timeout is not None:
            self._grace = timeout
        self._stopping.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until ``start()`` has returned (at most ``timeout`` seconds); whether it has."""
        return self._finished.wait(timeout)

    def __enter__(self) -> TaskConsumer:
        self._claim()
        try:
            self.connect()
        except BaseException:
            self._running = False
            raise
        self._finished.clear()
        self._background = threading.Thread(
            target=self._run_in_background, name=f"semibot-queue-main-{self.worker_id}"
        )
        self._background.start()
        return self

    def _run_in_background(self) -> None:
        try:
            self._serve()
        except QueueError:
            log.exception("queue %s: worker %s failed", self.keys.queue, self.worker_id)
        finally:
            self._running = False
            self._finished.set()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
        if self._background is not None:
            self._background.join()
            self._background = None
        # The run this block started has ended: a stop() that reached it after it ended
        # (the one above, after a stop() and join() inside the block) is not for the next.
        self._stopping.clear()
        self.disconnect()

    def _on_signal(self, _signum: int, _frame: FrameType | None) -> None:
        # Only set events: the loop and the shutdown wait act on them.
        if self._stopping.is_set():
            self._hurry.set()
        self._stopping.set()

    def _check_health(self) -> None:
        """Called by the watcher: a worker whose pool loops or recorder died cannot serve
        its queue, so it must not look alive."""
        recorder = self._recorder
        if recorder is not None and not recorder.is_alive() and not self._stopping.is_set():
            self._fatal.set(QueueError("the outcome recorder thread died"))
        for loop in self._loops:
            if loop.done() and not self._stopping.is_set():
                self._fatal.set(QueueError(f"a pool thread ended: {loop.exception()!r}"))

    def _stuck(self, task_id: str) -> None:
        """Called by the time limiter: a handler ignored TaskTimeoutError for
        SHUTDOWN_TIMEOUT (stuck in C code). Its slot is lost to this process: stop, and
        exit non-zero for a restart; recovery takes the task (a lost delivery)."""
        log.error(
            "queue %s: task %s ignored its time limit for %.1fs (stuck outside Python?);"
            " worker %s stops so that a restart frees its slot",
            self.keys.queue,
            task_id,
            self.settings.shutdown_timeout,
            self.worker_id,
            extra=self._extra(task_id),
        )
        self._fatal.set(
            QueueError(f"task {task_id} is stuck past its time limit; the worker must restart")
        )
        self._hurry.set()

    def _interrupt_pop(self) -> None:
        """Called by the watcher once stopping: end a blocking pop now, not in
        QUEUE_POLL_TIMEOUT. A task it took meanwhile is given back with the others."""
        links = self._links
        if links is not None:
            links.pop.interrupt()

    # --- the fetch loop -------------------------------------------------------------

    def _wait_for_slot(self) -> None:
        if self._slots.wait_free(self.settings.stop_poll_slice):
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
            extra=self._extra(),
        )

    # --- the pool -------------------------------------------------------------------

    def _work(self, ready: queue.SimpleQueue[Delivery | None], recorder: Recorder) -> None:
        # One long-lived loop per pool thread, fed by a queue: a task handed over costs a
        # queue put, not a Future. Nothing a task does can end it (see outcomes.py).
        while (delivery := ready.get()) is not None:
            recorder.submit(self._process_task(delivery))

    def _process_task(self, delivery: Delivery) -> Outcome:
        """Run one task as taken from Redis; its outcome, for the recorder."""
        decider = self._decider
        if decider is None:  # pragma: no cover - set by start
            raise QueueError("consumer is not started")
        return decider.decide(delivery)

    def _publish_result(self, delivery: Delivery, result: TaskResult) -> None:
        """Record ``result`` for ``delivery``: stored, published, out of the in-flight list."""
        if self._links is None:
            raise QueueError("consumer is not connected")
        acks = [
            (
                delivery.stored,
                result.task_id,
                self._codec.encode_result(result),
                self.keys.result_channel(result.session_id),
            )
        ]
        self._links.scripts.ack(self.inflight, self.settings.result_ttl, acks, 0)

    # --- shutdown ---------------------------------------------------------------------

    def _shutdown(self, scripts: Scripts, watcher: Watcher) -> None:
        self.unfinished = depart(
            scripts=scripts,
            watcher=watcher,
            slots=self._slots,
            fatal=self._fatal,
            give_up=self._give_up,
            hurry=self._hurry,
            grace=self._grace,
            settings=self.settings,
            extra=self._extra(),
        )
