"""The ledger every fault test ends with, and the waiting it needs.

The ledger reads Redis directly, not through the package under test: for each task id
that ``enqueue`` returned it finds the final outcome (a ``succeeded`` result, or a
dead-letter record, never both), and it finds the pending list, the retry schedule and
every in-flight list empty. :class:`ResultListener` counts the results published per
task, so a result recorded twice is seen even though the result key would hide it.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import redis

from semibot_queue.keys import KeySpace

T = TypeVar("T")

#: Seconds between two polls of a condition.
POLL_INTERVAL_S = 0.02

SUCCEEDED = "succeeded"
DEAD = "dead-lettered"
MISSING = "missing"
#: Violations: a success that was also dead-lettered; a failure with no dead letter.
BOTH = "succeeded and dead-lettered"
FAILED_UNKEPT = "failed without a dead letter"


def wait_until(
    condition: Callable[[], T],
    timeout: float,
    what: str,
    describe: Callable[[], str] | None = None,
) -> T:
    """Poll ``condition`` until it returns something truthy, and return that.

    Raises AssertionError naming ``what`` (and ``describe()``, the state seen last)
    after ``timeout`` seconds. A Redis connection error counts as "not yet": callers wait
    through outages they caused.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except (redis.ConnectionError, redis.TimeoutError):
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            detail = f"; last seen: {describe()}" if describe is not None else ""
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}{detail}")
        time.sleep(POLL_INTERVAL_S)


class Ledger:
    """Where each task of one queue ended, read straight from Redis."""

    def __init__(self, client: redis.Redis[bytes], keys: KeySpace) -> None:
        self.client = client
        self.keys = keys

    def outcomes(self, task_ids: Iterable[str]) -> dict[str, str]:
        """The outcome of each task: SUCCEEDED, DEAD, MISSING, or a violation."""
        ids = list(task_ids)
        pipe = self.client.pipeline(transaction=False)
        for task_id in ids:
            pipe.get(self.keys.result(task_id))
            # dead-letter records are "<task id>#<n>": any of them means dead-lettered
            pipe.zrangebylex(self.keys.dead_ids, f"[{task_id}#", f"({task_id}$", 0, 1)
        replies = pipe.execute() if ids else []
        found = {}
        for index, task_id in enumerate(ids):
            stored, dead = replies[2 * index], replies[2 * index + 1]
            status = None if stored is None else json.loads(stored)["status"]
            if status == "succeeded":
                found[task_id] = BOTH if dead else SUCCEEDED
            elif dead:
                found[task_id] = DEAD
            else:
                found[task_id] = MISSING if status is None else FAILED_UNKEPT
        return found

    def leftovers(self) -> dict[str, int]:
        """Tasks still waiting anywhere: pending, scheduled, or in any in-flight list."""
        left = {
            "pending": int(self.client.llen(self.keys.pending)),
            "scheduled": int(self.client.zcard(self.keys.scheduled)),
        }
        # queue names have no glob characters (keys.py refuses them)
        for key in self.client.scan_iter(match=self.keys.inflight_prefix + "*", count=1000):
            length = int(self.client.llen(key))
            if length:
                left[key.decode()] = length
        return {where: count for where, count in left.items() if count}

    def settled(self, task_ids: Iterable[str]) -> bool:
        """Whether every task has its outcome and nothing waits anywhere."""
        outcomes = self.outcomes(task_ids)
        return all(o in (SUCCEEDED, DEAD) for o in outcomes.values()) and not self.leftovers()

    def summary(self, task_ids: Iterable[str]) -> str:
        """Counts of outcomes and leftovers, for failure messages."""
        counts = Counter(self.outcomes(task_ids).values())
        return f"outcomes {dict(counts)}, leftovers {self.leftovers()}"

    def wait_settled(self, task_ids: Iterable[str], timeout: float) -> dict[str, str]:
        """Wait until :meth:`settled`, then :meth:`check`; the outcome of each task."""
        ids = list(task_ids)
        wait_until(
            lambda: self.settled(ids), timeout, "every task to settle", lambda: self.summary(ids)
        )
        return self.check(ids)

    def check(self, task_ids: Iterable[str]) -> dict[str, str]:
        """Assert the ledger: each task succeeded or dead-lettered, once; nothing left over."""
        outcomes = self.outcomes(task_ids)
        wrong = {task_id: o for task_id, o in outcomes.items() if o not in (SUCCEEDED, DEAD)}
        assert not wrong, f"{len(wrong)} task(s) without a single final outcome: {wrong}"
        assert not self.leftovers(), f"tasks left over: {self.leftovers()}"
        return outcomes


def duplicate_runs(runs: list[dict[str, Any]]) -> dict[tuple[str, int], int]:
    """Runs that started more than once with the same delivery count (invisible duplicates).

    At-least-once allows a task to run again after its worker died or gave it back, but
    then its ``delivery_count`` is higher: a repeat with the same count was never meant.
    """
    starts = Counter(
        (run["task_id"], run["delivery_count"]) for run in runs if run["event"] == "start"
    )
    return {key: count for key, count in starts.items() if count > 1}


class ResultListener:
    """Counts the results published on a queue's result channels, per task id.

    Runs one named thread; :meth:`start` subscribes before it returns, :meth:`stop` joins.
    After a Redis restart it subscribes again: results published meanwhile are missed, so
    after an outage a count is a lower bound (a count above one still proves a double).
    """

    def __init__(self, url: str, keys: KeySpace) -> None:
        self._url = url
        self._pattern = keys.result_channel_pattern
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()
        self._statuses: dict[str, list[str]] = {}
        self._thread = threading.Thread(target=self._run, name="fault-result-listener")

    def start(self) -> None:
        """Start listening; returns once subscribed."""
        self._thread.start()
        if not self._ready.wait(10.0):
            raise AssertionError("result listener did not subscribe within 10 s")

    def stop(self) -> None:
        """Stop and join the thread."""
        self._stop.set()
        self._thread.join()

    def counts(self) -> Counter[str]:
        """How many results were published per task id."""
        with self._lock:
            return Counter(self._counts)

    def statuses(self, task_id: str) -> list[str]:
        """The statuses published for ``task_id``, in order."""
        with self._lock:
            return list(self._statuses.get(task_id, []))

    def doubles(self) -> dict[str, int]:
        """Task ids whose result was published more than once."""
        return {task_id: n for task_id, n in self.counts().items() if n > 1}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._listen()
            except (redis.ConnectionError, redis.TimeoutError):
                self._stop.wait(POLL_INTERVAL_S)  # Redis is away: subscribe again soon

    def _listen(self) -> None:
        client = redis.Redis.from_url(self._url, socket_timeout=5.0)
        pubsub = client.pubsub()
        try:
            pubsub.psubscribe(self._pattern)
            while not self._stop.is_set():
                message = pubsub.get_message(timeout=0.1)
                if message is None:
                    continue
                if message["type"] == "psubscribe":
                    self._ready.set()
                elif message["type"] == "pmessage":
                    result = json.loads(message["data"])
                    with self._lock:
                        self._counts[result["task_id"]] += 1
                        self._statuses.setdefault(result["task_id"], []).append(result["status"])
        finally:
            pubsub.close()
            client.close()


def dead_record_ids(client: redis.Redis[bytes], keys: KeySpace, task_id: str) -> list[str]:
    """The ids of the dead-letter records of ``task_id`` (``<task id>#<n>``), oldest first."""
    # '$' sorts right after the '#' that ends a task id in a record id
    found = client.zrangebylex(keys.dead_ids, f"[{task_id}#", f"({task_id}$")
    return sorted((raw.decode() for raw in found), key=lambda rid: int(rid.rpartition("#")[2]))


def dead_records(client: redis.Redis[bytes], keys: KeySpace, task_id: str) -> list[dict[str, Any]]:
    """The dead-letter records of ``task_id`` as stored (JSON objects), oldest first."""
    ids = dead_record_ids(client, keys, task_id)
    stored = client.hmget(keys.dead, ids) if ids else []
    return [json.loads(raw) for raw in stored if raw is not None]
