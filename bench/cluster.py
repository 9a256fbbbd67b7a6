"""``python -m bench cluster [--tasks N] [--runs R]``: three queues on one master against
three queues on three masters of one local Redis Cluster (not a test).

A 3-master cluster is started on free loopback ports. For each layout, three queues are
picked by their hash slot (all on one master, or one per master), each is filled with N
no-op tasks, and three worker processes (one per queue, ``semibot-queue worker``) drain
them; the figure is tasks per second from the workers' start until every queue is empty
and nothing is in flight. Each layout runs R times; medians are printed as JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import redis
from redis.crc import key_slot

from bench.processes import log_tail, spawn, stop
from bench.redis_server import free_port
from semibot_queue import QueueSettings, TaskPayload, TaskProducer
from semibot_queue.clients import make_client
from semibot_queue.keys import KeySpace
from semibot_queue.stats import collect

MASTERS = 3
CLUSTER_BUS_OFFSET = 10_000  # each node's cluster bus listens on its port + 10000
MAX_PORT = 65_535
READY_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 300.0
POLL_S = 0.05
CONCURRENCY = 8
ENQUEUE_CHUNK = 500


def noop(_message: object) -> None:
    """The task body: nothing, so the figure is the queue's own cost."""


def _cluster_ports() -> list[int]:
    ports: list[int] = []
    while len(ports) < MASTERS:
        port = free_port()
        if port + CLUSTER_BUS_OFFSET <= MAX_PORT and port not in ports:
            ports.append(port)
    return ports


def _start_cluster(workdir: Path) -> tuple[list[int], list[subprocess.Popen[bytes]]]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server not found on PATH")
    ports = _cluster_ports()
    nodes = []
    for p in ports:
        options = ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{p}.conf"]
        options += ["--save", "", "--appendonly", "no", "--dir", str(workdir)]
        argv = [binary, "--port", str(p), "--bind", "127.0.0.1", *options]
        nodes.append(spawn(argv, workdir / f"redis-{p}.log"))
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not all(_answers(p) for p in ports):
        if time.monotonic() > deadline:
            logs = "\n".join(log_tail(workdir / f"redis-{p}.log") for p in ports)
            raise RuntimeError(f"cluster nodes did not start:\n{logs}")
        time.sleep(POLL_S)
    addresses = [f"127.0.0.1:{p}" for p in ports]
    create = ["redis-cli", "--cluster", "create", *addresses, "--cluster-replicas", "0"]
    subprocess.run(
        [*create, "--cluster-yes"],
        check=True,
        capture_output=True,
    )
    while not all(_cluster_ok(p) for p in ports):
        if time.monotonic() > deadline:
            raise RuntimeError("the cluster did not reach cluster_state:ok")
        time.sleep(POLL_S)
    return ports, nodes


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def _cluster_ok(port: int) -> bool:
    info = redis.Redis(port=port, socket_timeout=1).execute_command("CLUSTER", "INFO")
    return b"cluster_state:ok" in info


def _owners(port: int) -> list[tuple[int, int, int]]:
    slots = redis.Redis(port=port).execute_command("CLUSTER", "SLOTS")
    return [(int(s[0]), int(s[1]), int(s[2][1])) for s in slots]


def _queues(ports: list[int], spread: bool) -> list[str]:
    """Three queue names: one per master (``spread``), or all three on the first master."""
    owners = _owners(ports[0])

    def owner(name: str) -> int:
        slot = key_slot(name.encode())
        return next(p for start, end, p in owners if start <= slot <= end)

    wanted = list(ports) if spread else [ports[0]] * MASTERS
    names: list[str] = []
    n = 0
    for port in wanted:
        while owner(f"bench:q{n}") != port:
            n += 1
        names.append(f"bench:q{n}")
        n += 1
    return names


def _run(url: str, queues: list[str], tasks: int, workdir: Path) -> float:
    settings = QueueSettings(max_queue_length=max(tasks * 2, 10_000))
    for queue in queues:
        with TaskProducer(url, queue, settings) as producer:
            producer.clear_queue()
            for start in range(0, tasks, ENQUEUE_CHUNK):
                count = min(ENQUEUE_CHUNK, tasks - start)
                producer.enqueue_many([_payload() for _ in range(count)])
    clients = [(make_client(url, settings, queue=q), KeySpace(q)) for q in queues]
    started = time.monotonic()
    command = [sys.executable, "-m", "semibot_queue", "worker", "bench.cluster:noop"]
    command += ["--log-level", "WARNING", "--concurrency", str(CONCURRENCY)]
    workers = [
        spawn(
            [*command, "--redis-url", url, "--queue", q],
            workdir / f"worker-{q.replace(':', '_')}.log",
        )
        for q in queues
    ]
    try:
        while not all(_drained(client, keys, settings) for client, keys in clients):
            if time.monotonic() - started > DRAIN_TIMEOUT_S:
                raise RuntimeError("the queues did not drain in time")
            time.sleep(POLL_S)
        return len(queues) * tasks / (time.monotonic() - started)
    finally:
        for worker in workers:
            stop(worker)
        for client, _ in clients:
            client.close()


def _drained(client: redis.Redis, keys: KeySpace, settings: QueueSettings) -> bool:
    snapshot = collect(client, keys, settings)
    return snapshot["pending"] == 0 and snapshot["in_flight"] == 0


def _payload() -> TaskPayload:
    return TaskPayload(
        session_id="bench", agent_id="a", org_id="o", messages=[{"role": "user", "content": "x"}]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run both layouts ``--runs`` times; print the medians as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench cluster", description=__doc__)
    parser.add_argument("--tasks", type=int, default=5000, help="tasks per queue per run")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-cluster-") as tmp:
        workdir = Path(tmp)
        ports, nodes = _start_cluster(workdir)
        url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
        try:
            figures: dict[str, list[float]] = {"one_master": [], "three_masters": []}
            for _ in range(args.runs):
                for layout, spread in (("one_master", False), ("three_masters", True)):
                    rate = _run(url, _queues(ports, spread), args.tasks, workdir)
                    figures[layout].append(round(rate))
                    print(f"{layout}: {rate:.0f} tasks/s", file=sys.stderr)
        finally:
            for node in nodes:
                stop(node)
    medians = {k: statistics.median(v) for k, v in figures.items()}
    print(json.dumps({"runs": figures, "median_tasks_per_s": medians}, indent=2))
    return 0
