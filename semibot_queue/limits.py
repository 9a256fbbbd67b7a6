"""Time limits of running handlers: TaskTimeoutError raised in the handler's own thread.

One thread per worker watches the deadlines of the handlers running now. Past a deadline
it raises :class:`~semibot_queue.errors.TaskTimeoutError` in that handler's thread
asynchronously (``PyThreadState_SetAsyncExc``, as Dramatiq's TimeLimit does): Python code
sees it at its next bytecode, and it counts as a failure (retry, then dead letter).

A thread blocked in C code (a long ``time.sleep``, a socket read without a timeout) sees
the exception only when the call returns. If a handler is still running SHUTDOWN_TIMEOUT
seconds after its time limit, its slot is held hostage: ``on_stuck`` is called, and the
worker stops and exits non-zero so that a supervisor restarts it; recovery then takes its
tasks (counted as a lost delivery, so a task that always hangs ends as poison).
"""

from __future__ import annotations

import ctypes
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import attrs

from semibot_queue.errors import TaskTimeoutError


@attrs.define
class _Running:
    task_id: str
    thread_id: int
    deadline: float
    fired: bool = False


def _raise_in(thread_id: int, exc: type[BaseException] | None) -> None:
    """Raise ``exc`` in the thread ``thread_id`` at its next bytecode (None: cancel that)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else None
    )


class TimeLimiter:
    """Owns one named thread; ``start()`` starts it, ``stop()`` stops and joins it."""

    def __init__(
        self,
        name: str,
        stuck_after: float,
        on_stuck: Callable[[str], None],
        on_timeout: Callable[[str], None] = lambda _: None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._name = name
        self._stuck_after = stuck_after
        self._on_stuck = on_stuck
        self._on_timeout = on_timeout
        self._clock = clock
        self._running: dict[int, _Running] = {}
        # A plain lock, taken with `with` in a handler's thread: its acquire is C code, so
        # an exception raised there asynchronously cannot leave it held (Condition's own
        # __enter__ is Python code, and could).
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._stopping = False
        self._thread: threading.Thread | None = None

    @contextmanager
    def limit(self, task_id: str, seconds: float | None) -> Iterator[None]:
        """Run the block under a limit of ``seconds`` (None or 0: no limit)."""
        if not seconds:
            yield
            return
        entry = _Running(task_id, threading.get_ident(), self._clock() + seconds)
        # The exception is fired once at most, and only while the entry is registered.
        # Wherever in this thread it lands (the block, the registration, the cleanup),
        # the cleanup below runs to its end: once it has, nothing can surface later in
        # the worker's own code. No helper call here: a call is where it can land.
        late = False
        try:
            with self._lock:
                self._running[entry.thread_id] = entry
                self._changed.notify_all()
            yield
        finally:
            while True:
                try:
                    with self._lock:
                        self._running.pop(entry.thread_id, None)
                        if entry.fired:
                            _raise_in(entry.thread_id, None)  # raised, perhaps not seen yet
                    break
                except TaskTimeoutError:
                    late = True
        if late:  # it landed in the cleanup: the block ran out its time all the same
            raise TaskTimeoutError(f"task {task_id} ran past its time limit")

    def start(self) -> None:
        """Start the thread."""
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        with self._changed:
            while not self._stopping:
                now = self._clock()
                wake = None
                for entry in self._running.values():
                    due = entry.deadline + (self._stuck_after if entry.fired else 0.0)
                    if now >= due:
                        self._expire(entry)
                        due = entry.deadline + self._stuck_after
                    if due != float("inf"):
                        wake = due if wake is None else min(wake, due)
                self._changed.wait(None if wake is None else max(0.0, wake - self._clock()))

    def _expire(self, entry: _Running) -> None:
        if not entry.fired:
            entry.fired = True
            _raise_in(entry.thread_id, TaskTimeoutError)
            self._on_timeout(entry.task_id)
        else:
            entry.deadline = float("inf")  # reported once
            self._on_stuck(entry.task_id)
