"""Helpers shared by the tests: payloads, fast settings, deadline waits, a running consumer."""

from __future__ import annotations

import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from semibot_queue import QueueSettings, TaskConsumer, TaskPayload

#: Settings that make heartbeats, retries, reconnects and stops quick enough for tests.
FAST = QueueSettings(
    heartbeat_interval=0.1,
    worker_dead_after=0.5,
    retry_base_delay=0.02,
    retry_max_delay=0.1,
    error_retry_delay=0.01,
    max_reconnect_delay=0.05,
    stop_poll_slice=0.2,
    shutdown_timeout=5.0,
    busy_warning_interval=60.0,
)


def payload(n: int = 0, **fields: Any) -> TaskPayload:
    """A valid agent task; ``fields`` override any attribute."""
    values: dict[str, Any] = {
        "session_id": f"session-{n % 3}",
        "agent_id": "agent-1",
        "org_id": "org-1",
        "messages": [{"role": "user", "content": f"question {n}"}],
    }
    values.update(fields)
    return TaskPayload(**values)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it is truthy (its value) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


def thread_stacks() -> str:
    """Where every thread of this process is now (for a failure message)."""
    frames = sys._current_frames()
    parts = []
    for thread in threading.enumerate():
        frame = frames.get(thread.ident or -1)
        stack = "".join(traceback.format_stack(frame)) if frame is not None else ""
        parts.append(f"--- {thread.name}\n{stack}")
    return "\n".join(parts)


class Running:
    """A consumer started in a thread; remembers what ``start()`` raised."""

    def __init__(self, consumer: TaskConsumer) -> None:
        self.consumer = consumer
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="test-consumer")

    def _run(self) -> None:
        try:
            self.consumer.start()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def stop(self, timeout: float | None = None) -> None:
        """Stop the consumer and check its thread ended without error."""
        self.consumer.stop(timeout)
        self.thread.join(10)
        assert not self.thread.is_alive(), f"consumer thread did not end:\n{thread_stacks()}"


@contextmanager
def running(consumer: TaskConsumer) -> Iterator[Running]:
    """Run ``consumer`` for the duration of the block, then stop it."""
    handle = Running(consumer)
    handle.thread.start()
    try:
        yield handle
    finally:
        handle.stop()
    if handle.error is not None:
        raise handle.error
