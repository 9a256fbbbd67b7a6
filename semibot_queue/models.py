"""The attrs models that cross Redis: what producers enqueue, workers run and waiters get.

Models validate their own fields on construction and raise InvalidTaskError naming
the field; they do no I/O. :mod:`semibot_queue.codec` turns them into JSON and back.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any, Literal

import attrs

from semibot_queue.constants import MAX_NAME_LENGTH
from semibot_queue.errors import InvalidTaskError
from semibot_queue.keys import is_valid_name

Status = Literal["succeeded", "failed", "cancelled"]
STATUSES: tuple[Status, ...] = ("succeeded", "failed", "cancelled")

#: Where a task is, as ``TaskProducer.status(task_id)`` answers (None: an id the queue does
#: not know, or whose result has expired). ``pending``: waiting for a worker; ``scheduled``:
#: waiting for its delay or its next retry; ``running``: taken by a worker; ``succeeded``,
#: ``failed``, ``cancelled``: its result is stored; ``dead``: in the dead-letter queue.
TaskStatus = Literal["pending", "scheduled", "running", "succeeded", "failed", "dead", "cancelled"]
# Shown as this package's own, documented name (help(), the exported-names check).
TaskStatus.__module__ = __name__  # type: ignore[misc]
TaskStatus.__doc__ = """What ``TaskProducer.status(task_id)`` answers (None: an unknown id).

``pending`` waits for a worker; ``scheduled`` waits for its delay or its next retry;
``running`` is taken by a worker; ``succeeded``, ``failed`` and ``cancelled`` have their
result stored (for RESULT_TTL); ``dead`` is in the dead-letter queue.
"""
TASK_STATUSES: tuple[TaskStatus, ...] = (
    "pending",
    "scheduled",
    "running",
    "succeeded",
    "failed",
    "dead",
    "cancelled",
)

#: Characters of a bad value shown in a validation error.
_SHOWN_CHARS = 80

#: The variant digit (binary 10xx) of a UUID for each random hex digit.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}

#: Keys of one message: exactly "role" and "content".
_MESSAGE_KEYS = 2


def _shown(value: object) -> str:
    """A short repr of ``value`` for an error message; never raises."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails is named by its type
        return f"a {type(value).__name__}"
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def _non_empty_text(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not value:
        raise InvalidTaskError(f"{attribute.name}: must be a non-empty string, got {_shown(value)}")


def _messages(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, list):
        raise InvalidTaskError(
            f"{attribute.name}: must be a list of {{'role': str, 'content': str}},"
            f" got {type(value).__name__}"
        )
    for index, item in enumerate(value):
        if (
            type(item) is dict  # the common case, checked without building anything
            and len(item) == _MESSAGE_KEYS
            and type(item.get("role")) is str
            and type(item.get("content")) is str
        ):
            continue
        where = f"{attribute.name}[{index}]"
        if not isinstance(item, dict) or set(item) != {"role", "content"}:
            raise InvalidTaskError(
                f"{where}: must be a mapping with exactly 'role' and 'content', got {_shown(item)}"
            )
        for key in ("role", "content"):
            if not isinstance(item[key], str):
                raise InvalidTaskError(
                    f"{where}.{key}: must be a string, got {type(item[key]).__name__}"
                )


def _mapping(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, dict):
        raise InvalidTaskError(f"{attribute.name}: must be a mapping with string keys")
    for key in value:
        if type(key) is not str and not isinstance(key, str):
            raise InvalidTaskError(f"{attribute.name}: must be a mapping with string keys")


def _count(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidTaskError(
            f"{attribute.name}: must be a whole number >= 0, got {_shown(value)}"
        )


def _seconds(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidTaskError(f"{attribute.name}: must be a finite number, got {_shown(value)}")


def _time_limit(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise InvalidTaskError(
            f"{attribute.name}: must be a finite number of seconds > 0, or None,"
            f" got {_shown(value)}"
        )


def _optional_text(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and not isinstance(value, str):
        raise InvalidTaskError(f"{attribute.name}: must be a string or None, got {_shown(value)}")


def _task_id(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or not is_valid_name(value):
        raise InvalidTaskError(
            f"{attribute.name}: must be 1 to {MAX_NAME_LENGTH} of A-Z a-z 0-9 _ . : -,"
            f" got {_shown(value)}"
        )


def _new_task_id() -> str:
    """A random (version 4) UUID as text, as ``str(uuid.uuid4())`` writes it, made in a
    third of the time (one per task enqueued): 122 random bits, version and variant set."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:]}"


@attrs.frozen(kw_only=True)
class TaskPayload:
    """What a producer enqueues: one agent run for one session.

    ``messages`` is a list of ``{"role": str, "content": str}``; ``config`` and
    ``metadata`` must be JSON-serialisable mappings. What is enqueued is checked again
    when it is encoded, so changing these after construction cannot smuggle anything in.
    ``time_limit`` is this task's own limit in seconds (it travels with the task); None
    means the worker's TASK_TIME_LIMIT.
    ``task_id`` comes first so that it leads the stored JSON, where Lua scripts find it
    with a plain search.
    """

    task_id: str = attrs.field(factory=_new_task_id, validator=_task_id)
    session_id: str = attrs.field(validator=_non_empty_text)
    agent_id: str = attrs.field(validator=_non_empty_text)
    org_id: str = attrs.field(validator=_non_empty_text)
    messages: list[dict[str, str]] = attrs.field(validator=_messages)
    config: dict[str, Any] = attrs.field(factory=dict, validator=_mapping)
    metadata: dict[str, Any] = attrs.field(factory=dict, validator=_mapping)
    time_limit: float | None = attrs.field(default=None, validator=_time_limit)


@attrs.frozen(kw_only=True)
class TaskMessage(TaskPayload):
    """What a handler receives: the payload plus its delivery history.

    ``retry_count`` counts retries after handler errors; ``delivery_count`` counts how
    many times a worker has taken the task (more than ``retry_count + 1`` means a
    worker died holding it); ``last_error`` is the error of the previous attempt.

    ``cancel_requested()`` turns true while the handler runs when ``TaskProducer.cancel``
    was called for the task: a handler that checks it can stop early (whatever it then
    returns or raises, the task finishes ``cancelled``). The flag is not a field: it is
    neither compared, shown, copied by ``attrs.evolve`` nor written to Redis.
    """

    enqueued_at: float = attrs.field(default=0.0, validator=_seconds)
    retry_count: int = attrs.field(default=0, validator=_count)
    delivery_count: int = attrs.field(default=0, validator=_count)
    last_error: str | None = attrs.field(default=None, validator=_optional_text)
    _cancel: threading.Event = attrs.field(
        factory=threading.Event, init=False, eq=False, repr=False
    )

    def cancel_requested(self) -> bool:
        """Whether ``TaskProducer.cancel`` was asked for this task while it runs."""
        return self._cancel.is_set()

    def mark_cancel_requested(self) -> None:
        """Set the flag ``cancel_requested()`` reads. Called by the worker (its watcher
        sees the queue's cancel flag for a running task); handlers need not call it."""
        self._cancel.set()

    @classmethod
    def from_payload(cls, payload: TaskPayload, enqueued_at: float) -> TaskMessage:
        """The message a producer stores for ``payload``, never delivered yet."""
        return cls(**attrs.asdict(payload, recurse=False), enqueued_at=enqueued_at)


def _status(_: object, attribute: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str) or value not in STATUSES:
        raise InvalidTaskError(f"{attribute.name}: must be one of {STATUSES}, got {_shown(value)}")


def _outcome_value(instance: TaskResult, attribute: attrs.Attribute[Any], value: object) -> None:
    if value is not None and instance.status != "succeeded":
        raise InvalidTaskError(
            f"{attribute.name}: a {instance.status} task has no result value (its error"
            f" says why), got a {type(value).__name__}"
        )


@attrs.frozen(kw_only=True)
class TaskResult:
    """The final outcome of a task, stored for RESULT_TTL and published to its session.

    ``result`` is the handler's return value of a succeeded task and None otherwise. On
    the wire (the Semibot runtime's format) the key ``result`` of a failed or cancelled
    task holds ``{"error": "<text>"}``, so that the runtime's waiters tell a failure from
    a timeout; decoding gives this model back.
    """

    task_id: str
    session_id: str
    status: Status = attrs.field(validator=_status)
    result: Any = attrs.field(default=None, validator=_outcome_value)
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
    ``id`` is the record's own id, ``<task_id>#<n>``: every dead letter is a record of its
    own, so one task id may have several. It is set when a record is read back (Redis
    numbers the records); a record being written has ``id=None``.
    """

    id: str | None = None
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
