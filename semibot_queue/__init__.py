"""semibot_queue: a hardened, synchronous Redis task queue.

Producers enqueue agent tasks, workers run them on a bounded thread pool, results come
back over Redis pub/sub; nothing accepted is ever lost and every failure ends in a
dead-letter queue that operators can inspect and replay. ``run_workers`` runs several
worker processes of one ``module:function`` handler under a supervisor.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from semibot_queue.consumer import TaskConsumer
from semibot_queue.dead_letter import DeadLetterQueue
from semibot_queue.errors import (
    DuplicateTaskError,
    InvalidTaskError,
    PermanentTaskError,
    QueueConfigurationError,
    QueueConnectionError,
    QueueError,
    QueueFullError,
    QueueOutOfMemoryError,
    RedisCommandError,
    SettingsError,
    TaskTimeoutError,
)
from semibot_queue.models import (
    DeadLetterRecord,
    TaskMessage,
    TaskPayload,
    TaskResult,
    TaskStatus,
)
from semibot_queue.producer import TaskProducer
from semibot_queue.settings import QueueSettings
from semibot_queue.supervisor import RestartPolicy, run_workers

try:
    __version__ = version("semibot-queue")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0+unknown"

__all__ = [
    "DeadLetterQueue",
    "DeadLetterRecord",
    "DuplicateTaskError",
    "InvalidTaskError",
    "PermanentTaskError",
    "QueueConfigurationError",
    "QueueConnectionError",
    "QueueError",
    "QueueFullError",
    "QueueOutOfMemoryError",
    "QueueSettings",
    "RedisCommandError",
    "RestartPolicy",
    "SettingsError",
    "TaskConsumer",
    "TaskMessage",
    "TaskPayload",
    "TaskProducer",
    "TaskResult",
    "TaskStatus",
    "TaskTimeoutError",
    "run_workers",
]
