"""Handlers that ``semibot-queue worker cli_handlers:<name>`` loads in the command-line tests.

The tests put ``tests/`` on the worker's PYTHONPATH, so these are importable by module path
exactly as a user's own handler module would be.
"""

from __future__ import annotations

import threading
from typing import Any

from semibot_queue import PermanentTaskError, TaskMessage

#: Not a handler: ``worker cli_handlers:NOT_CALLABLE`` must be refused.
NOT_CALLABLE = 42


def echo(message: TaskMessage) -> dict[str, Any]:
    """Succeed with the agent id and the last message's text."""
    last = message.messages[-1]["content"] if message.messages else None
    return {"agent": message.agent_id, "echo": last}


def reject(message: TaskMessage) -> None:
    """Refuse every task for good, so it is dead-lettered on its first attempt."""
    raise PermanentTaskError(f"cannot handle task {message.task_id}")


def by_kind(message: TaskMessage) -> str:
    """Behave as ``metadata["kind"]`` says: ``ok``, ``flaky`` (fails its first attempt) or
    ``permanent`` (refused for good)."""
    kind = message.metadata.get("kind", "ok")
    if kind == "permanent":
        raise PermanentTaskError(f"task {message.task_id} refused")
    if kind == "flaky" and message.retry_count == 0:
        raise RuntimeError("the model endpoint timed out")
    return kind


def hang(message: TaskMessage) -> None:
    """Run far longer than any test waits: the worker must give the task back on SIGTERM."""
    threading.Event().wait(600)
    raise RuntimeError(f"task {message.task_id} outlived its test")
