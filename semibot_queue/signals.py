"""SIGTERM and SIGINT for a worker or a supervisor: handlers installed and restored, and
threads kept from receiving them."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

#: The signals that stop a worker or a supervisor.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def signals_to_main_thread(active: bool = True) -> Iterator[None]:
    """Threads started inside block SIGTERM and SIGINT, so the kernel delivers them to the
    main thread: there they interrupt a blocking call (EINTR) and the handlers run at once.
    Delivered to another thread, a signal would wait for the main thread to leave its
    blocking pop (CPython runs signal handlers only in the main thread, between bytecodes).
    """
    if not active or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def install_handlers(handler: Callable[[int, FrameType | None], None]) -> dict[int, Any]:
    """Handle SIGTERM and SIGINT with ``handler``; the handlers it replaced, to restore.

    Nothing is installed (``{}``) off the main thread, where Python refuses to.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}


def restore_handlers(previous: dict[int, Any]) -> None:
    """Put back the handlers :func:`install_handlers` replaced."""
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def ignore_stop_signals() -> None:
    """Ignore SIGTERM and SIGINT from now on: for a worker process whose stop is done and
    which is about to exit with its status (a late signal would replace that status with
    death by signal). Only from the main thread of a process the caller owns."""
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            signal.signal(signum, signal.SIG_IGN)
