"""JSON in and out of Redis, through one cattrs converter per codec.

Only JSON crosses Redis. Any decoding or validation failure becomes an
InvalidTaskError whose message names the field path and what was wrong.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, TypeVar

import attrs
import cattrs

from semibot_queue.errors import InvalidTaskError
from semibot_queue.keys import is_valid_name
from semibot_queue.models import DeadLetterRecord, TaskMessage, TaskPayload, TaskResult

T = TypeVar("T")

#: A task given back to pending carries a header: ``~C~<json>`` after C deliveries lost
#: to dead workers, ``~CrR~<json>`` when R more were given back by stopping workers.
_REDELIVERY = re.compile(rb"~(\d+)(?:r(\d+))?~")


def split_redelivery(raw: bytes) -> tuple[int, bytes]:
    """Return ``(deliveries lost, task bytes)`` of a stored task: lost to dead workers
    plus given back by stopping ones."""
    match = _REDELIVERY.match(raw)
    if match is None:
        return 0, raw
    return int(match.group(1)) + int(match.group(2) or 0), raw[match.end() :]


def task_id_of(stored: bytes) -> str:
    """The task id inside a stored task, or ``raw-<sha1>`` when it has none to read."""
    body = split_redelivery(stored)[1]
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    task_id = data.get("task_id") if isinstance(data, dict) else None
    if isinstance(task_id, str) and is_valid_name(task_id):
        return task_id
    return "raw-" + hashlib.sha1(body, usedforsecurity=False).hexdigest()


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


class Codec:
    """Encodes and decodes every model; owns its cattrs converter."""

    def __init__(self, max_payload_bytes: int) -> None:
        self._max_payload_bytes = max_payload_bytes
        self._converter = _strict_converter()

    # --- tasks ---------------------------------------------------------------

    def encode_new(self, payload: TaskPayload, enqueued_at: float) -> bytes:
        """JSON bytes of the never-delivered TaskMessage of ``payload``.

        The same bytes as ``encode_message(TaskMessage.from_payload(...))``, without
        building and validating that message again: the payload was validated when made.
        """
        data = self._converter.unstructure(payload)
        data.update(enqueued_at=enqueued_at, retry_count=0, delivery_count=0, last_error=None)
        return self._encode_task(data, payload.task_id)

    def encode_message(self, message: TaskMessage) -> bytes:
        """JSON bytes of ``message``; refuses what is not JSON or is too large."""
        return self._encode_task(self._converter.unstructure(message), message.task_id)

    def _encode_task(self, data: dict[str, Any], task_id: str) -> bytes:
        try:
            raw = _dumps(data)
        except (TypeError, ValueError) as exc:
            raise InvalidTaskError(_unserialisable(data, exc)) from None
        if len(raw) > self._max_payload_bytes:
            raise InvalidTaskError(
                f"task {task_id}: encoded size {len(raw)} bytes exceeds"
                f" MAX_PAYLOAD_BYTES ({self._max_payload_bytes})"
            )
        return raw

    def decode_message(self, raw: bytes) -> TaskMessage:
        """The TaskMessage stored in ``raw`` (without any redelivery header)."""
        if len(raw) > self._max_payload_bytes:
            raise InvalidTaskError(
                f"payload of {len(raw)} bytes exceeds MAX_PAYLOAD_BYTES ({self._max_payload_bytes})"
            )
        return self._structure(_loads(raw), TaskMessage)

    def decode_delivery(self, stored: bytes) -> TaskMessage:
        """The TaskMessage a worker just took, its ``delivery_count`` counting this take
        and every delivery lost to a dead worker (the ``~N~`` header)."""
        lost, body = split_redelivery(stored)
        if len(body) > self._max_payload_bytes:
            raise InvalidTaskError(
                f"payload of {len(body)} bytes exceeds MAX_PAYLOAD_BYTES"
                f" ({self._max_payload_bytes})"
            )
        data = _loads(body)
        if isinstance(data, dict):
            previous = data.get("delivery_count", 0)
            if isinstance(previous, int) and not isinstance(previous, bool) and previous >= 0:
                data["delivery_count"] = previous + lost + 1
        return self._structure(data, TaskMessage)

    def message_from_dict(self, data: Any) -> TaskMessage:
        """A TaskMessage from JSON-like data (a dead letter's kept task)."""
        return self._structure(data, TaskMessage)

    def payload_from_dict(self, data: Any) -> TaskPayload:
        """A TaskPayload from a JSON-like mapping (the command line's ``--json``)."""
        return self._structure(data, TaskPayload)

    # --- results and dead letters -----------------------------------------

    def encode_result(self, result: TaskResult) -> bytes:
        """JSON bytes of ``result``; a result that is not JSON raises InvalidTaskError."""
        data = self._converter.unstructure(result)
        try:
            return _dumps(data)
        except (TypeError, ValueError) as exc:
            raise InvalidTaskError(f"result of task {result.task_id}: {exc}") from None

    def decode_result(self, raw: bytes) -> TaskResult:
        """The TaskResult stored or published as ``raw``."""
        return self._structure(_loads(raw), TaskResult)

    def encode_record(self, record: DeadLetterRecord) -> bytes:
        """JSON bytes of a dead-letter record."""
        return _dumps(self._converter.unstructure(record))

    def decode_record(self, raw: bytes) -> DeadLetterRecord:
        """The DeadLetterRecord stored as ``raw``."""
        return self._structure(_loads(raw), DeadLetterRecord)

    def unstructure(self, value: Any) -> Any:
        """Plain JSON-ready data of any model."""
        return self._converter.unstructure(value)

    def _structure(self, data: Any, cls: type[T]) -> T:
        if not isinstance(data, dict):
            raise InvalidTaskError(
                f"{cls.__name__}: expected a JSON object, got {type(data).__name__}"
            )
        try:
            return self._converter.structure(data, cls)
        except cattrs.ClassValidationError as exc:
            messages = cattrs.transform_error(exc, path=cls.__name__, format_exception=_describe)
            details = "; ".join(messages)
            raise InvalidTaskError(details) from None


def _strict_converter() -> cattrs.Converter:
    """A converter that never coerces: ``5`` is not a session id, ``"x"`` is not a list.

    Containers pass through unchanged; the models' own validators check their items
    and name the offending index.
    """
    converter = cattrs.Converter()

    def exact(kind: type[Any], label: str) -> Any:
        def hook(value: Any, _: Any) -> Any:
            if isinstance(value, bool) or not isinstance(value, kind):
                raise TypeError(f"expected {label}, got {type(value).__name__}")
            return value

        return hook

    def number(value: Any, _: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"expected a number, got {type(value).__name__}")
        return float(value)

    converter.register_structure_hook(str, exact(str, "a string"))
    converter.register_structure_hook(int, exact(int, "a whole number"))
    converter.register_structure_hook(float, number)
    converter.register_structure_hook_func(
        lambda kind: kind == list[dict[str, str]], exact(list, "a list")
    )
    converter.register_structure_hook_func(
        lambda kind: kind in (dict[str, Any], dict[str, Any] | None), _mapping_or_none
    )
    return converter


def _describe(exc: BaseException, _: Any) -> str:
    if isinstance(exc, KeyError):
        return "required field missing"
    return str(exc) or type(exc).__name__


def _mapping_or_none(value: Any, kind: Any) -> Any:
    if value is None and kind != dict[str, Any]:
        return None
    if not isinstance(value, dict):
        raise TypeError(f"expected a JSON object, got {type(value).__name__}")
    return value


def _loads(raw: bytes) -> Any:
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise InvalidTaskError(f"payload is not UTF-8 text: {exc}") from None
    except json.JSONDecodeError as exc:
        raise InvalidTaskError(f"payload is not JSON: {exc}") from None


def _unserialisable(data: dict[str, Any], exc: Exception) -> str:
    for name in ("config", "metadata", "messages"):
        try:
            _dumps(data.get(name))
        except (TypeError, ValueError):
            return f"{name}: not JSON-serialisable ({exc})"
    return f"task is not JSON-serialisable ({exc})"


def fields_of(cls: type[Any]) -> list[str]:
    """Names of a model's fields, in order (for tables and documentation)."""
    return [field.name for field in attrs.fields(cls)]
