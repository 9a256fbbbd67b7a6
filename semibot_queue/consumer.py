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

import attrs
import redis
from prometheus_client import CollectorRegistry

from semibot_queue.backoff import Random
from semibot_queue.clients import given_client, make_client
from semibot_queue.codec import Codec, task_id_of
from semibot_queue.connection import (
    REDIS_ERRORS,
    Client,
    Reconnector,
)
from semibot_queue.constants import BLOCKING_MARGIN
from semibot_queue.errors import QueueError
from semibot_queue.fetcher import BlockingPop, Fetcher, pop_timeout
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
        self._client: Client | None = None
        self._pop_client: Client | None = None
        self._pop: BlockingPop | None = None
        self._scripts: Scripts | None = None
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
        if self._client is not None:
            return
        s = self.settings
        client = self._given_client or make_client(self.redis_url, s, queue=self.keys.queue)
        self._reconnect.call("connect", client.ping)
        if self._given_client is None:
            # The blocking pop has a connection of its own whose socket timeout leaves a
            # margin above QUEUE_POLL_TIMEOUT: a full wait is never taken for a dead link.
            self._pop_client = make_client(
                self.redis_url,
                attrs.evolve(s, max_connections=1),  # one pop at a time
                queue=self.keys.queue,
                socket_timeout=s.queue_poll_timeout + BLOCKING_MARGIN,
            )
            wait = s.queue_poll_timeout
        else:
            self._pop_client = client
            wait = pop_timeout(client, s.queue_poll_timeout)
        self._pop = BlockingPop(
            self._pop_client, self.keys.pending, self.inflight, wait, self._stopping
        )
        self._client = client
        self._scripts = Scripts(client, self.keys, self.settings)
        self._warn_if_evicting(client)

    def disconnect(self) -> None:
        """Close the connections (a given client is left to its owner)."""
        if self._scripts is not None:
            self._scripts.close()
        if self._given_client is None or self._owns_given:
            for client in {self._client, self._pop_client}:
                if client is not None:
                    client.close()
        self._client = None
        self._pop_client = None
        self._pop = None
        self._scripts = None

    def _warn_if_evicting(self, client: Client) -> None:
        try:
            policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
        except redis.RedisError:
            return  # CONFIG is often disabled on managed Redis; a lost link shows elsewhere
        if policy not in (None, "noeviction", b"noeviction"):
            log.warning(
                "queue %s: Redis maxmemory-policy is %r, not noeviction: Redis may drop tasks",
                self.keys.queue,
                policy,
                extra=self._extra(),
            )

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
        if self._client is None or self._scripts is None or self._pop is None:  # pragma: no cover
            raise QueueError("consumer failed to connect")
        client, scripts = self._client, self._scripts
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
                pop=self._pop,
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
        pop = self._pop
        if pop is not None:
            pop.interrupt()

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
        if self._scripts is None:
            raise QueueError("consumer is not connected")
        acks = [
            (
                delivery.stored,
                result.task_id,
                self._codec.encode_result(result),
                self.keys.result_channel(result.session_id),
            )
        ]
        self._scripts.ack(self.inflight, self.settings.result_ttl, acks, 0)

    # --- shutdown ---------------------------------------------------------------------

    def _shutdown(self, scripts: Scripts, watcher: Watcher) -> None:
        if self._fatal.is_set():
            # Leave everything in flight: recovery counts these deliveries, so a task that
            # keeps stopping workers ends as poison instead of looping.
            self._give_up.set()
            watcher.stop()
            log.error(
                "queue %s: worker %s cannot go on; its tasks stay in flight for recovery",
                self.keys.queue,
                self.worker_id,
                extra=self._extra(),
            )
            return
        deadline = time.monotonic() + self._grace
        unfinished = self._slots.wait_idle(deadline, self._hurry, self.settings.stop_poll_slice)
        self._give_up.set()
        watcher.stop()  # its next heartbeat would register the worker again after release
        self.unfinished = [task_id_of(stored) for stored in unfinished]
        for task_id in self.unfinished:
            log.warning(
                "queue %s: task %s still running at shutdown; given back to pending",
                self.keys.queue,
                task_id,
                extra=self._extra(task_id),
            )
        try:
            left = scripts.release(
                self.worker_id, self.settings.max_queue_length, self.settings.max_payload_bytes
            )
        except (*REDIS_ERRORS, QueueError) as exc:
            log.error(
                "queue %s: worker %s could not deregister (%s); its tasks will be recovered",
                self.keys.queue,
                self.worker_id,
                exc,
                extra=self._extra(),
            )
            return
        if left:
            log.error(
                "queue %s: %d task(s) of worker %s did not fit on pending; recovery will move them",
                self.keys.queue,
                left,
                self.worker_id,
                extra=self._extra(),
            )
