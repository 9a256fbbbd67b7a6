"""The attrs models that cross Redis: what producers enqueue, workers run and waiters get.

Models validate their own fields on construction and raise InvalidTaskError naming
the field; they do no I/O. :mod:`semibot_queue.codec` turns them into JSON and back.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal

import attrs

from semibot_queue.constants import MAX_NAME_LENGTH
from semibot_queue.errors import InvalidTaskError
from semibot_queue.keys import is_valid_name

Status = Literal["succeeded", "failed"]
STATUSES: tuple[Status, ...] = ("succeeded", "failed")


def _non_empty_text(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidTaskError(f"{attribute.name}: must be a non-empty string, got {value!r}")


def _messages(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, list):
        raise InvalidTaskError(
            f"{attribute.name}: must be a list of {{'role': str, 'content': str}},"
            f" got {type(value).__name__}"
        )
    for index, item in enumerate(value):
        where = f"{attribute.name}[{index}]"
        if not isinstance(item, dict) or set(item) != {"role", "content"}:
            raise InvalidTaskError(
                f"{where}: must be a mapping with exactly 'role' and 'content', got {item!r}"
            )
        for key in ("role", "content"):
            if not isinstance(item[key], str):
                raise InvalidTaskError(
                    f"{where}.{key}: must be a string, got {type(item[key]).__name__}"
                )


def _mapping(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        raise InvalidTaskError(f"{attribute.name}: must be a mapping with string keys")


def _count(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidTaskError(f"{attribute.name}: must be a whole number >= 0, got {value!r}")


def _task_id(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not is_valid_name(value):
        raise InvalidTaskError(
            f"{attribute.name}: must be 1 to {MAX_NAME_LENGTH} of A-Z a-z 0-9 _ . : -,"
            f" got {value!r}"
        )


def _new_task_id() -> str:
    return str(uuid.uuid4())


@attrs.frozen(kw_only=True)
class TaskPayload:
    """What a producer enqueues: one agent run for one session.

    ``messages`` is a list of ``{"role": str, "content": str}``; ``config`` and
    ``metadata`` must be JSON-serialisable mappings.
    """

    session_id: str = attrs.field(validator=_non_empty_text)
    agent_id: str = attrs.field(validator=_non_empty_text)
    org_id: str = attrs.field(validator=_non_empty_text)
    messages: list[dict[str, str]] = attrs.field(validator=_messages)
    config: dict[str, Any] = attrs.field(factory=dict, validator=_mapping)
    metadata: dict[str, Any] = attrs.field(factory=dict, validator=_mapping)
    task_id: str = attrs.field(factory=_new_task_id, validator=_task_id)


@attrs.frozen(kw_only=True)
class TaskMessage(TaskPayload):
    """What a handler receives: the payload plus its delivery history.

    ``retry_count`` counts retries after handler errors; ``delivery_count`` counts how
    many times a worker has taken the task (more than ``retry_count + 1`` means a
    worker died holding it); ``last_error`` is the error of the previous attempt.
    """

    enqueued_at: float = attrs.field(default=0.0)
    retry_count: int = attrs.field(default=0, validator=_count)
    delivery_count: int = attrs.field(default=0, validator=_count)
    last_error: str | None = attrs.field(default=None)

    @classmethod
    def from_payload(cls, payload: TaskPayload, enqueued_at: float) -> TaskMessage:
        """The message a producer stores for ``payload``, never delivered yet."""
        return cls(**attrs.asdict(payload, recurse=False), enqueued_at=enqueued_at)


def _status(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value not in STATUSES:
        raise InvalidTaskError(f"{attribute.name}: must be one of {STATUSES}, got {value!r}")


@attrs.frozen(kw_only=True)
class TaskResult:
    """The final outcome of a task, stored for RESULT_TTL and published to its session."""

    task_id: str
    session_id: str
    status: Status = attrs.field(validator=_status)
    result: Any = None
    error: str | None = None
    attempts: int = 1
    duration_s: float = 0.0
    finished_at: float = 0.0


RawEncoding = Literal["utf-8", "base64"]


@attrs.frozen(kw_only=True)
class DeadLetterRecord:
    """A task that ended in the dead-letter queue, with why and when.

    ``message`` is the task as it was last stored; a payload that could not be parsed
    has ``message=None`` and keeps its bytes in ``raw`` (base64 when not UTF-8).
    ``reason`` is one of ``exhausted``, ``permanent``, ``invalid`` or ``poison``.
    """

    task_id: str
    reason: str
    error_type: str
    error: str
    traceback: str | None = None
    attempts: int = 0
    delivery_count: int = 0
    enqueued_at: float | None = None
    failed_at: float = 0.0
    worker_id: str | None = None
    message: dict[str, Any] | None = None
    raw: str | None = None
    raw_encoding: RawEncoding | None = None
