"""The handler that fault tests run in worker subprocesses, and the log of every run.

A task's ``config`` tells the handler how to behave, so one handler serves every fault:

- ``sleep``: seconds to sleep (default 0);
- ``slow`` and ``slow_deliveries``: sleep ``slow`` seconds instead while the task's
  ``delivery_count`` is at most ``slow_deliveries`` (default 1: only its first delivery);
- ``spin``: seconds of busy CPU work, holding the GIL as a CPU-bound agent would;
- ``die``: end the whole worker process with ``os._exit(DIE_STATUS)``, like a segfault or
  the OOM killer;
- ``fail``: raise ``RuntimeError`` (a retryable handler error).

Each run appends a ``start`` line and, if it gets that far, a ``done`` line of JSON to the
file named by ``$FAULT_RUNS_FILE``. The lines are written with ``O_APPEND`` by a single
``write`` each, so several worker processes can share the file, and a run that a crash
cut short still shows its ``start``: duplicates are visible.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from semibot_queue import TaskMessage

#: Environment variable naming the runs file of a test.
RUNS_FILE_ENV = "FAULT_RUNS_FILE"

#: Exit status of a worker process ended by a ``die`` task.
DIE_STATUS = 1


def record(event: str, message: TaskMessage) -> None:
    """Append one ``event`` line for ``message`` to the runs file (if one is configured)."""
    path = os.environ.get(RUNS_FILE_ENV)
    if not path:
        return
    line = {
        "event": event,
        "task_id": message.task_id,
        "delivery_count": message.delivery_count,
        "retry_count": message.retry_count,
        "pid": os.getpid(),
        "time": time.time(),
    }
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(line) + "\n").encode())
    finally:
        os.close(fd)


def read_runs(path: Path) -> list[dict[str, Any]]:
    """Every line of a runs file, in the order written (empty if nothing ran yet)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def _busy(seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    count = 0
    while time.perf_counter() < deadline:
        count += 1  # pure Python work: holds the GIL between switch intervals


def handle(message: TaskMessage) -> dict[str, Any]:
    """Behave as ``message.config`` says; return who ran it and which delivery it was."""
    behaviour = message.config
    record("start", message)
    if behaviour.get("die"):
        os._exit(DIE_STATUS)
    seconds = float(behaviour.get("sleep", 0.0))
    if "slow" in behaviour and message.delivery_count <= int(behaviour.get("slow_deliveries", 1)):
        seconds = float(behaviour["slow"])
    if seconds:
        time.sleep(seconds)
    _busy(float(behaviour.get("spin", 0.0)))
    if behaviour.get("fail"):
        raise RuntimeError(f"task {message.task_id} failed on purpose")
    record("done", message)
    return {"pid": os.getpid(), "delivery_count": message.delivery_count}
