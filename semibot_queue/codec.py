"""JSON in and out of Redis, through one cattrs converter per codec.

Only JSON crosses Redis. What is encoded is first copied into plain JSON values and
validated as that copy (:mod:`semibot_queue.json_values`), so what was checked is what is
written. Any decoding or validation failure becomes an InvalidTaskError whose message
names the field path and what was wrong.

Tasks are stored as plain JSON objects, as the Semibot runtime pushed them: its bodies
(``metadata.enqueued_at`` an ISO-8601 string, no counters, ``null`` config or metadata)
decode as well as ours. Results keep the key ``result`` its waiters read; for a failed or
cancelled task that key holds ``{"error": "<text>"}``.
"""

from __future__ import annotations

import hashlib
import math
import re
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, TypeVar

import attrs
import cattrs

from semibot_queue.constants import CANCELLED_ERROR, MAX_NAME_LENGTH
from semibot_queue.converters import describe, fields_of, strict_converter
from semibot_queue.error_text import describe_error, format_traceback
from semibot_queue.errors import InvalidTaskError
from semibot_queue.json_values import (
    NotJsonError,
    TooLargeError,
    find_unencodable_text,
    plain,
)
from semibot_queue.json_values import dumps as _dumps
from semibot_queue.json_values import loads as _loads
from semibot_queue.models import DeadLetterRecord, TaskMessage, TaskPayload, TaskResult

__all__ = [
    "Codec",
    "cancelled_result",
    "describe_error",  # defined in error_text; found here by the outcome code
    "fields_of",
    "format_traceback",
    "task_id_of",
]

T = TypeVar("T")

#: Appended to a ``last_error`` shortened to keep a retry copy within MAX_PAYLOAD_BYTES.
_SHORTENED = " [...]"

#: Exact types whose values are immutable JSON values as they are (floats are not: NaN).
_IMMUTABLE = frozenset({str, int, bool, type(None)})

#: What follows the first ``"task_id"`` key of a body: the id, as lib_task_id.lua reads it.
_TASK_ID_VALUE = re.compile(rb'\s*:\s*"([A-Za-z0-9_.:\-]+)"')


def task_id_of(body: bytes) -> str:
    """The task id of a stored task, found as the Lua scripts find it (lib_task_id.lua):
    the first ``"task_id": "<name>"`` of the body, else ``raw-<sha1 of the body>``."""
    start = body.find(b'"task_id"')
    while start >= 0:
        match = _TASK_ID_VALUE.match(body, start + 9)
        if match is not None and len(match.group(1)) <= MAX_NAME_LENGTH:
            return match.group(1).decode("ascii")
        start = body.find(b'"task_id"', start + 9)
    return "raw-" + hashlib.sha1(body, usedforsecurity=False).hexdigest()


def cancelled_result(
    task_id: str, session_id: str, *, attempts: int = 0, duration_s: float = 0.0
) -> TaskResult:
    """The result of a cancelled task, finished now: status ``cancelled``, error
    CANCELLED_ERROR (``{"error": "cancelled"}`` under ``result`` on the wire).
    ``attempts`` is 0 for a task cancelled before it ran, else the attempts it had."""
    return TaskResult(
        task_id=task_id,
        session_id=session_id,
        status="cancelled",
        error=CANCELLED_ERROR,
        attempts=attempts,
        duration_s=duration_s,
        finished_at=time.time(),
    )


# --- the Semibot runtime's task shape -------------------------------------------------------


#: The fraction of a second in an ISO-8601 time.
_FRACTION = re.compile(r"\.(\d+)")


def _epoch(value: object) -> float | None:
    """Unix seconds of an ISO-8601 time (naive means UTC) or of a number; None if neither."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value) if math.isfinite(value) else None
    if not isinstance(value, str):
        return None
    text = value[:-1] + "+00:00" if value.endswith(("Z", "z")) else value
    # Python 3.10 reads only 3 or 6 digits of a second's fraction: give it 6.
    text = _FRACTION.sub(lambda m: "." + (m.group(1) + "000000")[:6], text, count=1)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _as_stored(data: Any) -> Any:
    """Read a task the Semibot runtime pushed as one of ours: ``null`` config or metadata
    is empty, and ``enqueued_at`` comes from ``metadata.enqueued_at`` when not given."""
    if not isinstance(data, dict):
        return data
    for name in ("config", "metadata"):
        if name in data and data[name] is None:
            data[name] = {}
    if data.get("enqueued_at") is None:
        metadata = data.get("metadata")
        when = _epoch(metadata.get("enqueued_at")) if isinstance(metadata, dict) else None
        data["enqueued_at"] = 0.0 if when is None else when
    return data


# --- the codec --------------------------------------------------------------------------------


class Codec:
    """Encodes and decodes every model; owns its cattrs converters."""

    def __init__(self, max_payload_bytes: int) -> None:
        self._max_payload_bytes = max_payload_bytes
        self._converter = strict_converter(forbid_extra_keys=False)
        self._closed = strict_converter(forbid_extra_keys=True)
        #: A payload's fields with their validators, run on the copy a new task writes.
        self._payload_checks = [
            (field.name, field.validator, field)
            for field in attrs.fields(TaskPayload)
            if field.validator is not None
        ]

    # --- tasks ---------------------------------------------------------------

    def encode_new(self, payload: TaskPayload, enqueued_at: float) -> bytes:
        """JSON bytes of the never-delivered TaskMessage of ``payload``.

        The same bytes as ``encode_message(TaskMessage.from_payload(...))``, and checked
        as strictly: every validator of the payload's fields runs on the copy that is
        written. Only the message is not built (the enqueue hot path): its other fields
        are this codec's own constants and ``enqueued_at``, a finite float.
        """
        fields = _fields(payload)
        # The top-level dict is this call's own: only its values need copying, and a
        # value of an exact immutable JSON type is its own copy.
        for name, value in fields.items():
            if type(value) not in _IMMUTABLE:
                fields[name] = self._copied(value, name, payload.task_id)
        fields.update(enqueued_at=enqueued_at, retry_count=0, delivery_count=0, last_error=None)
        self._check_payload(fields)
        return self._dumped(fields, payload.task_id)

    def _copied(self, value: Any, name: str, task_id: str) -> Any:
        """``plain(value)`` under the payload limit, its errors as InvalidTaskError."""
        try:
            return plain(value, self._max_payload_bytes)
        except TooLargeError:
            raise InvalidTaskError(
                f"task {task_id}: encoded size exceeds MAX_PAYLOAD_BYTES"
                f" ({self._max_payload_bytes})"
            ) from None
        except NotJsonError as exc:
            raise InvalidTaskError(f"{exc.where(name)}: not JSON-serialisable ({exc})") from None

    def _check_payload(self, data: dict[str, Any]) -> None:
        for name, validator, field in self._payload_checks:
            validator(None, field, data[name])

    def encode_message(self, message: TaskMessage) -> bytes:
        """JSON bytes of ``message``; refuses what is not JSON or is too large."""
        return self._encode_task(_fields(message), message.task_id, _check_message)

    def encode_retry(self, message: TaskMessage) -> bytes:
        """JSON bytes of the copy of a task stored for its next attempt.

        Its ``last_error`` is shortened, to nothing at worst, when it would take the copy
        over MAX_PAYLOAD_BYTES: a task that fitted once always fits again. Raises
        InvalidTaskError only for a task that is itself not encodable.
        """
        try:
            return self.encode_message(message)
        except InvalidTaskError:
            if not message.last_error:
                raise
        error = message.last_error
        bare = self.encode_message(attrs.evolve(message, last_error=None))
        keep = max(self._max_payload_bytes - len(bare), 0)  # characters: at most bytes
        while keep > 0:
            shortened = error[:keep] + _SHORTENED
            try:
                return self.encode_message(attrs.evolve(message, last_error=shortened))
            except InvalidTaskError:
                keep //= 2
        return bare

    def _encode_task(
        self, fields: dict[str, Any], task_id: str, check: Callable[[dict[str, Any]], None]
    ) -> bytes:
        """Copy, ``check`` the copy (raises InvalidTaskError), and encode that same copy."""
        try:
            data = plain(fields, self._max_payload_bytes)
        except TooLargeError:
            raise InvalidTaskError(
                f"task {task_id}: encoded size exceeds MAX_PAYLOAD_BYTES"
                f" ({self._max_payload_bytes})"
            ) from None
        except NotJsonError as exc:
            raise InvalidTaskError(f"{exc.where()}: not JSON-serialisable ({exc})") from None
        check(data)  # the validators, run on the very copy that is written
        return self._dumped(data, task_id)

    def _dumped(self, data: dict[str, Any], task_id: str) -> bytes:
        """JSON bytes of the plain copy ``data`` of a task, within MAX_PAYLOAD_BYTES."""
        try:
            raw = _dumps(data)
        except UnicodeEncodeError:
            where = find_unencodable_text(data)
            raise InvalidTaskError(f"{where}: not JSON-serialisable (not UTF-8 text)") from None
        except ValueError as exc:  # an int too long to write as text
            raise InvalidTaskError(f"task {task_id}: not JSON-serialisable ({exc})") from None
        if len(raw) > self._max_payload_bytes:
            raise InvalidTaskError(
                f"task {task_id}: encoded size {len(raw)} bytes exceeds"
                f" MAX_PAYLOAD_BYTES ({self._max_payload_bytes})"
            )
        return raw

    def decode_message(self, raw: bytes) -> TaskMessage:
        """The TaskMessage stored in ``raw`` (ours or the Semibot runtime's)."""
        self._check_size(raw)
        return self._structure(_as_stored(_loads(raw)), TaskMessage)

    def decode_delivery(self, body: bytes, redelivered: int) -> TaskMessage:
        """The TaskMessage a worker just took. Its ``delivery_count`` is the count stored
        in the body, plus ``redelivered`` (earlier deliveries lost to dead workers or given
        back by stopping ones, kept outside the body), plus one for this take."""
        self._check_size(body)
        data = _as_stored(_loads(body))
        if isinstance(data, dict):
            previous = data.get("delivery_count", 0)
            if isinstance(previous, int) and not isinstance(previous, bool) and previous >= 0:
                data["delivery_count"] = previous + redelivered + 1
        return self._structure(data, TaskMessage)

    def _check_size(self, raw: bytes) -> None:
        if len(raw) > self._max_payload_bytes:
            raise InvalidTaskError(
                f"payload of {len(raw)} bytes exceeds MAX_PAYLOAD_BYTES ({self._max_payload_bytes})"
            )

    def message_from_dict(self, data: Any) -> TaskMessage:
        """A TaskMessage from JSON-like data (a dead letter's kept task)."""
        return self._structure(
            _as_stored(dict(data) if isinstance(data, dict) else data), TaskMessage
        )

    def payload_from_dict(self, data: Any) -> TaskPayload:
        """A TaskPayload from a JSON-like mapping (the command line's ``--json``).

        Unknown keys are refused by name (a typo must not pass silently); ``null`` config
        or metadata is empty.
        """
        try:
            copied = plain(data, self._max_payload_bytes)
        except NotJsonError as exc:
            raise InvalidTaskError(f"{exc.where()}: not JSON-serialisable ({exc})") from None
        if isinstance(copied, dict):
            for name in ("config", "metadata"):
                if name in copied and copied[name] is None:
                    copied[name] = {}
        return self._structure(copied, TaskPayload, self._closed)

    # --- results and dead letters -----------------------------------------

    def encode_result(self, result: TaskResult) -> bytes:
        """JSON bytes of ``result`` in the wire format (see the module docstring).

        Whatever the handler returned, this raises nothing but InvalidTaskError, naming
        what was wrong: a value JSON cannot carry (or whose methods raise), a key that is
        not a string, NaN, nesting deeper than MAX_JSON_DEPTH, more than MAX_PAYLOAD_BYTES.
        """
        task = _shown_id(result)
        data = _fields(result)
        try:
            if result.status == "succeeded":
                value = result.result
                value = self.unstructure(value) if attrs.has(type(value)) else value
            else:
                value = {"error": result.status if result.error is None else result.error}
            # Only the value is walked: the other fields are the worker's own plain values
            # (json.dumps refuses anything else, caught below).
            data["result"] = plain(value, self._max_payload_bytes)
            raw = _dumps(data)
        except NotJsonError as exc:
            raise InvalidTaskError(f"result of task {task}: {exc.where('result')}: {exc}") from None
        except UnicodeEncodeError:
            where = find_unencodable_text(data)
            raise InvalidTaskError(f"result of task {task}: {where}: not UTF-8 text") from None
        except BaseException as exc:  # noqa: BLE001 - whatever a returned object does is "bad"
            raise InvalidTaskError(
                f"result of task {task}: cannot be encoded ({describe_error(exc)})"
            ) from None
        if len(raw) > self._max_payload_bytes:
            raise InvalidTaskError(
                f"result of task {task}: encoded size {len(raw)} bytes exceeds"
                f" MAX_PAYLOAD_BYTES ({self._max_payload_bytes})"
            )
        return raw

    def decode_result(self, raw: bytes) -> TaskResult:
        """The TaskResult stored or published as ``raw``."""
        data = _loads(raw)
        if isinstance(data, dict) and data.get("status") in ("failed", "cancelled"):
            wire = data.get("result")
            if "error" not in data and isinstance(wire, dict):
                data["error"] = wire.get("error")
            data["result"] = None
        return self._structure(data, TaskResult)

    def encode_record(self, record: DeadLetterRecord) -> bytes:
        """JSON bytes of a dead-letter record; text UTF-8 cannot carry is escaped."""
        try:
            copied = plain(self._converter.unstructure(record))
        except NotJsonError as exc:
            raise InvalidTaskError(
                f"dead letter of task {record.task_id}: {exc.where()}: {exc}"
            ) from None
        try:
            return _dumps(copied)
        except UnicodeEncodeError:
            return _dumps(copied, ascii_only=True)

    def decode_record(self, raw: bytes) -> DeadLetterRecord:
        """The DeadLetterRecord stored as ``raw``."""
        return self._structure(_loads(raw), DeadLetterRecord)

    def unstructure(self, value: Any) -> Any:
        """Plain JSON-ready data of any model."""
        return self._converter.unstructure(value)

    def _structure(self, data: Any, cls: type[T], converter: cattrs.Converter | None = None) -> T:
        if not isinstance(data, dict):
            raise InvalidTaskError(
                f"{cls.__name__}: expected a JSON object, got {type(data).__name__}"
            )
        try:
            return (converter or self._converter).structure(data, cls)
        except cattrs.ClassValidationError as exc:
            messages = cattrs.transform_error(exc, path=cls.__name__, format_exception=describe)
            details = "; ".join(messages)
            raise InvalidTaskError(details) from None


def _check_message(data: dict[str, Any]) -> None:
    """A TaskMessage's validators, run on ``data``."""
    TaskMessage(**data)


def _fields(instance: Any) -> dict[str, Any]:
    """A model's fields by name, in order, the values as they are (not copied); fields
    that are not constructor arguments (a message's cancel flag) are not data."""
    return {
        field.name: getattr(instance, field.name)
        for field in attrs.fields(type(instance))
        if field.init
    }


def _shown_id(result: TaskResult) -> str:
    task_id = result.task_id
    return str.__str__(task_id)[:MAX_NAME_LENGTH] if isinstance(task_id, str) else "?"
