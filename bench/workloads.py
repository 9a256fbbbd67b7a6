"""The workloads, each driving one system through its :class:`~bench.adapter.Producer`.

Every workload starts from an empty database and a fresh worker process, and returns its
figures plus ``rss_mib``, the worker's peak RSS (``VmHWM``) when the workload ended.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import redis

from bench import tasks
from bench.adapter import BatchProducer, Producer, SystemSpec
from bench.config import BenchConfig
from bench.processes import WorkerProcess
from bench.stats import percentile

#: How long one result may take once the worker is warm.
RESULT_TIMEOUT_S = 30.0
#: How long a fresh worker may take to start and run its first task.
STARTUP_TIMEOUT_S = 60.0
#: Longest single blocking wait on a result (below redis-py's 5 s socket timeout).
_WAIT_CHUNK_S = 3.0


@dataclass(frozen=True)
class Context:
    """The run's Redis, sizes and log directory."""

    redis_url: str
    admin: redis.Redis[bytes]
    config: BenchConfig
    log_dir: Path


def _worker(ctx: Context, spec: SystemSpec, workload: str, processes: int = 1) -> WorkerProcess:
    log_path = ctx.log_dir / f"{spec.name}-{workload}.log"
    return WorkerProcess(
        spec.worker_module, ctx.redis_url, log_path, ctx.config.concurrency, processes
    )


def _wait_value(producer: Producer, handle: object, worker: WorkerProcess, timeout: float) -> float:
    """Wait for a result in short blocking chunks, checking that the worker is still alive."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no result within {timeout:.0f} s")
        value = producer.wait_value(handle, min(_WAIT_CHUNK_S, max(remaining, 1.0)))
        if value is not None:
            return value
        worker.check_alive()


def _wait_counted(ctx: Context, worker: WorkerProcess, timeout: float) -> tuple[float, float]:
    """Wait until a task has written ``LAST_KEY``; return (first start, last end) times."""
    deadline = time.monotonic() + timeout
    while ctx.admin.get(tasks.LAST_KEY) is None:
        worker.check_alive()
        if time.monotonic() > deadline:
            done = ctx.admin.get(tasks.COUNT_KEY)
            raise TimeoutError(f"only {done!r} tasks counted within {timeout:.0f} s")
        time.sleep(0.05)
    first, last = ctx.admin.mget(tasks.FIRST_KEY, tasks.LAST_KEY)
    if first is None or last is None:
        raise RuntimeError("the tasks' start and end times are missing")
    return float(first), float(last)


def _timed_enqueue(count: int, enqueue_one: Callable[[], object]) -> float:
    """Call ``enqueue_one`` ``count`` times; return calls per second."""
    started = time.perf_counter()
    for _ in range(count):
        enqueue_one()
    return count / (time.perf_counter() - started)


def _rss(worker: WorkerProcess) -> float:
    rss = worker.peak_rss_mib()
    if rss is None:
        raise RuntimeError("cannot read the worker's VmHWM")
    return rss


def throughput(ctx: Context, spec: SystemSpec) -> dict[str, float]:
    """No-op throughput: enqueue N tasks from one thread, then start the worker and drain.

    Processed/s is N over the span from the first handler's start to the last handler's
    end, both written to Redis by the tasks, so the worker's start-up is not counted.
    """
    count = ctx.config.noop_tasks
    ctx.admin.flushall()
    producer = spec.make_producer(ctx.redis_url, ctx.config)
    try:
        figures = {"enqueue_per_s": _timed_enqueue(count, lambda: producer.enqueue("noop", count))}
        with _worker(ctx, spec, "noop") as worker:
            first, last = _wait_counted(ctx, worker, STARTUP_TIMEOUT_S + count * 0.02)
            figures["noop_per_s"] = count / (last - first)
            figures["rss_mib"] = _rss(worker)
        if isinstance(producer, BatchProducer):
            ctx.admin.flushall()
            batch = ctx.config.batch_size
            batches = _timed_enqueue(
                count // batch, lambda: producer.enqueue_batch("noop", count, batch)
            )
            figures["enqueue_many_per_s"] = batches * batch
    finally:
        producer.close()
        ctx.admin.flushall()
    return figures


def throughput_two_processes(ctx: Context, spec: SystemSpec) -> dict[str, float]:
    """No-op throughput as above, drained by two worker processes of the system's own
    supervisor (each with the usual threads); nothing for a system without one."""
    if not spec.processes:
        return {}
    count = ctx.config.noop_tasks
    first, last, _ = _drain(ctx, spec, "noop", count, count * 0.02, processes=2)
    return {"noop_p2_per_s": count / (last - first)}


def sleep_bound(ctx: Context, spec: SystemSpec) -> dict[str, float]:
    """Sleep-bound: N tasks of ``sleep_seconds`` each, timed like the no-op drain."""
    count = ctx.config.sleep_tasks
    timeout = count * ctx.config.sleep_seconds * 3
    first, last, rss = _drain(ctx, spec, "sleep", count, timeout)
    elapsed = last - first
    return {
        "sleep_s": elapsed,
        "sleep_vs_ideal": elapsed / ctx.config.sleep_ideal_s,
        "rss_mib": rss,
    }


def _drain(
    ctx: Context, spec: SystemSpec, kind: str, count: int, timeout: float, processes: int = 1
) -> tuple[float, float, float]:
    """Enqueue ``count`` tasks of ``kind``, then time a worker draining them: the first and
    last task's stamps and the worker's peak RSS."""
    ctx.admin.flushall()
    producer = spec.make_producer(ctx.redis_url, ctx.config)
    try:
        for _ in range(count):
            producer.enqueue(kind, count)
        label = kind if processes == 1 else f"{kind}-{processes}-processes"
        with _worker(ctx, spec, label, processes=processes) as worker:
            first, last = _wait_counted(ctx, worker, STARTUP_TIMEOUT_S + timeout)
            rss = _rss(worker)
    finally:
        producer.close()
        ctx.admin.flushall()
    return first, last, rss


def _stamp_once(producer: Producer, worker: WorkerProcess, timeout: float) -> tuple[float, float]:
    """Enqueue one ``stamp`` task; return (enqueue->start, enqueue->result seen) in ms."""
    sent = time.time()
    handle = producer.enqueue("stamp", 0)
    started = _wait_value(producer, handle, worker, timeout)
    seen = time.time()
    return (started - sent) * 1000, (seen - sent) * 1000


def interactive(ctx: Context, spec: SystemSpec) -> dict[str, float]:
    """Latency then idle wake-up, one task at a time, on one warmed-up idle worker.

    Latency: tasks back to back, the next enqueued as soon as the previous result is seen.
    Wake-up: tasks ``wakeup_gap_s`` apart, so the worker has been idle that long.
    """
    config = ctx.config
    ctx.admin.flushall()
    producer = spec.make_producer(ctx.redis_url, config)
    try:
        with _worker(ctx, spec, "latency") as worker:
            _stamp_once(producer, worker, STARTUP_TIMEOUT_S)
            for _ in range(config.warmup_tasks):
                _stamp_once(producer, worker, RESULT_TIMEOUT_S)
            samples = [
                _stamp_once(producer, worker, RESULT_TIMEOUT_S)
                for _ in range(config.latency_samples)
            ]
            wakeups = []
            for _ in range(config.wakeups):
                time.sleep(config.wakeup_gap_s)
                wakeups.append(_stamp_once(producer, worker, RESULT_TIMEOUT_S)[0])
            rss = _rss(worker)
    finally:
        producer.close()
        ctx.admin.flushall()
    starts = [start for start, _ in samples]
    results = [result for _, result in samples]
    return {
        "start_p50_ms": percentile(starts, 0.50),
        "start_p99_ms": percentile(starts, 0.99),
        "result_p50_ms": percentile(results, 0.50),
        "result_p99_ms": percentile(results, 0.99),
        "wakeup_p50_ms": percentile(wakeups, 0.50),
        "wakeup_p99_ms": percentile(wakeups, 0.99),
        "rss_mib": rss,
    }


#: The workloads in the order they run for each system.
WORKLOADS: dict[str, Callable[[Context, SystemSpec], dict[str, float]]] = {
    "throughput": throughput,
    "throughput-2p": throughput_two_processes,
    "sleep": sleep_bound,
    "interactive": interactive,
}
