"""Prometheus metrics, asserted by value after known sequences, each test on its own registry.

Every metric is labelled by queue; counters count exactly what happened, the length gauges
are what the watcher last read from Redis, and several producers or consumers of one process
share one registry.
"""

from __future__ import annotations

import json
import threading

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Gauge

from cli_handlers import by_kind, reject
from redis_server import free_port
from semibot_queue import (
    DeadLetterQueue,
    QueueConnectionError,
    QueueFullError,
    QueueSettings,
    TaskConsumer,
    TaskMessage,
    TaskProducer,
)
from semibot_queue.codec import Codec
from semibot_queue.constants import DURATION_BUCKETS
from semibot_queue.keys import KeySpace
from semibot_queue.metrics import PROCESSED_STATUSES, Metrics
from semibot_queue.scripts import Scripts
from semibot_queue.watcher import Watcher
from support import FAST, payload, running, wait_until

QUEUE = "metrics:q"
KEYS = KeySpace(QUEUE)

#: Quick retries and heartbeats; twelve tasks fill the queue.
SETTINGS = QueueSettings(
    max_queue_length=12,
    queue_length_warning_threshold=12,
    retry_base_delay=0.01,
    retry_max_delay=0.05,
    heartbeat_interval=0.1,
    worker_dead_after=0.5,
    stop_poll_slice=0.05,
    error_retry_delay=0.01,
    max_reconnect_delay=0.02,
    shutdown_timeout=5.0,
)


def value(registry: CollectorRegistry, name: str, queue: str = QUEUE, **labels: str) -> float:
    """The sample ``name{queue, labels}``; fails if the registry has no such sample."""
    sample = registry.get_sample_value(name, {"queue": queue, **labels})
    assert sample is not None, f"no sample {name} for queue {queue} {labels}"
    return sample


def processed(registry: CollectorRegistry, status: str) -> float:
    return value(registry, "semibot_queue_tasks_processed_total", status=status)


def watcher_of(client, metrics: Metrics, settings: QueueSettings = FAST) -> Watcher:
    """A watcher of QUEUE that is not started: tests call its steps themselves."""
    return Watcher(
        worker_id="metrics-watcher",
        client=client,
        keys=KEYS,
        settings=settings,
        scripts=Scripts(client, KEYS),
        codec=Codec(settings.max_payload_bytes),
        metrics=metrics,
    )


@pytest.fixture(scope="module")
def outcome(redis_server):
    """The metrics after the known sequence, computed once for the class below."""
    redis_server.flushall()
    registry = CollectorRegistry()
    kinds = ["ok"] * 7 + ["flaky"] * 3 + ["permanent"] * 2
    with TaskProducer(redis_server.url, QUEUE, SETTINGS, registry=registry) as producer:
        ids = producer.enqueue_many(
            [payload(n, metadata={"kind": kind}) for n, kind in enumerate(kinds)]
        )
        for n in range(5):
            with pytest.raises(QueueFullError):
                producer.enqueue(payload(100 + n))
        before = {
            "enqueued": value(registry, "semibot_queue_enqueued_total"),
            "rejected": value(registry, "semibot_queue_rejected_total"),
            "length": value(registry, "semibot_queue_length"),
        }
        consumer = TaskConsumer(
            redis_server.url, QUEUE, by_kind, 4, SETTINGS, registry=registry, rand=lambda: 0.5
        )
        with running(consumer):
            results = [producer.wait_for_result(task_id, timeout=15) for task_id in ids]
    # running() returned after stop(): every handler has returned, every outcome counted.
    return registry, before, results


class TestAKnownSequence:
    """12 accepted (7 fine, 3 failing once, 2 refused for good) and 5 rejected as full."""

    def test_the_results_are_as_planned(self, outcome):
        _, _, results = outcome
        assert [r.status if r else None for r in results] == ["succeeded"] * 10 + ["failed"] * 2
        assert [r.attempts for r in results if r] == [1] * 7 + [2] * 3 + [1] * 2

    def test_producer_counts_enqueued_and_rejected(self, outcome):
        registry, before, _ = outcome
        assert before == {"enqueued": 12, "rejected": 5, "length": 12}
        assert value(registry, "semibot_queue_enqueued_total") == 12
        assert value(registry, "semibot_queue_rejected_total") == 5

    def test_processed_counts_each_outcome(self, outcome):
        registry, _, _ = outcome
        assert processed(registry, "succeeded") == 10
        assert processed(registry, "retried") == 3
        assert processed(registry, "dead_lettered") == 2
        # every failed attempt: 3 first attempts of the flaky tasks and the 2 refused
        assert processed(registry, "failed") == 5

    def test_retries_and_nothing_else(self, outcome):
        registry, _, _ = outcome
        assert value(registry, "semibot_queue_retries_total") == 3
        assert value(registry, "semibot_queue_recovered_total") == 0
        assert value(registry, "semibot_queue_redis_reconnects_total") == 0
        assert value(registry, "semibot_queue_dead_letter_evictions_total") == 0

    def test_every_attempt_is_timed(self, outcome):
        registry, _, _ = outcome
        assert value(registry, "semibot_queue_task_duration_seconds_count") == 15
        assert 0 < value(registry, "semibot_queue_task_duration_seconds_sum") < 15
        name = "semibot_queue_task_duration_seconds_bucket"
        assert value(registry, name, le="+Inf") == 15
        assert value(registry, name, le="600.0") == 15

    def test_no_handler_is_running_afterwards(self, outcome):
        registry, _, _ = outcome
        assert value(registry, "semibot_queue_concurrent_tasks") == 0


class TestGauges:
    """Lengths come from Redis through the watcher; concurrency from the running handlers."""

    def test_refresh_reads_pending_scheduled_and_dead_letter_lengths(self, redis_url, redis_client):
        registry = CollectorRegistry()
        with TaskProducer(redis_url, QUEUE, FAST, registry=CollectorRegistry()) as producer:
            producer.enqueue_many([payload(n) for n in range(4)])
        seconds, _ = redis_client.time()
        redis_client.zadd(KEYS.scheduled, {b"later-1": seconds * 1000 + 3_600_000})
        redis_client.zadd(KEYS.scheduled, {b"later-2": seconds * 1000 + 3_600_000})
        redis_client.hset(KEYS.dead, mapping={"a": b"{}", "b": b"{}", "c": b"{}"})
        metrics = Metrics(QUEUE, registry)
        watcher = watcher_of(redis_client, metrics)
        assert value(registry, "semibot_queue_length") == 0
        watcher.refresh_gauges()
        assert value(registry, "semibot_queue_length") == 4
        assert value(registry, "semibot_queue_scheduled_length") == 2
        assert value(registry, "semibot_queue_dead_letter_length") == 3
        redis_client.rpop(KEYS.pending)
        redis_client.delete(KEYS.scheduled)
        watcher.refresh_gauges()
        assert value(registry, "semibot_queue_length") == 3
        assert value(registry, "semibot_queue_scheduled_length") == 0

    def test_a_running_worker_refreshes_them_on_its_heartbeat(self, redis_url):
        registry = CollectorRegistry()
        with TaskProducer(redis_url, QUEUE, FAST, registry=CollectorRegistry()) as producer:
            producer.enqueue_many([payload(n) for n in range(3)])
        consumer = TaskConsumer(redis_url, QUEUE, reject, 2, FAST, registry=registry)
        with running(consumer):
            wait_until(
                lambda: value(registry, "semibot_queue_dead_letter_length") == 3,
                what="the dead-letter gauge at 3",
            )
        assert value(registry, "semibot_queue_length") == 0
        assert value(registry, "semibot_queue_scheduled_length") == 0

    def test_concurrent_tasks_rise_to_the_slots_and_fall_back_to_zero(self, redis_url):
        registry = CollectorRegistry()
        release = threading.Event()

        def hold(message: TaskMessage) -> str:
            release.wait(10)
            return message.task_id

        with TaskProducer(redis_url, QUEUE, FAST, registry=CollectorRegistry()) as producer:
            ids = producer.enqueue_many([payload(n) for n in range(3)])
            consumer = TaskConsumer(redis_url, QUEUE, hold, 2, FAST, registry=registry)
            with running(consumer):
                wait_until(lambda: value(registry, "semibot_queue_concurrent_tasks") == 2)
                release.set()
                results = [producer.wait_for_result(task_id, timeout=10) for task_id in ids]
        assert [r.status for r in results if r] == ["succeeded"] * 3
        assert value(registry, "semibot_queue_concurrent_tasks") == 0


class TestFailureCounters:
    """Reconnects, crash recoveries and dead-letter evictions are counted as they happen."""

    def test_a_refused_connection_counts_each_retry(self):
        registry = CollectorRegistry()
        settings = QueueSettings(
            max_reconnect_attempts=2, error_retry_delay=0.01, max_reconnect_delay=0.02
        )
        url = f"redis://127.0.0.1:{free_port()}/0"
        producer = TaskProducer(url, QUEUE, settings, registry=registry)
        with pytest.raises(QueueConnectionError, match="unreachable after 2 attempts"):
            producer.connect()
        assert value(registry, "semibot_queue_redis_reconnects_total") == 1

    def test_a_worker_counts_its_reconnects_before_giving_up(self):
        registry = CollectorRegistry()
        settings = QueueSettings(
            max_reconnect_attempts=4, error_retry_delay=0.01, max_reconnect_delay=0.02
        )
        url = f"redis://127.0.0.1:{free_port()}/0"
        consumer = TaskConsumer(
            url, QUEUE, reject, 1, settings, registry=registry, handle_signals=False
        )
        with pytest.raises(QueueConnectionError, match="unreachable after 4 attempts"):
            consumer.start()
        assert value(registry, "semibot_queue_redis_reconnects_total") == 3

    def test_recovered_tasks_of_a_dead_worker(self, redis_url, redis_client):
        registry = CollectorRegistry()
        with TaskProducer(redis_url, QUEUE, FAST, registry=CollectorRegistry()) as producer:
            producer.enqueue_many([payload(n) for n in range(3)])
        dead = KEYS.inflight("dead-worker")
        for _ in range(3):
            redis_client.lmove(KEYS.pending, dead, "RIGHT", "LEFT")
        # the third was already lost twice: this loss makes it poison (MAX_DELIVERY_ATTEMPTS 3)
        third = json.loads(redis_client.lindex(dead, 0))["task_id"]
        redis_client.hset(KEYS.crashes, third, 2)
        seconds, _ = redis_client.time()
        redis_client.zadd(KEYS.workers, {"dead-worker": (seconds - 60) * 1000})
        watcher = watcher_of(redis_client, Metrics(QUEUE, registry))
        assert watcher.recover_dead_workers() == 2
        assert value(registry, "semibot_queue_recovered_total") == 2
        assert processed(registry, "dead_lettered") == 1
        assert redis_client.llen(KEYS.pending) == 2
        assert redis_client.hlen(KEYS.dead) == 1
        assert watcher.recover_dead_workers() == 0
        assert value(registry, "semibot_queue_recovered_total") == 2

    def test_evictions_beyond_the_dead_letter_bound(self, redis_url):
        registry = CollectorRegistry()
        settings = QueueSettings(
            dead_letter_max_length=2,
            heartbeat_interval=0.1,
            worker_dead_after=0.5,
            stop_poll_slice=0.05,
        )
        with TaskProducer(redis_url, QUEUE, settings, registry=CollectorRegistry()) as producer:
            ids = producer.enqueue_many([payload(n) for n in range(3)])
        consumer = TaskConsumer(redis_url, QUEUE, reject, 1, settings, registry=registry)
        with running(consumer):
            wait_until(lambda: processed(registry, "dead_lettered") == 3, what="3 dead letters")
            # the watcher trims on its next heartbeat
            wait_until(
                lambda: value(registry, "semibot_queue_dead_letter_evictions_total") == 1,
                what="the eviction",
            )
        assert value(registry, "semibot_queue_dead_letter_evictions_total") == 1
        dlq = DeadLetterQueue(redis_url, QUEUE, settings)
        try:
            assert sorted(r.task_id for r in dlq.list()) == sorted(ids[1:])
        finally:
            dlq.close()


class TestRegistry:
    """Metrics live in the registry they are given; one family serves every queue."""

    def test_two_queues_share_the_families_of_one_registry(self):
        registry = CollectorRegistry()
        first, second = Metrics("q-one", registry), Metrics("q-two", registry)
        first.enqueued.inc(2)
        second.enqueued.inc(5)
        first.processed["succeeded"].inc()
        second.queue_length.set(7)
        assert value(registry, "semibot_queue_enqueued_total", queue="q-one") == 2
        assert value(registry, "semibot_queue_enqueued_total", queue="q-two") == 5
        assert (
            value(registry, "semibot_queue_tasks_processed_total", "q-one", status="succeeded") == 1
        )
        assert (
            value(registry, "semibot_queue_tasks_processed_total", "q-two", status="succeeded") == 0
        )
        assert value(registry, "semibot_queue_length", queue="q-two") == 7
        families = [f for f in registry.collect() if f.name == "semibot_queue_enqueued"]
        assert len(families) == 1
        assert {s.labels["queue"] for s in families[0].samples if s.name.endswith("_total")} == {
            "q-one",
            "q-two",
        }

    def test_every_metric_of_the_issue_exists_labelled_by_queue(self):
        registry = CollectorRegistry()
        Metrics(QUEUE, registry)
        names = {
            "semibot_queue_length", "semibot_queue_concurrent_tasks",
            "semibot_queue_dead_letter_length", "semibot_queue_scheduled_length",
            "semibot_queue_enqueued_total", "semibot_queue_rejected_total",
            "semibot_queue_retries_total", "semibot_queue_recovered_total",
            "semibot_queue_redis_reconnects_total", "semibot_queue_dead_letter_evictions_total",
            "semibot_queue_task_duration_seconds_count",
        }  # fmt: skip
        for name in names:
            assert value(registry, name) == 0
        for status in PROCESSED_STATUSES:
            assert processed(registry, status) == 0
        assert set(PROCESSED_STATUSES) == {
            "succeeded", "failed", "retried", "dead_lettered", "cancelled", "timed_out"
        }  # fmt: skip

    def test_duration_buckets_span_5_ms_to_10_minutes(self):
        registry = CollectorRegistry()
        Metrics(QUEUE, registry).duration.observe(0.004)
        bounds = [
            float(s.labels["le"])
            for f in registry.collect()
            if f.name == "semibot_queue_task_duration_seconds"
            for s in f.samples
            if s.name.endswith("_bucket")
        ]
        assert bounds == [*DURATION_BUCKETS, float("inf")]
        assert bounds[0] == 0.005
        assert bounds[-2] == 600
        name = "semibot_queue_task_duration_seconds_bucket"
        assert value(registry, name, le="0.005") == 1

    def test_without_a_registry_the_global_one_is_used(self):
        metrics = Metrics("metrics-global-registry-test")
        assert metrics.registry is REGISTRY
        metrics.rejected.inc()
        assert value(REGISTRY, "semibot_queue_rejected_total", "metrics-global-registry-test") >= 1

    def test_a_name_taken_by_another_kind_of_metric_is_refused(self):
        registry = CollectorRegistry()
        Gauge("semibot_queue_enqueued", "not a counter", ["queue"], registry=registry)
        with pytest.raises(ValueError, match="semibot_queue_enqueued"):
            Metrics(QUEUE, registry)
