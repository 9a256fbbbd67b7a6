"""The task bodies every system runs, and the Redis keys through which they report.

The three operations are the same for every system:

- ``noop(total)``: count the task (one INCR); the first to count records its start time,
  the one that brings the count to ``total`` records its end time.
- ``sleep(total, seconds)``: sleep, then count like ``noop``.
- ``stamp()``: return ``time.time()`` taken as the handler starts; the producer learns it
  through the system's own result mechanism, so it costs no extra round trip.

Each worker process calls :func:`configure` once before it starts taking tasks; a worker
process started by a system's own supervisor (``--processes N``) is configured from
``BENCH_REDIS_URL`` on first use instead.
"""

from __future__ import annotations

import os
import time

import redis

#: How many counted tasks have finished.
COUNT_KEY = "bench:count"
#: ``time.time()`` at which the first counted task started.
FIRST_KEY = "bench:first"
#: ``time.time()`` at which the task that completed the count finished.
LAST_KEY = "bench:last"

_clients: dict[str, redis.Redis[bytes]] = {}


def configure(redis_url: str) -> None:
    """Connect the task bodies of this worker process to the benchmark's Redis."""
    _clients["default"] = redis.Redis.from_url(redis_url)


#: Where a worker process started by a supervisor finds the benchmark's Redis.
REDIS_URL_ENV = "BENCH_REDIS_URL"


def _client() -> redis.Redis[bytes]:
    if "default" not in _clients:
        configure(os.environ[REDIS_URL_ENV])
    return _clients["default"]


def _count(started: float, total: int) -> None:
    client = _client()
    done = int(client.incr(COUNT_KEY))
    if done == 1:
        client.set(FIRST_KEY, repr(started))
    if done == total:
        client.set(LAST_KEY, repr(time.time()))


def noop(total: int) -> None:
    """A task that does nothing but count itself."""
    _count(time.time(), total)


def sleep(total: int, seconds: float) -> None:
    """A task that sleeps ``seconds``, then counts itself."""
    started = time.time()
    time.sleep(seconds)
    _count(started, total)


def stamp() -> float:
    """A task that returns the wall-clock time at which its handler started."""
    return time.time()
