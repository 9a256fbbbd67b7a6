"""What every ``python -m bench.worker_<system>`` shares: arguments, logging, stop signals."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from collections.abc import Callable, Sequence
from types import FrameType

from bench import tasks


def prepare(argv: Sequence[str] | None, description: str) -> argparse.Namespace:
    """Parse ``--redis-url`` and ``--concurrency``, quiet logging, connect the task bodies."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    # several worker processes, each with --concurrency threads (systems that support it)
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args(argv)
    # Every worker logs at WARNING: per-task INFO lines would measure the terminal, not the queue.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    tasks.configure(args.redis_url)
    return args


def wait_for_signal(alive: Callable[[], bool] = lambda: True) -> None:
    """Block until SIGTERM or SIGINT arrives, or until ``alive()`` turns false."""
    stopping = threading.Event()

    def _on_signal(_signum: int, _frame: FrameType | None) -> None:
        stopping.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    while not stopping.wait(0.2):
        if not alive():
            return
