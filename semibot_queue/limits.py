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
from collections.abc import Callable
from types import TracebackType

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

    def limit(self, task_id: str, seconds: float | None) -> _Limit:
        """A context manager running its block under a limit of ``seconds`` (None or 0:
        no limit). A class, not a generator: on CPython 3.13.0 an asynchronous exception
        raised in the block of a generator-based context manager skips the handlers
        around the ``with``."""
        if not seconds:
            return _Limit(None, self._register, self._unregister)
        entry = _Running(task_id, threading.get_ident(), self._clock() + seconds)
        return _Limit(entry, self._register, self._unregister)

    def forget(self) -> None:
        """Forget the calling thread's entry, if any. For the code that caught this
        thread's TaskTimeoutError: the exception came (it comes once), so nothing can
        land here, and an entry the exit of its block could not remove goes now."""
        with self._lock:
            self._running.pop(threading.get_ident(), None)

    def _register(self, entry: _Running) -> None:
        with self._lock:
            self._running[entry.thread_id] = entry
            self._changed.notify_all()

    def _unregister(self, entry: _Running) -> bool:
        """Remove ``entry``; whether its exception landed here instead of in the block.

        The exception is fired once at most, and only while the entry is registered: once
        this returns, nothing can surface later in the worker's own code.
        """
        late = False
        while True:
            try:
                with self._lock:
                    self._running.pop(entry.thread_id, None)
                    if entry.fired:
                        _raise_in(entry.thread_id, None)  # raised, perhaps not seen yet
                return late
            except TaskTimeoutError:
                late = True

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


class _Limit:
    """``with limiter.limit(task_id, seconds):`` (see TimeLimiter.limit); ``entry`` is
    None for no limit."""

    def __init__(
        self,
        entry: _Running | None,
        register: Callable[[_Running], None],
        unregister: Callable[[_Running], bool],
    ) -> None:
        self._entry = entry
        self._register = register
        self._unregister = unregister

    def __enter__(self) -> None:
        if self._entry is not None:
            self._register(self._entry)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._entry is None:
            return
        late = self._unregister(self._entry)
        if late and exc is None:  # it landed on the way out: the block ran out its time
            raise TaskTimeoutError(f"task {self._entry.task_id} ran past its time limit")
