"""``python -m bench soak [--minutes M] [--rate R] [--output DIR]``: a long steady run.

An open-loop producer enqueues ``R`` tasks a second (default 1,500: about 40% of the
no-op capacity one worker process measured, 3,861/s) onto one ``semibot-queue worker``
process with 8 slots, on a fresh ``redis-server``. The mix: 90% succeed, 7% fail once and
succeed on their retry, 3% are dead-lettered (PermanentTaskError). Results live
``RESULT_TTL`` = 60 s and at most 2,000 dead letters are kept, so every footprint must
level off after the first minutes.

Every ``--every`` seconds (default 5) it samples the worker's RSS, Redis's used memory,
its key count, the pending length and the enqueue-to-start p99 of the first attempts
started since the last sample. It reports each one's slope over the second half of the run (per
minute; flat means no drift) and a ledger by counts (every task sent ran to its outcome:
nothing lost, nothing left pending, in flight or scheduled), and writes ``soak.json``,
``soak.md`` and, with matplotlib installed, ``soak.png`` into ``--output``.
Exit status: 0 when the ledger balances, 1 when it does not.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from bench.processes import spawn, stop
from bench.redis_server import RedisServer
from semibot_queue import PermanentTaskError, TaskMessage, TaskPayload, TaskProducer

QUEUE = "soak"
#: The worker's settings: short-lived results and a small dead-letter cap, fast retries.
SETTINGS_ENV = {
    "SEMIBOT_QUEUE_RESULT_TTL": "60",
    "SEMIBOT_QUEUE_DEAD_LETTER_MAX_LENGTH": "2000",
    "SEMIBOT_QUEUE_RETRY_BASE_DELAY": "0.2",
    "SEMIBOT_QUEUE_RETRY_MAX_DELAY": "1.0",
}
#: kind -> share of the tasks sent
MIX = {"ok": 0.90, "retry": 0.07, "dead": 0.03}
LATENCY_KEY = "soak:latency_ms"  # enqueue-to-start of recent starts, emptied by each sample
DONE_KEY = "soak:done"  # hash: kind -> tasks that reached their intended outcome
SAMPLES = ("rss_mib", "redis_mib", "keys", "pending", "start_p99_ms")

_client: redis.Redis[bytes] | None = None


def handle(message: TaskMessage) -> str:
    """The worker's handler: behave as the task's kind says, and report its start."""
    global _client  # noqa: PLW0603 - one client per worker process, made on first use
    if _client is None:
        _client = redis.Redis.from_url(os.environ["REDIS_URL"])
    started = (time.time() - message.enqueued_at) * 1000
    kind = message.config["kind"]
    pipe = _client.pipeline(transaction=False)
    if message.retry_count == 0:  # a retry's wait is its backoff, not the queue's
        pipe.rpush(LATENCY_KEY, f"{started:.3f}")
    if kind == "retry" and message.retry_count == 0:
        pipe.execute()
        raise RuntimeError("fails once, on purpose")
    pipe.hincrby(DONE_KEY, kind, 1)
    pipe.execute()
    if kind == "dead":
        raise PermanentTaskError("dead-lettered on purpose")
    return "ok"


def _produce(url: str, rate: float, until: float, sent: dict[str, int]) -> None:
    rand = random.Random(20261130)  # noqa: S311 - a replayable mix, not a secret
    kinds, weights = list(MIX), list(MIX.values())
    with TaskProducer(url, QUEUE) as producer:
        due = time.monotonic()
        while due < until:
            kind = rand.choices(kinds, weights)[0]
            producer.enqueue(
                TaskPayload(
                    session_id="soak", agent_id="a", org_id="o", messages=[], config={"kind": kind}
                )
            )
            sent[kind] += 1
            due += 1.0 / rate  # open loop: the schedule does not wait for the worker
            pause = due - time.monotonic()
            if pause > 0:
                time.sleep(pause)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _sample(admin: redis.Redis[bytes], pid: int, started: float) -> dict[str, float]:
    pipe = admin.pipeline(transaction=True)
    pipe.lrange(LATENCY_KEY, 0, -1)
    pipe.delete(LATENCY_KEY)
    latencies = sorted(float(v) for v in pipe.execute()[0])
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else 0.0
    return {
        "minute": (time.monotonic() - started) / 60,
        "rss_mib": _rss_mib(pid),
        "redis_mib": int(admin.info("memory")["used_memory"]) / 2**20,
        "keys": float(admin.dbsize()),
        "pending": float(admin.llen(QUEUE)),
        "start_p99_ms": p99,
    }


def _slopes(samples: list[dict[str, float]]) -> dict[str, float]:
    """Least-squares slope per minute of each figure over the second half of the run."""
    half = samples[len(samples) // 2 :]
    minutes = [s["minute"] for s in half]
    return {
        name: statistics.linear_regression(minutes, [s[name] for s in half]).slope
        for name in SAMPLES
    }


def _drained(admin: redis.Redis[bytes]) -> bool:
    keys = [k.decode() for k in admin.keys("*")]
    inflight = sum(admin.llen(k) for k in keys if ":inflight:" in k)
    scheduled = sum(admin.zcard(k) for k in keys if k.endswith(":scheduled"))
    return admin.llen(QUEUE) == 0 and inflight == 0 and scheduled == 0


def _ledger(admin: redis.Redis[bytes], sent: dict[str, int]) -> dict[str, Any]:
    done = {k.decode(): int(v) for k, v in admin.hgetall(DONE_KEY).items()}
    rows = {kind: {"sent": sent[kind], "done": done.get(kind, 0)} for kind in MIX}
    balanced = all(row["sent"] == row["done"] for row in rows.values())
    return {"kinds": rows, "balanced": balanced and _drained(admin)}


def _plot(samples: list[dict[str, float]], path: Path) -> bool:
    try:
        import matplotlib  # noqa: PLC0415 - optional, only for the picture

        matplotlib.use("Agg")
        from matplotlib import pyplot  # noqa: PLC0415
    except ImportError:
        return False
    figure, axes = pyplot.subplots(len(SAMPLES), 1, figsize=(8, 11), sharex=True)
    minutes = [s["minute"] for s in samples]
    for axis, name in zip(axes, SAMPLES, strict=True):
        axis.plot(minutes, [s[name] for s in samples])
        axis.set_ylabel(name)
        axis.set_ylim(bottom=0)
    axes[-1].set_xlabel("minutes")
    figure.suptitle("semibot_queue soak run")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    return True


def _table(result: dict[str, Any]) -> str:
    last = result["samples"][-1]
    lines = ["| figure | last sample | slope per minute (second half) |", "|---|---|---|"]
    lines += [f"| {n} | {last[n]:.2f} | {result['slopes'][n]:+.4f} |" for n in SAMPLES]
    lines += ["", "| kind | sent | reached its outcome |", "|---|---|---|"]
    lines += [f"| {k} | {r['sent']} | {r['done']} |" for k, r in result["ledger"]["kinds"].items()]
    lines += ["", f"ledger balanced, nothing left anywhere: {result['ledger']['balanced']}"]
    return "\n".join(lines)


def run(minutes: float, rate: float, every: float, output: Path) -> int:
    """Run the soak; write its files into ``output``; the exit status."""
    output.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="semibot-soak-") as workdir,
        RedisServer(Path(workdir)) as server,
    ):
        env = {**os.environ, **SETTINGS_ENV, "REDIS_URL": server.url}
        command = [sys.executable, "-m", "semibot_queue", "worker", "bench.soak:handle"]
        command += ["--queue", QUEUE, "--concurrency", "8", "--log-level", "WARNING"]
        worker = spawn(command, output / "soak-worker.log", env)
        admin = redis.Redis.from_url(server.url)
        sent = dict.fromkeys(MIX, 0)
        started = time.monotonic()
        until = started + minutes * 60
        producer = threading.Thread(target=_produce, args=(server.url, rate, until, sent))
        producer.start()
        samples = []
        try:
            while producer.is_alive():
                producer.join(every)
                samples.append(_sample(admin, worker.pid, started))
                print(json.dumps(samples[-1]), flush=True)
            deadline = time.monotonic() + 120
            while not _drained(admin) and time.monotonic() < deadline:
                time.sleep(0.5)
            ledger = _ledger(admin, sent)
        finally:
            stop(worker)
    result = {"minutes": minutes, "rate": rate, "samples": samples, "ledger": ledger}
    result["slopes"] = _slopes(samples)
    (output / "soak.json").write_text(json.dumps(result, indent=1))
    (output / "soak.md").write_text(_table(result) + "\n")
    _plot(samples, output / "soak.png")
    print(_table(result))
    return 0 if ledger["balanced"] else 1


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options and run the soak."""
    parser = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=1500.0, help="tasks enqueued a second")
    parser.add_argument("--every", type=float, default=5.0, help="seconds between samples")
    parser.add_argument("--output", type=Path, default=Path("bench/results/soak"))
    args = parser.parse_args(argv)
    if args.minutes <= 0 or args.rate <= 0 or args.every <= 0:
        parser.error("--minutes, --rate and --every must be > 0")
    return run(args.minutes, args.rate, args.every, args.output)
