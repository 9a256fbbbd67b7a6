"""The load the fault tests put on a queue, and the faults they inject while it runs.

- :func:`task` makes a task whose handler (``fault_handlers.handle``) behaves as told;
- :class:`PacedProducer` enqueues batches from a thread through any outage;
- :class:`ConnectionCutter` cuts every client connection again and again;
- :data:`GARBAGE` makes unusable payloads to push raw onto a pending list.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from typing import Any

import redis

from semibot_queue import QueueConnectionError, QueueSettings, TaskPayload, TaskProducer


def task(**behaviour: Any) -> TaskPayload:
    """A task whose handler behaves as ``behaviour`` says (see fault_handlers)."""
    return TaskPayload(
        session_id=f"session-{uuid.uuid4().hex[:12]}",
        agent_id="agent-1",
        org_id="org-1",
        messages=[{"role": "user", "content": "hello"}],
        config=behaviour,
    )


def stored_task_id(stored: bytes) -> str:
    """The task id inside a task as stored in a Redis list (plain JSON)."""
    return str(json.loads(stored)["task_id"])


class PacedProducer:
    """Enqueues batches of tasks from a named thread, through any outage.

    A batch either gets its ids back (accepted: the ledger must find each one) or fails
    with QueueConnectionError once ``attempts`` reconnects failed (refused: the caller was
    told, so the ids are not promised). With ``batches=None`` it runs until :meth:`join`.
    """

    def __init__(
        self,
        url: str,
        queue: str,
        *,
        batches: int | None,
        pause: float,
        attempts: int,
        size: int = 10,
    ) -> None:
        settings = QueueSettings(
            error_retry_delay=0.05, max_reconnect_delay=0.5, max_reconnect_attempts=attempts
        )
        self._producer = TaskProducer(url, queue, settings)
        self._batches = batches
        self._size = size
        self._pause = pause
        self._stop = threading.Event()
        self.accepted: list[str] = []
        self.refused: list[str] = []
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="fault-producer")

    def start(self) -> None:
        self._producer.connect()
        self._thread.start()

    def join(self, timeout: float) -> None:
        """Wait for the last batch (stop now when ``batches`` is None); assert it went well."""
        if self._batches is None:
            self._stop.set()
        self._thread.join(timeout)
        alive = self._thread.is_alive()
        self.close()
        assert not alive, f"producer still enqueuing after {timeout} s"
        assert not self.errors, f"producer failed: {self.errors!r}"

    def close(self) -> None:
        """Stop the thread, wait for it and disconnect (safe to call twice)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._producer.disconnect()

    def _run(self) -> None:
        sent = 0
        while not self._stop.is_set() and (self._batches is None or sent < self._batches):
            batch = [task(sleep=0.05) for _ in range(self._size)]
            sent += 1
            try:
                self.accepted += self._producer.enqueue_many(batch)
            except QueueConnectionError:
                self.refused += [payload.task_id for payload in batch]
            except BaseException as exc:  # noqa: BLE001 - reported by join()
                self.errors.append(exc)
                return
            self._stop.wait(self._pause)  # pacing, so that the load spans the fault


class ConnectionCutter:
    """``CLIENT KILL TYPE normal`` every ``interval`` seconds from a named thread.

    SKIPME is left at its default (yes), so the cutter's own connection survives; pub/sub
    connections are of another type and survive too.
    """

    def __init__(self, url: str, interval: float) -> None:
        self._admin = redis.Redis.from_url(url)
        self._interval = interval
        self._stop = threading.Event()
        self.rounds = 0
        self.killed = 0
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="fault-connection-cutter")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop cutting, wait for the thread; assert it never failed."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._admin.close()
        assert not self.errors, f"connection cutter failed: {self.errors!r}"

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.killed += int(self._admin.client_kill_filter(_type="normal"))
            except BaseException as exc:  # noqa: BLE001 - reported by stop()
                self.errors.append(exc)
                return
            self.rounds += 1


# --- unusable payloads ----------------------------------------------------------------------

#: MAX_PAYLOAD_BYTES of the workers that get garbage: a good task takes about 400 bytes.
SMALL_PAYLOAD_LIMIT = 2048


def good_fields(index: int) -> dict[str, Any]:
    """A valid stored task, as a dict, with the unique task id ``garbage-<index>``."""
    return {
        "task_id": f"garbage-{index}",
        "session_id": f"session-{index}",
        "agent_id": "agent-1",
        "org_id": "org-1",
        "messages": [{"role": "user", "content": "hello"}],
        "config": {},
        "metadata": {},
        "enqueued_at": 1.0,
    }


def dumps(data: Any) -> bytes:
    """JSON bytes of ``data``."""
    return json.dumps(data).encode()


#: Ways a payload can be unusable; each makes a unique payload from an index.
GARBAGE: dict[str, Callable[[int], bytes]] = {
    "not JSON": lambda i: f"this is not JSON #{i}".encode(),
    "truncated JSON": lambda i: dumps(good_fields(i))[:-20],
    "JSON but not an object": lambda i: dumps([i, "task"]),
    "a field of the wrong type": lambda i: dumps({**good_fields(i), "session_id": i}),
    "a task id that is a number": lambda i: dumps({**good_fields(i), "task_id": i}),
    "required fields missing": lambda i: dumps({"task_id": f"garbage-{i}", "agent_id": "a"}),
    "messages not a list": lambda i: dumps({**good_fields(i), "messages": "hello"}),
    "a message without content": lambda i: dumps(
        {**good_fields(i), "messages": [{"role": "user"}]}
    ),
    "a negative retry count": lambda i: dumps({**good_fields(i), "retry_count": -1}),
    "beyond MAX_PAYLOAD_BYTES": lambda i: dumps(
        {**good_fields(i), "messages": [{"role": "user", "content": "x" * SMALL_PAYLOAD_LIMIT}]}
    ),
    "not UTF-8": lambda i: b"\xff\xfe\x00garbage " + str(i).encode() + b" \xc3\x28",
    "JSON with a non-UTF-8 string": lambda i: dumps(good_fields(i)).replace(
        b'"hello"', b'"hel\xfflo"'
    ),
}
