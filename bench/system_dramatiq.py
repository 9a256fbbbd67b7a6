"""Dramatiq: ``RedisBroker`` with the ``Results`` middleware on a ``RedisBackend``.

The worker is one ``dramatiq.Worker(broker, worker_threads=8)`` in one process (what
``dramatiq --processes 1 --threads 8`` runs, without the supervising parent). Default
middleware and options; only the ``stamp`` actor stores results (``store_results=True``),
read with ``message.get_result(block=True)``, which is a BRPOPLPUSH on the result key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dramatiq
import redis
from dramatiq.brokers.redis import RedisBroker
from dramatiq.results import Results, ResultTimeout
from dramatiq.results.backends.redis import RedisBackend

from bench import tasks
from bench.adapter import Op, SystemSpec
from bench.config import QUEUE_NAME, BenchConfig


@dataclass(frozen=True)
class DramatiqApp:
    """The broker, the result backend and the three actors, built the same in both processes."""

    broker: RedisBroker
    backend: RedisBackend
    actors: dict[str, dramatiq.Actor[Any, Any]]


def build(redis_url: str) -> DramatiqApp:
    """Build the broker and declare the actors on it (no global broker is set)."""
    broker = RedisBroker(url=redis_url)
    backend = RedisBackend(client=redis.Redis.from_url(redis_url))
    broker.add_middleware(Results(backend=backend))
    actors = {
        op: dramatiq.actor(
            actor_name=f"bench_{op}",
            broker=broker,
            queue_name=QUEUE_NAME,
            store_results=op == "stamp",
        )(body)
        for op, body in (("noop", tasks.noop), ("sleep", tasks.sleep), ("stamp", tasks.stamp))
    }
    return DramatiqApp(broker=broker, backend=backend, actors=actors)


class DramatiqProducer:
    """Sends with ``actor.send``; waits with ``message.get_result(block=True)``."""

    def __init__(self, redis_url: str, config: BenchConfig) -> None:
        """Build the app against ``redis_url``."""
        self.app = build(redis_url)
        self.sleep_seconds = config.sleep_seconds

    def enqueue(self, op: Op, total: int) -> object:
        """Send one message to the actor for ``op``."""
        actor = self.app.actors[op]
        if op == "noop":
            return actor.send(total)
        if op == "sleep":
            return actor.send(total, self.sleep_seconds)
        return actor.send()

    def wait_value(self, handle: object, timeout: float) -> float | None:
        """Block on the result backend for the message's result."""
        if not isinstance(handle, dramatiq.Message):
            raise TypeError(f"not a dramatiq message: {handle!r}")
        try:
            value = handle.get_result(
                backend=self.app.backend, block=True, timeout=int(timeout * 1000)
            )
        except ResultTimeout:
            return None
        return float(value)

    def close(self) -> None:
        """Close the broker's and the backend's connections."""
        self.app.broker.close()
        self.app.backend.client.close()


SPEC = SystemSpec(
    name="dramatiq",
    distribution="dramatiq",
    worker_module="bench.worker_dramatiq",
    shape="1 process x 8 threads (dramatiq.Worker)",
    result_mechanism="Results middleware + RedisBackend, message.get_result(block=True)",
    make_producer=DramatiqProducer,
    processes=True,
)
