"""Prometheus metrics of one queue, registered in an injected ``CollectorRegistry``.

Several producers or consumers of one process may share a registry: each metric is
created once per registry and every instance uses its ``queue`` label. Under
prometheus-client's multiprocess mode (``worker --processes N``) each gauge says how the
values of the processes combine: running handlers add up; lengths, which every process reads
from the same Redis, are the highest reading of a live process.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from semibot_queue.constants import DURATION_BUCKETS

M = TypeVar("M", Counter, Gauge, Histogram)

#: Final statuses counted by ``semibot_queue_tasks_processed_total``.
PROCESSED_STATUSES = ("succeeded", "failed", "retried", "dead_lettered", "cancelled", "timed_out")


#: The metric families created in each registry, so that every producer and consumer of
#: one registry shares them: prometheus-client has no public lookup of a registered
#: collector. Weak keys: this holds nothing the caller does not hold itself.
_FAMILIES: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, Any]] = (
    weakref.WeakKeyDictionary()
)
_FAMILIES_LOCK = threading.Lock()


def _metric(registry: CollectorRegistry, kind: type[M], name: str, doc: str, **kw: Any) -> M:
    labels = ["queue", *kw.pop("extra_labels", [])]
    with _FAMILIES_LOCK:
        families = _FAMILIES.setdefault(registry, {})
        if name not in families:
            families[name] = kind(name, doc, labels, registry=registry, **kw)
        family = families[name]
    if not isinstance(family, kind):  # pragma: no cover - one kind per name in this module
        raise TypeError(f"metric {name} is a {type(family).__name__}, not a {kind.__name__}")
    return family


class Metrics:
    """The queue's counters, gauges and histogram, already bound to its ``queue`` label."""

    def __init__(self, queue: str, registry: CollectorRegistry | None = None) -> None:
        reg = REGISTRY if registry is None else registry
        self.registry = reg

        def counter(name: str, doc: str) -> Any:
            return _metric(reg, Counter, name, doc).labels(queue=queue)

        def gauge(name: str, doc: str, mode: str = "livemax") -> Any:
            # mode only matters in multiprocess mode; one process keeps its own value
            return _metric(reg, Gauge, name, doc, multiprocess_mode=mode).labels(queue=queue)

        processed = _metric(
            reg,
            Counter,
            "semibot_queue_tasks_processed",
            "Task attempts by outcome.",
            extra_labels=["status"],
        )
        self.processed = {s: processed.labels(queue=queue, status=s) for s in PROCESSED_STATUSES}
        self.duration = _metric(
            reg,
            Histogram,
            "semibot_queue_task_duration_seconds",
            "Seconds a handler ran.",
            buckets=DURATION_BUCKETS,
        ).labels(queue=queue)
        self.queue_length = gauge("semibot_queue_length", "Tasks pending.")
        self.concurrent = gauge(
            "semibot_queue_concurrent_tasks", "Handlers running now.", "livesum"
        )
        self.dead_letter_length = gauge("semibot_queue_dead_letter_length", "Dead letters kept.")
        self.scheduled_length = gauge("semibot_queue_scheduled_length", "Retries waiting.")
        self.enqueued = counter("semibot_queue_enqueued", "Tasks accepted by enqueue.")
        self.rejected = counter("semibot_queue_rejected", "Tasks refused: queue full.")
        self.retries = counter("semibot_queue_retries", "Retries scheduled.")
        self.recovered = counter("semibot_queue_recovered", "Tasks recovered from dead workers.")
        self.reconnects = counter("semibot_queue_redis_reconnects", "Redis reconnect attempts.")
        self.evictions = counter(
            "semibot_queue_dead_letter_evictions", "Dead letters evicted by TTL or length bound."
        )
